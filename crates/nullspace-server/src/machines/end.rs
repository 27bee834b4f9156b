//! How machines end (delete, timeout, a VM that died, a failed recovery)
//! and how long they may run (`POST …/timeout`).

use nullspace_model::machine::{
    Destroyed, MachineStatus, TimeoutAction, TimeoutBody, TimeoutLease,
};
use nullspace_store::machines::LIVE;
use nullspace_store::{Caller, now_ms};

use super::error::{MachineError, MachineResult};
use super::events::{self, Event};
use super::record::{self, Machine};
use super::{rules, snapshots};
use crate::model::iso;
use crate::state::Shared;
use nullspace_model::machine::lifecycle::LifecycleOperation as Op;

/// `DELETE /v1/machines/{id}`: the VM ends, the record says `destroyed`.
/// Deleting an ended machine answers its final status again.
pub async fn destroy(state: &Shared, c: &Caller, id: &str) -> MachineResult<Destroyed> {
    let m = record::load(state, c, id).await?;
    if m.status().is_final() {
        return Ok(Destroyed {
            id: m.row.id,
            status: m.row.status,
        });
    }
    if m.status() != MachineStatus::Paused && m.row.node_id != state.machines.node_id {
        return Err(MachineError::conflict(
            "machine_conflict",
            format!(
                "machine {id} runs on node {}; delete it there",
                m.row.node_id
            ),
        ));
    }
    end(state, m, MachineStatus::Destroyed, "deleted", LIVE).await?;
    Ok(Destroyed {
        id: id.to_string(),
        status: MachineStatus::Destroyed,
    })
}

/// Ends a machine (`status`: destroyed or error): the record first (nobody
/// uses it from now on), then its VM and directory, then the server's own
/// snapshots of it that nothing needs any more. The record is read again
/// under the machine's lifecycle lock and ended only if its status is
/// still one of `only_if` (a pause or resume may have come first).
pub async fn end(
    state: &Shared,
    m: Machine,
    status: MachineStatus,
    reason: &str,
    only_if: &[MachineStatus],
) -> MachineResult<()> {
    debug_assert!(status.is_final());
    let live = state.machines.get(&m.row.id);
    let _l = match &live {
        Some(l) => Some(l.lifecycle.lock().await),
        None => None,
    };
    let Some(row) = state.store.machine(&m.row.id).await? else {
        return Ok(());
    };
    if !only_if.contains(&row.status) {
        return Ok(());
    }
    let mut m = Machine::from_row(row)?;
    let vm = m.doc.vm.take();
    m.doc.ended_reason = Some(reason.to_string());
    m.doc.ended_at = Some(now_ms());
    m.doc.timeout_at = None;
    if !record::transition(state, &mut m, status).await? {
        return Ok(());
    }
    ended_events(state, &m, status, reason).await;
    let id = m.row.id.clone();
    if m.row.node_id == state.machines.node_id {
        let handle = vm.map(|v| state.machines.handle_of(&id, v.pid));
        if let Err(e) = state.machines.destroy(&id, handle).await {
            tracing::warn!(machine = %id, "ending the VM: {e}");
        }
    }
    tracing::info!(machine = %id, %status, reason, "machine ended");
    // Its QEMU is gone: its volumes are free for other machines.
    crate::volumes::attach::release_machine(state, &id).await;
    // Its upload sessions (and their spool) go with it.
    state.uploads.forget_machine(&crate::uploads::Owner {
        namespace: m.row.namespace.clone(),
        machine: id.clone(),
    });
    let mut candidates: Vec<String> = state
        .store
        .snapshots(&m.row.namespace, Some(&id))
        .await
        .map(|v| v.into_iter().rev().map(|s| s.id).collect())
        .unwrap_or_default();
    if !m.row.base_snapshot.is_empty() {
        candidates.push(m.row.base_snapshot.clone());
    }
    snapshots::collect(state, candidates).await;
    Ok(())
}

/// The events of an ending: a timeout first when it was one, then the
/// destroy (failed when the machine ended in `error`); its preview grants
/// are forgotten.
async fn ended_events(state: &Shared, m: &Machine, status: MachineStatus, reason: &str) {
    // Its preview grants can never admit anything again.
    if let Err(e) = state.store.delete_preview_grants(m.id()).await {
        tracing::warn!(machine = m.id(), "forgetting preview grants: {e}");
    }
    let by_user = reason == "deleted";
    if reason == "timeout" {
        let ev = Event::ok(Op::TimeoutExpired).by_system().reason("destroy");
        events::record(state, m, ev).await;
    }
    let ev = if status == MachineStatus::Error {
        Event::failed(Op::Destroy, reason)
    } else {
        Event::ok(Op::Destroy).reason(reason)
    };
    events::record(state, m, if by_user { ev } else { ev.by_system() }).await;
}

/// `POST …/timeout`: the machine may run `timeout_ms` from now (and its
/// timeout action changes when given).
pub async fn set_timeout(
    state: &Shared,
    c: &Caller,
    id: &str,
    b: TimeoutBody,
) -> MachineResult<TimeoutLease> {
    let ms = rules::timeout_ms(b.timeout_ms)?;
    let action = rules::timeout_action(b.timeout_action.as_deref(), None)?;
    let mut m = record::load_live(state, c, id).await?;
    if let Some(a) = action {
        if m.doc.ephemeral && a == TimeoutAction::Hibernate {
            return Err(MachineError::Invalid(
                "an ephemeral machine is never hibernated (timeout_action destroy)".into(),
            ));
        }
        m.doc.timeout_action = a;
    }
    m.doc.timeout_ms = ms;
    let running = m.status() == MachineStatus::Running;
    if running {
        m.doc.timeout_at = Some(now_ms() + ms as i64);
    }
    let status = m.status();
    if !record::save(state, &mut m, &[status]).await? {
        return Err(MachineError::not_ready(
            id,
            "changed state meanwhile; try again",
        ));
    }
    let ev = Event::ok(Op::TimeoutUpdated).reason(format!("{ms} ms"));
    events::record(state, &m, ev).await;
    let timeout_at = m.doc.timeout_at.filter(|_| running);
    Ok(TimeoutLease {
        timeout_ms: ms,
        timeout_action: m.doc.timeout_action,
        timeout_at: timeout_at.map(iso),
        remaining_ms: timeout_at.map(|t| (t - now_ms()).max(0)),
    })
}
