//! Volumes on both backends: names unique per namespace, one namespace
//! never sees another's, the lock (one read-write attachment, or read-only
//! ones, never both), delete refused while attached, detach releases.

use nullspace_store::{AttachOutcome, AttachmentRow, Store, VolumeRow};

mod common;
use common::SqliteDb;

fn vol(id: &str, ns: &str, name: &str) -> VolumeRow {
    VolumeRow {
        id: id.into(),
        namespace: ns.into(),
        name: name.into(),
        size_bytes: 1 << 30,
        created_at: 1,
        rw_holder: String::new(),
        ro_count: 0,
    }
}

fn att(id: &str, vol: &str, machine: &str, slot: i64, ro: bool) -> AttachmentRow {
    AttachmentRow {
        id: id.into(),
        volume_id: vol.into(),
        machine_id: machine.into(),
        namespace: "a".into(),
        slot,
        mount_path: "/data".into(),
        read_only: ro,
        subpath: String::new(),
        state: "attached".into(),
        last_error: String::new(),
        created_at: 1,
        updated_at: 1,
    }
}

async fn exercise(store: &Store) {
    assert!(store.insert_volume(&vol("v1", "a", "work")).await.unwrap());
    assert!(
        !store.insert_volume(&vol("v2", "a", "work")).await.unwrap(),
        "name taken"
    );
    assert!(
        store.insert_volume(&vol("v3", "b", "work")).await.unwrap(),
        "other namespace"
    );
    assert!(
        store.volume("b", "v1").await.unwrap().is_none(),
        "b sees a's volume"
    );
    assert_eq!(
        store.volume_by_name("a", "work").await.unwrap().unwrap().id,
        "v1"
    );
    assert_eq!(store.volumes("a").await.unwrap().len(), 1);
    // Another namespace cannot attach it either.
    let mut foreign = att("x", "v1", "m9", 0, false);
    foreign.namespace = "b".into();
    assert_eq!(
        store.attach_volume(&foreign).await.unwrap(),
        AttachOutcome::Gone
    );

    // Exclusive read-write.
    assert_eq!(
        store
            .attach_volume(&att("a1", "v1", "m1", 0, false))
            .await
            .unwrap(),
        AttachOutcome::Attached
    );
    for (id, m, ro) in [("a2", "m2", false), ("a3", "m2", true)] {
        assert_eq!(
            store.attach_volume(&att(id, "v1", m, 0, ro)).await.unwrap(),
            AttachOutcome::InUse {
                holder: "m1".into(),
                ro_count: 0
            },
            "{id}"
        );
    }
    assert!(
        !store.delete_volume("a", "v1").await.unwrap(),
        "deleted while attached"
    );
    assert!(store.volume("a", "v1").await.unwrap().is_some());
    assert!(store.detach_volume("a1").await.unwrap());
    assert!(!store.detach_volume("a1").await.unwrap(), "detached twice");

    // Shared read-only, and then no read-write.
    assert_eq!(
        store
            .attach_volume(&att("r1", "v1", "m1", 0, true))
            .await
            .unwrap(),
        AttachOutcome::Attached
    );
    assert_eq!(
        store
            .attach_volume(&att("r2", "v1", "m2", 1, true))
            .await
            .unwrap(),
        AttachOutcome::Attached
    );
    assert_eq!(
        store
            .attach_volume(&att("w", "v1", "m3", 0, false))
            .await
            .unwrap(),
        AttachOutcome::InUse {
            holder: String::new(),
            ro_count: 2
        }
    );
    // One machine, one slot: a second volume on slot 0 of m1 is a duplicate.
    store.insert_volume(&vol("v4", "a", "other")).await.unwrap();
    assert_eq!(
        store
            .attach_volume(&att("d", "v4", "m1", 0, false))
            .await
            .unwrap(),
        AttachOutcome::Duplicate
    );
    // ...and the failed attach left v4 unlocked.
    assert_eq!(
        store.volume("a", "v4").await.unwrap().unwrap().rw_holder,
        ""
    );
    assert_eq!(
        store.volume_attachments("v1", false).await.unwrap().len(),
        2
    );
    assert_eq!(
        store.volume_attachments("m2", true).await.unwrap()[0].id,
        "r2"
    );
    assert!(
        store
            .set_attachment_state("r2", "error", "not mounted", 5)
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .volume_attachment("r2")
            .await
            .unwrap()
            .unwrap()
            .last_error,
        "not mounted"
    );
    store.detach_volume("r1").await.unwrap();
    store.detach_volume("r2").await.unwrap();
    assert_eq!(store.volume("a", "v1").await.unwrap().unwrap().ro_count, 0);
    assert!(
        !store.delete_volume("b", "v1").await.unwrap(),
        "b deleted a's volume"
    );
    assert!(store.delete_volume("a", "v1").await.unwrap());
    assert!(store.volume("a", "v1").await.unwrap().is_none());
}

#[tokio::test]
async fn volumes_on_sqlite() {
    let db = SqliteDb::new();
    let store = db.open().await;
    exercise(&store).await;
}

#[tokio::test]
async fn volumes_on_postgres() {
    let pg = nullspace_testkit::server::Postgres::start();
    exercise(&Store::open(&pg.url).await.unwrap()).await;
}
