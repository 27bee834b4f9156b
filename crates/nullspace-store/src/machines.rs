//! Machines, their snapshots and the idempotency keys of machine requests.
//!
//! Like builds, a machine is a few indexed columns plus the server's JSON
//! record. Columns hold what queries select on: the owning namespace, the
//! node (server identity) that runs its VMM, the status, the snapshot its
//! disk currently sits on (so a snapshot in use is never deleted), and the
//! next deadline the server must act on (timeout, inactivity, auto-delete;
//! `0` = none). No column is NULL: sqlx's `Any` driver and both databases
//! then read every row the same way.

use nullspace_model::machine::MachineStatus;
use sqlx::Row;

use crate::{Result, Store, StoreError, now_ms};

// The tables: migrations/0003_machines.sql.

/// Statuses of a machine that has (or is getting, or keeps) a VM.
pub const LIVE: &[MachineStatus] = &MachineStatus::LIVE;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineRow {
    pub id: String,
    pub namespace: String,
    /// The server (see the server's node identity) that runs the VMM.
    pub node_id: String,
    pub status: MachineStatus,
    pub template_id: String,
    /// The machine snapshot its disk sits on (`""`: the template's).
    pub base_snapshot: String,
    pub created_at: i64,
    pub updated_at: i64,
    /// Epoch ms of the next timeout action; 0 = none.
    pub deadline_at: i64,
    /// The server's JSON record.
    pub record: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRow {
    pub id: String,
    pub namespace: String,
    pub machine_id: String,
    pub node_id: String,
    /// The snapshot this one's disk is layered on (`""`: the template's).
    pub parent_id: String,
    pub created_at: i64,
    pub record: String,
}

/// What [`Store::insert_machine_once`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    New,
    /// The idempotency key was taken: the machine (or snapshot) it names.
    Existing(String),
}

const MACHINE_COLS: &str = "id, namespace, node_id, status, template_id, base_snapshot, created_at, updated_at, deadline_at, record";
const SNAPSHOT_COLS: &str = "id, namespace, machine_id, node_id, parent_id, created_at, record";

fn machine_row(r: sqlx::any::AnyRow) -> Result<MachineRow> {
    let id: String = r.get(0);
    let status: String = r.get(3);
    let status = status
        .parse()
        .map_err(|e| StoreError::Corrupt(format!("machine {id}: {e}")))?;
    Ok(MachineRow {
        id,
        namespace: r.get(1),
        node_id: r.get(2),
        status,
        template_id: r.get(4),
        base_snapshot: r.get(5),
        created_at: r.get(6),
        updated_at: r.get(7),
        deadline_at: r.get(8),
        record: r.get(9),
    })
}

fn snapshot_row(r: sqlx::any::AnyRow) -> SnapshotRow {
    SnapshotRow {
        id: r.get(0),
        namespace: r.get(1),
        machine_id: r.get(2),
        node_id: r.get(3),
        parent_id: r.get(4),
        created_at: r.get(5),
        record: r.get(6),
    }
}

/// `$first, $first+1, …` for an `IN (…)` of `n` values.
fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Store {
    /// Inserts a machine; with `key` = `(scope, key)`, only if no earlier
    /// request of the namespace used that idempotency key (atomically, also
    /// across servers sharing a database).
    pub async fn insert_machine_once(
        &self,
        m: &MachineRow,
        key: Option<(&str, &str)>,
    ) -> Result<Inserted> {
        let mut tx = self.pool.begin().await?;
        if let Some((scope, k)) = key {
            let n = sqlx::query(
                "INSERT INTO idempotency_keys (namespace, scope, key, target_id, created_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (namespace, scope, key) DO NOTHING",
            )
            .bind(&m.namespace)
            .bind(scope)
            .bind(k)
            .bind(&m.id)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
            if n.rows_affected() == 0 {
                let row = sqlx::query(
                    "SELECT target_id FROM idempotency_keys WHERE namespace = $1 AND scope = $2 AND key = $3",
                )
                .bind(&m.namespace)
                .bind(scope)
                .bind(k)
                .fetch_one(&mut *tx)
                .await?;
                tx.rollback().await?;
                return Ok(Inserted::Existing(row.get(0)));
            }
        }
        sqlx::query(&format!(
            "INSERT INTO machines ({MACHINE_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        ))
        .bind(&m.id)
        .bind(&m.namespace)
        .bind(&m.node_id)
        .bind(m.status.as_str())
        .bind(&m.template_id)
        .bind(&m.base_snapshot)
        .bind(m.created_at)
        .bind(m.updated_at)
        .bind(m.deadline_at)
        .bind(&m.record)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Inserted::New)
    }

    /// The target of an idempotency key, if the namespace used it.
    pub async fn idempotency_target(
        &self,
        namespace: &str,
        scope: &str,
        key: &str,
    ) -> Result<Option<String>> {
        let row = sqlx::query(
            "SELECT target_id FROM idempotency_keys WHERE namespace = $1 AND scope = $2 AND key = $3",
        )
        .bind(namespace)
        .bind(scope)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Claims an idempotency key for `target` (a snapshot or fork); the
    /// earlier target when it was taken.
    pub async fn claim_idempotency_key(
        &self,
        namespace: &str,
        scope: &str,
        key: &str,
        target: &str,
    ) -> Result<Inserted> {
        let n = sqlx::query(
            "INSERT INTO idempotency_keys (namespace, scope, key, target_id, created_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (namespace, scope, key) DO NOTHING",
        )
        .bind(namespace)
        .bind(scope)
        .bind(key)
        .bind(target)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        if n.rows_affected() == 1 {
            return Ok(Inserted::New);
        }
        Ok(self
            .idempotency_target(namespace, scope, key)
            .await?
            .map(Inserted::Existing)
            .unwrap_or(Inserted::New))
    }

    /// Forgets a key whose request failed, so that a retry starts afresh.
    pub async fn release_idempotency_key(
        &self,
        namespace: &str,
        scope: &str,
        key: &str,
    ) -> Result<()> {
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE namespace = $1 AND scope = $2 AND key = $3",
        )
        .bind(namespace)
        .bind(scope)
        .bind(key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn machine(&self, id: &str) -> Result<Option<MachineRow>> {
        let row = sqlx::query(&format!(
            "SELECT {MACHINE_COLS} FROM machines WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(machine_row).transpose()
    }

    /// Replaces a machine's mutable columns and record. With `only_if`,
    /// only while its status is one of those (returns whether it did), so a
    /// destroyed machine is never brought back by a late writer.
    pub async fn update_machine(&self, m: &MachineRow, only_if: &[MachineStatus]) -> Result<bool> {
        let mut sql = "UPDATE machines SET status = $1, base_snapshot = $2, updated_at = $3, deadline_at = $4, record = $5, node_id = $6 WHERE id = $7".to_string();
        if !only_if.is_empty() {
            sql.push_str(&format!(
                " AND status IN ({})",
                placeholders(8, only_if.len())
            ));
        }
        let mut q = sqlx::query(&sql)
            .bind(m.status.as_str())
            .bind(&m.base_snapshot)
            .bind(m.updated_at)
            .bind(m.deadline_at)
            .bind(&m.record)
            .bind(&m.node_id)
            .bind(&m.id);
        for s in only_if {
            q = q.bind(s.as_str());
        }
        Ok(q.execute(&self.pool).await?.rows_affected() > 0)
    }

    /// A namespace's machines in `statuses`, oldest first, after the
    /// exclusive `(created_at, id)` cursor; at most `limit`.
    pub async fn machines_page(
        &self,
        namespace: &str,
        statuses: &[MachineStatus],
        limit: i64,
        after: Option<(i64, String)>,
    ) -> Result<Vec<MachineRow>> {
        let (at, aid) = after.unwrap_or((i64::MIN, String::new()));
        let sql = format!(
            "SELECT {MACHINE_COLS} FROM machines WHERE namespace = $1
               AND (created_at > $2 OR (created_at = $2 AND id > $3))
               AND status IN ({})
             ORDER BY created_at, id LIMIT $4",
            placeholders(5, statuses.len())
        );
        let mut q = sqlx::query(&sql)
            .bind(namespace)
            .bind(at)
            .bind(aid)
            .bind(limit);
        for s in statuses {
            q = q.bind(s.as_str());
        }
        q.fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(machine_row)
            .collect()
    }

    /// Machines of `node` in `statuses` (recovery, capacity, shutdown).
    pub async fn machines_on_node(
        &self,
        node: &str,
        statuses: &[MachineStatus],
    ) -> Result<Vec<MachineRow>> {
        let sql = format!(
            "SELECT {MACHINE_COLS} FROM machines WHERE node_id = $1 AND status IN ({}) ORDER BY created_at, id",
            placeholders(2, statuses.len())
        );
        let mut q = sqlx::query(&sql).bind(node);
        for s in statuses {
            q = q.bind(s.as_str());
        }
        q.fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(machine_row)
            .collect()
    }

    /// Every machine in `statuses`, on any node (the collector's marks).
    pub async fn machines_in(&self, statuses: &[MachineStatus]) -> Result<Vec<MachineRow>> {
        let sql = format!(
            "SELECT {MACHINE_COLS} FROM machines WHERE status IN ({}) ORDER BY created_at, id",
            placeholders(1, statuses.len())
        );
        let mut q = sqlx::query(&sql);
        for s in statuses {
            q = q.bind(s.as_str());
        }
        q.fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(machine_row)
            .collect()
    }

    /// Machines of `node` whose deadline has passed at `now`.
    pub async fn machines_due(&self, node: &str, now: i64) -> Result<Vec<MachineRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {MACHINE_COLS} FROM machines WHERE node_id = $1 AND deadline_at > 0 AND deadline_at <= $2
               AND status IN ('running', 'paused') ORDER BY deadline_at"
        ))
        .bind(node)
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(machine_row).collect()
    }

    // ---- snapshots ------------------------------------------------------

    pub async fn insert_snapshot(&self, s: &SnapshotRow) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO machine_snapshots ({SNAPSHOT_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        ))
        .bind(&s.id)
        .bind(&s.namespace)
        .bind(&s.machine_id)
        .bind(&s.node_id)
        .bind(&s.parent_id)
        .bind(s.created_at)
        .bind(&s.record)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn snapshot(&self, id: &str) -> Result<Option<SnapshotRow>> {
        let row = sqlx::query(&format!(
            "SELECT {SNAPSHOT_COLS} FROM machine_snapshots WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(snapshot_row))
    }

    /// A namespace's snapshots (of one machine, when given), oldest first.
    pub async fn snapshots(
        &self,
        namespace: &str,
        machine_id: Option<&str>,
    ) -> Result<Vec<SnapshotRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {SNAPSHOT_COLS} FROM machine_snapshots WHERE namespace = $1 AND ($2 = '' OR machine_id = $2)
             ORDER BY created_at, id"
        ))
        .bind(namespace)
        .bind(machine_id.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(snapshot_row).collect())
    }

    /// What keeps a snapshot's files needed: a live machine whose disk
    /// sits on it (snapshots are self-contained: a later one holds its own
    /// links to the files it shares).
    pub async fn snapshot_users(&self, id: &str) -> Result<Vec<String>> {
        let sql = format!(
            "SELECT id FROM machines WHERE base_snapshot = $1 AND status IN ({})",
            placeholders(2, LIVE.len())
        );
        let mut q = sqlx::query(&sql).bind(id);
        for s in LIVE {
            q = q.bind(s.as_str());
        }
        let mut ids: Vec<String> = q
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(|r| r.get(0))
            .collect();
        ids.sort();
        Ok(ids)
    }

    pub async fn delete_snapshot(&self, id: &str) -> Result<bool> {
        let n = sqlx::query("DELETE FROM machine_snapshots WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(n.rows_affected() > 0)
    }
}
