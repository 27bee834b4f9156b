//! Lifecycle events: append, list with filters and paging, replay after a
//! sequence number; on SQLite and on a real Postgres (the testkit's).

use nullspace_store::lifecycle::{PAGE_MAX, TEXT_MAX};
use nullspace_store::{LifecycleEvent, LifecycleFilter, Order, Store};

mod common;
use common::SqliteDb;

fn event(ns: &str, machine: &str, op: &str, status: &str, at: i64) -> LifecycleEvent {
    LifecycleEvent {
        namespace: ns.into(),
        machine_id: machine.into(),
        node_id: "node_a".into(),
        operation: op.into(),
        status: status.into(),
        actor_kind: "user".into(),
        occurred_at: at,
        metadata: "{}".into(),
        ..Default::default()
    }
}

fn ops(page: &nullspace_store::LifecyclePage) -> Vec<(String, String)> {
    page.events
        .iter()
        .map(|e| (e.event.machine_id.clone(), e.event.operation.clone()))
        .collect()
}

async fn exercise(store: &Store) {
    let head0 = store.lifecycle_head().await.unwrap();
    let t = 1_700_000_000_000;
    let mut seqs = vec![];
    for (i, (m, op, st)) in [
        ("mch_1", "create", "succeeded"),
        ("mch_1", "hibernate", "succeeded"),
        ("mch_2", "create", "failed"),
        ("mch_1", "resume_from_snapshot", "succeeded"),
        ("mch_1", "destroy", "succeeded"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut e = event("team-a", m, op, st, t + i as i64 * 1000);
        if st == "failed" {
            e.reason = "boot failed".into();
            e.error_code = "machine_error".into();
            e.error_message = "the VM did not start".into();
        }
        seqs.push(store.append_lifecycle_event(&e).await.unwrap());
    }
    // Another namespace's event is never listed for team-a.
    store
        .append_lifecycle_event(&event("team-b", "mch_1", "create", "succeeded", t))
        .await
        .unwrap();
    assert!(
        seqs.windows(2).all(|w| w[1] > w[0]),
        "sequence increases: {seqs:?}"
    );
    assert!(seqs[0] > head0);
    assert!(store.lifecycle_head().await.unwrap() > seqs[4]);

    let all = LifecycleFilter {
        namespace: "team-a",
        ..Default::default()
    };
    // Newest first by default, oldest first when asked.
    let page = store
        .lifecycle_events(&all, Order::Desc, 0, 50)
        .await
        .unwrap();
    assert_eq!(page.events.len(), 5);
    assert!(!page.has_more);
    assert_eq!(page.events[0].event.operation, "destroy");
    let page = store
        .lifecycle_events(&all, Order::Asc, 0, 50)
        .await
        .unwrap();
    assert_eq!(page.events[0].seq, seqs[0]);
    assert_eq!(page.events[0].event, {
        event("team-a", "mch_1", "create", "succeeded", t)
    });
    let failed = &page.events[2].event;
    assert_eq!(
        (
            failed.reason.as_str(),
            failed.error_code.as_str(),
            failed.error_message.as_str()
        ),
        ("boot failed", "machine_error", "the VM did not start")
    );

    // One machine, one operation, one status.
    let m1 = LifecycleFilter {
        machine_id: Some("mch_1"),
        ..all
    };
    let page = store
        .lifecycle_events(&m1, Order::Asc, 0, 50)
        .await
        .unwrap();
    assert_eq!(
        ops(&page),
        [
            ("mch_1".into(), "create".into()),
            ("mch_1".into(), "hibernate".into()),
            ("mch_1".into(), "resume_from_snapshot".into()),
            ("mch_1".into(), "destroy".into()),
        ]
    );
    let creates = LifecycleFilter {
        operation: Some("create"),
        ..all
    };
    let page = store
        .lifecycle_events(&creates, Order::Asc, 0, 50)
        .await
        .unwrap();
    assert_eq!(
        ops(&page),
        [
            ("mch_1".into(), "create".into()),
            ("mch_2".into(), "create".into())
        ]
    );
    let failures = LifecycleFilter {
        status: Some("failed"),
        ..all
    };
    let page = store
        .lifecycle_events(&failures, Order::Asc, 0, 50)
        .await
        .unwrap();
    assert_eq!(ops(&page), [("mch_2".into(), "create".into())]);

    // Time window, both ends inclusive.
    let window = LifecycleFilter {
        from: Some(t + 1000),
        to: Some(t + 3000),
        ..m1
    };
    let page = store
        .lifecycle_events(&window, Order::Asc, 0, 50)
        .await
        .unwrap();
    assert_eq!(
        ops(&page),
        [
            ("mch_1".into(), "hibernate".into()),
            ("mch_1".into(), "resume_from_snapshot".into())
        ]
    );

    // Paging: offset and limit, has_more until the last page.
    let p1 = store.lifecycle_events(&m1, Order::Asc, 0, 3).await.unwrap();
    assert_eq!(p1.events.len(), 3);
    assert!(p1.has_more);
    let p2 = store.lifecycle_events(&m1, Order::Asc, 3, 3).await.unwrap();
    assert_eq!(ops(&p2), [("mch_1".into(), "destroy".into())]);
    assert!(!p2.has_more);
    let past = store.lifecycle_events(&m1, Order::Asc, 9, 3).await.unwrap();
    assert!(past.events.is_empty() && !past.has_more);
    // A limit out of range is clamped, not an error.
    let p0 = store
        .lifecycle_events(&m1, Order::Asc, -5, 0)
        .await
        .unwrap();
    assert_eq!(p0.events.len(), 1);
    assert!(p0.has_more);

    // Replay: strictly after a sequence number, in order.
    let replay = LifecycleFilter {
        after_seq: Some(seqs[1]),
        ..m1
    };
    let page = store
        .lifecycle_events(&replay, Order::Asc, 0, 50)
        .await
        .unwrap();
    assert_eq!(
        page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [seqs[3], seqs[4]]
    );

    // Hostile sizes are clipped; bad metadata is replaced.
    let mut big = event("team-a", "mch_3", "create", "failed", t);
    big.reason = "é".repeat(TEXT_MAX);
    big.metadata = format!("{{\"k\":\"{}\"}}", "x".repeat(1 << 20));
    let seq = store.append_lifecycle_event(&big).await.unwrap();
    let page = store
        .lifecycle_events(
            &LifecycleFilter {
                machine_id: Some("mch_3"),
                ..all
            },
            Order::Asc,
            0,
            PAGE_MAX + 10,
        )
        .await
        .unwrap();
    assert_eq!(page.events[0].seq, seq);
    assert_eq!(page.events[0].event.reason.len(), TEXT_MAX);
    assert_eq!(page.events[0].event.metadata, "{}");

    // Pruning removes old events only.
    let n = store.prune_lifecycle_events(t + 2000).await.unwrap();
    assert!(n >= 3, "pruned {n}");
    let page = store
        .lifecycle_events(&m1, Order::Asc, 0, 50)
        .await
        .unwrap();
    assert_eq!(
        ops(&page),
        [
            ("mch_1".into(), "resume_from_snapshot".into()),
            ("mch_1".into(), "destroy".into())
        ]
    );
}

/// Concurrent appends get distinct, gap-free sequence numbers.
async fn concurrent_appends(store: &Store) {
    let before = store.lifecycle_head().await.unwrap();
    let mut tasks = vec![];
    for i in 0..40 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .append_lifecycle_event(&event(
                    "team-c",
                    &format!("mch_{i}"),
                    "create",
                    "succeeded",
                    i,
                ))
                .await
                .unwrap()
        }));
    }
    let mut seqs = vec![];
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    seqs.sort();
    assert_eq!(seqs, ((before + 1)..=(before + 40)).collect::<Vec<_>>());
}

#[tokio::test]
async fn lifecycle_on_sqlite() {
    let db = SqliteDb::new();
    let store = db.open().await;
    exercise(&store).await;
    concurrent_appends(&store).await;
    // Reopening keeps the events and the counter.
    let head = store.lifecycle_head().await.unwrap();
    drop(store);
    let store = db.open().await;
    assert_eq!(store.lifecycle_head().await.unwrap(), head);
    let next = store
        .append_lifecycle_event(&event("team-a", "mch_9", "create", "succeeded", 1))
        .await
        .unwrap();
    assert_eq!(next, head + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lifecycle_on_postgres() {
    let pg = nullspace_testkit::server::Postgres::start();
    let store = Store::open(&pg.url).await.unwrap();
    exercise(&store).await;
    concurrent_appends(&store).await;
}
