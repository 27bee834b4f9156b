//! nullspace-store: the durable state of a nullspace server.
//!
//! - A SQL database: the embedded SQLite file by default, or a shared
//!   Postgres when given a `postgres://` URL. Both run the same queries
//!   through sqlx's `Any` driver (numbered `$N` parameters, portable types:
//!   TEXT for JSON documents, BIGINT epoch milliseconds for times).
//! - A content-addressed artifact store on disk ([`artifacts`]).
//!
//! Records are stored as JSON documents next to the few columns queries
//! need. The store does not interpret them: the server owns their shape.
//! Nothing here may ever hold a secret value; callers sanitize first.

pub mod artifacts;
pub mod machines;

pub use machines::{Inserted, MachineRow, SnapshotRow};

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Row};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database URL {0:?} is not supported (sqlite:PATH or postgres://…)")]
    BadUrl(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

const SCHEMA: &[&str] = &[
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

/// A build row: indexed columns plus the server's JSON documents.
#[derive(Debug, Clone, PartialEq, Eq)]
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
        for stmt in SCHEMA.iter().chain(machines::SCHEMA) {
            sqlx::query(stmt).execute(&pool).await?;
        }
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

    pub async fn insert_build(&self, b: &BuildRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO builds (id, namespace, template_id, status, source_type, backend, created_at, record, definition)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
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
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Replaces a build's status and record. With `only_if`, the update
    /// happens only while the status is one of those (returns whether it
    /// did), so a terminal state is never overwritten by a late writer.
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
        let row = sqlx::query(
            "SELECT id, namespace, template_id, status, source_type, backend, created_at, record, definition FROM builds WHERE id = $1",
        )
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
        let rows = sqlx::query(
            "SELECT id, namespace, template_id, status, source_type, backend, created_at, record, definition FROM builds
             WHERE template_id = $1
               AND ($2 = '' OR status = $2) AND ($3 = '' OR backend = $3) AND ($4 = '' OR source_type = $4)
               AND (created_at < $5 OR (created_at = $5 AND ($6 = '' OR id < $6)))
             ORDER BY created_at DESC, id DESC LIMIT $7",
        )
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

    /// Moves a waiting build to building; false when another worker (or a
    /// cancel) got there first. Safe across servers sharing a database.
    pub async fn claim(&self, id: &str, record: &str) -> Result<bool> {
        let n = sqlx::query("UPDATE builds SET status = 'building', record = $1 WHERE id = $2 AND status = 'waiting'")
            .bind(record)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(n.rows_affected() == 1)
    }

    // ---- logs -----------------------------------------------------------

    /// Appends a log entry; `make` receives the entry's offset (0-based,
    /// dense per build) and returns the JSON to store.
    pub async fn append_log(
        &self,
        build_id: &str,
        make: impl FnOnce(i64) -> String,
    ) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        let row =
            sqlx::query("SELECT COALESCE(MAX(seq) + 1, 0) FROM build_logs WHERE build_id = $1")
                .bind(build_id)
                .fetch_one(&mut *tx)
                .await?;
        let seq: i64 = row.get(0);
        sqlx::query("INSERT INTO build_logs (build_id, seq, entry) VALUES ($1, $2, $3)")
            .bind(build_id)
            .bind(seq)
            .bind(make(seq))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(seq)
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

fn build_row(r: sqlx::any::AnyRow) -> BuildRow {
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
    }
}
