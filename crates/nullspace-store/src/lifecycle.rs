//! Lifecycle events of machines: appended at each transition, listed with
//! filters and paging, and replayed after a sequence number.
//!
//! The store keeps the words the server gives it (operation, status, actor
//! are the SDK's spellings, chosen by the caller) and interprets none of
//! them. Every text column is clipped to [`TEXT_MAX`] bytes and metadata to
//! [`METADATA_MAX`], so no caller can grow a row without bound.

use sqlx::Row;

use crate::{Result, Store};

// The tables: migrations/0004_lifecycle_events.sql.

/// Longest value kept in a text column (reason, error message, ids).
pub const TEXT_MAX: usize = 4096;
/// Longest metadata document kept; a longer one is stored as `{}`.
pub const METADATA_MAX: usize = 16 << 10;
/// Most events one list call returns.
pub const PAGE_MAX: i64 = 1000;

/// One event, as appended (the store assigns its sequence number). Empty
/// strings mean "none".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LifecycleEvent {
    pub namespace: String,
    pub machine_id: String,
    /// The node (server identity) that made the transition.
    pub node_id: String,
    pub operation: String,
    pub status: String,
    pub reason: String,
    pub error_code: String,
    pub error_message: String,
    pub actor_kind: String,
    pub snapshot_id: String,
    pub source_machine_id: String,
    pub target_machine_id: String,
    /// Epoch milliseconds.
    pub occurred_at: i64,
    /// A JSON object (`{}` when empty).
    pub metadata: String,
}

/// An event with the sequence number the store gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLifecycleEvent {
    /// Increases with every append, across all machines and servers
    /// sharing the database; events commit in this order.
    pub seq: i64,
    pub event: LifecycleEvent,
}

/// Which events a list or replay returns. `None` matches anything.
#[derive(Debug, Clone, Copy, Default)]
pub struct LifecycleFilter<'a> {
    pub namespace: &'a str,
    pub machine_id: Option<&'a str>,
    pub operation: Option<&'a str>,
    pub status: Option<&'a str>,
    /// Epoch ms, inclusive.
    pub from: Option<i64>,
    /// Epoch ms, inclusive.
    pub to: Option<i64>,
    /// Only events with a larger sequence number (a replay's cursor).
    pub after_seq: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    /// Oldest first.
    Asc,
    /// Newest first.
    #[default]
    Desc,
}

/// One page of a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecyclePage {
    pub events: Vec<StoredLifecycleEvent>,
    /// More events match past this page.
    pub has_more: bool,
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

const COLS: &str = "seq, namespace, machine_id, node_id, operation, status, reason, error_code, error_message, actor_kind, snapshot_id, source_machine_id, target_machine_id, occurred_at, metadata";

fn stored(r: sqlx::any::AnyRow) -> StoredLifecycleEvent {
    StoredLifecycleEvent {
        seq: r.get(0),
        event: LifecycleEvent {
            namespace: r.get(1),
            machine_id: r.get(2),
            node_id: r.get(3),
            operation: r.get(4),
            status: r.get(5),
            reason: r.get(6),
            error_code: r.get(7),
            error_message: r.get(8),
            actor_kind: r.get(9),
            snapshot_id: r.get(10),
            source_machine_id: r.get(11),
            target_machine_id: r.get(12),
            occurred_at: r.get(13),
            metadata: r.get(14),
        },
    }
}

impl Store {
    /// Appends an event; its sequence number.
    pub async fn append_lifecycle_event(&self, e: &LifecycleEvent) -> Result<i64> {
        let metadata = if e.metadata.is_empty() || e.metadata.len() > METADATA_MAX {
            "{}"
        } else {
            e.metadata.as_str()
        };
        let mut tx = self.begin_write().await?;
        // Holds the counter row until commit: see the migration.
        let seq: i64 =
            sqlx::query("UPDATE lifecycle_seq SET value = value + 1 WHERE id = 1 RETURNING value")
                .fetch_one(&mut *tx)
                .await?
                .get(0);
        sqlx::query(&format!(
            "INSERT INTO lifecycle_events ({COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
        ))
        .bind(seq)
        .bind(clip(&e.namespace, TEXT_MAX))
        .bind(clip(&e.machine_id, TEXT_MAX))
        .bind(clip(&e.node_id, TEXT_MAX))
        .bind(clip(&e.operation, TEXT_MAX))
        .bind(clip(&e.status, TEXT_MAX))
        .bind(clip(&e.reason, TEXT_MAX))
        .bind(clip(&e.error_code, TEXT_MAX))
        .bind(clip(&e.error_message, TEXT_MAX))
        .bind(clip(&e.actor_kind, TEXT_MAX))
        .bind(clip(&e.snapshot_id, TEXT_MAX))
        .bind(clip(&e.source_machine_id, TEXT_MAX))
        .bind(clip(&e.target_machine_id, TEXT_MAX))
        .bind(e.occurred_at)
        .bind(metadata)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(seq)
    }

    /// The events matching `f` in `order` of sequence, skipping `offset`,
    /// at most `limit` (clamped to `1..=`[`PAGE_MAX`]).
    pub async fn lifecycle_events(
        &self,
        f: &LifecycleFilter<'_>,
        order: Order,
        offset: i64,
        limit: i64,
    ) -> Result<LifecyclePage> {
        let limit = limit.clamp(1, PAGE_MAX);
        let dir = match order {
            Order::Asc => "ASC",
            Order::Desc => "DESC",
        };
        // Unset filters bind values that match every row, so there is one
        // statement whatever is set.
        let sql = format!(
            "SELECT {COLS} FROM lifecycle_events
             WHERE namespace = $1 AND ($2 = '' OR machine_id = $2)
               AND ($3 = '' OR operation = $3) AND ($4 = '' OR status = $4)
               AND occurred_at >= $5 AND occurred_at <= $6 AND seq > $7
             ORDER BY seq {dir} LIMIT $8 OFFSET $9"
        );
        let rows = sqlx::query(&sql)
            .bind(f.namespace)
            .bind(f.machine_id.unwrap_or(""))
            .bind(f.operation.unwrap_or(""))
            .bind(f.status.unwrap_or(""))
            .bind(f.from.unwrap_or(i64::MIN))
            .bind(f.to.unwrap_or(i64::MAX))
            .bind(f.after_seq.unwrap_or(i64::MIN))
            .bind(limit + 1)
            .bind(offset.max(0))
            .fetch_all(&self.pool)
            .await?;
        let mut events: Vec<StoredLifecycleEvent> = rows.into_iter().map(stored).collect();
        let has_more = events.len() as i64 > limit;
        events.truncate(limit as usize);
        Ok(LifecyclePage { events, has_more })
    }

    /// The newest sequence number handed out (0 before the first event):
    /// where a live-only stream starts.
    pub async fn lifecycle_head(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT value FROM lifecycle_seq WHERE id = 1")
            .fetch_one(&self.pool)
            .await?
            .get(0))
    }

    /// Deletes events older than `before` (epoch ms); how many.
    pub async fn prune_lifecycle_events(&self, before: i64) -> Result<u64> {
        Ok(
            sqlx::query("DELETE FROM lifecycle_events WHERE occurred_at < $1")
                .bind(before)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::clip;

    #[test]
    fn clip_keeps_whole_characters() {
        assert_eq!(clip("abc", 5), "abc");
        assert_eq!(clip("abcdef", 3), "abc");
        // "é" is two bytes: a cut inside it drops it whole.
        assert_eq!(clip("aé", 2), "a");
    }
}
