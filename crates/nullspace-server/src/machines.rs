//! The machine lifecycle: `creating → running ⇄ paused → destroyed | error`.
//!
//! A machine is restored from a template's ready snapshot (the start
//! command is already running, not run again) or from a machine snapshot,
//! owned by the caller's namespace (another caller gets `*_not_found`,
//! exactly as for a machine that does not exist) and by the node that runs
//! its VMM ([`crate::runtime`]). The record is written before the VM is
//! started and updated after every transition; [`recover`] reconciles
//! records and VMs when the server starts, and [`spawn_reaper`] enforces
//! timeouts and notices VMs that died.
//!
//! Commands get the template's runtime defaults (the guest applies them),
//! then the machine's create-time `envs` and `cwd`, then the command's own.
//! The start command never sees create-time envs: it was started when the
//! template was snapshotted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use nullspace_store::machines::LIVE;
use nullspace_store::{Caller, Inserted, MachineRow, SnapshotRow, now_ms};
use nullspace_vm::{AfterSnapshot as After, Snapshot};
use serde_json::{Map, Value};

use crate::error::{ApiError, ApiResult};
use crate::guest::{Chunk, Command, Finished, GuestError};
use crate::machine_model::*;
use crate::model::iso;
use crate::runtime::{Live, RuntimeError, load_envs};
use crate::state::Shared;
use crate::templates;

/// Bytes of each output stream a foreground command's answer keeps.
pub const OUTPUT_CAP: usize = 8 << 20;
/// The SDK's default `timeout_ms`.
pub const DEFAULT_TIMEOUT_MS: u64 = 300_000;
/// The longest `timeout_ms` (one day).
pub const MAX_TIMEOUT_MS: u64 = 86_400_000;
/// The default of a command's `timeout_secs` (what the SDK sends).
pub const DEFAULT_EXEC_SECS: u64 = 30;
const SCOPE_CREATE: &str = "machine_create";

// ---- errors -----------------------------------------------------------

pub fn not_found(f: Flavor, id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        f.not_found(),
        format!("{} {id:?} not found", f.noun()),
    )
}

fn ended(f: Flavor, id: &str, doc: &MachineDoc, status: &str) -> ApiError {
    let why = doc
        .ended_reason
        .as_deref()
        .map(|r| format!(" ({r})"))
        .unwrap_or_default();
    ApiError::new(
        StatusCode::NOT_FOUND,
        f.not_found(),
        format!("{} {id} is {status}{why}", f.noun()),
    )
}

fn not_ready(f: Flavor, id: &str, what: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        f.not_ready(),
        format!("{} {id} {what}", f.noun()),
    )
}

fn snapshot_not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "snapshot_not_found",
        format!("snapshot {id:?} not found"),
    )
}

/// An option or operation this server does not offer. The code makes the
/// SDK raise `NotImplementedError`; the status is 400, not 501: the request
/// asked for something not offered here, and nothing is wrong with the
/// server (5xx is kept for its own failures).
pub fn not_implemented(m: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "not_implemented", m)
}

/// What a guest failure means for the caller.
pub fn guest_error(f: Flavor, id: &str, e: GuestError) -> ApiError {
    match e {
        GuestError::Unsupported(_) => not_implemented(e.to_string()),
        GuestError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, "file_not_found", m),
        GuestError::Gone(m) => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "exec_failed",
            format!("{} {id}: {m}", f.noun()),
        ),
        GuestError::Timeout(t) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "exec_timeout",
            format!("{} {id}: the guest did not answer within {t:?}", f.noun()),
        ),
        GuestError::Failed(m) => ApiError::invalid(m),
    }
}

fn runtime_error(f: Flavor, id: &str, e: RuntimeError) -> ApiError {
    match e {
        RuntimeError::Capacity(m) => {
            // Not 429: the client retries those; this does not clear soon.
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "capacity_exceeded", m)
        }
        RuntimeError::Busy(m) => not_ready(f, id, m),
        other => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "vm_error",
            format!("{} {id}: {other}", f.noun()),
        ),
    }
}

// ---- records ----------------------------------------------------------

pub fn plausible_id(id: &str) -> bool {
    crate::builds::plausible_id(id)
}

fn doc_of(row: &MachineRow) -> ApiResult<MachineDoc> {
    serde_json::from_str(&row.record).map_err(ApiError::internal)
}

/// The caller's machine; anything else is "not found".
pub async fn load(
    state: &Shared,
    c: &Caller,
    f: Flavor,
    id: &str,
) -> ApiResult<(MachineRow, MachineDoc)> {
    if !plausible_id(id) {
        return Err(not_found(f, id));
    }
    let row = state
        .store
        .machine(id)
        .await?
        .filter(|r| r.namespace == c.namespace)
        .ok_or_else(|| not_found(f, id))?;
    let doc = doc_of(&row)?;
    Ok((row, doc))
}

/// When the server must act next on a machine in `status` (0: never).
fn deadline(status: &str, doc: &MachineDoc) -> i64 {
    match status {
        "running" => {
            let mut d = doc.timeout_at.unwrap_or(0);
            if let Some(i) = doc.inactivity_timeout_ms {
                let idle = doc.last_active_at + i as i64;
                d = if d == 0 { idle } else { d.min(idle) };
            }
            d
        }
        "paused" => match (doc.auto_delete_after_ms, doc.paused_at) {
            (Some(ms), Some(at)) => at + ms as i64,
            _ => 0,
        },
        _ => 0,
    }
}

/// Writes the record (and the columns it implies); with `only_if`, only
/// while the stored status is one of those.
async fn save(
    state: &Shared,
    row: &mut MachineRow,
    doc: &MachineDoc,
    only_if: &[&str],
) -> ApiResult<bool> {
    row.updated_at = now_ms();
    row.deadline_at = deadline(&row.status, doc);
    row.record = serde_json::to_string(doc).map_err(ApiError::internal)?;
    Ok(state.store.update_machine(row, only_if).await?)
}

/// A machine as the API shows it.
pub fn info(row: &MachineRow, doc: &MachineDoc) -> MachineInfo {
    let running = row.status == "running";
    let timeout_at = doc.timeout_at.filter(|_| running);
    MachineInfo {
        id: row.id.clone(),
        status: row.status.clone(),
        config: MachineConfig {
            vcpus: doc.vcpus,
            memory_mb: doc.memory_mb,
        },
        template: doc.template.clone(),
        created_at: iso(doc.created_at),
        metadata: Some(doc.metadata.clone()),
        started_at: doc.started_at.map(iso),
        timeout_ms: Some(doc.timeout_ms),
        timeout_at: timeout_at.map(iso),
        expires_at: timeout_at.map(iso),
        remaining_ms: timeout_at.map(|t| (t - now_ms()).max(0)),
        timeout_action: Some(doc.timeout_action.clone()),
        last_active_at: Some(iso(doc.last_active_at)),
        inactivity_timeout_ms: doc.inactivity_timeout_ms,
        auto_delete_after_ms: doc.auto_delete_after_ms,
        ephemeral: doc.ephemeral,
        cwd: doc.cwd.clone(),
        snapshot_id: doc.snapshot_id.clone(),
    }
}

// ---- validation -------------------------------------------------------

/// An absolute guest path, normalised (`.` and `..` resolved, never above
/// `/`).
pub fn guest_path(what: &str, p: &str) -> ApiResult<String> {
    if !p.starts_with('/') {
        return Err(ApiError::invalid(format!(
            "{what} {p:?} must be an absolute path"
        )));
    }
    if p.len() > 4096 {
        return Err(ApiError::invalid(format!(
            "{what} is longer than 4096 bytes"
        )));
    }
    let mut parts: Vec<&str> = vec![];
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

fn check_cwd(cwd: &str) -> ApiResult<String> {
    let p = guest_path("cwd", cwd)?;
    if p == "/workspace/.nullspace" || p.starts_with("/workspace/.nullspace/") {
        return Err(ApiError::invalid(format!(
            "cwd {cwd:?} is reserved (/workspace/.nullspace)"
        )));
    }
    Ok(p)
}

fn check_envs(what: &str, envs: &BTreeMap<String, String>) -> ApiResult<()> {
    if envs.len() > 1000 {
        return Err(ApiError::invalid(format!("{what}: at most 1000 variables")));
    }
    let mut total = 0;
    for (k, v) in envs {
        nullspace_model::build::rules::env_name(k)
            .map_err(|e| ApiError::invalid(format!("{what}: {e}")))?;
        total += k.len() + v.len();
    }
    if total > 1 << 20 {
        return Err(ApiError::invalid(format!("{what}: more than 1 MiB")));
    }
    Ok(())
}

fn timeout_action(raw: Option<&str>, lifecycle: Option<&Value>) -> ApiResult<Option<String>> {
    let from_lifecycle = lifecycle
        .and_then(|l| l.get("on_timeout"))
        .and_then(Value::as_str);
    let a = match (raw, from_lifecycle) {
        (Some(a), _) => a,
        (None, Some("pause" | "hibernate")) => "hibernate",
        (None, Some("destroy")) => "destroy",
        (None, Some(o)) => {
            return Err(ApiError::invalid(format!(
                "lifecycle.on_timeout {o:?} must be destroy or pause"
            )));
        }
        (None, None) => return Ok(None),
    };
    match a {
        "destroy" | "hibernate" => Ok(Some(a.to_string())),
        o => Err(ApiError::invalid(format!(
            "timeout_action {o:?} must be destroy or hibernate"
        ))),
    }
}

fn check_timeout_ms(ms: u64) -> ApiResult<u64> {
    if ms == 0 || ms > MAX_TIMEOUT_MS {
        return Err(ApiError::invalid(format!(
            "timeout_ms {ms} must be between 1 and {MAX_TIMEOUT_MS} (one day)"
        )));
    }
    Ok(ms)
}

/// Options this server does not offer fail clearly instead of being
/// ignored.
fn refuse_unsupported(b: &CreateMachineBody) -> ApiResult<()> {
    if b.desktop.as_ref().is_some_and(|d| !d.is_null()) {
        return Err(not_implemented(
            "desktop machines are not supported by this server",
        ));
    }
    if b.volumes
        .as_ref()
        .is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty()) && !v.is_null())
    {
        return Err(not_implemented("volumes are not supported by this server"));
    }
    if let Some(w) = b.warm_pool.as_ref().filter(|w| !w.is_null())
        && w.get("mode").and_then(Value::as_str) != Some("bypass")
    {
        return Err(not_implemented(
            "warm pools are not supported by this server (omit warm_pool, or use mode bypass)",
        ));
    }
    if let Some(n) = b.network.as_ref()
        && ["allow_out", "deny_out"].iter().any(|k| {
            n.get(k)
                .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
        })
    {
        return Err(not_implemented(
            "egress policies (network.allow_out/deny_out) are not supported; internet_access: false isolates a machine",
        ));
    }
    Ok(())
}

// ---- sources ----------------------------------------------------------

/// What a new machine is restored from.
struct Source {
    template: String,
    template_id: String,
    build_id: String,
    snapshot: Snapshot,
    /// The template snapshot at the root of the chain.
    template_dir: String,
    /// The machine snapshot (`""`: a template's).
    snapshot_id: String,
    envs: BTreeMap<String, String>,
    cwd: Option<String>,
    vcpus: u32,
    memory_mb: u32,
}

fn open_snapshot(dir: &str) -> ApiResult<Snapshot> {
    Snapshot::open(std::path::Path::new(dir)).map_err(|e| {
        ApiError::new(
            StatusCode::CONFLICT,
            "rebuild_required",
            format!("the snapshot at {dir} cannot be opened ({e}); rebuild the template"),
        )
    })
}

async fn template_source(state: &Shared, c: &Caller, raw: &str) -> ApiResult<Source> {
    let resolved = match templates::resolve_build(state, c, raw).await {
        Ok(x) => x,
        Err(e) if raw == crate::base::NAME && e.code == "template_not_found" => {
            let r = format!("{}/{}", crate::base::NAMESPACE, crate::base::NAME);
            templates::resolve_build(state, c, &r).await.map_err(|_| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "template_not_found",
                    "template \"base\" is not built on this server yet (it builds in the background when the server starts with the build VM); try again shortly",
                )
            })?
        }
        Err(e) => return Err(e),
    };
    let (row, rec) = resolved;
    if rec.status != nullspace_model::build::status::BuildStatus::Ready {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "template_build_conflict",
            format!(
                "template {raw:?} points at build {} which is {}",
                rec.build_id, rec.status
            ),
        ));
    }
    let m = templates::manifest_of(state, &rec, raw).await?;
    let Some(dir) = templates::snapshot_dir(state, &m) else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "rebuild_required",
            format!(
                "template {raw:?} (build {}) has no VM snapshot: it was built without the build VM; rebuild it on a server with the build VM",
                rec.build_id
            ),
        ));
    };
    let snapshot = open_snapshot(&dir.display().to_string())?;
    Ok(Source {
        template: raw.to_string(),
        template_id: row.id,
        build_id: rec.build_id,
        vcpus: snapshot.meta.vm.vcpus,
        memory_mb: snapshot.meta.vm.memory_mb,
        template_dir: snapshot.dir.display().to_string(),
        snapshot,
        snapshot_id: String::new(),
        envs: BTreeMap::new(),
        cwd: None,
    })
}

async fn load_snapshot(
    state: &Shared,
    c: &Caller,
    id: &str,
) -> ApiResult<(SnapshotRow, SnapshotDoc)> {
    if !plausible_id(id) {
        return Err(snapshot_not_found(id));
    }
    let row = state
        .store
        .snapshot(id)
        .await?
        .filter(|r| r.namespace == c.namespace)
        .ok_or_else(|| snapshot_not_found(id))?;
    let doc: SnapshotDoc = serde_json::from_str(&row.record).map_err(ApiError::internal)?;
    Ok((row, doc))
}

async fn snapshot_source(state: &Shared, c: &Caller, id: &str) -> ApiResult<Source> {
    let (row, doc) = load_snapshot(state, c, id).await?;
    if row.node_id != state.machines.node_id {
        return Err(ApiError::conflict(
            "snapshot_conflict",
            format!(
                "snapshot {id} is stored on node {} (another server sharing this database); create machines from it there",
                row.node_id
            ),
        ));
    }
    let snapshot = open_snapshot(&doc.dir)?;
    Ok(Source {
        template: doc.template.clone(),
        template_id: doc.template_id.clone(),
        build_id: doc.build_id.clone(),
        envs: load_envs(&snapshot.dir),
        template_dir: doc.template_dir.clone(),
        snapshot,
        snapshot_id: doc.id.clone(),
        cwd: doc.cwd.clone(),
        vcpus: doc.vcpus,
        memory_mb: doc.memory_mb,
    })
}

// ---- create -----------------------------------------------------------

/// `POST /v1/machines`: answers when the machine runs commands.
pub async fn create(
    state: &Shared,
    c: &Caller,
    f: Flavor,
    b: CreateMachineBody,
    key: Option<String>,
) -> ApiResult<MachineInfo> {
    refuse_unsupported(&b)?;
    if let Some(k) = &key {
        if k.is_empty() || k.len() > 256 {
            return Err(ApiError::invalid("Idempotency-Key must be 1 to 256 bytes"));
        }
        if let Some(existing) = state
            .store
            .idempotency_target(&c.namespace, SCOPE_CREATE, k)
            .await?
        {
            return wait_created(state, c, f, &existing).await;
        }
    }
    let timeout_ms = check_timeout_ms(b.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS))?;
    let mut action = timeout_action(b.timeout_action.as_deref(), b.lifecycle.as_ref())?
        .unwrap_or_else(|| "destroy".into());
    let ephemeral = b.ephemeral.unwrap_or(false);
    let auto_resume = b.auto_resume.unwrap_or(false);
    if ephemeral {
        if auto_resume {
            return Err(ApiError::invalid(
                "ephemeral machines cannot auto_resume (they are never hibernated)",
            ));
        }
        action = "destroy".into();
    }
    if auto_resume && action != "hibernate" {
        return Err(ApiError::invalid(
            "auto_resume needs timeout_action hibernate (or lifecycle.on_timeout pause)",
        ));
    }
    let envs = b.envs.clone().unwrap_or_default();
    check_envs("envs", &envs)?;
    let cwd = b.cwd.as_deref().map(check_cwd).transpose()?;
    let metadata = b.metadata.clone().unwrap_or_default();
    if serde_json::to_vec(&metadata).map(|v| v.len()).unwrap_or(0) > 64 << 10 {
        return Err(ApiError::invalid("metadata is larger than 64 KiB"));
    }
    let mut src = match (&b.snapshot_id, &b.template) {
        (Some(s), _) => snapshot_source(state, c, s).await?,
        (None, t) => {
            let raw = t.as_deref().unwrap_or(crate::base::NAME).trim();
            template_source(state, c, raw).await?
        }
    };
    // The VM's shape is part of its snapshot: a restore has exactly it.
    let (want_v, want_m) = (
        b.vcpus.unwrap_or(src.vcpus),
        b.memory_mb.unwrap_or(src.memory_mb),
    );
    if (want_v, want_m) != (src.vcpus, src.memory_mb) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "incompatible_snapshot",
            format!(
                "template {:?}'s snapshot was taken with {} vCPUs and {} MiB, and a machine restored from it has exactly that shape; create it with vcpus={} memory_mb={} (asked: vcpus={want_v} memory_mb={want_m}), or rebuild the template with build_config vcpus/memory_mib",
                src.template, src.vcpus, src.memory_mb, src.vcpus, src.memory_mb
            ),
        ));
    }
    if let Some(d) = b.disk_mb {
        let have = src.snapshot.meta.disk_bytes >> 20;
        if b.snapshot_id.is_some() {
            return Err(ApiError::invalid("disk_mb is not allowed with snapshot_id"));
        }
        if d > have {
            return Err(ApiError::invalid(format!(
                "disk_mb {d} exceeds template {:?}'s disk of {have} MiB (fixed when it was built; rebuild it with a larger disk_mb)",
                src.template
            )));
        }
    }
    let internet = b.internet_access.unwrap_or(true);
    if !internet && src.snapshot.meta.vm.network {
        return Err(not_implemented(format!(
            "internet_access false: template {:?} was built with a network device (--build-vm-network), which its machines keep; build it with build_config internet_access false",
            src.template
        )));
    }
    if state.vmm.is_none() {
        return Err(not_implemented(
            "this server runs no VMs (started with --no-build-vm, or QEMU, the guest kernel or the guest init is missing)",
        ));
    }
    // Create-time envs go over the snapshot's (a machine from a snapshot keeps them).
    src.envs.extend(envs);
    let reservation = state
        .machines
        .reserve(src.memory_mb)
        .map_err(|e| runtime_error(f, "(new)", e))?;
    // A template's machine may start from a VM prepared ahead for exactly
    // this snapshot and shape: its id is the one it was prepared under.
    let pooled = if src.snapshot_id.is_empty() {
        let (machines, tid, snap) = (
            state.machines.clone(),
            src.template_id.clone(),
            src.snapshot.clone(),
        );
        tokio::task::spawn_blocking(move || machines.take_pooled(&tid, &snap))
            .await
            .ok()
            .flatten()
    } else {
        None
    };
    let id = pooled
        .as_ref()
        .map(|p| p.id.clone())
        .unwrap_or_else(|| nullspace_store::new_id("mch_"));
    let now = now_ms();
    let doc = MachineDoc {
        id: id.clone(),
        flavor: f,
        template: src.template.clone(),
        template_id: src.template_id.clone(),
        build_id: src.build_id.clone(),
        vcpus: src.vcpus,
        memory_mb: src.memory_mb,
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
        internet_access: b.internet_access.unwrap_or(true),
        base_dir: src.snapshot.dir.display().to_string(),
        template_dir: src.template_dir.clone(),
        snapshot_id: (!src.snapshot_id.is_empty()).then(|| src.snapshot_id.clone()),
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
        status: "creating".into(),
        template_id: src.template_id.clone(),
        base_snapshot: src.snapshot_id.clone(),
        created_at: now,
        updated_at: now,
        deadline_at: 0,
        record: serde_json::to_string(&doc).map_err(ApiError::internal)?,
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
            return wait_created(state, c, f, &other).await;
        }
        Inserted::New => {}
    }
    // The restore goes on if the client gives up: its retry (same key)
    // then finds the machine.
    let task = tokio::spawn(finish_create(
        state.clone(),
        f,
        row,
        doc,
        src.snapshot,
        src.envs,
        reservation,
        key.map(|k| (c.namespace.clone(), k)),
        pooled,
    ));
    task.await
        .map_err(|e| ApiError::internal(format!("create task: {e}")))?
}

#[allow(clippy::too_many_arguments)]
async fn finish_create(
    state: Shared,
    f: Flavor,
    mut row: MachineRow,
    mut doc: MachineDoc,
    snapshot: Snapshot,
    envs: BTreeMap<String, String>,
    reservation: crate::runtime::Reservation,
    key: Option<(String, String)>,
    pooled: Option<nullspace_vm::pool::Entry>,
) -> ApiResult<MachineInfo> {
    let id = row.id.clone();
    match state
        .machines
        .restore(&id, snapshot, envs, reservation, pooled)
        .await
    {
        Ok((live, started)) => {
            let now = now_ms();
            doc.vm = Some(live.handle.clone());
            doc.started_at = Some(now);
            doc.last_active_at = now;
            doc.timeout_at = Some(now + doc.timeout_ms as i64);
            row.status = "running".into();
            if !save(&state, &mut row, &doc, &["creating"]).await? {
                // Deleted while it was being restored.
                let _ = state.machines.destroy(&id, None).await;
                return Err(not_found(f, &id));
            }
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
                template = %doc.template,
                "machine running"
            );
            Ok(info(&row, &doc))
        }
        Err(e) => {
            tracing::warn!(machine = %id, "machine create failed: {e}");
            doc.ended_reason = Some(format!("the restore failed: {e}"));
            doc.ended_at = Some(now_ms());
            row.status = "error".into();
            let _ = save(&state, &mut row, &doc, &["creating"]).await;
            if let Some((ns, k)) = key {
                let _ = state
                    .store
                    .release_idempotency_key(&ns, SCOPE_CREATE, &k)
                    .await;
            }
            Err(runtime_error(f, &id, e))
        }
    }
}

/// A create that repeats an earlier one's Idempotency-Key: the same
/// machine, once its restore is done.
async fn wait_created(state: &Shared, c: &Caller, f: Flavor, id: &str) -> ApiResult<MachineInfo> {
    let t = std::time::Instant::now();
    loop {
        let (row, doc) = load(state, c, f, id).await?;
        match row.status.as_str() {
            "creating" => {}
            "error" => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "vm_error",
                    format!(
                        "{} {id}: {}",
                        f.noun(),
                        doc.ended_reason.as_deref().unwrap_or("creation failed")
                    ),
                ));
            }
            _ => return Ok(info(&row, &doc)),
        }
        if t.elapsed() > Duration::from_secs(100) {
            // The SDK retries this code (with the same key).
            return Err(ApiError::conflict(
                "transition_in_progress",
                format!("{} {id} is still being created", f.noun()),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---- read -------------------------------------------------------------

pub async fn get(state: &Shared, c: &Caller, f: Flavor, id: &str) -> ApiResult<MachineInfo> {
    let (row, doc) = load(state, c, f, id).await?;
    Ok(info(&row, &doc))
}

/// Query of `GET /v1/machines`.
#[derive(Debug, Default)]
pub struct ListQuery {
    pub limit: Option<i64>,
    pub next_token: Option<String>,
    pub states: Vec<String>,
    pub template: Option<String>,
    pub metadata: Option<Map<String, Value>>,
}

const LISTABLE: &[&str] = &["creating", "running", "paused", "destroyed", "error"];

pub async fn list(state: &Shared, c: &Caller, f: Flavor, q: ListQuery) -> ApiResult<MachinePage> {
    let limit = q.limit.unwrap_or(50).clamp(1, 100);
    let states: Vec<&str> = if q.states.is_empty() {
        LIVE.to_vec()
    } else {
        let mut v = vec![];
        for s in &q.states {
            match LISTABLE.iter().find(|l| **l == s.as_str()) {
                Some(l) => v.push(*l),
                None => {
                    return Err(ApiError::invalid(format!(
                        "state {s:?} must be one of {}",
                        LISTABLE.join(", ")
                    )));
                }
            }
        }
        v
    };
    let mut cursor = match &q.next_token {
        None => None,
        Some(t) => Some(
            t.split_once('_')
                .and_then(|(at, id)| Some((at.parse::<i64>().ok()?, id.to_string())))
                .filter(|(_, id)| plausible_id(id))
                .ok_or_else(|| ApiError::invalid("next_token is not one this server issued"))?,
        ),
    };
    let mut items = vec![];
    let mut has_next = false;
    'pages: loop {
        let rows = state
            .store
            .machines_page(&c.namespace, &states, limit + 1, cursor.clone())
            .await?;
        let n = rows.len();
        for row in rows {
            if items.len() == limit as usize {
                has_next = true;
                break 'pages;
            }
            cursor = Some((row.created_at, row.id.clone()));
            let doc = doc_of(&row)?;
            if q.template.as_ref().is_some_and(|t| *t != doc.template) {
                continue;
            }
            if q.metadata
                .as_ref()
                .is_some_and(|m| m.iter().any(|(k, v)| doc.metadata.get(k) != Some(v)))
            {
                continue;
            }
            items.push(info(&row, &doc));
        }
        if n < (limit + 1) as usize {
            break;
        }
    }
    let next_token = if has_next {
        items
            .last()
            .and(cursor.as_ref())
            .map(|(at, id)| format!("{at}_{id}"))
    } else {
        None
    };
    let _ = f;
    Ok(MachinePage {
        items,
        has_next,
        next_token,
    })
}

// ---- running machines -------------------------------------------------

/// The caller's running machine on this node (a paused one with
/// `auto_resume` is resumed first).
pub async fn running(
    state: &Shared,
    c: &Caller,
    f: Flavor,
    id: &str,
) -> ApiResult<(MachineRow, MachineDoc, Arc<Live>)> {
    let (mut row, mut doc) = load(state, c, f, id).await?;
    if row.status == "paused" && doc.auto_resume {
        resume(state, c, f, id).await?;
        (row, doc) = load(state, c, f, id).await?;
    }
    match row.status.as_str() {
        "running" => {}
        "destroyed" | "error" => return Err(ended(f, id, &doc, &row.status)),
        "paused" => return Err(not_ready(f, id, "is paused; resume it first")),
        s => return Err(not_ready(f, id, format!("is {s}"))),
    }
    if row.node_id != state.machines.node_id {
        return Err(ApiError::conflict(
            "machine_conflict",
            format!(
                "{} {id} runs on node {} (another server sharing this database); send its requests there",
                f.noun(),
                row.node_id
            ),
        ));
    }
    let live = state
        .machines
        .get(id)
        .ok_or_else(|| not_ready(f, id, "has no VM attached to this server yet"))?;
    // Activity counts for the inactivity timeout; written at most every 5 s.
    let now = now_ms();
    if now - doc.last_active_at > 5_000 {
        doc.last_active_at = now;
        let _ = save(state, &mut row, &doc, &["running"]).await;
    }
    Ok((row, doc, live))
}

/// A command of `POST …/exec` or the exec channel.
pub fn command(doc: &MachineDoc, live: &Live, b: &ExecBody) -> ApiResult<Command> {
    let (program, args, shell) = (b.command.as_str(), &b.args, b.shell.unwrap_or(false));
    let (cwd, envs, timeout_secs) = (b.cwd.as_deref(), b.envs.as_ref(), b.timeout_secs);
    let user = b.user.as_deref();
    if program.is_empty() {
        return Err(ApiError::invalid("command is empty"));
    }
    if program.len() + args.iter().map(String::len).sum::<usize>() > 256 << 10 {
        return Err(ApiError::invalid("command and args exceed 256 KiB"));
    }
    let (argv, line) = if shell || args.is_empty() {
        // A bare command is a shell line (`commands.run("ls -la")`).
        let mut line = program.to_string();
        for a in args {
            line.push(' ');
            line.push_str(&nullspace_oci::config::shell_quote(a));
        }
        (vec![], Some(line))
    } else {
        let mut v = vec![program.to_string()];
        v.extend(args.iter().cloned());
        (v, None)
    };
    let mut env = live.envs.clone();
    if let Some(e) = envs {
        check_envs("envs", e)?;
        env.extend(e.clone());
    }
    let cwd = match cwd.filter(|c| !c.is_empty()) {
        Some(c) => Some(guest_path("cwd", c)?),
        None => doc.cwd.clone(),
    };
    let timeout = match timeout_secs.unwrap_or(DEFAULT_EXEC_SECS) {
        0 => None,
        s => Some(Duration::from_secs(s.min(7 * 24 * 3600))),
    };
    Ok(Command {
        argv,
        shell: line,
        env,
        cwd,
        user: user
            .filter(|u| !u.trim().is_empty())
            .map(|u| u.trim().to_string()),
        timeout,
    })
}

pub fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn finished(out: Finished) -> ExecResult {
    let mut stderr = lossy(&out.stderr);
    if out.stdout_dropped + out.stderr_dropped > 0 {
        stderr.push_str(&format!(
            "\n[nullspace: output truncated to {} MiB per stream; {} stdout and {} stderr bytes dropped]\n",
            OUTPUT_CAP >> 20,
            out.stdout_dropped,
            out.stderr_dropped
        ));
    }
    ExecResult {
        exit_code: out.exit_code(),
        stdout: lossy(&out.stdout),
        stderr,
        pid: out.pid,
    }
}

/// `POST …/exec`: the result of a foreground command, or a background
/// command's pid.
pub async fn exec(
    state: &Shared,
    c: &Caller,
    f: Flavor,
    id: &str,
    b: ExecBody,
) -> ApiResult<ExecReply> {
    let (_, doc, live) = running(state, c, f, id).await?;
    let cmd = command(&doc, &live, &b)?;
    if b.background.unwrap_or(false) {
        let pid = live
            .guest
            .spawn(cmd)
            .await
            .map_err(|e| guest_error(f, id, e))?;
        return Ok(ExecReply::Background(Spawned { pid }));
    }
    let limit = cmd.timeout;
    let out = live
        .guest
        .run(cmd, OUTPUT_CAP, None)
        .await
        .map_err(|e| guest_error(f, id, e))?;
    if out.timed_out {
        return Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "exec_timeout",
            format!(
                "the command ran longer than timeout_secs ({} s) and was killed",
                limit.map(|t| t.as_secs()).unwrap_or(0)
            ),
        ));
    }
    Ok(ExecReply::Finished(finished(out)))
}

/// Runs a command and sends its output to `tx` as it streams (the exec
/// channel).
pub async fn exec_streaming(
    live: &Arc<Live>,
    f: Flavor,
    id: &str,
    cmd: Command,
    tx: tokio::sync::mpsc::Sender<Chunk>,
) -> ApiResult<Finished> {
    live.guest
        .run(cmd, 64 << 10, Some(tx))
        .await
        .map_err(|e| guest_error(f, id, e))
}

pub async fn processes(
    state: &Shared,
    c: &Caller,
    f: Flavor,
    id: &str,
) -> ApiResult<Vec<ProcessEntry>> {
    let (_, _, live) = running(state, c, f, id).await?;
    let ps = live
        .guest
        .processes()
        .await
        .map_err(|e| guest_error(f, id, e))?;
    Ok(ps
        .into_iter()
        .map(|p| ProcessEntry {
            pid: p.pid,
            command: p.command,
            running: p.running,
        })
        .collect())
}

pub async fn process_logs(
    state: &Shared,
    c: &Caller,
    f: Flavor,
    id: &str,
    pid: u32,
) -> ApiResult<ProcessLogs> {
    let (_, _, live) = running(state, c, f, id).await?;
    let o = live.guest.output(pid).await.map_err(|e| match e {
        GuestError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, "process_not_found", m),
        e => guest_error(f, id, e),
    })?;
    let (stdout, stderr) = (lossy(&o.stdout), lossy(&o.stderr));
    Ok(ProcessLogs {
        output: format!("{stdout}{stderr}"),
        stdout,
        stderr,
        exit_code: if o.running { None } else { o.exit_code },
    })
}

pub async fn kill_process(
    state: &Shared,
    c: &Caller,
    f: Flavor,
    id: &str,
    pid: u32,
) -> ApiResult<()> {
    let (_, _, live) = running(state, c, f, id).await?;
    live.guest.kill(pid).await.map_err(|e| match e {
        GuestError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, "process_not_found", m),
        e => guest_error(f, id, e),
    })
}

// ---- files ------------------------------------------------------------

pub fn file_info(s: nullspace_model::agent::FileInfo) -> FileInfo {
    use nullspace_model::agent::FileKind;
    FileInfo {
        name: s.name,
        path: s.path,
        is_dir: s.is_dir,
        size: s.size,
        r#type: Some(
            match s.kind {
                FileKind::File => "file",
                FileKind::Dir => "dir",
                FileKind::Symlink => "symlink",
                FileKind::Other => "other",
            }
            .into(),
        ),
        mode: Some(s.mode),
        permissions: Some(s.permissions),
        owner: Some(s.owner),
        group: Some(s.group),
        modified_time: Some(s.modified_time),
        symlink_target: s.symlink_target,
    }
}

pub async fn write_file(
    state: &Shared,
    c: &Caller,
    f: Flavor,
    id: &str,
    path: &str,
    data: Vec<u8>,
    user: Option<&str>,
) -> ApiResult<FileInfo> {
    let path = guest_path("path", path)?;
    let (_, _, live) = running(state, c, f, id).await?;
    live.guest
        .write(&path, data, user)
        .await
        .map_err(|e| guest_error(f, id, e))?;
    live.guest
        .stat(&path, user)
        .await
        .map(file_info)
        .map_err(|e| guest_error(f, id, e))
}

pub async fn read_file(
    state: &Shared,
    c: &Caller,
    f: Flavor,
    id: &str,
    path: &str,
    user: Option<&str>,
) -> ApiResult<Vec<u8>> {
    let path = guest_path("path", path)?;
    let (_, _, live) = running(state, c, f, id).await?;
    live.guest
        .read(&path, user)
        .await
        .map_err(|e| guest_error(f, id, e))
}

pub async fn stat_file(
    state: &Shared,
    c: &Caller,
    f: Flavor,
    id: &str,
    path: &str,
    user: Option<&str>,
) -> ApiResult<FileInfo> {
    let path = guest_path("path", path)?;
    let (_, _, live) = running(state, c, f, id).await?;
    live.guest
        .stat(&path, user)
        .await
        .map(file_info)
        .map_err(|e| guest_error(f, id, e))
}

pub async fn list_files(
    state: &Shared,
    c: &Caller,
    f: Flavor,
    id: &str,
    path: &str,
    depth: u32,
    user: Option<&str>,
) -> ApiResult<Vec<FileInfo>> {
    let path = guest_path("path", path)?;
    if !(1..=32).contains(&depth) {
        return Err(ApiError::invalid(format!(
            "depth {depth} must be between 1 and 32"
        )));
    }
    let (_, _, live) = running(state, c, f, id).await?;
    let entries = live
        .guest
        .list(&path, depth, user)
        .await
        .map_err(|e| guest_error(f, id, e))?;
    Ok(entries.into_iter().map(file_info).collect())
}

// ---- timeouts ---------------------------------------------------------

pub async fn set_timeout(
    state: &Shared,
    c: &Caller,
    f: Flavor,
    id: &str,
    b: TimeoutBody,
) -> ApiResult<TimeoutLease> {
    let ms = check_timeout_ms(b.timeout_ms)?;
    let action = timeout_action(b.timeout_action.as_deref(), None)?;
    let (mut row, mut doc) = load(state, c, f, id).await?;
    match row.status.as_str() {
        "running" | "paused" | "creating" => {}
        s => return Err(ended(f, id, &doc, s)),
    }
    if let Some(a) = action {
        if doc.ephemeral && a == "hibernate" {
            return Err(ApiError::invalid(
                "an ephemeral machine is never hibernated (timeout_action destroy)",
            ));
        }
        doc.timeout_action = a;
    }
    doc.timeout_ms = ms;
    if row.status == "running" {
        doc.timeout_at = Some(now_ms() + ms as i64);
    }
    let status = row.status.clone();
    if !save(state, &mut row, &doc, &[status.as_str()]).await? {
        return Err(not_ready(f, id, "changed state meanwhile; try again"));
    }
    let timeout_at = doc.timeout_at.filter(|_| row.status == "running");
    Ok(TimeoutLease {
        timeout_ms: ms,
        timeout_action: doc.timeout_action.clone(),
        timeout_at: timeout_at.map(iso),
        remaining_ms: timeout_at.map(|t| (t - now_ms()).max(0)),
    })
}

// ---- snapshots, pause, resume, fork -----------------------------------

fn snapshot_json(doc: &SnapshotDoc, f: Flavor) -> SnapshotInfo {
    match f {
        Flavor::Machine => SnapshotInfo::Machine(MachineSnapshotInfo {
            id: doc.id.clone(),
            machine_id: doc.machine_id.clone(),
            size_bytes: doc.size_bytes,
            created_at: iso(doc.created_at),
            metadata: doc.metadata.clone(),
        }),
        Flavor::Sandbox => SnapshotInfo::Sandbox(SandboxSnapshotInfo {
            id: doc.id.clone(),
            sandbox_id: doc.machine_id.clone(),
            size_bytes: doc.size_bytes,
            created_at: iso(doc.created_at),
            metadata: doc.metadata.clone(),
        }),
    }
}

/// Snapshots a running machine (it goes on, or ends with `After::Stop`)
/// and records the snapshot.
async fn take_snapshot(
    state: &Shared,
    row: &MachineRow,
    doc: &MachineDoc,
    live: &Arc<Live>,
    kind: &str,
    after: After,
) -> ApiResult<SnapshotDoc> {
    let sid = nullspace_store::new_id("snap_");
    let dir = state.machines.snapshots_dir.join(&sid);
    let snap = state
        .machines
        .snapshot(live, dir.clone(), after)
        .await
        .map_err(|e| runtime_error(doc.flavor, &row.id, e))?;
    let meta = &snap.meta;
    let sdoc = SnapshotDoc {
        id: sid.clone(),
        flavor: doc.flavor,
        machine_id: row.id.clone(),
        kind: kind.into(),
        dir: dir.display().to_string(),
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
        namespace: row.namespace.clone(),
        machine_id: row.id.clone(),
        node_id: state.machines.node_id.clone(),
        parent_id: row.base_snapshot.clone(),
        created_at: sdoc.created_at,
        record: serde_json::to_string(&sdoc).map_err(ApiError::internal)?,
    };
    if let Err(e) = state.store.insert_snapshot(&srow).await {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e.into());
    }
    tracing::info!(machine = %row.id, snapshot = %srow.id, kind, ms = meta.timings_ms.snapshot, "snapshot taken");
    Ok(sdoc)
}

/// `POST …/snapshots`.
pub async fn create_snapshot(
    state: &Shared,
    c: &Caller,
    f: Flavor,
    id: &str,
    key: Option<String>,
) -> ApiResult<SnapshotInfo> {
    let (row, doc, live) = running(state, c, f, id).await?;
    let scope = format!("snapshot:{id}");
    if let Some(k) = &key
        && let Some(sid) = state
            .store
            .idempotency_target(&c.namespace, &scope, k)
            .await?
    {
        let (_, sdoc) = load_snapshot(state, c, &sid).await?;
        return Ok(snapshot_json(&sdoc, f));
    }
    let _l = live.lifecycle.lock().await;
    let sdoc = take_snapshot(state, &row, &doc, &live, "snapshot", After::Resume).await?;
    if let Some(k) = &key {
        let _ = state
            .store
            .claim_idempotency_key(&c.namespace, &scope, k, &sdoc.id)
            .await;
    }
    Ok(snapshot_json(&sdoc, f))
}

/// `POST …/hibernate` (`pause()`): memory and disk into a snapshot, the VM
/// ends, the machine is `paused` until `resume`.
pub async fn hibernate(state: &Shared, c: &Caller, f: Flavor, id: &str) -> ApiResult<SnapshotInfo> {
    let (row, _) = load(state, c, f, id).await?;
    if row.status == "paused" {
        let (_, doc) = load(state, c, f, id).await?;
        if let Some(sid) = &doc.snapshot_id {
            let (_, sdoc) = load_snapshot(state, c, sid).await?;
            return Ok(snapshot_json(&sdoc, f));
        }
    }
    let (row, doc, live) = running(state, c, f, id).await?;
    let _l = live.lifecycle.lock().await;
    let sdoc = pause_now(state, row, doc, &live).await?;
    Ok(snapshot_json(&sdoc, f))
}

async fn pause_now(
    state: &Shared,
    mut row: MachineRow,
    mut doc: MachineDoc,
    live: &Arc<Live>,
) -> ApiResult<SnapshotDoc> {
    let sdoc = take_snapshot(state, &row, &doc, live, "hibernate", After::Stop).await?;
    doc.vm = None;
    doc.snapshot_id = Some(sdoc.id.clone());
    doc.base_dir = sdoc.dir.clone();
    doc.paused_at = Some(now_ms());
    doc.timeout_at = None;
    row.status = "paused".into();
    row.base_snapshot = sdoc.id.clone();
    save(state, &mut row, &doc, &["running"]).await?;
    tracing::info!(machine = %row.id, snapshot = %sdoc.id, "machine paused");
    Ok(sdoc)
}

/// `POST …/resume`: a paused machine runs again (the same id) from its
/// hibernation snapshot. 0.1.9 names the snapshot instead of the machine.
pub async fn resume(state: &Shared, c: &Caller, f: Flavor, id: &str) -> ApiResult<MachineInfo> {
    let machine_id = if id.starts_with("snap_") {
        let (srow, _) = load_snapshot(state, c, id)
            .await
            .map_err(|_| not_found(f, id))?;
        let (_, doc) = load(state, c, f, &srow.machine_id).await?;
        if doc.snapshot_id.as_deref() != Some(id) {
            return Err(ApiError::conflict(
                "snapshot_conflict",
                format!(
                    "snapshot {id} is not the paused state of {} {}; create a {} from it with snapshot_id",
                    f.noun(),
                    srow.machine_id,
                    f.noun()
                ),
            ));
        }
        srow.machine_id
    } else {
        id.to_string()
    };
    let id = machine_id.as_str();
    let (mut row, mut doc) = load(state, c, f, id).await?;
    match row.status.as_str() {
        "running" => return Ok(info(&row, &doc)),
        "paused" => {}
        "creating" => return Err(not_ready(f, id, "is still being created")),
        s => return Err(ended(f, id, &doc, s)),
    }
    if row.node_id != state.machines.node_id {
        return Err(ApiError::conflict(
            "machine_conflict",
            format!(
                "{} {id} was paused on node {}; resume it there",
                f.noun(),
                row.node_id
            ),
        ));
    }
    let snapshot = open_snapshot(&doc.base_dir)?;
    let reservation = state
        .machines
        .reserve(doc.memory_mb)
        .map_err(|e| runtime_error(f, id, e))?;
    // Claim the transition so a concurrent resume does not restore twice.
    row.status = "creating".into();
    if !save(state, &mut row, &doc, &["paused"]).await? {
        return Err(ApiError::conflict(
            "transition_in_progress",
            format!("{} {id} is changing state; try again", f.noun()),
        ));
    }
    let envs = load_envs(&snapshot.dir);
    match state
        .machines
        .restore(id, snapshot, envs, reservation, None)
        .await
    {
        Ok((live, started)) => {
            let ms = started.ms;
            let now = now_ms();
            doc.vm = Some(live.handle.clone());
            doc.paused_at = None;
            doc.last_active_at = now;
            doc.timeout_at = Some(now + doc.timeout_ms as i64);
            row.status = "running".into();
            save(state, &mut row, &doc, &["creating"]).await?;
            tracing::info!(machine = %id, restore_ms = ms, "machine resumed");
            Ok(info(&row, &doc))
        }
        Err(e) => {
            row.status = "paused".into();
            let _ = save(state, &mut row, &doc, &["creating"]).await;
            Err(runtime_error(f, id, e))
        }
    }
}

/// `POST …/fork`: a new machine from a snapshot of this running one (its
/// disk copy-on-write over the snapshot's); both go on independently.
pub async fn fork(
    state: &Shared,
    c: &Caller,
    f: Flavor,
    id: &str,
    key: Option<String>,
) -> ApiResult<MachineInfo> {
    let scope = format!("fork:{id}");
    if let Some(k) = &key
        && let Some(child) = state
            .store
            .idempotency_target(&c.namespace, &scope, k)
            .await?
    {
        return wait_created(state, c, f, &child).await;
    }
    let (row, doc, live) = running(state, c, f, id).await?;
    let sdoc = {
        let _l = live.lifecycle.lock().await;
        take_snapshot(state, &row, &doc, &live, "fork", After::Resume).await?
    };
    let body = CreateMachineBody {
        snapshot_id: Some(sdoc.id.clone()),
        timeout_ms: Some(doc.timeout_ms),
        timeout_action: Some(doc.timeout_action.clone()),
        inactivity_timeout_ms: doc.inactivity_timeout_ms,
        auto_delete_after_ms: doc.auto_delete_after_ms,
        ephemeral: Some(doc.ephemeral),
        auto_resume: Some(doc.auto_resume),
        metadata: Some(doc.metadata.clone()),
        internet_access: Some(doc.internet_access),
        ..Default::default()
    };
    let child = create(state, c, f, body, None).await?;
    // The child records its parent.
    if let Ok(Some(mut crow)) = state.store.machine(&child.id).await
        && let Ok(mut cdoc) = doc_of(&crow)
    {
        cdoc.parent_id = Some(id.to_string());
        let status = crow.status.clone();
        let _ = save(state, &mut crow, &cdoc, &[status.as_str()]).await;
    }
    if let Some(k) = &key {
        let _ = state
            .store
            .claim_idempotency_key(&c.namespace, &scope, k, &child.id)
            .await;
    }
    Ok(child)
}

// ---- snapshots API ----------------------------------------------------

/// `f`: the dialect the request named (`machine_id`/`sandbox_id` in the
/// query), else the snapshot's own.
pub async fn snapshot_get(
    state: &Shared,
    c: &Caller,
    id: &str,
    f: Option<Flavor>,
) -> ApiResult<SnapshotInfo> {
    let (_, doc) = load_snapshot(state, c, id).await?;
    Ok(snapshot_json(&doc, f.unwrap_or(doc.flavor)))
}

pub async fn snapshot_list(
    state: &Shared,
    c: &Caller,
    machine_id: Option<&str>,
    f: Option<Flavor>,
    metadata: Option<&Map<String, Value>>,
) -> ApiResult<Vec<SnapshotInfo>> {
    if let Some(m) = machine_id
        && !plausible_id(m)
    {
        return Ok(vec![]);
    }
    let rows = state.store.snapshots(&c.namespace, machine_id).await?;
    let mut out = vec![];
    for r in rows {
        let doc: SnapshotDoc = serde_json::from_str(&r.record).map_err(ApiError::internal)?;
        if metadata.is_some_and(|m| m.iter().any(|(k, v)| doc.metadata.get(k) != Some(v))) {
            continue;
        }
        out.push(snapshot_json(&doc, f.unwrap_or(doc.flavor)));
    }
    Ok(out)
}

pub async fn snapshot_delete(state: &Shared, c: &Caller, id: &str) -> ApiResult<()> {
    let (row, doc) = load_snapshot(state, c, id).await?;
    let users = state.store.snapshot_users(id).await?;
    if !users.is_empty() {
        return Err(ApiError::conflict(
            "snapshot_in_use",
            format!(
                "snapshot {id} is in use by {} (a machine's disk or a later snapshot is layered on it)",
                users.join(", ")
            ),
        ));
    }
    state.store.delete_snapshot(&row.id).await?;
    let dir = std::path::PathBuf::from(&doc.dir);
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
    Ok(())
}

// ---- destroy ----------------------------------------------------------

/// `DELETE /v1/machines/{id}`: the VM ends, the record says `destroyed`.
pub async fn destroy(state: &Shared, c: &Caller, f: Flavor, id: &str) -> ApiResult<Destroyed> {
    let (row, _) = load(state, c, f, id).await?;
    if matches!(row.status.as_str(), "destroyed" | "error") {
        return Ok(Destroyed {
            id: row.id,
            status: row.status,
        });
    }
    if row.status != "paused" && row.node_id != state.machines.node_id {
        return Err(ApiError::conflict(
            "machine_conflict",
            format!(
                "{} {id} runs on node {}; delete it there",
                f.noun(),
                row.node_id
            ),
        ));
    }
    end(state, row, "destroyed", "deleted", LIVE).await?;
    Ok(Destroyed {
        id: id.to_string(),
        status: "destroyed".into(),
    })
}

/// Ends a machine: the record first (nobody uses it from now on), then
/// its VM and directory, then the internal snapshots (its hibernation
/// states, the fork snapshots) nothing needs any more. The record is read
/// again under the machine's lifecycle lock and ended only if its status
/// is still one of `only_if` (a pause or resume may have come first).
pub async fn end(
    state: &Shared,
    row: MachineRow,
    status: &str,
    reason: &str,
    only_if: &[&str],
) -> ApiResult<()> {
    let live = state.machines.get(&row.id);
    let _l = match &live {
        Some(l) => Some(l.lifecycle.lock().await),
        None => None,
    };
    let Some(mut row) = state.store.machine(&row.id).await? else {
        return Ok(());
    };
    if !only_if.contains(&row.status.as_str()) {
        return Ok(());
    }
    let mut doc = doc_of(&row)?;
    let vm = doc.vm.take();
    doc.ended_reason = Some(reason.to_string());
    doc.ended_at = Some(now_ms());
    doc.timeout_at = None;
    let was = row.status.clone();
    row.status = status.into();
    if !save(state, &mut row, &doc, &[was.as_str()]).await? {
        return Ok(());
    }
    if row.node_id == state.machines.node_id
        && let Err(e) = state.machines.destroy(&row.id, vm).await
    {
        tracing::warn!(machine = %row.id, "ending the VM: {e}");
    }
    tracing::info!(machine = %row.id, status, reason, "machine ended");
    let mut candidates: Vec<String> = state
        .store
        .snapshots(&row.namespace, Some(&row.id))
        .await
        .map(|v| v.into_iter().rev().map(|s| s.id).collect())
        .unwrap_or_default();
    if !row.base_snapshot.is_empty() {
        candidates.push(row.base_snapshot.clone());
    }
    collect_snapshots(state, candidates).await;
    Ok(())
}

/// Deletes the internal snapshots among `ids` (kinds `hibernate` and
/// `fork`; a user's snapshots stay until deleted) that nothing uses, and
/// then their parents, likewise.
async fn collect_snapshots(state: &Shared, mut ids: Vec<String>) {
    while let Some(id) = ids.pop() {
        let Ok(Some(srow)) = state.store.snapshot(&id).await else {
            continue;
        };
        let Ok(sdoc) = serde_json::from_str::<SnapshotDoc>(&srow.record) else {
            continue;
        };
        if !matches!(sdoc.kind.as_str(), "hibernate" | "fork") {
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
            let dir = std::path::PathBuf::from(&sdoc.dir);
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
            if !srow.parent_id.is_empty() {
                ids.push(srow.parent_id);
            }
        }
    }
}

// ---- the server's own duties ------------------------------------------

/// At start-up: running machines of this node whose QEMU still runs and
/// whose agent answers are taken over; the others (and those interrupted
/// while being created or resumed) end with status `error` and the reason.
/// Machine directories without a live record are removed, their QEMU
/// killed. Nothing runs without a record, no record claims a VM that is gone.
pub async fn recover(state: &Shared) -> ApiResult<()> {
    let rt = &state.machines;
    let rows = state
        .store
        .machines_on_node(&rt.node_id, &["creating", "running"])
        .await?;
    let mut adopted = vec![];
    for row in rows {
        let doc = doc_of(&row)?;
        let outcome = if row.status == "creating" {
            Err("the server stopped while the machine was being created or resumed".to_string())
        } else {
            match (&doc.vm, open_snapshot(&doc.base_dir)) {
                (Some(h), Ok(base)) => match rt.reserve(doc.memory_mb) {
                    Ok(res) => rt.adopt(&row.id, h.clone(), base, res).await.map_err(|e| {
                        format!("its VM did not answer after the server restarted ({e})")
                    }),
                    Err(e) => Err(format!("{e}")),
                },
                (None, _) => Err("no VM was recorded".into()),
                (_, Err(e)) => Err(format!("its snapshot is unreadable: {}", e.message)),
            }
        };
        match outcome {
            Ok(_) => {
                tracing::info!(machine = %row.id, "machine taken over after restart");
                adopted.push(row.id.clone());
            }
            Err(why) => {
                tracing::warn!(machine = %row.id, "machine ended at start-up: {why}");
                // A paused machine caught mid-resume keeps its snapshot.
                let was_resuming = row.status == "creating" && doc.paused_at.is_some();
                if was_resuming {
                    let mut row = row.clone();
                    row.status = "paused".into();
                    let _ = state.machines.destroy(&row.id, doc.vm.clone()).await;
                    let mut d = doc.clone();
                    d.vm = None;
                    let _ = save(state, &mut row, &d, &["creating"]).await;
                } else {
                    if row.status == "creating"
                        && let Some(k) = &doc.idempotency_key
                    {
                        // The client's retry (same key) creates it afresh.
                        let _ = state
                            .store
                            .release_idempotency_key(&row.namespace, SCOPE_CREATE, k)
                            .await;
                    }
                    end(state, row, "error", &why, &["creating", "running"]).await?;
                }
            }
        }
    }
    let swept = {
        let rt = state.machines.clone();
        tokio::task::spawn_blocking(move || rt.sweep_orphans(&adopted))
            .await
            .unwrap_or_default()
    };
    for id in swept {
        tracing::warn!(machine = %id, "removed a machine directory without a running record");
    }
    Ok(())
}

/// Every second: machines past a deadline get their timeout action
/// (destroy or hibernate; a paused one past `auto_delete_after_ms` is
/// destroyed); every few seconds, a running machine whose QEMU is gone
/// ends with status `error`.
pub fn spawn_reaper(state: Shared) {
    tokio::spawn(async move {
        let mut tick: u64 = 0;
        loop {
            // A stopping server neither times out nor ends machines: they
            // run on for the next start.
            tokio::select! {
                _ = state.shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            tick += 1;
            if let Err(e) = reap_due(&state).await {
                tracing::warn!("machine timeouts: {}", e.message);
            }
            if tick.is_multiple_of(3) {
                check_alive(&state).await;
            }
        }
    });
}

async fn reap_due(state: &Shared) -> ApiResult<()> {
    let due = state
        .store
        .machines_due(&state.machines.node_id, now_ms())
        .await?;
    for row in due {
        let doc = doc_of(&row)?;
        let st = state.clone();
        // One task per machine: a slow hibernate does not hold up the others.
        tokio::spawn(async move {
            let id = row.id.clone();
            let r = match (row.status.as_str(), doc.timeout_action.as_str()) {
                ("running", "hibernate") => match st.machines.get(&id) {
                    Some(live) => {
                        let _l = live.lifecycle.lock().await;
                        // Re-read under the lock: it may have changed.
                        match st.store.machine(&id).await {
                            Ok(Some(r)) if r.status == "running" => match doc_of(&r) {
                                Ok(d) => pause_now(&st, r, d, &live).await.map(|_| ()),
                                Err(e) => Err(e),
                            },
                            _ => Ok(()),
                        }
                    }
                    None => Ok(()),
                },
                ("running", _) => end(&st, row, "destroyed", "timeout", &["running"]).await,
                ("paused", _) => {
                    end(&st, row, "destroyed", "auto_delete_after_ms", &["paused"]).await
                }
                _ => Ok(()),
            };
            if let Err(e) = r {
                tracing::warn!(machine = %id, "timeout action: {}", e.message);
            }
        });
    }
    Ok(())
}

async fn check_alive(state: &Shared) {
    for live in state.machines.all() {
        let h = live.handle.clone();
        let alive = tokio::task::spawn_blocking(move || h.alive())
            .await
            .unwrap_or(true);
        if alive {
            continue;
        }
        if let Ok(Some(row)) = state.store.machine(&live.id).await
            && row.status == "running"
            && doc_of(&row).is_ok_and(|d| d.vm.is_some_and(|v| v.pid == live.handle.pid))
        {
            let _ = end(
                state,
                row,
                "error",
                "its VM exited unexpectedly",
                &["running"],
            )
            .await;
        } else {
            state.machines.remove_if(&live);
        }
    }
}
