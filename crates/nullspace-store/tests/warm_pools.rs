//! Warm pools on both backends: names unique per namespace (also through
//! a rename), one namespace never sees or changes another's, delete.

mod common;
use common::SqliteDb;
use nullspace_store::{Store, WarmPoolRow};

fn pool(id: &str, ns: &str, name: &str) -> WarmPoolRow {
    WarmPoolRow {
        id: id.into(),
        namespace: ns.into(),
        name: name.into(),
        template_id: "tmpl_1".into(),
        state: "enabled".into(),
        record: "{}".into(),
        created_at: 1,
        updated_at: 1,
    }
}

async fn exercise(store: &Store) {
    assert!(
        store
            .insert_warm_pool(&pool("w1", "a", "ci"))
            .await
            .unwrap()
    );
    assert!(
        !store
            .insert_warm_pool(&pool("w2", "a", "ci"))
            .await
            .unwrap(),
        "name taken"
    );
    assert!(
        store
            .insert_warm_pool(&pool("w3", "b", "ci"))
            .await
            .unwrap()
    );
    assert!(
        store
            .insert_warm_pool(&pool("w4", "a", "other"))
            .await
            .unwrap()
    );
    assert!(store.warm_pool("b", "w1").await.unwrap().is_none());
    let mine: Vec<String> = store
        .warm_pools(Some("a"))
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(mine, ["w1", "w4"]);
    assert_eq!(store.warm_pools(None).await.unwrap().len(), 3);
    // A rename onto another pool's name is refused; a change goes in.
    let mut w4 = pool("w4", "a", "ci");
    assert!(!store.update_warm_pool(&w4).await.unwrap());
    w4.name = "renamed".into();
    w4.state = "draining".into();
    w4.updated_at = 9;
    assert!(store.update_warm_pool(&w4).await.unwrap());
    assert_eq!(store.warm_pool("a", "w4").await.unwrap().unwrap(), w4);
    // Another namespace can neither change nor delete it.
    let mut stolen = w4.clone();
    stolen.namespace = "b".into();
    stolen.name = "mine".into();
    assert!(!store.update_warm_pool(&stolen).await.unwrap());
    assert!(!store.delete_warm_pool("b", "w4").await.unwrap());
    assert!(store.delete_warm_pool("a", "w4").await.unwrap());
    assert!(store.warm_pool("a", "w4").await.unwrap().is_none());
}

#[tokio::test]
async fn warm_pools_on_sqlite() {
    let db = SqliteDb::new();
    exercise(&db.open().await).await;
}

#[tokio::test]
async fn warm_pools_on_postgres() {
    let pg = nullspace_testkit::server::Postgres::start();
    exercise(&Store::open(&pg.url).await.unwrap()).await;
}
