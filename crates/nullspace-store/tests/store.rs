//! The store's queries on SQLite (and on Postgres when
//! `NULLSPACE_TEST_POSTGRES_URL` names one; the server suite starts one).

use nullspace_store::{BuildFilter, BuildRow, Store, now_ms};

async fn exercise(store: &Store) {
    let (key_id, secret) = store.create_key("ci", "team-a").await.unwrap();
    let caller = store.authenticate(&secret).await.unwrap().unwrap();
    assert_eq!(
        (caller.key_id.as_str(), caller.namespace.as_str()),
        (key_id.as_str(), "team-a")
    );
    assert!(store.authenticate("ns_wrong").await.unwrap().is_none());

    let t = store.ensure_template("team-a", "app", "{}").await.unwrap();
    assert_eq!(
        store.ensure_template("team-a", "app", "{}").await.unwrap(),
        t,
        "idempotent"
    );
    assert_ne!(
        store.ensure_template("team-b", "app", "{}").await.unwrap(),
        t,
        "per namespace"
    );

    for i in 0..5 {
        store
            .insert_build(&BuildRow {
                id: format!("tb_{i}"),
                namespace: "team-a".into(),
                template_id: t.clone(),
                status: "waiting".into(),
                source_type: "oci_import".into(),
                backend: if i % 2 == 0 { "native" } else { "buildkit" }.into(),
                created_at: now_ms() + i,
                record: format!("{{\"n\":{i}}}"),
                definition: "{}".into(),
            })
            .await
            .unwrap();
    }
    assert!(store.claim("tb_0", "{}").await.unwrap());
    assert!(!store.claim("tb_0", "{}").await.unwrap(), "claimed once");
    assert!(
        store
            .update_build("tb_0", "ready", "{}", &["building"])
            .await
            .unwrap()
    );
    assert!(
        !store
            .update_build("tb_0", "error", "{}", &["waiting", "building"])
            .await
            .unwrap(),
        "terminal stays"
    );
    assert_eq!(store.builds_in_status("waiting").await.unwrap().len(), 4);

    let page = store
        .builds(&t, &BuildFilter::default(), 2, None)
        .await
        .unwrap();
    assert_eq!(
        page.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(),
        ["tb_4", "tb_3"]
    );
    let next = store
        .builds(
            &t,
            &BuildFilter::default(),
            10,
            Some((page[1].created_at, page[1].id.clone())),
        )
        .await
        .unwrap();
    assert_eq!(
        next.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(),
        ["tb_2", "tb_1", "tb_0"]
    );
    let f = BuildFilter {
        backend: Some("buildkit".into()),
        ..Default::default()
    };
    assert_eq!(store.builds(&t, &f, 10, None).await.unwrap().len(), 2);

    for i in 0..3 {
        let off = store
            .append_log("tb_1", |o| format!("{{\"offset\":{o},\"i\":{i}}}"))
            .await
            .unwrap();
        assert_eq!(off, i);
    }
    let logs = store.logs("tb_1", 1).await.unwrap();
    assert_eq!(logs.iter().map(|l| l.0).collect::<Vec<_>>(), [1, 2]);

    store.set_tag(&t, "default", "tb_0").await.unwrap();
    store.set_tag(&t, "default", "tb_1").await.unwrap();
    assert_eq!(store.tags(&t).await.unwrap()[0].1, "tb_1");
    assert!(store.remove_tag(&t, "default").await.unwrap());
    store.add_alias("team-a", "old-app", &t).await.unwrap();
    assert_eq!(
        store
            .alias_target("team-a", "old-app")
            .await
            .unwrap()
            .as_deref(),
        Some(t.as_str())
    );
    assert!(store.delete_template(&t).await.unwrap());
    assert!(
        store
            .alias_target("team-a", "old-app")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn sqlite_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!(
        "sqlite:{}",
        dir.path().join("db.sqlite").display()
    ))
    .await
    .unwrap();
    exercise(&store).await;
}

#[tokio::test]
async fn postgres_store_when_configured() {
    let Ok(url) = std::env::var("NULLSPACE_TEST_POSTGRES_URL") else {
        eprintln!("NULLSPACE_TEST_POSTGRES_URL unset: covered by the server suite's Postgres run");
        return;
    };
    let store = Store::open(&url).await.unwrap();
    exercise(&store).await;
}
