//! Preview grants on both backends: insert, list by machine and port, the
//! live count, revocation (once), and forgetting a machine's grants.

use nullspace_store::{PreviewGrantRow, Store};

mod common;
use common::SqliteDb;

fn grant(id: &str, machine: &str, port: u16, issued: i64, expires: i64) -> PreviewGrantRow {
    PreviewGrantRow {
        id: id.into(),
        namespace: "ns".into(),
        machine_id: machine.into(),
        port,
        auth_mode: "direct".into(),
        issued_at: issued,
        expires_at: expires,
        revoked_at: 0,
    }
}

async fn exercise(store: &Store) {
    store
        .insert_preview_grant(&grant("pg_1", "mch_a", 8000, 10, 1000))
        .await
        .unwrap();
    store
        .insert_preview_grant(&grant("pg_2", "mch_a", 8080, 20, 2000))
        .await
        .unwrap();
    store
        .insert_preview_grant(&grant("pg_3", "mch_a", 8000, 30, 50))
        .await
        .unwrap();
    store
        .insert_preview_grant(&grant("pg_4", "mch_b", 8000, 40, 4000))
        .await
        .unwrap();
    let ids = |v: Vec<PreviewGrantRow>| v.into_iter().map(|g| g.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.preview_grants("mch_a", None).await.unwrap()),
        ["pg_1", "pg_2", "pg_3"]
    );
    assert_eq!(
        ids(store.preview_grants("mch_a", Some(8000)).await.unwrap()),
        ["pg_1", "pg_3"]
    );
    let g = store.preview_grant("pg_2").await.unwrap().unwrap();
    assert_eq!((g.port, g.expires_at, g.revoked_at), (8080, 2000, 0));
    // pg_3 expired at 50.
    assert_eq!(store.live_preview_grants("mch_a", 100).await.unwrap(), 2);
    assert!(store.revoke_preview_grant("pg_1", 150).await.unwrap());
    assert!(
        !store.revoke_preview_grant("pg_1", 160).await.unwrap(),
        "revoked once"
    );
    assert!(!store.revoke_preview_grant("pg_none", 160).await.unwrap());
    assert_eq!(
        store
            .preview_grant("pg_1")
            .await
            .unwrap()
            .unwrap()
            .revoked_at,
        150
    );
    assert_eq!(store.live_preview_grants("mch_a", 100).await.unwrap(), 1);
    assert_eq!(store.delete_preview_grants("mch_a").await.unwrap(), 3);
    assert!(
        store
            .preview_grants("mch_a", None)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        ids(store.preview_grants("mch_b", None).await.unwrap()),
        ["pg_4"]
    );
}

#[tokio::test]
async fn previews_on_sqlite() {
    let db = SqliteDb::new();
    let store = db.open().await;
    exercise(&store).await;
}

#[tokio::test]
async fn previews_on_postgres() {
    let pg = nullspace_testkit::server::Postgres::start();
    exercise(&Store::open(&pg.url).await.unwrap()).await;
}
