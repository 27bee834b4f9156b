//! Machine snapshots: taking one of a running machine (it goes on, or
//! ends for a hibernation), the snapshot API (get, list, delete), and the
//! collection rule: the server's own snapshots (hibernate, fork) are
//! deleted when no live machine and no later snapshot references them; a
//! user's stay until deleted, and never while referenced. A directory no
//! row names is a crash's leftover once no take holds its `.taking`
//! marker; the collector (`gc.rs`) removes it.

use std::sync::Arc;

use nullspace_model::machine::SnapshotKind;
use nullspace_store::inflight::InFlight;
use nullspace_store::{Caller, SnapshotRow, now_ms};
use nullspace_vm::AfterSnapshot;
use serde_json::{Map, Value};

use super::commands::running;
use super::error::{MachineError, MachineResult};
use super::events::{self, Event};
use super::record::{self, Machine, plausible_id};
use crate::machine_model::SnapshotDoc;
use crate::runtime::Live;
use crate::state::Shared;
use nullspace_model::machine::lifecycle::LifecycleOperation as Op;

/// Snapshots a running machine (it goes on, or ends with
/// `AfterSnapshot::Stop`) and records the snapshot. The caller holds the
/// machine's lifecycle lock.
pub(super) async fn take(
    state: &Shared,
    m: &Machine,
    live: &Arc<Live>,
    kind: SnapshotKind,
    after: AfterSnapshot,
) -> MachineResult<SnapshotDoc> {
    let sid = nullspace_store::new_id("snap_");
    let dir = state.machines.machine_snapshots_dir.join(&sid);
    // Held until the row below names the directory: the collector removes
    // an unnamed one only when nobody is taking it (a crash's leftover).
    let _taking = InFlight::hold(&dir.with_extension("taking"))
        .map_err(|e| MachineError::Internal(format!("snapshot {sid}: {e}")))?;
    // A fork or a user snapshot holds no volume (another machine made from
    // it would write through the guest's view of it); a hibernation keeps
    // them (the resume gives the spares their images back).
    let volumes = if kind == SnapshotKind::Hibernate {
        Vec::new()
    } else {
        crate::volumes::attach::before_snapshot(state, live).await?
    };
    let snap = state.machines.snapshot(live, dir.clone(), after).await;
    if !volumes.is_empty() {
        crate::volumes::attach::after_snapshot(state, live, volumes).await;
    }
    let snap = snap.map_err(|e| MachineError::runtime(m.id(), e))?;
    let meta = &snap.meta;
    let doc = &m.doc;
    let sdoc = SnapshotDoc {
        id: sid.clone(),
        flavor: doc.flavor,
        machine_id: m.row.id.clone(),
        kind,
        dir: state.machines.relative(&dir),
        template_dir: doc.template_dir.clone(),
        size_bytes: meta.disk_bytes + meta.memory_bytes,
        created_at: now_ms(),
        template: doc.template.clone(),
        template_id: doc.template_id.clone(),
        build_id: doc.build_id.clone(),
        vcpus: doc.vcpus,
        memory_mb: doc.memory_mb,
        cwd: doc.cwd.clone(),
        env_keys: doc.env_keys.clone(),
        metadata: Map::new(),
    };
    let srow = SnapshotRow {
        id: sid,
        namespace: m.row.namespace.clone(),
        machine_id: m.row.id.clone(),
        node_id: state.machines.node_id.clone(),
        parent_id: m.row.base_snapshot.clone(),
        created_at: sdoc.created_at,
        record: serde_json::to_string(&sdoc)
            .map_err(|e| MachineError::Internal(format!("snapshot record: {e}")))?,
    };
    if let Err(e) = state.store.insert_snapshot(&srow).await {
        let _ = nullspace_vm::snapshot::remove_dir(&dir);
        return Err(e.into());
    }
    tracing::info!(machine = %m.row.id, snapshot = %srow.id, kind = kind.as_str(), ms = meta.timings_ms.snapshot, "snapshot taken");
    Ok(sdoc)
}

/// `POST …/snapshots`: the machine goes on.
pub async fn create(
    state: &Shared,
    c: &Caller,
    id: &str,
    key: Option<String>,
) -> MachineResult<SnapshotDoc> {
    let (m, live) = running(state, c, id).await?;
    let scope = format!("snapshot:{id}");
    if let Some(k) = &key
        && let Some(sid) = state
            .store
            .idempotency_target(&c.namespace, &scope, k)
            .await?
    {
        return Ok(record::load_snapshot(state, c, &sid).await?.1);
    }
    let _l = live.lifecycle.lock().await;
    let sdoc = take(
        state,
        &m,
        &live,
        SnapshotKind::Snapshot,
        AfterSnapshot::Resume,
    )
    .await?;
    events::record(state, &m, Event::ok(Op::SnapshotCreated).snapshot(&sdoc.id)).await;
    if let Some(k) = &key {
        let _ = state
            .store
            .claim_idempotency_key(&c.namespace, &scope, k, &sdoc.id)
            .await;
    }
    Ok(sdoc)
}

pub async fn get(state: &Shared, c: &Caller, id: &str) -> MachineResult<SnapshotDoc> {
    Ok(record::load_snapshot(state, c, id).await?.1)
}

/// The caller's snapshots (of one machine), oldest first, whose metadata
/// holds every pair of `metadata`.
pub async fn list(
    state: &Shared,
    c: &Caller,
    machine_id: Option<&str>,
    metadata: Option<&Map<String, Value>>,
) -> MachineResult<Vec<SnapshotDoc>> {
    if let Some(m) = machine_id
        && !plausible_id(m)
    {
        return Ok(vec![]);
    }
    let rows = state.store.snapshots(&c.namespace, machine_id).await?;
    let mut out = vec![];
    for r in rows {
        let doc = record::snapshot_doc(&r)?;
        if metadata.is_some_and(|m| m.iter().any(|(k, v)| doc.metadata.get(k) != Some(v))) {
            continue;
        }
        out.push(doc);
    }
    Ok(out)
}

/// `DELETE /v1/snapshots/{id}`: refused while a live machine's disk or a
/// later snapshot is layered on it.
pub async fn delete(state: &Shared, c: &Caller, id: &str) -> MachineResult<()> {
    let (row, doc) = record::load_snapshot(state, c, id).await?;
    let users = state.store.snapshot_users(id).await?;
    if !users.is_empty() {
        return Err(MachineError::conflict(
            "snapshot_in_use",
            format!(
                "snapshot {id} is in use by {} (a machine's disk or a later snapshot is layered on it)",
                users.join(", ")
            ),
        ));
    }
    state.store.delete_snapshot(&row.id).await?;
    let dir = state.machines.resolve(&doc.dir);
    let _ = tokio::task::spawn_blocking(move || nullspace_vm::snapshot::remove_dir(&dir)).await;
    Ok(())
}

/// Deletes the server's own snapshots among `ids` that nothing uses, and
/// then their parents, likewise.
pub(super) async fn collect(state: &Shared, mut ids: Vec<String>) {
    while let Some(id) = ids.pop() {
        let Ok(Some(srow)) = state.store.snapshot(&id).await else {
            continue;
        };
        let Ok(sdoc) = record::snapshot_doc(&srow) else {
            continue;
        };
        if !sdoc.kind.is_internal() {
            continue;
        }
        if !state
            .store
            .snapshot_users(&id)
            .await
            .is_ok_and(|u| u.is_empty())
        {
            continue;
        }
        if state.store.delete_snapshot(&id).await.unwrap_or(false) {
            let dir = state.machines.resolve(&sdoc.dir);
            let _ =
                tokio::task::spawn_blocking(move || nullspace_vm::snapshot::remove_dir(&dir)).await;
            if !srow.parent_id.is_empty() {
                ids.push(srow.parent_id);
            }
        }
    }
}
