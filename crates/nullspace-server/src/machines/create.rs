//! Creating a machine: what it is restored from (a template's snapshot or
//! a machine snapshot), the record written `creating` before the VM
//! starts, and the restore that makes it `running` or `error`. Retries
//! with the same Idempotency-Key get the same machine.

use std::collections::BTreeMap;
use std::time::Duration;

use nullspace_model::machine::{CreateMachineBody, MachineInfo, MachineStatus, TimeoutAction};
use nullspace_store::{Caller, Inserted, MachineRow, now_ms};
use nullspace_vm::Snapshot;

use super::error::{MachineError, MachineResult};
use super::events::{self, Event};
use super::record::{self, Machine};
use super::rules;
use crate::machine_model::{Flavor, MachineDoc, VmRecord};
use crate::runtime::{Reservation, Runtime, load_envs};
use crate::state::Shared;
use crate::templates;
use nullspace_model::machine::lifecycle::LifecycleOperation as Op;

pub(super) const SCOPE_CREATE: &str = "machine_create";

/// Where a new machine comes from: a template build's snapshot or a
/// machine snapshot, with what the machine inherits.
pub struct Source {
    pub template: String,
    pub template_id: String,
    pub build_id: String,
    pub snapshot: Snapshot,
    /// The template snapshot at the root of the chain (as recorded).
    pub template_dir: String,
    /// The machine snapshot (`None`: a template's).
    pub snapshot_id: Option<String>,
    pub envs: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub vcpus: u32,
    pub memory_mb: u32,
}

/// Opens a snapshot directory a record names.
pub(super) fn open_snapshot(state: &Shared, recorded: &str) -> MachineResult<Snapshot> {
    let dir = state.machines.resolve(recorded);
    Snapshot::open(&dir).map_err(|e| {
        MachineError::conflict(
            "rebuild_required",
            format!(
                "the snapshot at {} cannot be opened ({e}); rebuild the template",
                dir.display()
            ),
        )
    })
}

pub async fn template_source(state: &Shared, c: &Caller, raw: &str) -> MachineResult<Source> {
    let resolved = match templates::resolve_build(state, c, raw).await {
        Ok(x) => x,
        Err(e) if raw == crate::base::NAME && e.code == "template_not_found" => {
            let r = format!("{}/{}", crate::base::NAMESPACE, crate::base::NAME);
            templates::resolve_build(state, c, &r).await.map_err(|_| {
                MachineError::Template(crate::error::ApiError::new(
                    axum::http::StatusCode::NOT_FOUND,
                    "template_not_found",
                    "template \"base\" is not built on this server yet (it builds in the background when the server starts with the build VM); try again shortly",
                ))
            })?
        }
        Err(e) => return Err(e.into()),
    };
    let (row, rec) = resolved;
    if rec.status != nullspace_model::build::status::BuildStatus::Ready {
        return Err(MachineError::conflict(
            "template_build_conflict",
            format!(
                "template {raw:?} points at build {} which is {}",
                rec.build_id, rec.status
            ),
        ));
    }
    // Built on another node: pulled from the artifact registry first.
    crate::replicate::ensure_local(state, &rec, raw)
        .await
        .map_err(|e| match e {
            crate::replicate::ReplicateError::NotPublished(m) => {
                MachineError::conflict("template_unavailable", m)
            }
            e => MachineError::TemplateUnavailable(e.to_string()),
        })?;
    let m = templates::manifest_of(state, &rec, raw).await?;
    let Some(dir) = templates::snapshot_dir(state, &m) else {
        return Err(MachineError::conflict(
            "rebuild_required",
            format!(
                "template {raw:?} (build {}) has no VM snapshot: it was built without the build VM; rebuild it on a server with the build VM",
                rec.build_id
            ),
        ));
    };
    let recorded = state.machines.relative(&dir);
    let snapshot = open_snapshot(state, &recorded)?;
    Ok(Source {
        template: raw.to_string(),
        template_id: row.id,
        build_id: rec.build_id,
        vcpus: snapshot.meta.vm.vcpus,
        memory_mb: snapshot.meta.vm.memory_mb,
        template_dir: recorded,
        snapshot,
        snapshot_id: None,
        envs: BTreeMap::new(),
        cwd: None,
    })
}

async fn snapshot_source(state: &Shared, c: &Caller, id: &str) -> MachineResult<Source> {
    let (row, doc) = record::load_snapshot(state, c, id).await?;
    if row.node_id != state.machines.node_id {
        return Err(MachineError::conflict(
            "snapshot_conflict",
            format!(
                "snapshot {id} is stored on node {} (another server sharing this database); create machines from it there",
                row.node_id
            ),
        ));
    }
    let snapshot = open_snapshot(state, &doc.dir)?;
    Ok(Source {
        template: doc.template.clone(),
        template_id: doc.template_id.clone(),
        build_id: doc.build_id.clone(),
        envs: load_envs(&snapshot.dir),
        template_dir: doc.template_dir.clone(),
        snapshot,
        snapshot_id: Some(doc.id.clone()),
        cwd: doc.cwd.clone(),
        vcpus: doc.vcpus,
        memory_mb: doc.memory_mb,
    })
}

/// `POST /v1/machines`: answers when the machine runs commands. `flavor`
/// is recorded: `/v1/snapshots` answers in the dialect of the machine a
/// snapshot came from.
pub async fn create(
    state: &Shared,
    c: &Caller,
    flavor: Flavor,
    b: CreateMachineBody,
    key: Option<String>,
) -> MachineResult<MachineInfo> {
    rules::refuse_unsupported(&b)?;
    if let Some(m) = state.cluster.get()
        && m.is_fenced()
    {
        return Err(MachineError::Fenced(m.node_id.clone()));
    }
    // Checked before anything is made; attached once the machine runs.
    let volumes = crate::volumes::rules::mounts(b.volumes.as_ref())?;
    crate::volumes::attach::check_at_create(state, c, &volumes).await?;
    if let Some(k) = &key {
        if k.is_empty() || k.len() > 256 {
            return Err(MachineError::Invalid(
                "Idempotency-Key must be 1 to 256 bytes".into(),
            ));
        }
        if let Some(existing) = state
            .store
            .idempotency_target(&c.namespace, SCOPE_CREATE, k)
            .await?
        {
            return wait_created(state, c, &existing).await;
        }
    }
    let timeout_ms = rules::timeout_ms(b.timeout_ms.unwrap_or(rules::DEFAULT_TIMEOUT_MS))?;
    let mut action = rules::timeout_action(b.timeout_action.as_deref(), b.lifecycle.as_ref())?
        .unwrap_or_default();
    let ephemeral = b.ephemeral.unwrap_or(false);
    let auto_resume = b.auto_resume.unwrap_or(false);
    if ephemeral {
        if auto_resume {
            return Err(MachineError::Invalid(
                "ephemeral machines cannot auto_resume (they are never hibernated)".into(),
            ));
        }
        action = TimeoutAction::Destroy;
    }
    if auto_resume && action != TimeoutAction::Hibernate {
        return Err(MachineError::Invalid(
            "auto_resume needs timeout_action hibernate (or lifecycle.on_timeout pause)".into(),
        ));
    }
    let envs = b.envs.clone().unwrap_or_default();
    rules::envs("envs", &envs)?;
    let cwd = b.cwd.as_deref().map(rules::cwd).transpose()?;
    let metadata = b.metadata.clone().unwrap_or_default();
    if serde_json::to_vec(&metadata).map(|v| v.len()).unwrap_or(0) > 64 << 10 {
        return Err(MachineError::Invalid(
            "metadata is larger than 64 KiB".into(),
        ));
    }
    let mut src = match (&b.snapshot_id, &b.template) {
        (Some(s), _) => snapshot_source(state, c, s).await?,
        (None, t) => {
            let raw = t.as_deref().unwrap_or(crate::base::NAME).trim();
            template_source(state, c, raw).await?
        }
    };
    // A restore has its snapshot's size; another size within the
    // snapshot's ceiling is set in the guest right after.
    let (want_v, want_m) = (
        b.vcpus.unwrap_or(src.vcpus),
        b.memory_mb.unwrap_or(src.memory_mb),
    );
    let resize = (want_v, want_m) != (src.vcpus, src.memory_mb);
    nullspace_model::size::check(
        src.snapshot.meta.vm.ceiling,
        (src.vcpus, src.memory_mb),
        (want_v, want_m),
    )
    .map_err(|e| MachineError::Incompatible(format!("template {:?}: {e}", src.template)))?;
    if resize {
        let names_pool = b
            .warm_pool
            .as_ref()
            .and_then(|w| w.get("id"))
            .and_then(|v| v.as_str())
            .is_some_and(|s| !s.trim().is_empty());
        if names_pool {
            return Err(MachineError::Incompatible(format!(
                "a warm pool's machines have their template's size ({} vCPUs, {} MiB); create without warm_pool for vcpus={want_v} memory_mb={want_m}",
                src.vcpus, src.memory_mb
            )));
        }
    }
    if let Some(d) = b.disk_mb {
        let have = src.snapshot.meta.disk_bytes >> 20;
        if b.snapshot_id.is_some() {
            return Err(MachineError::Invalid(
                "disk_mb is not allowed with snapshot_id".into(),
            ));
        }
        if d > have {
            return Err(MachineError::Invalid(format!(
                "disk_mb {d} exceeds template {:?}'s disk of {have} MiB (fixed when it was built; rebuild it with a larger disk_mb)",
                src.template
            )));
        }
    }
    let internet = b.internet_access.unwrap_or(true);
    let public = super::rules::public_traffic(&b)?;
    let egress = super::egress::requested(&b)?;
    super::egress::admit(
        state,
        &src.template,
        &src.snapshot.meta.vm,
        internet,
        egress.as_ref(),
    )?;
    if state.vmm.is_none() {
        return Err(MachineError::NotImplemented(
            "this server runs no VMs (started with --no-build-vm, or QEMU, the guest kernel or the guest init is missing)".into(),
        ));
    }
    // Create-time envs go over the snapshot's (a machine from a snapshot keeps them).
    src.envs.extend(envs);
    // A template's machine may start from a VM prepared ahead for exactly
    // this snapshot and shape (the server's pool, or the warm pool the
    // create names): its id is the one it was prepared under, and it
    // brings the capacity it holds.
    // A machine of another size is restored for itself (pooled VMs hold
    // the template's size and its capacity).
    let (mut pooled, checkout) = if src.snapshot_id.is_none() && !resize {
        let plan = crate::warm_pools::plan_checkout(state, c, b.warm_pool.as_ref(), &src).await?;
        let machines = state.machines.clone();
        let (tid, snap) = (src.template_id.clone(), src.snapshot.clone());
        let (entry, result) = tokio::task::spawn_blocking(move || {
            crate::warm_pools::take(&machines, &plan, &tid, &snap)
        })
        .await
        .map_err(|e| MachineError::Internal(format!("pool take task: {e}")))??;
        (entry, Some(result))
    } else {
        (None, None)
    };
    let reservation = match pooled.as_mut().and_then(Runtime::admission_of) {
        Some(r) => r,
        None => state
            .machines
            .reserve(want_m)
            .map_err(|e| MachineError::runtime("(new)", e))?,
    };
    let id = pooled
        .as_ref()
        .map(|p| p.id.clone())
        .unwrap_or_else(|| nullspace_store::new_id("mch_"));
    let now = now_ms();
    let doc = MachineDoc {
        id: id.clone(),
        flavor,
        template: src.template.clone(),
        template_id: src.template_id.clone(),
        build_id: src.build_id.clone(),
        vcpus: want_v,
        memory_mb: want_m,
        created_at: now,
        started_at: None,
        timeout_ms,
        timeout_action: action,
        timeout_at: None,
        inactivity_timeout_ms: b.inactivity_timeout_ms,
        auto_delete_after_ms: b.auto_delete_after_ms,
        ephemeral,
        auto_resume,
        last_active_at: now,
        paused_at: None,
        metadata,
        env_keys: src.envs.keys().cloned().collect(),
        cwd: cwd.or(src.cwd.clone()),
        internet_access: internet,
        egress,
        access: super::ports::PortAccess {
            public,
            traffic_token: super::ports::new_secret(),
        },
        base_dir: state.machines.relative(&src.snapshot.dir),
        template_dir: src.template_dir.clone(),
        snapshot_id: src.snapshot_id.clone(),
        parent_id: None,
        vm: None,
        idempotency_key: key.clone(),
        ended_reason: None,
        ended_at: None,
    };
    let row = MachineRow {
        id: id.clone(),
        namespace: c.namespace.clone(),
        node_id: state.machines.node_id.clone(),
        status: MachineStatus::Creating,
        template_id: src.template_id.clone(),
        base_snapshot: src.snapshot_id.clone().unwrap_or_default(),
        created_at: now,
        updated_at: now,
        deadline_at: 0,
        record: serde_json::to_string(&doc)
            .map_err(|e| MachineError::Internal(format!("machine record: {e}")))?,
    };
    match state
        .store
        .insert_machine_once(&row, key.as_deref().map(|k| (SCOPE_CREATE, k)))
        .await?
    {
        Inserted::Existing(other) => {
            drop(reservation);
            if let Some(p) = pooled {
                // Not needed after all: ended (the pool refills).
                let _ = tokio::task::spawn_blocking(move || drop(p)).await;
            }
            return wait_created(state, c, &other).await;
        }
        Inserted::New => {}
    }
    // The restore goes on if the client gives up: its retry (same key)
    // then finds the machine.
    let task = tokio::spawn(finish_create(
        state.clone(),
        Machine { row, doc },
        src.snapshot,
        src.envs,
        reservation,
        key.map(|k| (c.namespace.clone(), k)),
        pooled,
    ));
    let mut info = task
        .await
        .map_err(|e| MachineError::Internal(format!("create task: {e}")))??;
    info.warm_pool_checkout = checkout;
    if !volumes.is_empty() {
        let attached = crate::volumes::attach::at_create(state, c, &info.id, &volumes).await?;
        // The create's answer says what is mounted where, as the SDK reads
        // it (`Machine.volumes`, from `metadata.volume_attachments`); the
        // machine's own metadata is not changed.
        if let Ok(v) = serde_json::to_value(&attached) {
            info.metadata
                .get_or_insert_with(Default::default)
                .insert("volume_attachments".into(), v);
        }
    }
    Ok(info)
}

async fn finish_create(
    state: Shared,
    mut m: Machine,
    snapshot: Snapshot,
    envs: BTreeMap<String, String>,
    reservation: Reservation,
    key: Option<(String, String)>,
    pooled: Option<nullspace_vm::pool::Entry>,
) -> MachineResult<MachineInfo> {
    let id = m.row.id.clone();
    let egress = super::egress::effective(m.doc.internet_access, m.doc.egress.as_ref());
    let size = Some((m.doc.vcpus, m.doc.memory_mb))
        .filter(|&s| s != (snapshot.meta.vm.vcpus, snapshot.meta.vm.memory_mb));
    match state
        .machines
        .restore(
            &id,
            snapshot,
            envs,
            reservation,
            pooled,
            egress,
            Vec::new(),
            size,
        )
        .await
    {
        Ok((live, started)) => {
            let now = now_ms();
            m.doc.vm = Some(VmRecord {
                pid: live.handle.pid,
            });
            m.doc.started_at = Some(now);
            m.doc.last_active_at = now;
            m.doc.timeout_at = Some(now + m.doc.timeout_ms as i64);
            if !record::transition(&state, &mut m, MachineStatus::Running).await? {
                // Deleted while it was being restored.
                let _ = state.machines.destroy(&id, None).await;
                return Err(MachineError::NotFound(id));
            }
            events::record(&state, &m, Event::ok(Op::Create)).await;
            let p = started.phases;
            tracing::info!(
                machine = %id,
                restore_ms = started.ms,
                pooled = started.pooled,
                verify_ms = p.verify,
                overlay_ms = p.overlay,
                spawn_ms = p.spawn,
                load_ms = p.load,
                start_ms = p.start,
                resize_ms = started.resize_ms,
                template = %m.doc.template,
                "machine running"
            );
            Ok(m.info())
        }
        Err(e) => {
            tracing::warn!(machine = %id, "machine create failed: {e}");
            m.doc.ended_reason = Some(format!("the restore failed: {e}"));
            m.doc.ended_at = Some(now_ms());
            let _ = record::transition(&state, &mut m, MachineStatus::Error).await;
            events::record(
                &state,
                &m,
                Event::failed(Op::Create, format!("the restore failed: {e}")),
            )
            .await;
            if let Some((ns, k)) = key {
                let _ = state
                    .store
                    .release_idempotency_key(&ns, SCOPE_CREATE, &k)
                    .await;
            }
            Err(MachineError::runtime(&id, e))
        }
    }
}

/// A create that repeats an earlier one's Idempotency-Key: the same
/// machine, once its restore is done.
pub(super) async fn wait_created(
    state: &Shared,
    c: &Caller,
    id: &str,
) -> MachineResult<MachineInfo> {
    let t = std::time::Instant::now();
    loop {
        let m = record::load(state, c, id).await?;
        match m.status() {
            MachineStatus::Creating => {}
            MachineStatus::Error => {
                return Err(MachineError::Vm {
                    id: id.to_string(),
                    reason: m
                        .doc
                        .ended_reason
                        .clone()
                        .unwrap_or_else(|| "creation failed".into()),
                });
            }
            _ => return Ok(m.info()),
        }
        if t.elapsed() > Duration::from_secs(100) {
            // The SDK retries this code (with the same key).
            return Err(MachineError::InTransition {
                id: id.to_string(),
                why: "is still being created".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
