//! Nodes on both backends: a registration starts a new epoch and fences
//! the older one; leases are renewed and run out by the database's clock;
//! a node whose lease ran out past the grace is declared dead exactly once.

mod common;
use common::SqliteDb;
use nullspace_model::node::{NodeLabels, NodeStatus};
use nullspace_store::Store;
use nullspace_store::nodes::Registration;

fn labels() -> NodeLabels {
    NodeLabels {
        arch: "x86_64".into(),
        accel: "tcg".into(),
        qemu: "10.0.2".into(),
    }
}

async fn exercise(store: &Store) {
    let l = labels();
    let reg = |id: &'static str, lease_ms| Registration {
        id,
        url: "http://127.0.0.2:7101",
        max_machines: 8,
        memory_mib: 4096,
        labels: &l,
        lease_ms,
    };
    let before = store.db_now().await.unwrap();
    let a1 = store.register_node(&reg("node_a", 60_000)).await.unwrap();
    assert_eq!(a1.epoch, 1);
    assert!(
        a1.expires_at >= before + 60_000,
        "the lease runs from the database's now"
    );
    // A second process of the same node: a new epoch fences the first.
    let a2 = store.register_node(&reg("node_a", 60_000)).await.unwrap();
    assert_eq!(a2.epoch, 2);
    assert!(
        store
            .renew_node("node_a", 1, 60_000)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .renew_node("node_a", 2, 60_000)
            .await
            .unwrap()
            .is_some()
    );

    // Draining and back; a fenced epoch cannot change the status.
    assert!(
        !store
            .set_node_status("node_a", 1, NodeStatus::Ready, NodeStatus::Draining)
            .await
            .unwrap()
    );
    assert!(
        store
            .set_node_status("node_a", 2, NodeStatus::Ready, NodeStatus::Draining)
            .await
            .unwrap()
    );
    assert!(
        store
            .set_node_status("node_a", 2, NodeStatus::Draining, NodeStatus::Ready)
            .await
            .unwrap()
    );
    // An illegal transition is refused before the database.
    assert!(
        store
            .set_node_status("node_a", 2, NodeStatus::Dead, NodeStatus::Ready)
            .await
            .is_err()
    );

    // B's lease is short; once it ran out past the grace, B is dead, and
    // only one of two declarations returns it.
    store.register_node(&reg("node_b", 50)).await.unwrap();
    let nodes = store.nodes().await.unwrap();
    assert_eq!(nodes.len(), 2);
    assert!(nodes.iter().all(|n| n.labels == l));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let b = store.node("node_b").await.unwrap().unwrap();
    assert!(!b.live, "an expired lease reads as not live");
    assert!(store.node("node_a").await.unwrap().unwrap().live);
    let (d1, d2) = tokio::join!(store.declare_dead_nodes(100), store.declare_dead_nodes(100));
    let declared: Vec<String> = d1
        .unwrap()
        .into_iter()
        .chain(d2.unwrap())
        .map(|n| n.id)
        .collect();
    let b = store.node("node_b").await.unwrap().unwrap();
    assert_eq!(b.status, NodeStatus::Dead);
    assert_eq!(declared, vec!["node_b".to_string()], "declared once");
    assert!(store.declare_dead_nodes(100).await.unwrap().is_empty());
    // A dead node's process is fenced; its next start registers anew.
    assert!(
        store
            .renew_node("node_b", b.epoch, 60_000)
            .await
            .unwrap()
            .is_none()
    );
    let b2 = store.register_node(&reg("node_b", 60_000)).await.unwrap();
    assert_eq!(b2.epoch, b.epoch + 1);
    assert_eq!(
        store.node("node_b").await.unwrap().unwrap().status,
        NodeStatus::Ready
    );
    // A live node is never declared dead.
    assert!(store.declare_dead_nodes(0).await.unwrap().is_empty());
}

#[tokio::test]
async fn nodes_on_sqlite() {
    let db = SqliteDb::new();
    exercise(&db.open().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_postgres() {
    let pg = nullspace_testkit::server::Postgres::start();
    let store = Store::open(&pg.url).await.unwrap();
    exercise(&store).await;
}
