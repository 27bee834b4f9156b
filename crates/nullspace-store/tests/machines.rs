//! Machine, snapshot and idempotency-key queries, on SQLite and on a real
//! Postgres (Debian's postgresql 15, started by the testkit).

use nullspace_model::machine::MachineStatus as S;
use nullspace_store::machines::LIVE;
use nullspace_store::{Inserted, MachineRow, SnapshotRow, Store, now_ms};

mod common;
use common::SqliteDb;

fn machine(id: &str, ns: &str, created_at: i64) -> MachineRow {
    MachineRow {
        id: id.into(),
        namespace: ns.into(),
        node_id: "node_a".into(),
        status: S::Creating,
        template_id: "tmpl_1".into(),
        base_snapshot: String::new(),
        created_at,
        updated_at: created_at,
        deadline_at: 0,
        record: "{}".into(),
    }
}

async fn exercise(store: &Store) {
    let t0 = now_ms();
    // Idempotency: the second insert with the same key names the first.
    let m1 = machine("mch_1", "team-a", t0);
    assert_eq!(
        store
            .insert_machine_once(&m1, Some(("create", "k1")))
            .await
            .unwrap(),
        Inserted::New
    );
    let again = machine("mch_other", "team-a", t0);
    assert_eq!(
        store
            .insert_machine_once(&again, Some(("create", "k1")))
            .await
            .unwrap(),
        Inserted::Existing("mch_1".into())
    );
    assert!(
        store.machine("mch_other").await.unwrap().is_none(),
        "nothing inserted on a taken key"
    );
    // Keys are per namespace.
    let b = machine("mch_b", "team-b", t0 + 1);
    assert_eq!(
        store
            .insert_machine_once(&b, Some(("create", "k1")))
            .await
            .unwrap(),
        Inserted::New
    );
    store
        .release_idempotency_key("team-b", "create", "k1")
        .await
        .unwrap();
    assert!(
        store
            .idempotency_target("team-b", "create", "k1")
            .await
            .unwrap()
            .is_none()
    );
    for i in 2..=4 {
        store
            .insert_machine_once(&machine(&format!("mch_{i}"), "team-a", t0 + i), None)
            .await
            .unwrap();
    }

    // Transitions are gated on the current status.
    let mut m = store.machine("mch_1").await.unwrap().unwrap();
    m.status = S::Running;
    m.deadline_at = t0 - 1;
    assert!(store.update_machine(&m, &[S::Creating]).await.unwrap());
    m.status = S::Paused;
    assert!(!store.update_machine(&m, &[S::Creating]).await.unwrap());
    assert_eq!(
        store.machine("mch_1").await.unwrap().unwrap().status,
        S::Running
    );

    // Paging: oldest first, by (created_at, id).
    let p1 = store.machines_page("team-a", LIVE, 2, None).await.unwrap();
    assert_eq!(
        p1.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        ["mch_1", "mch_2"]
    );
    let last = p1.last().unwrap();
    let p2 = store
        .machines_page("team-a", LIVE, 10, Some((last.created_at, last.id.clone())))
        .await
        .unwrap();
    assert_eq!(
        p2.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        ["mch_3", "mch_4"]
    );
    let running = store
        .machines_page("team-a", &[S::Running], 10, None)
        .await
        .unwrap();
    assert_eq!(running.len(), 1);
    assert_eq!(
        store
            .machines_on_node("node_a", &[S::Creating])
            .await
            .unwrap()
            .len(),
        4,
        "mch_2..4 and team-b's"
    );
    let due = store.machines_due("node_a", t0).await.unwrap();
    assert_eq!(
        due.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        ["mch_1"]
    );

    // Snapshots in use are reported, by a machine or a layered snapshot.
    let s = |id: &str, parent: &str| SnapshotRow {
        id: id.into(),
        namespace: "team-a".into(),
        machine_id: "mch_1".into(),
        node_id: "node_a".into(),
        parent_id: parent.into(),
        created_at: now_ms(),
        record: "{}".into(),
    };
    store.insert_snapshot(&s("snap_1", "")).await.unwrap();
    store.insert_snapshot(&s("snap_2", "snap_1")).await.unwrap();
    assert!(
        store.snapshot_users("snap_1").await.unwrap().is_empty(),
        "a later snapshot is self-contained"
    );
    let mut m2 = store.machine("mch_2").await.unwrap().unwrap();
    m2.base_snapshot = "snap_2".into();
    assert!(store.update_machine(&m2, &[]).await.unwrap());
    assert_eq!(
        store.snapshot_users("snap_2").await.unwrap(),
        vec!["mch_2".to_string()]
    );
    m2.status = S::Destroyed;
    store.update_machine(&m2, &[]).await.unwrap();
    assert!(store.snapshot_users("snap_2").await.unwrap().is_empty());
    assert_eq!(
        store
            .snapshots("team-a", Some("mch_1"))
            .await
            .unwrap()
            .len(),
        2
    );
    assert!(store.snapshots("team-b", None).await.unwrap().is_empty());
    assert!(store.delete_snapshot("snap_2").await.unwrap());
    assert!(!store.delete_snapshot("snap_2").await.unwrap());
    assert_eq!(
        store
            .claim_idempotency_key("team-a", "fork:mch_1", "f1", "mch_9")
            .await
            .unwrap(),
        Inserted::New
    );
    assert_eq!(
        store
            .claim_idempotency_key("team-a", "fork:mch_1", "f1", "mch_10")
            .await
            .unwrap(),
        Inserted::Existing("mch_9".into())
    );
}

#[tokio::test]
async fn machines_on_sqlite() {
    let db = SqliteDb::new();
    let store = db.open().await;
    exercise(&store).await;
    // Reopening keeps everything (the schema is created only if missing).
    drop(store);
    let store = db.open().await;
    assert!(store.machine("mch_1").await.unwrap().is_some());
}

#[tokio::test]
async fn machines_on_postgres() {
    let pg = nullspace_testkit::server::Postgres::start();
    let store = Store::open(&pg.url).await.unwrap();
    exercise(&store).await;
}
