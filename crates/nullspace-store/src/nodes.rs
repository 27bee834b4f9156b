//! Nodes (migrations/0008_nodes.sql): registration, the lease, fencing and
//! the declaration of dead nodes. Every time here is the database's clock
//! ([`Store::db_now`]), never a node's own: two nodes whose clocks differ
//! still agree on whose lease ran out. What a node does with its status
//! (ending machines, refusing work) is the server's.

use nullspace_model::node::{NodeLabels, NodeStatus};
use sqlx::Row;

use crate::{Backend, Result, Store, StoreError};

/// A node as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    pub id: String,
    /// Where other nodes reach its API (`http://host:port`).
    pub url: String,
    pub epoch: i64,
    pub status: NodeStatus,
    /// Epoch ms, database clock.
    pub lease_expires_at: i64,
    pub registered_at: i64,
    pub heartbeat_at: i64,
    pub max_machines: i64,
    pub memory_mib: i64,
    pub labels: NodeLabels,
    /// Whether its lease still runs at the database's `now` of the read.
    pub live: bool,
}

/// What a node registers.
#[derive(Debug, Clone)]
pub struct Registration<'a> {
    pub id: &'a str,
    pub url: &'a str,
    pub max_machines: i64,
    pub memory_mib: i64,
    pub labels: &'a NodeLabels,
    /// How long the lease runs without a renewal (ms).
    pub lease_ms: i64,
}

/// A registration's outcome: the epoch this process holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeLease {
    pub epoch: i64,
    pub expires_at: i64,
}

const COLS: &str = "id, url, epoch, status, lease_expires_at, registered_at, heartbeat_at, max_machines, memory_mib, labels";

impl Store {
    /// The database clock in epoch ms, as an SQL expression of this backend.
    fn now_sql(&self) -> &'static str {
        match self.backend {
            Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
            Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS BIGINT)",
        }
    }

    /// The database clock now (epoch ms).
    pub async fn db_now(&self) -> Result<i64> {
        let r = sqlx::query(&format!("SELECT {}", self.now_sql()))
            .fetch_one(&self.pool)
            .await?;
        Ok(r.get(0))
    }

    /// Registers `reg` as `ready` with a new epoch (one above the row's, or
    /// 1): any earlier process of this node id is fenced from now on.
    pub async fn register_node(&self, reg: &Registration<'_>) -> Result<NodeLease> {
        let labels = serde_json::to_string(reg.labels)
            .map_err(|e| StoreError::Corrupt(format!("node labels: {e}")))?;
        let now = self.now_sql();
        let r = sqlx::query(&format!(
            "INSERT INTO nodes ({COLS}) VALUES ($1, $2, 1, 'ready', {now} + $3, {now}, {now}, $4, $5, $6)
             ON CONFLICT (id) DO UPDATE SET url = $2, epoch = nodes.epoch + 1, status = 'ready',
                 lease_expires_at = {now} + $3, registered_at = {now}, heartbeat_at = {now},
                 max_machines = $4, memory_mib = $5, labels = $6
             RETURNING epoch, lease_expires_at"
        ))
        .bind(reg.id)
        .bind(reg.url)
        .bind(reg.lease_ms)
        .bind(reg.max_machines)
        .bind(reg.memory_mib)
        .bind(&labels)
        .fetch_one(&self.pool)
        .await?;
        Ok(NodeLease {
            epoch: r.get(0),
            expires_at: r.get(1),
        })
    }

    /// Renews `id`'s lease for `lease_ms`; `None` when this process no
    /// longer holds the node (another registration raised the epoch, or it
    /// was declared dead or stopped): it is fenced.
    pub async fn renew_node(&self, id: &str, epoch: i64, lease_ms: i64) -> Result<Option<i64>> {
        let now = self.now_sql();
        let r = sqlx::query(&format!(
            "UPDATE nodes SET lease_expires_at = {now} + $3, heartbeat_at = {now}
             WHERE id = $1 AND epoch = $2 AND status IN ('ready', 'draining')
             RETURNING lease_expires_at"
        ))
        .bind(id)
        .bind(epoch)
        .bind(lease_ms)
        .fetch_optional(&self.pool)
        .await?;
        Ok(r.map(|r| r.get(0)))
    }

    /// Moves this node (at `epoch`) from one of `from` to `to`; false when
    /// it does not hold the node any more or its status is not one of `from`.
    pub async fn set_node_status(
        &self,
        id: &str,
        epoch: i64,
        from: NodeStatus,
        to: NodeStatus,
    ) -> Result<bool> {
        from.to(to)
            .map_err(|e| StoreError::Corrupt(format!("node {id}: {e}")))?;
        let n = sqlx::query(
            "UPDATE nodes SET status = $4 WHERE id = $1 AND epoch = $2 AND status = $3",
        )
        .bind(id)
        .bind(epoch)
        .bind(from.as_str())
        .bind(to.as_str())
        .execute(&self.pool)
        .await;
        crate::wrote(n)
    }

    /// Declares dead every live node whose lease ran out more than
    /// `grace_ms` ago (database clock), and returns them. The update is
    /// conditional, so of several nodes declaring at once each dead node is
    /// returned to exactly one.
    pub async fn declare_dead_nodes(&self, grace_ms: i64) -> Result<Vec<NodeRow>> {
        let now = self.now_sql();
        let rows = sqlx::query(&format!(
            "UPDATE nodes SET status = 'dead'
             WHERE status IN ('ready', 'draining') AND lease_expires_at < {now} - $1
             RETURNING {COLS}, 0"
        ))
        .bind(grace_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(node_row).collect()
    }

    /// Every node, by id, with whether its lease runs now.
    pub async fn nodes(&self) -> Result<Vec<NodeRow>> {
        let now = self.now_sql();
        let rows = sqlx::query(&format!(
            "SELECT {COLS}, CASE WHEN lease_expires_at > {now} AND status IN ('ready', 'draining') THEN 1 ELSE 0 END
             FROM nodes ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(node_row).collect()
    }

    /// One node.
    pub async fn node(&self, id: &str) -> Result<Option<NodeRow>> {
        Ok(self.nodes().await?.into_iter().find(|n| n.id == id))
    }
}

fn node_row(r: sqlx::any::AnyRow) -> Result<NodeRow> {
    let id: String = r.get(0);
    let status: String = r.get(3);
    let status = status
        .parse()
        .map_err(|e| StoreError::Corrupt(format!("node {id}: {e}")))?;
    let labels: String = r.get(9);
    let labels = serde_json::from_str(&labels)
        .map_err(|e| StoreError::Corrupt(format!("node {id}: labels: {e}")))?;
    // An integer from a CASE (Postgres) or a plain literal: read as i32/i64.
    let live: i64 = r
        .try_get::<i64, _>(10)
        .or_else(|_| r.try_get::<i32, _>(10).map(i64::from))?;
    Ok(NodeRow {
        id,
        url: r.get(1),
        epoch: r.get(2),
        status,
        lease_expires_at: r.get(4),
        registered_at: r.get(5),
        heartbeat_at: r.get(6),
        max_machines: r.get(7),
        memory_mib: r.get(8),
        labels,
        live: live != 0,
    })
}
