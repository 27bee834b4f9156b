//! Pausing and resuming: a hibernation puts memory and disk into a
//! snapshot and ends the VM (`running → paused`); a resume restores it
//! under the same id (`paused → creating → running`, back to `paused` if
//! the restore fails). A fork snapshots a running machine and creates a
//! new one from it.

use std::sync::Arc;

use nullspace_model::machine::{CreateMachineBody, MachineInfo, MachineStatus, SnapshotKind};
use nullspace_store::{Caller, now_ms};
use nullspace_vm::AfterSnapshot;

use super::commands::running;
use super::create::{open_snapshot, wait_created};
use super::error::{MachineError, MachineResult};
use super::events::{self, Event};
use super::record::{self, Machine};
use super::snapshots;
use crate::machine_model::{SnapshotDoc, VmRecord};
use crate::runtime::{Live, load_envs};
use crate::state::Shared;
use nullspace_model::machine::lifecycle::LifecycleOperation as Op;

/// `POST …/hibernate` (`pause()`): answers the snapshot it is paused in
/// (the same one again for a paused machine).
pub async fn hibernate(state: &Shared, c: &Caller, id: &str) -> MachineResult<SnapshotDoc> {
    let m = record::load(state, c, id).await?;
    if m.status() == MachineStatus::Paused
        && let Some(sid) = &m.doc.snapshot_id
    {
        return Ok(record::load_snapshot(state, c, sid).await?.1);
    }
    let (m, live) = running(state, c, id).await?;
    let _l = live.lifecycle.lock().await;
    pause_now(state, m, &live).await
}

/// Hibernates a running machine; the caller holds its lifecycle lock.
pub(super) async fn pause_now(
    state: &Shared,
    mut m: Machine,
    live: &Arc<Live>,
) -> MachineResult<SnapshotDoc> {
    let sdoc = snapshots::take(
        state,
        &m,
        live,
        SnapshotKind::Hibernate,
        AfterSnapshot::Stop,
    )
    .await?;
    m.doc.vm = None;
    m.doc.snapshot_id = Some(sdoc.id.clone());
    m.doc.base_dir = sdoc.dir.clone();
    m.doc.paused_at = Some(now_ms());
    m.doc.timeout_at = None;
    m.row.base_snapshot = sdoc.id.clone();
    record::transition(state, &mut m, MachineStatus::Paused).await?;
    events::record(state, &m, Event::ok(Op::Hibernate).snapshot(&sdoc.id)).await;
    tracing::info!(machine = %m.row.id, snapshot = %sdoc.id, "machine paused");
    Ok(sdoc)
}

/// `POST …/resume`: a paused machine runs again (the same id) from its
/// hibernation snapshot. 0.1.9 names the snapshot instead of the machine.
pub async fn resume(state: &Shared, c: &Caller, id: &str) -> MachineResult<MachineInfo> {
    let machine_id = if id.starts_with("snap_") {
        let (srow, _) = record::load_snapshot(state, c, id)
            .await
            .map_err(|_| MachineError::NotFound(id.to_string()))?;
        let m = record::load(state, c, &srow.machine_id).await?;
        if m.doc.snapshot_id.as_deref() != Some(id) {
            return Err(MachineError::conflict(
                "snapshot_conflict",
                format!(
                    "snapshot {id} is not the paused state of machine {}; create a machine from it with snapshot_id",
                    srow.machine_id
                ),
            ));
        }
        srow.machine_id
    } else {
        id.to_string()
    };
    let id = machine_id.as_str();
    let mut m = record::load_live(state, c, id).await?;
    match m.status() {
        MachineStatus::Running => return Ok(m.info()),
        MachineStatus::Paused => {}
        _ => return Err(MachineError::not_ready(id, "is still being created")),
    }
    if m.row.node_id != state.machines.node_id {
        return Err(MachineError::conflict(
            "machine_conflict",
            format!(
                "machine {id} was paused on node {}; resume it there",
                m.row.node_id
            ),
        ));
    }
    let snapshot = open_snapshot(state, &m.doc.base_dir)?;
    let reservation = state
        .machines
        .reserve(m.doc.memory_mb)
        .map_err(|e| MachineError::runtime(id, e))?;
    // Claim the transition so a concurrent resume does not restore twice.
    if !record::transition(state, &mut m, MachineStatus::Creating).await? {
        return Err(MachineError::InTransition {
            id: id.to_string(),
            why: "is changing state; try again".into(),
        });
    }
    let envs = load_envs(&snapshot.dir);
    let egress = super::egress::effective(m.doc.internet_access, m.doc.egress.as_ref());
    // Its volumes are mounted in the guest's memory: each spare gets its
    // image back before the guest runs.
    let volumes = match crate::volumes::attach::resume_images(state, id).await {
        Ok(v) => v,
        Err(e) => {
            let _ = record::transition(state, &mut m, MachineStatus::Paused).await;
            return Err(e.into());
        }
    };
    match state
        .machines
        .restore(id, snapshot, envs, reservation, None, egress, volumes, None)
        .await
    {
        Ok((live, started)) => {
            let now = now_ms();
            m.doc.vm = Some(VmRecord {
                pid: live.handle.pid,
            });
            m.doc.paused_at = None;
            m.doc.last_active_at = now;
            m.doc.timeout_at = Some(now + m.doc.timeout_ms as i64);
            record::transition(state, &mut m, MachineStatus::Running).await?;
            let from = m.row.base_snapshot.clone();
            events::record(state, &m, Event::ok(Op::ResumeFromSnapshot).snapshot(from)).await;
            tracing::info!(machine = %id, restore_ms = started.ms, "machine resumed");
            Ok(m.info())
        }
        Err(e) => {
            let _ = record::transition(state, &mut m, MachineStatus::Paused).await;
            let e = MachineError::runtime(id, e);
            events::record(
                state,
                &m,
                Event::failed(Op::ResumeFromSnapshot, e.to_string()),
            )
            .await;
            Err(e)
        }
    }
}

/// `POST …/fork`: a new machine from a snapshot of this running one (its
/// disk copy-on-write over the snapshot's); both go on independently.
pub async fn fork(
    state: &Shared,
    c: &Caller,
    id: &str,
    key: Option<String>,
) -> MachineResult<MachineInfo> {
    let scope = format!("fork:{id}");
    if let Some(k) = &key
        && let Some(child) = state
            .store
            .idempotency_target(&c.namespace, &scope, k)
            .await?
    {
        return wait_created(state, c, &child).await;
    }
    let (m, live) = running(state, c, id).await?;
    let sdoc = {
        let _l = live.lifecycle.lock().await;
        snapshots::take(state, &m, &live, SnapshotKind::Fork, AfterSnapshot::Resume).await?
    };
    let doc = &m.doc;
    let body = CreateMachineBody {
        snapshot_id: Some(sdoc.id.clone()),
        timeout_ms: Some(doc.timeout_ms),
        timeout_action: Some(doc.timeout_action.as_str().to_string()),
        inactivity_timeout_ms: doc.inactivity_timeout_ms,
        auto_delete_after_ms: doc.auto_delete_after_ms,
        ephemeral: Some(doc.ephemeral),
        auto_resume: Some(doc.auto_resume),
        metadata: Some(doc.metadata.clone()),
        internet_access: Some(doc.internet_access),
        // The child keeps its parent's access and egress policy.
        network: Some(serde_json::json!({
            "allow_public_traffic": doc.access.public,
            "egress": doc.egress,
        })),
        ..Default::default()
    };
    let child = super::create::create(state, c, doc.flavor, body, None).await?;
    events::record(
        state,
        &m,
        Event::ok(Op::Fork).snapshot(&sdoc.id).fork(id, &child.id),
    )
    .await;
    // The child records its parent.
    if let Ok(Some(crow)) = state.store.machine(&child.id).await
        && let Ok(mut cm) = Machine::from_row(crow)
    {
        cm.doc.parent_id = Some(id.to_string());
        let status = cm.status();
        let _ = record::save(state, &mut cm, &[status]).await;
    }
    if let Some(k) = &key {
        let _ = state
            .store
            .claim_idempotency_key(&c.namespace, &scope, k, &child.id)
            .await;
    }
    Ok(child)
}
