//! nullspace-store: the durable state of a nullspace server.
//!
//! - A SQL database: the embedded SQLite file by default, or a shared
//!   Postgres when given a `postgres://` URL. Both run the same queries
//!   through sqlx's `Any` driver (numbered `$N` parameters, portable types:
//!   TEXT for JSON documents, BIGINT epoch milliseconds for times).
//! - A content-addressed artifact store on disk ([`artifacts`]), and the
//!   in-flight markers that tell work from a crash's leftover ([`inflight`]).
//!
//! Records are stored as JSON documents next to the few columns queries
//! need. The store does not interpret them: the server owns their shape.
//! Nothing here may ever hold a secret value; callers sanitize first.

pub mod artifacts;
pub mod inflight;
pub mod lifecycle;
pub mod machines;
pub mod nodes;
pub mod previews;
pub mod volumes;
pub mod warm_pools;

pub use lifecycle::{LifecycleEvent, LifecycleFilter, LifecyclePage, Order, StoredLifecycleEvent};
pub use machines::{Inserted, MachineRow, SnapshotRow};
pub use nodes::{NodeLease, NodeRow};
pub use previews::PreviewGrantRow;
pub use volumes::{AttachOutcome, AttachmentRow, VolumeRow};
pub use warm_pools::WarmPoolRow;

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::{AnyPool, Row};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database schema migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database URL {0:?} is not supported (sqlite:PATH or postgres://…)")]
    BadUrl(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A stored value no version of this server writes.
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Whether a conditional write changed a row; a unique index refusing it
/// (two writers of one name at once) is "no" as well.
pub(crate) fn wrote(
    r: std::result::Result<sqlx::any::AnyQueryResult, sqlx::Error>,
) -> Result<bool> {
    match r {
        Ok(n) => Ok(n.rows_affected() > 0),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The schema as sqlx migrations (`migrations/`), embedded at compile time.
/// Embedded with `include_str!` and a [`MigrationSource`] rather than
/// `sqlx::migrate!`, which needs sqlx's `macros` feature: a second build of
/// both drivers (and of libsqlite3) for the proc-macro host, on every CI run.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "initial", include_str!("../migrations/0001_initial.sql")),
    (
        2,
        "build leases",
        include_str!("../migrations/0002_build_leases.sql"),
    ),
    (
        3,
        "machines",
        include_str!("../migrations/0003_machines.sql"),
    ),
    (
        4,
        "lifecycle events",
        include_str!("../migrations/0004_lifecycle_events.sql"),
    ),
    (
        5,
        "preview grants",
        include_str!("../migrations/0005_preview_grants.sql"),
    ),
    (6, "volumes", include_str!("../migrations/0006_volumes.sql")),
    (
        7,
        "warm pools",
        include_str!("../migrations/0007_warm_pools.sql"),
    ),
    (8, "nodes", include_str!("../migrations/0008_nodes.sql")),
];

#[derive(Debug)]
struct Embedded;

impl<'s> MigrationSource<'s> for Embedded {
    fn resolve(
        self,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<
                    Output = std::result::Result<Vec<Migration>, sqlx::error::BoxDynError>,
                > + Send
                + 's,
        >,
    > {
        Box::pin(async {
            Ok(MIGRATIONS
                .iter()
                .map(|(v, d, sql)| {
                    Migration::new(*v, (*d).into(), MigrationType::Simple, (*sql).into(), false)
                })
                .collect())
        })
    }
}

/// The newest schema version this build knows.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// Which database is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    pub backend: Backend,
}

/// The caller an API key authenticates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub key_id: String,
    pub namespace: String,
}

/// A cancel request recorded on a build (by any server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelRequest {
    pub at: i64,
    /// The API key that asked.
    pub by: String,
    pub reason: Option<String>,
}

/// Who may make a [`Transition`].
#[derive(Debug, Clone, Copy)]
pub enum Writer<'a> {
    /// The server that owns the build.
    Owner(&'a str),
    /// Any server, for a build whose owner is gone: its lease expired
    /// before `now`, or it is one of `dead`.
    Recovery { now: i64, dead: &'a [String] },
    /// Any server (a waiting build that nobody runs).
    Anyone,
}

/// A status change of a build; see [`Store::transition`].
pub struct Transition<'a> {
    pub from: &'a [&'a str],
    pub writer: Writer<'a>,
    pub status: &'a str,
    pub record: &'a str,
    /// The owner and lease expiry afterwards; `None` releases the build.
    pub owner: Option<(&'a str, i64)>,
    /// The log entry written with the change (given its offset).
    pub entry: Option<&'a (dyn Fn(i64) -> String + Sync)>,
    /// `(template_id, tag)` pairs to point at this build.
    pub tags: &'a [(&'a str, &'a str)],
    /// `(namespace, cache_key)` of the final-artifact cache to point here.
    pub cache: Option<(&'a str, &'a str)>,
    /// Set when the new status is terminal.
    pub finished_at: Option<i64>,
}

/// When a log append is allowed; see [`Store::append_log`].
#[derive(Debug, Clone, Copy)]
pub enum LogGate<'a> {
    /// While the build is waiting or building.
    Live,
    /// While the build is building and owned by this server.
    Owner(&'a str),
}

/// A build row: indexed columns plus the server's JSON documents.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BuildRow {
    pub id: String,
    pub namespace: String,
    pub template_id: String,
    pub status: String,
    pub source_type: String,
    pub backend: String,
    pub created_at: i64,
    /// The build record as the API returns it.
    pub record: String,
    /// The sanitized, persisted build definition (for retry).
    pub definition: String,
    /// The server running the build, or holding its credentials.
    pub owner: Option<String>,
    pub lease_expires_at: Option<i64>,
    /// How many times a worker claimed the build.
    pub attempt: i64,
    pub cancel: Option<CancelRequest>,
    pub finished_at: Option<i64>,
}

#[derive(Debug, Clone, Default)]
pub struct BuildFilter {
    pub status: Option<String>,
    pub backend: Option<String>,
    pub source_type: Option<String>,
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// A random identifier with a prefix: `tb_…`, `tmpl_…`, `key_…`.
pub fn new_id(prefix: &str) -> String {
    use rand::Rng as _;
    let bytes: [u8; 12] = rand::rng().random();
    format!("{prefix}{}", hex::encode(bytes))
}

impl Store {
    /// Opens (creating if needed) the database at `url`: `sqlite:PATH` or
    /// `postgres://…`.
    pub async fn open(url: &str) -> Result<Store> {
        install_default_drivers();
        let (url, backend) = if let Some(path) = url.strip_prefix("sqlite:") {
            let path = path.trim_start_matches("//");
            (format!("sqlite://{path}?mode=rwc"), Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (url.to_string(), Backend::Postgres)
        } else {
            return Err(StoreError::BadUrl(url.to_string()));
        };
        // SQLite serialises writers; one connection avoids lock errors
        // under the worker pool without hurting (everything is local).
        let max = if backend == Backend::Sqlite { 1 } else { 8 };
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .connect(&url)
            .await?;
        if backend == Backend::Sqlite {
            sqlx::query("PRAGMA journal_mode=WAL")
                .execute(&pool)
                .await?;
            sqlx::query("PRAGMA busy_timeout=5000")
                .execute(&pool)
                .await?;
        }
        // Concurrent openers (servers starting together on one Postgres)
        // serialise on the migrator's advisory lock.
        Migrator::new(Embedded).await?.run(&pool).await?;
        Ok(Store { pool, backend })
    }

    // ---- API keys -------------------------------------------------------

    /// Creates a key for `namespace` and returns `(key_id, secret)`. Only a
    /// hash of the secret is stored; the secret is shown once.
    pub async fn create_key(&self, name: &str, namespace: &str) -> Result<(String, String)> {
        use rand::Rng as _;
        let raw: [u8; 24] = rand::rng().random();
        let secret = format!("ns_{}", hex::encode(raw));
        let id = new_id("key_");
        sqlx::query("INSERT INTO api_keys (id, name, namespace, key_hash, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(&id)
            .bind(name)
            .bind(namespace)
            .bind(sha256_hex(&secret))
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok((id, secret))
    }

    pub async fn authenticate(&self, secret: &str) -> Result<Option<Caller>> {
        // API keys are 192-bit random: a fast hash is the right lookup key.
        let row = sqlx::query("SELECT id, namespace FROM api_keys WHERE key_hash = $1")
            .bind(sha256_hex(secret))
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| Caller {
            key_id: r.get(0),
            namespace: r.get(1),
        }))
    }

    // ---- templates ------------------------------------------------------

    /// Returns the template id for `(namespace, name)`, creating the
    /// template with `doc` if it does not exist.
    pub async fn ensure_template(&self, namespace: &str, name: &str, doc: &str) -> Result<String> {
        if let Some(id) = self.template_id(namespace, name).await? {
            return Ok(id);
        }
        let id = new_id("tmpl_");
        let now = now_ms();
        let inserted = sqlx::query(
            "INSERT INTO templates (id, namespace, name, doc, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (namespace, name) DO NOTHING",
        )
        .bind(&id)
        .bind(namespace)
        .bind(name)
        .bind(doc)
        .bind(now)
        .bind(now)
        .execute(&self.pool)
        .await?;
        if inserted.rows_affected() == 1 {
            return Ok(id);
        }
        // Lost a race with another server: use theirs.
        Ok(self.template_id(namespace, name).await?.unwrap_or(id))
    }

    pub async fn template_id(&self, namespace: &str, name: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT id FROM templates WHERE namespace = $1 AND name = $2")
            .bind(namespace)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// `(id, namespace, name, doc, created_at, updated_at)`.
    pub async fn template(&self, id: &str) -> Result<Option<TemplateRow>> {
        let row = sqlx::query(
            "SELECT id, namespace, name, doc, created_at, updated_at FROM templates WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(template_row))
    }

    pub async fn templates(&self, namespace: &str) -> Result<Vec<TemplateRow>> {
        let rows = sqlx::query(
            "SELECT id, namespace, name, doc, created_at, updated_at FROM templates WHERE namespace = $1 ORDER BY name",
        )
        .bind(namespace)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(template_row).collect())
    }

    pub async fn update_template(&self, id: &str, name: &str, doc: &str) -> Result<()> {
        sqlx::query("UPDATE templates SET name = $1, doc = $2, updated_at = $3 WHERE id = $4")
            .bind(name)
            .bind(doc)
            .bind(now_ms())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Deletes a template with its tags and aliases (builds stay, for
    /// history).
    pub async fn delete_template(&self, id: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM tags WHERE template_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM aliases WHERE template_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let n = sqlx::query("DELETE FROM templates WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(n.rows_affected() > 0)
    }

    // ---- tags and aliases -----------------------------------------------

    pub async fn set_tag(&self, template_id: &str, tag: &str, build_id: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO tags (template_id, tag, build_id, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (template_id, tag) DO UPDATE SET build_id = excluded.build_id, created_at = excluded.created_at",
        )
        .bind(template_id)
        .bind(tag)
        .bind(build_id)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// `(tag, build_id, created_at)` ordered by tag.
    pub async fn tags(&self, template_id: &str) -> Result<Vec<(String, String, i64)>> {
        let rows = sqlx::query(
            "SELECT tag, build_id, created_at FROM tags WHERE template_id = $1 ORDER BY tag",
        )
        .bind(template_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    pub async fn remove_tag(&self, template_id: &str, tag: &str) -> Result<bool> {
        let n = sqlx::query("DELETE FROM tags WHERE template_id = $1 AND tag = $2")
            .bind(template_id)
            .bind(tag)
            .execute(&self.pool)
            .await?;
        Ok(n.rows_affected() > 0)
    }

    pub async fn add_alias(&self, namespace: &str, alias: &str, template_id: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO aliases (namespace, alias, template_id, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (namespace, alias) DO UPDATE SET template_id = excluded.template_id",
        )
        .bind(namespace)
        .bind(alias)
        .bind(template_id)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn alias_target(&self, namespace: &str, alias: &str) -> Result<Option<String>> {
        let row =
            sqlx::query("SELECT template_id FROM aliases WHERE namespace = $1 AND alias = $2")
                .bind(namespace)
                .bind(alias)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// `(alias, created_at)` of a template.
    pub async fn aliases(&self, template_id: &str) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "SELECT alias, created_at FROM aliases WHERE template_id = $1 ORDER BY alias",
        )
        .bind(template_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    pub async fn remove_alias(&self, template_id: &str, alias: &str) -> Result<bool> {
        let n = sqlx::query("DELETE FROM aliases WHERE template_id = $1 AND alias = $2")
            .bind(template_id)
            .bind(alias)
            .execute(&self.pool)
            .await?;
        Ok(n.rows_affected() > 0)
    }

    // ---- builds ---------------------------------------------------------

    /// A write transaction. SQLite takes the write lock up front (`BEGIN
    /// IMMEDIATE`): a deferred transaction that reads and then writes fails
    /// at once with "database is locked" when another process (a second
    /// server, a CLI command) wrote in between, instead of waiting.
    pub(crate) async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        })
    }

    /// Locks a build row for the rest of the transaction (Postgres; SQLite's
    /// write transaction already excludes every other writer).
    fn lock_suffix(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE",
        }
    }

    pub async fn insert_build(&self, b: &BuildRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO builds (id, namespace, template_id, status, source_type, backend, created_at, record, definition, owner, lease_expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&b.id)
        .bind(&b.namespace)
        .bind(&b.template_id)
        .bind(&b.status)
        .bind(&b.source_type)
        .bind(&b.backend)
        .bind(b.created_at)
        .bind(&b.record)
        .bind(&b.definition)
        .bind(b.owner.clone())
        .bind(b.lease_expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Replaces a build's status and record. With `only_if`, the update
    /// happens only while the status is one of those (returns whether it
    /// did), so a terminal state is never overwritten by a late writer.
    /// Writes of a running build go through [`Store::transition`] instead,
    /// which also checks the owner.
    pub async fn update_build(
        &self,
        id: &str,
        status: &str,
        record: &str,
        only_if: &[&str],
    ) -> Result<bool> {
        let n = if only_if.is_empty() {
            sqlx::query("UPDATE builds SET status = $1, record = $2 WHERE id = $3")
                .bind(status)
                .bind(record)
                .bind(id)
                .execute(&self.pool)
                .await?
        } else {
            // At most three allowed states are ever needed.
            let mut allowed = only_if.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            allowed.resize(3, allowed[0].clone());
            sqlx::query("UPDATE builds SET status = $1, record = $2 WHERE id = $3 AND status IN ($4, $5, $6)")
                .bind(status)
                .bind(record)
                .bind(id)
                .bind(&allowed[0])
                .bind(&allowed[1])
                .bind(&allowed[2])
                .execute(&self.pool)
                .await?
        };
        Ok(n.rows_affected() > 0)
    }

    pub async fn build(&self, id: &str) -> Result<Option<BuildRow>> {
        let row = sqlx::query(&format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(build_row))
    }

    /// A template's builds, newest first; `before` is an exclusive
    /// `(created_at, id)` cursor.
    pub async fn builds(
        &self,
        template_id: &str,
        filter: &BuildFilter,
        limit: i64,
        before: Option<(i64, String)>,
    ) -> Result<Vec<BuildRow>> {
        let (bt, bid) = before.unwrap_or((i64::MAX, String::new()));
        let rows = sqlx::query(&format!(
            "SELECT {BUILD_COLUMNS} FROM builds
             WHERE template_id = $1
               AND ($2 = '' OR status = $2) AND ($3 = '' OR backend = $3) AND ($4 = '' OR source_type = $4)
               AND (created_at < $5 OR (created_at = $5 AND ($6 = '' OR id < $6)))
             ORDER BY created_at DESC, id DESC LIMIT $7"
        ))
        .bind(template_id)
        .bind(filter.status.clone().unwrap_or_default())
        .bind(filter.backend.clone().unwrap_or_default())
        .bind(filter.source_type.clone().unwrap_or_default())
        .bind(bt)
        .bind(bid)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(build_row).collect())
    }

    /// Ids of builds in `status`, oldest first.
    pub async fn builds_in_status(&self, status: &str) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT id FROM builds WHERE status = $1 ORDER BY created_at, id")
            .bind(status)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    /// Waiting builds `owner` may run, oldest first: unowned ones, and those
    /// pinned to `owner` (it holds their request-time credentials).
    pub async fn claimable(&self, owner: &str) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT id FROM builds WHERE status = 'waiting' AND (owner IS NULL OR owner = $1)
             AND cancel_requested_at IS NULL ORDER BY created_at, id",
        )
        .bind(owner)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    /// Moves a waiting build to building, owned by `owner` with a lease
    /// until `lease_until`; returns the attempt number, or `None` when
    /// another worker (or a cancel) got there first. Safe across servers
    /// sharing a database: the update is conditional on the status.
    pub async fn claim(
        &self,
        id: &str,
        owner: &str,
        lease_until: i64,
        record: &str,
    ) -> Result<Option<i64>> {
        let n = sqlx::query(
            "UPDATE builds SET status = 'building', owner = $1, lease_expires_at = $2,
                 attempt = attempt + 1, record = $3
             WHERE id = $4 AND status = 'waiting' AND (owner IS NULL OR owner = $1)
               AND cancel_requested_at IS NULL",
        )
        .bind(owner)
        .bind(lease_until)
        .bind(record)
        .bind(id)
        .execute(&self.pool)
        .await?;
        if n.rows_affected() != 1 {
            return Ok(None);
        }
        let row = sqlx::query("SELECT attempt FROM builds WHERE id = $1")
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
        Ok(Some(row.get(0)))
    }

    /// Extends the lease of every live build `owner` holds; returns how
    /// many it still holds.
    pub async fn renew_leases(&self, owner: &str, lease_until: i64) -> Result<u64> {
        let n = sqlx::query(
            "UPDATE builds SET lease_expires_at = $1
             WHERE owner = $2 AND status IN ('waiting', 'building')",
        )
        .bind(lease_until)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(n.rows_affected())
    }

    /// The running builds `owner` holds, with whether a cancel was
    /// requested for each (by any server).
    pub async fn owned_running(&self, owner: &str) -> Result<Vec<(String, bool)>> {
        let rows = sqlx::query(
            "SELECT id, cancel_requested_at FROM builds WHERE owner = $1 AND status = 'building'",
        )
        .bind(owner)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get(0), r.get::<Option<i64>, _>(1).is_some()))
            .collect())
    }

    /// The live (waiting or building) builds `owner` holds.
    pub async fn owned_builds(&self, owner: &str) -> Result<Vec<BuildRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {BUILD_COLUMNS} FROM builds WHERE owner = $1 AND status IN ('waiting', 'building')
             ORDER BY created_at, id"
        ))
        .bind(owner)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(build_row).collect())
    }

    /// Live builds whose owner is gone: the lease expired before `now`, or
    /// the owner is one of `dead` (a process known to have exited). Running
    /// builds without an owner (made before leases existed) count too.
    pub async fn recoverable(&self, now: i64, dead: &[String]) -> Result<Vec<BuildRow>> {
        let mut rows = sqlx::query(&format!(
            "SELECT {BUILD_COLUMNS} FROM builds
             WHERE (status = 'building' AND (owner IS NULL OR lease_expires_at IS NULL OR lease_expires_at < $1))
                OR (status = 'waiting' AND owner IS NOT NULL AND (lease_expires_at IS NULL OR lease_expires_at < $1))
             ORDER BY created_at, id"
        ))
        .bind(now)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(build_row)
        .collect::<Vec<_>>();
        for owner in dead {
            let more = sqlx::query(&format!(
                "SELECT {BUILD_COLUMNS} FROM builds
                 WHERE owner = $1 AND status IN ('waiting', 'building') ORDER BY created_at, id"
            ))
            .bind(owner)
            .fetch_all(&self.pool)
            .await?;
            for r in more.into_iter().map(build_row) {
                if !rows.iter().any(|x| x.id == r.id) {
                    rows.push(r);
                }
            }
        }
        Ok(rows)
    }

    /// Records a cancel request on a live build (the first one wins);
    /// false when the build is terminal or already being cancelled.
    pub async fn request_cancel(
        &self,
        id: &str,
        by: &str,
        reason: Option<&str>,
        at: i64,
    ) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE builds SET cancel_requested_at = $1, cancel_requested_by = $2, cancel_reason = $3
             WHERE id = $4 AND status IN ('waiting', 'building') AND cancel_requested_at IS NULL",
        )
        .bind(at)
        .bind(by)
        .bind(reason.map(str::to_string))
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(n.rows_affected() == 1)
    }

    /// Moves a build from one of `t.from` to `t.status` when `t.writer` may:
    /// in one transaction, appends `t.entry` (so it is the build's last
    /// entry when the new status is terminal), points `t.tags` at the build,
    /// stores `t.cache`, and writes the record. Returns false (and changes
    /// nothing) when the build is elsewhere or owned by someone else, so a
    /// transition happens once however many servers race for it.
    pub async fn transition(&self, id: &str, t: &Transition<'_>) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(&format!(
            "SELECT status, owner, lease_expires_at FROM builds WHERE id = $1{}",
            self.lock_suffix()
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(false);
        };
        let status: String = row.get(0);
        let owner: Option<String> = row.get(1);
        let lease: Option<i64> = row.get(2);
        let allowed = t.from.contains(&status.as_str())
            && match &t.writer {
                Writer::Owner(me) => owner.as_deref() == Some(*me),
                Writer::Recovery { now, dead } => match &owner {
                    None => status == "building",
                    Some(o) => dead.contains(o) || lease.is_none_or(|l| l < *now),
                },
                Writer::Anyone => true,
            };
        if !allowed {
            return Ok(false);
        }
        if let Some(make) = t.entry {
            insert_log(&mut tx, id, make).await?;
        }
        for (template_id, tag) in t.tags {
            sqlx::query(
                "INSERT INTO tags (template_id, tag, build_id, created_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (template_id, tag) DO UPDATE SET build_id = excluded.build_id, created_at = excluded.created_at",
            )
            .bind(*template_id)
            .bind(*tag)
            .bind(id)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        }
        if let Some((namespace, key)) = t.cache {
            sqlx::query(
                "INSERT INTO artifact_cache (namespace, cache_key, build_id, created_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (namespace, cache_key) DO UPDATE SET build_id = excluded.build_id, created_at = excluded.created_at",
            )
            .bind(namespace)
            .bind(key)
            .bind(id)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        }
        let (new_owner, lease) = match t.owner {
            Some((o, l)) => (Some(o.to_string()), Some(l)),
            None => (None, None),
        };
        sqlx::query(
            "UPDATE builds SET status = $1, record = $2, owner = $3, lease_expires_at = $4,
                 finished_at = COALESCE($5, finished_at)
             WHERE id = $6",
        )
        .bind(t.status)
        .bind(t.record)
        .bind(new_owner)
        .bind(lease)
        .bind(t.finished_at)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    // ---- logs -----------------------------------------------------------

    /// Appends a log entry while `gate` holds; `make` receives the entry's
    /// offset (0-based, dense per build) and returns the JSON to store.
    /// Returns `None` (and stores nothing) when the build is terminal or
    /// owned by someone else, so nothing follows a build's terminal entry
    /// and a worker that lost its lease cannot write into the log.
    pub async fn append_log(
        &self,
        build_id: &str,
        gate: LogGate<'_>,
        make: impl FnOnce(i64) -> String + Send,
    ) -> Result<Option<i64>> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(&format!(
            "SELECT status, owner FROM builds WHERE id = $1{}",
            self.lock_suffix()
        ))
        .bind(build_id)
        .fetch_optional(&mut *tx)
        .await?;
        let open = row.is_some_and(|r| {
            let status: String = r.get(0);
            let owner: Option<String> = r.get(1);
            match gate {
                LogGate::Live => status == "waiting" || status == "building",
                LogGate::Owner(me) => status == "building" && owner.as_deref() == Some(me),
            }
        });
        if !open {
            return Ok(None);
        }
        let seq = insert_log(&mut tx, build_id, make).await?;
        tx.commit().await?;
        Ok(Some(seq))
    }

    /// Entries with offset >= `from`, in order.
    pub async fn logs(&self, build_id: &str, from: i64) -> Result<Vec<(i64, String)>> {
        let rows = sqlx::query(
            "SELECT seq, entry FROM build_logs WHERE build_id = $1 AND seq >= $2 ORDER BY seq",
        )
        .bind(build_id)
        .bind(from)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    // ---- context blobs --------------------------------------------------

    pub async fn put_blob_meta(
        &self,
        namespace: &str,
        blob_id: &str,
        sha256: &str,
        size: i64,
        uploaded: bool,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO blobs (namespace, blob_id, sha256, size_bytes, uploaded, created_at) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (namespace, blob_id) DO UPDATE SET uploaded = excluded.uploaded",
        )
        .bind(namespace)
        .bind(blob_id)
        .bind(sha256)
        .bind(size)
        .bind(uploaded as i32)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// `(sha256, size, uploaded)`.
    pub async fn blob_meta(
        &self,
        namespace: &str,
        blob_id: &str,
    ) -> Result<Option<(String, i64, bool)>> {
        let row = sqlx::query(
            "SELECT sha256, size_bytes, uploaded FROM blobs WHERE namespace = $1 AND blob_id = $2",
        )
        .bind(namespace)
        .bind(blob_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| (r.get(0), r.get(1), r.get::<i32, _>(2) != 0)))
    }

    // ---- final-artifact cache ------------------------------------------

    /// Records that `build_id` (ready) produced the artifact for `key`.
    pub async fn cache_put(&self, namespace: &str, key: &str, build_id: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO artifact_cache (namespace, cache_key, build_id, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (namespace, cache_key) DO UPDATE SET build_id = excluded.build_id, created_at = excluded.created_at",
        )
        .bind(namespace)
        .bind(key)
        .bind(build_id)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn cache_get(&self, namespace: &str, key: &str) -> Result<Option<String>> {
        let row = sqlx::query(
            "SELECT build_id FROM artifact_cache WHERE namespace = $1 AND cache_key = $2",
        )
        .bind(namespace)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Every final-artifact cache entry: `(namespace, cache_key, build_id)`.
    pub async fn cache_entries(&self) -> Result<Vec<(String, String, String)>> {
        let rows = sqlx::query("SELECT namespace, cache_key, build_id FROM artifact_cache")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    pub async fn delete_cache_entry(&self, namespace: &str, key: &str) -> Result<bool> {
        let n = sqlx::query("DELETE FROM artifact_cache WHERE namespace = $1 AND cache_key = $2")
            .bind(namespace)
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(n.rows_affected() > 0)
    }

    // ---- garbage collection ---------------------------------------------

    /// Every build with whether its template still exists (the roots of
    /// the artifact mark).
    pub async fn gc_builds(&self) -> Result<Vec<GcBuild>> {
        let rows = sqlx::query(
            "SELECT b.id, b.status, b.record, b.finished_at, t.id
             FROM builds b LEFT JOIN templates t ON t.id = b.template_id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| GcBuild {
                id: r.get(0),
                status: r.get(1),
                record: r.get(2),
                finished_at: r.get(3),
                template_exists: r.get::<Option<String>, _>(4).is_some(),
            })
            .collect())
    }

    /// The sha256 (hex) of every context blob a caller announced.
    pub async fn blob_digests(&self) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT sha256 FROM blobs")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    /// Logs of builds that ended before `before`: `(build_id, entries,
    /// bytes)` per build.
    pub async fn expired_logs(&self, before: i64) -> Result<Vec<(String, i64, i64)>> {
        let rows = sqlx::query(
            "SELECT l.build_id, COUNT(*), COALESCE(SUM(LENGTH(l.entry)), 0)
             FROM build_logs l JOIN builds b ON b.id = l.build_id
             WHERE b.status IN ('ready', 'error', 'cancelled') AND b.finished_at < $1
             GROUP BY l.build_id",
        )
        .bind(before)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    /// Deletes a terminal build's log (a live build's log is never touched).
    pub async fn delete_logs(&self, build_id: &str) -> Result<u64> {
        let n = sqlx::query(
            "DELETE FROM build_logs WHERE build_id = $1 AND EXISTS
               (SELECT 1 FROM builds WHERE id = $1 AND status IN ('ready', 'error', 'cancelled'))",
        )
        .bind(build_id)
        .execute(&self.pool)
        .await?;
        Ok(n.rows_affected())
    }

    /// The applied schema migrations, oldest first.
    pub async fn schema_versions(&self) -> Result<Vec<i64>> {
        let rows = sqlx::query(
            "SELECT version FROM _sqlx_migrations WHERE success = TRUE ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    // ---- name claims ----------------------------------------------------

    pub async fn create_claim(
        &self,
        namespace: &str,
        name: &str,
        ttl_ms: i64,
    ) -> Result<(String, i64)> {
        use rand::Rng as _;
        let raw: [u8; 16] = rand::rng().random();
        let token = format!("claim_{}", hex::encode(raw));
        let expires = now_ms() + ttl_ms;
        sqlx::query(
            "INSERT INTO claims (token_hash, namespace, name, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(sha256_hex(&token))
        .bind(namespace)
        .bind(name)
        .bind(expires)
        .execute(&self.pool)
        .await?;
        Ok((token, expires))
    }

    /// The live claim on `(namespace, name)`, as `(token_hash, expires_at)`.
    pub async fn claim_on(&self, namespace: &str, name: &str) -> Result<Option<(String, i64)>> {
        let row = sqlx::query("SELECT token_hash, expires_at FROM claims WHERE namespace = $1 AND name = $2 AND expires_at > $3")
            .bind(namespace)
            .bind(name)
            .bind(now_ms())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    pub fn claim_hash(token: &str) -> String {
        sha256_hex(token)
    }

    pub async fn release_claim(&self, namespace: &str, token: &str) -> Result<bool> {
        let n = sqlx::query("DELETE FROM claims WHERE token_hash = $1 AND namespace = $2")
            .bind(sha256_hex(token))
            .bind(namespace)
            .execute(&self.pool)
            .await?;
        Ok(n.rows_affected() > 0)
    }
}

/// A build as the garbage collector sees it.
#[derive(Debug, Clone)]
pub struct GcBuild {
    pub id: String,
    pub status: String,
    pub record: String,
    pub finished_at: Option<i64>,
    pub template_exists: bool,
}

#[derive(Debug, Clone)]
pub struct TemplateRow {
    pub id: String,
    pub namespace: String,
    pub name: String,
    pub doc: String,
    pub created_at: i64,
    pub updated_at: i64,
}

fn template_row(r: sqlx::any::AnyRow) -> TemplateRow {
    TemplateRow {
        id: r.get(0),
        namespace: r.get(1),
        name: r.get(2),
        doc: r.get(3),
        created_at: r.get(4),
        updated_at: r.get(5),
    }
}

const BUILD_COLUMNS: &str = "id, namespace, template_id, status, source_type, backend, created_at, record, definition, owner, lease_expires_at, attempt, cancel_requested_at, cancel_requested_by, cancel_reason, finished_at";

fn build_row(r: sqlx::any::AnyRow) -> BuildRow {
    let cancel_at: Option<i64> = r.get(12);
    BuildRow {
        id: r.get(0),
        namespace: r.get(1),
        template_id: r.get(2),
        status: r.get(3),
        source_type: r.get(4),
        backend: r.get(5),
        created_at: r.get(6),
        record: r.get(7),
        definition: r.get(8),
        owner: r.get(9),
        lease_expires_at: r.get(10),
        attempt: r.get(11),
        cancel: cancel_at.map(|at| CancelRequest {
            at,
            by: r.get::<Option<String>, _>(13).unwrap_or_default(),
            reason: r.get(14),
        }),
        finished_at: r.get(15),
    }
}

/// Inserts the next entry of a build's log inside `tx`.
async fn insert_log(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    build_id: &str,
    make: impl FnOnce(i64) -> String,
) -> Result<i64> {
    let row = sqlx::query("SELECT COALESCE(MAX(seq) + 1, 0) FROM build_logs WHERE build_id = $1")
        .bind(build_id)
        .fetch_one(&mut **tx)
        .await?;
    let seq: i64 = row.get(0);
    sqlx::query("INSERT INTO build_logs (build_id, seq, entry) VALUES ($1, $2, $3)")
        .bind(build_id)
        .bind(seq)
        .bind(make(seq))
        .execute(&mut **tx)
        .await?;
    Ok(seq)
}
