//! Lifecycle events: recorded in the store at each transition, listed with
//! the SDK's filters and paging, and replayed then followed for a stream.
//! Recording never fails the operation it describes (a store error is
//! logged): the transition has already happened.

use std::time::Duration;

use nullspace_model::machine::lifecycle::{
    LifecycleActorKind, LifecycleAudience, LifecycleEventInfo, LifecycleEventList,
    LifecycleOperation, LifecycleOrder, LifecycleQuery, LifecycleStatus, event_id,
};
use nullspace_store::{Caller, LifecycleFilter, Order, StoredLifecycleEvent, now_ms};

use super::error::{MachineError, MachineResult};
use super::record::{self, Machine};
use crate::model::iso;
use crate::state::Shared;

/// Default and largest page of `GET …/lifecycle`.
pub const PAGE_DEFAULT: u64 = 50;
pub const PAGE_MAX: u64 = 1000;
/// How often a stream looks for new events (the store is shared by every
/// server of the database, so polling it sees all of them).
pub const FOLLOW_EVERY: Duration = Duration::from_millis(250);

/// One event about to be recorded.
#[derive(Debug, Clone)]
pub struct Event {
    pub op: LifecycleOperation,
    pub status: LifecycleStatus,
    pub actor: LifecycleActorKind,
    pub reason: Option<String>,
    pub error: Option<(&'static str, String)>,
    pub snapshot_id: Option<String>,
    pub source: Option<String>,
    pub target: Option<String>,
}

impl Event {
    pub fn ok(op: LifecycleOperation) -> Event {
        Event {
            op,
            status: LifecycleStatus::Succeeded,
            actor: LifecycleActorKind::User,
            reason: None,
            error: None,
            snapshot_id: None,
            source: None,
            target: None,
        }
    }
    /// A failure of `op`, with why.
    pub fn failed(op: LifecycleOperation, reason: impl Into<String>) -> Event {
        let reason = reason.into();
        Event {
            status: LifecycleStatus::Failed,
            error: Some(("machine_error", reason.clone())),
            reason: Some(reason),
            ..Event::ok(op)
        }
    }
    /// Done by the server (a timeout, a dead VM), not by a request.
    pub fn by_system(mut self) -> Event {
        self.actor = LifecycleActorKind::System;
        self
    }
    pub fn reason(mut self, r: impl Into<String>) -> Event {
        self.reason = Some(r.into());
        self
    }
    pub fn snapshot(mut self, id: impl Into<String>) -> Event {
        self.snapshot_id = Some(id.into());
        self
    }
    pub fn fork(mut self, source: &str, target: &str) -> Event {
        self.source = Some(source.into());
        self.target = Some(target.into());
        self
    }
}

/// Records `e` about machine `m`.
pub async fn record(state: &Shared, m: &Machine, e: Event) {
    let (error_code, error_message) = e.error.map(|(c, m)| (c.to_string(), m)).unwrap_or_default();
    let row = nullspace_store::LifecycleEvent {
        namespace: m.row.namespace.clone(),
        machine_id: m.row.id.clone(),
        node_id: state.machines.node_id.clone(),
        operation: e.op.as_str().into(),
        status: e.status.as_str().into(),
        reason: e.reason.unwrap_or_default(),
        error_code,
        error_message,
        actor_kind: e.actor.as_str().into(),
        snapshot_id: e.snapshot_id.unwrap_or_default(),
        source_machine_id: e.source.unwrap_or_default(),
        target_machine_id: e.target.unwrap_or_default(),
        occurred_at: now_ms(),
        metadata: "{}".into(),
    };
    if let Err(err) = state.store.append_lifecycle_event(&row).await {
        tracing::warn!(machine = %m.row.id, op = %e.op, "recording a lifecycle event: {err}");
    }
}

fn some(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// A stored event as the SDK reads it.
pub fn info(s: StoredLifecycleEvent) -> LifecycleEventInfo {
    let e = s.event;
    LifecycleEventInfo {
        id: event_id(s.seq),
        occurred_at: iso(e.occurred_at),
        audience: LifecycleAudience::Customer,
        operation: e.operation.parse().unwrap_or(LifecycleOperation::Reconcile),
        status: e.status.parse().unwrap_or(LifecycleStatus::Failed),
        actor_kind: e.actor_kind.parse().unwrap_or(LifecycleActorKind::System),
        metadata: serde_json::from_str(&e.metadata).unwrap_or_default(),
        machine_id: some(e.machine_id),
        snapshot_id: some(e.snapshot_id),
        source_machine_id: some(e.source_machine_id),
        target_machine_id: some(e.target_machine_id),
        user_id: None,
        reason: some(e.reason),
        error_code: some(e.error_code),
        error_message: some(e.error_message),
    }
}

/// An RFC 3339 time as epoch milliseconds (`from`/`to`).
pub fn parse_time(what: &str, s: &str) -> MachineResult<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|_| {
            MachineError::Invalid(format!(
                "{what} {:?} is not an RFC 3339 time (like 2026-01-02T03:04:05Z)",
                s.chars().take(64).collect::<String>()
            ))
        })
}

/// `GET …/lifecycle`: the machine's events (also of an ended machine).
pub async fn list(
    state: &Shared,
    c: &Caller,
    id: &str,
    q: LifecycleQuery,
) -> MachineResult<LifecycleEventList> {
    record::load(state, c, id).await?;
    if q.audience == Some(LifecycleAudience::Internal) {
        return Err(MachineError::Invalid(
            "public lifecycle routes do not serve audience=internal".into(),
        ));
    }
    let from = q
        .from
        .as_deref()
        .map(|s| parse_time("from", s))
        .transpose()?;
    let to = q.to.as_deref().map(|s| parse_time("to", s)).transpose()?;
    let offset = q.offset.unwrap_or(0).min(i64::MAX as u64);
    let limit = q.limit.unwrap_or(PAGE_DEFAULT).clamp(1, PAGE_MAX);
    let order = match q.order.unwrap_or(LifecycleOrder::Desc) {
        LifecycleOrder::Asc => Order::Asc,
        LifecycleOrder::Desc => Order::Desc,
    };
    let f = LifecycleFilter {
        namespace: &c.namespace,
        machine_id: Some(id),
        operation: q.operation.map(|o| o.as_str()),
        status: q.status.map(|s| s.as_str()),
        from,
        to,
        after_seq: None,
    };
    let page = state
        .store
        .lifecycle_events(&f, order, offset as i64, limit as i64)
        .await?;
    Ok(LifecycleEventList {
        events: page.events.into_iter().map(info).collect(),
        offset,
        limit,
        has_more: page.has_more,
    })
}

/// What a stream sends: events of one machine after `after_seq`, oldest
/// first, filtered; at most `limit`.
pub async fn after(
    state: &Shared,
    c: &Caller,
    id: &str,
    op: Option<LifecycleOperation>,
    status: Option<LifecycleStatus>,
    after_seq: i64,
    limit: u64,
) -> MachineResult<Vec<StoredLifecycleEvent>> {
    let f = LifecycleFilter {
        namespace: &c.namespace,
        machine_id: Some(id),
        operation: op.map(|o| o.as_str()),
        status: status.map(|s| s.as_str()),
        from: None,
        to: None,
        after_seq: Some(after_seq),
    };
    Ok(state
        .store
        .lifecycle_events(&f, Order::Asc, 0, limit.clamp(1, PAGE_MAX) as i64)
        .await?
        .events)
}

/// The newest sequence number (a live-only stream starts after it).
pub async fn head(state: &Shared) -> MachineResult<i64> {
    Ok(state.store.lifecycle_head().await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_the_sdk_sends_them() {
        assert_eq!(parse_time("from", "1970-01-01T00:00:01Z").unwrap(), 1000);
        assert_eq!(
            parse_time("from", "1970-01-01T01:00:01+01:00").unwrap(),
            1000
        );
        assert_eq!(
            parse_time("from", "2026-12-06T20:00:00.250+00:00").unwrap(),
            1_796_587_200_250
        );
        let e = parse_time("to", "yesterday").unwrap_err().to_string();
        assert!(
            e.contains("to \"yesterday\" is not an RFC 3339 time"),
            "{e}"
        );
    }
}
