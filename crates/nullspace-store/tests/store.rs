//! The store's queries, leases and schema migrations, each on SQLite and on
//! a real Postgres started here (Debian's postgresql, via the testkit).

use nullspace_store::{BuildFilter, BuildRow, LogGate, Store, Transition, Writer, now_ms};
use nullspace_testkit::server::Postgres;

mod common;
use common::SqliteDb;

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
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let lease = now_ms() + 30_000;
    assert_eq!(
        store.claim("tb_0", "own_a", lease, "{}").await.unwrap(),
        Some(1)
    );
    assert_eq!(
        store.claim("tb_0", "own_b", lease, "{}").await.unwrap(),
        None,
        "claimed once"
    );
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
            .append_log("tb_1", LogGate::Live, |o| {
                format!("{{\"offset\":{o},\"i\":{i}}}")
            })
            .await
            .unwrap();
        assert_eq!(off, Some(i));
    }
    let logs = store.logs("tb_1", 1).await.unwrap();
    assert_eq!(logs.iter().map(|l| l.0).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(
        store
            .append_log("tb_0", LogGate::Live, |_| "{}".into())
            .await
            .unwrap(),
        None,
        "nothing follows a terminal build's last entry"
    );

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

/// Leases: a claim names its owner, writes of a running build need it, a
/// cancel request is visible to the owner, only expired leases recover,
/// and each recovery transition happens once however many servers race.
async fn leases(store: &Store) {
    let t = store.ensure_template("team-l", "app", "{}").await.unwrap();
    let row = |id: &str, owner: Option<&str>| BuildRow {
        id: id.into(),
        namespace: "team-l".into(),
        template_id: t.clone(),
        status: "waiting".into(),
        source_type: "oci_import".into(),
        backend: "native".into(),
        created_at: now_ms(),
        record: "{}".into(),
        definition: "{}".into(),
        owner: owner.map(str::to_string),
        lease_expires_at: owner.map(|_| now_ms() + 60_000),
        ..Default::default()
    };
    store.insert_build(&row("tb_l1", None)).await.unwrap();
    // Pinned to server A (it holds the credentials): B may not claim it.
    store
        .insert_build(&row("tb_l2", Some("own_a")))
        .await
        .unwrap();
    let claimable = |owner: &'static str| {
        let store = store.clone();
        async move {
            let mut ids = store.claimable(owner).await.unwrap();
            ids.retain(|i| i.starts_with("tb_l"));
            ids
        }
    };
    assert_eq!(claimable("own_b").await, ["tb_l1"]);
    assert_eq!(claimable("own_a").await, ["tb_l1", "tb_l2"]);
    assert_eq!(store.claim("tb_l2", "own_b", 0, "{}").await.unwrap(), None);

    let soon = now_ms() + 60_000;
    assert_eq!(
        store.claim("tb_l1", "own_a", soon, "{}").await.unwrap(),
        Some(1)
    );
    // Only the owner writes into a running build's log and status.
    assert!(
        store
            .append_log("tb_l1", LogGate::Owner("own_b"), |_| "{}".into())
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        store
            .append_log("tb_l1", LogGate::Owner("own_a"), |o| format!(
                "{{\"o\":{o}}}"
            ))
            .await
            .unwrap(),
        Some(0)
    );
    let done = |writer| Transition {
        from: &["building"],
        writer,
        status: "ready",
        record: "{\"done\":true}",
        owner: None,
        entry: None,
        tags: &[],
        cache: None,
        finished_at: Some(now_ms()),
    };
    assert!(
        !store
            .transition("tb_l1", &done(Writer::Owner("own_b")))
            .await
            .unwrap()
    );
    // A live lease is not recoverable by anyone.
    assert!(
        !store
            .transition(
                "tb_l1",
                &done(Writer::Recovery {
                    now: now_ms(),
                    dead: &[]
                })
            )
            .await
            .unwrap()
    );
    assert!(
        store
            .recoverable(now_ms(), &[])
            .await
            .unwrap()
            .iter()
            .all(|r| r.id != "tb_l1" && r.id != "tb_l2")
    );

    // A cancel request from any server reaches the owner's poll.
    assert!(
        store
            .request_cancel("tb_l1", "key_x", Some("stop"), now_ms())
            .await
            .unwrap()
    );
    assert!(
        !store
            .request_cancel("tb_l1", "key_y", None, now_ms())
            .await
            .unwrap(),
        "first wins"
    );
    assert_eq!(
        store.owned_running("own_a").await.unwrap(),
        [("tb_l1".to_string(), true)]
    );
    let r = store.build("tb_l1").await.unwrap().unwrap();
    assert_eq!(
        r.cancel
            .as_ref()
            .map(|c| (c.by.as_str(), c.reason.as_deref())),
        Some(("key_x", Some("stop")))
    );
    assert_eq!(r.owner.as_deref(), Some("own_a"));

    // The lease lapses (the owner stopped renewing): recoverable, once.
    assert_eq!(store.renew_leases("own_a", now_ms() - 1).await.unwrap(), 2);
    let found = store.recoverable(now_ms(), &[]).await.unwrap();
    let ids: Vec<&str> = found.iter().map(|r| r.id.as_str()).collect();
    assert!(ids.contains(&"tb_l1") && ids.contains(&"tb_l2"), "{ids:?}");
    let requeue = |id: &'static str| {
        let store = store.clone();
        async move {
            store
                .transition(
                    id,
                    &Transition {
                        from: &["building"],
                        writer: Writer::Recovery {
                            now: now_ms(),
                            dead: &[],
                        },
                        status: "waiting",
                        record: "{}",
                        owner: None,
                        entry: Some(&|o| format!("{{\"requeued\":{o}}}")),
                        tags: &[],
                        cache: None,
                        finished_at: None,
                    },
                )
                .await
                .unwrap()
        }
    };
    let racers: Vec<_> = (0..4).map(|_| tokio::spawn(requeue("tb_l1"))).collect();
    let mut won = 0;
    for r in racers {
        won += r.await.unwrap() as i32;
    }
    assert_eq!(won, 1, "exactly one recovery");
    assert_eq!(store.logs("tb_l1", 0).await.unwrap().len(), 2);
    let r = store.build("tb_l1").await.unwrap().unwrap();
    assert_eq!((r.status.as_str(), r.owner.as_deref()), ("waiting", None));
    // A dead owner's builds recover at once, lease or not.
    assert_eq!(
        store
            .renew_leases("own_a", now_ms() + 60_000)
            .await
            .unwrap(),
        1
    );
    let dead = vec!["own_a".to_string()];
    assert_eq!(
        store
            .recoverable(now_ms(), &dead)
            .await
            .unwrap()
            .iter()
            .filter(|r| r.id == "tb_l2")
            .count(),
        1
    );
}

/// The statements the store ran at every open before it had migrations.
const LEGACY_SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS api_keys (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, namespace TEXT NOT NULL,
        key_hash TEXT NOT NULL UNIQUE, created_at BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS templates (
        id TEXT PRIMARY KEY, namespace TEXT NOT NULL, name TEXT NOT NULL,
        doc TEXT NOT NULL, created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL,
        UNIQUE (namespace, name))",
    "CREATE TABLE IF NOT EXISTS builds (
        id TEXT PRIMARY KEY, namespace TEXT NOT NULL, template_id TEXT NOT NULL,
        status TEXT NOT NULL, source_type TEXT NOT NULL, backend TEXT NOT NULL,
        created_at BIGINT NOT NULL, record TEXT NOT NULL, definition TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS builds_by_template ON builds (template_id, created_at)",
    "CREATE INDEX IF NOT EXISTS builds_by_status ON builds (status, created_at)",
    "CREATE TABLE IF NOT EXISTS build_logs (
        build_id TEXT NOT NULL, seq BIGINT NOT NULL, entry TEXT NOT NULL,
        PRIMARY KEY (build_id, seq))",
    "CREATE TABLE IF NOT EXISTS tags (
        template_id TEXT NOT NULL, tag TEXT NOT NULL, build_id TEXT NOT NULL,
        created_at BIGINT NOT NULL, PRIMARY KEY (template_id, tag))",
    "CREATE TABLE IF NOT EXISTS aliases (
        namespace TEXT NOT NULL, alias TEXT NOT NULL, template_id TEXT NOT NULL,
        created_at BIGINT NOT NULL, PRIMARY KEY (namespace, alias))",
    "CREATE TABLE IF NOT EXISTS blobs (
        namespace TEXT NOT NULL, blob_id TEXT NOT NULL, sha256 TEXT NOT NULL,
        size_bytes BIGINT NOT NULL, uploaded INTEGER NOT NULL, created_at BIGINT NOT NULL,
        PRIMARY KEY (namespace, blob_id))",
    "CREATE TABLE IF NOT EXISTS artifact_cache (
        namespace TEXT NOT NULL, cache_key TEXT NOT NULL, build_id TEXT NOT NULL,
        created_at BIGINT NOT NULL, PRIMARY KEY (namespace, cache_key))",
    "CREATE TABLE IF NOT EXISTS claims (
        token_hash TEXT PRIMARY KEY, namespace TEXT NOT NULL, name TEXT NOT NULL,
        expires_at BIGINT NOT NULL)",
];

/// A store written by the pre-migration code (its schema and rows, made
/// here with plain SQL) opens, upgrades, and keeps its data.
async fn upgrades_a_legacy_store(url: &str) {
    use sqlx::Connection as _;
    sqlx::any::install_default_drivers();
    let raw_url = match url.strip_prefix("sqlite:") {
        Some(p) => format!("sqlite://{p}?mode=rwc"),
        None => url.to_string(),
    };
    let mut c = sqlx::AnyConnection::connect(&raw_url).await.unwrap();
    for stmt in LEGACY_SCHEMA {
        sqlx::query(stmt).execute(&mut c).await.unwrap();
    }
    sqlx::query("INSERT INTO templates (id, namespace, name, doc, created_at, updated_at) VALUES ('tmpl_old', 'team-a', 'old', '{}', 1, 1)")
        .execute(&mut c)
        .await
        .unwrap();
    sqlx::query("INSERT INTO builds (id, namespace, template_id, status, source_type, backend, created_at, record, definition) VALUES ('tb_old', 'team-a', 'tmpl_old', 'ready', 'oci_import', 'native', 1, '{\"old\":true}', '{}')")
        .execute(&mut c)
        .await
        .unwrap();
    sqlx::query("INSERT INTO build_logs (build_id, seq, entry) VALUES ('tb_old', 0, '{}')")
        .execute(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();

    let store = Store::open(url).await.unwrap();
    // Every migration applied, in order (0001 is the legacy schema itself).
    assert_eq!(store.schema_versions().await.unwrap(), all_versions());
    let old = store.build("tb_old").await.unwrap().unwrap();
    assert_eq!(
        (old.status.as_str(), old.record.as_str()),
        ("ready", "{\"old\":true}")
    );
    assert_eq!((old.owner, old.attempt, old.cancel), (None, 0, None));
    assert_eq!(store.logs("tb_old", 0).await.unwrap().len(), 1);
    assert_eq!(
        store.template_id("team-a", "old").await.unwrap().as_deref(),
        Some("tmpl_old")
    );
    drop(store);
    // Reopening is a no-op, and the upgraded store works as a new one does.
    let store = Store::open(url).await.unwrap();
    assert_eq!(store.schema_versions().await.unwrap(), all_versions());
    exercise(&store).await;
    leases(&store).await;
}

#[tokio::test]
async fn sqlite_store() {
    let db = SqliteDb::new();
    let store = db.open().await;
    exercise(&store).await;
    leases(&store).await;
}

#[tokio::test]
async fn postgres_store() {
    let pg = Postgres::start();
    let store = Store::open(&pg.url).await.unwrap();
    exercise(&store).await;
    leases(&store).await;
}

#[tokio::test]
async fn sqlite_store_upgrades_from_the_legacy_schema() {
    let db = SqliteDb::new();
    upgrades_a_legacy_store(&db.url).await;
}

#[tokio::test]
async fn postgres_store_upgrades_from_the_legacy_schema() {
    let pg = Postgres::start();
    upgrades_a_legacy_store(&pg.url).await;
}

#[tokio::test]
async fn servers_opening_one_postgres_together_migrate_it_once() {
    let pg = Postgres::start();
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let url = pg.url.clone();
            tokio::spawn(async move { Store::open(&url).await.map(|_| ()) })
        })
        .collect();
    for o in opens {
        o.await.unwrap().unwrap();
    }
    let store = Store::open(&pg.url).await.unwrap();
    assert_eq!(store.schema_versions().await.unwrap(), all_versions());
}

/// 1 to the latest migration.
fn all_versions() -> Vec<i64> {
    (1..=nullspace_store::SCHEMA_VERSION).collect()
}
