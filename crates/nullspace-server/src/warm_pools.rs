//! Template warm pools: a namespace's standing order for prepared machines
//! of one template build and shape. The machines are the VM pool's
//! (`nullspace_vm::pool`), kept under a pin named by the warm pool's id;
//! the order is durable in the store and pinned again when the server
//! starts. A create that names a pool checks out of it ([`checkout`]).
//!
//! `pinned_build` only: a pool serves the build its template ref resolved
//! to when it was made or changed (an update that names the ref again, or
//! a reconcile, moves it to the ref's current build).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::StatusCode;
use nullspace_model::machine::warm_pool::{
    CheckoutMode, CheckoutRequest, CheckoutResult, CheckoutSource, CreateWarmPoolBody,
    MAX_READY_LIMIT, UpdateWarmPoolBody, WarmPoolAction, WarmPoolCounts, WarmPoolInfo,
    WarmPoolResources, WarmPoolState,
};
use nullspace_store::{Caller, WarmPoolRow, now_ms};
use nullspace_vm::Snapshot;
use nullspace_vm::pool::Entry;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ApiError;
use crate::machines::MachineError;
use crate::machines::create::{Source, template_source};
use crate::model::iso;
use crate::state::Shared;

type R<T> = Result<T, MachineError>;

/// The longest a create may wait for a ready machine (`wait_ms`).
pub const MAX_WAIT: Duration = Duration::from_secs(30);

fn err(status: StatusCode, code: &str, msg: String) -> MachineError {
    MachineError::Template(ApiError::new(status, code, msg))
}

fn not_found(id: &str) -> MachineError {
    err(
        StatusCode::NOT_FOUND,
        "warm_pool_not_found",
        format!("warm pool {id:?} not found"),
    )
}

/// What the store keeps of a pool beside its columns.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Doc {
    template_ref: String,
    build_id: String,
    resources: WarmPoolResources,
    min_ready: u32,
    max_ready: u32,
    idle_timeout_seconds: u64,
    stale_after_seconds: u64,
    checkout_policy: CheckoutMode,
    labels: BTreeMap<String, String>,
    metadata: serde_json::Map<String, Value>,
    /// When the pool last changed its build (`rollout_generation`).
    generation: u64,
    enabled_at: Option<i64>,
    disabled_at: Option<i64>,
    drain_requested_at: Option<i64>,
    last_reconciled_at: Option<i64>,
}

struct Pool {
    row: WarmPoolRow,
    doc: Doc,
    state: WarmPoolState,
}

fn parse_state(s: &str) -> WarmPoolState {
    match s {
        "enabled" => WarmPoolState::Enabled,
        "draining" => WarmPoolState::Draining,
        _ => WarmPoolState::Disabled,
    }
}

impl Pool {
    fn of(row: WarmPoolRow) -> R<Pool> {
        let doc: Doc = serde_json::from_str(&row.record)
            .map_err(|e| MachineError::Internal(format!("warm pool {} record: {e}", row.id)))?;
        let state = parse_state(&row.state);
        Ok(Pool { row, doc, state })
    }

    fn to_row(&self) -> R<WarmPoolRow> {
        let mut row = self.row.clone();
        row.state = self.state.as_str().into();
        row.record = serde_json::to_string(&self.doc)
            .map_err(|e| MachineError::Internal(format!("warm pool record: {e}")))?;
        row.updated_at = now_ms();
        Ok(row)
    }
}

fn name(n: &str) -> R<()> {
    let ok = !n.is_empty()
        && n.len() <= 63
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(MachineError::Invalid(format!(
            "warm pool name {n:?} must be 1 to 63 of [A-Za-z0-9._-]"
        )))
    }
}

fn bounds(min: u32, max: u32) -> R<()> {
    if max < min {
        return Err(MachineError::Invalid(format!(
            "max_ready ({max}) must be at least min_ready ({min})"
        )));
    }
    if max > MAX_READY_LIMIT {
        return Err(MachineError::Invalid(format!(
            "max_ready ({max}) is above this server's limit of {MAX_READY_LIMIT} per warm pool"
        )));
    }
    Ok(())
}

fn policy(p: Option<&str>) -> R<Option<CheckoutMode>> {
    p.map(|s| {
        CheckoutMode::parse(s).ok_or_else(|| {
            MachineError::Invalid(format!(
                "checkout_policy {s:?} must be prefer, require or bypass"
            ))
        })
    })
    .transpose()
}

fn pinned_build_only(version_policy: Option<&str>, track_tag: Option<&str>) -> R<()> {
    match (version_policy, track_tag) {
        (None | Some("pinned_build"), None) => Ok(()),
        _ => Err(MachineError::NotImplemented(
            "warm pools here serve the build their template ref resolves to (version_policy pinned_build); track_tag is not supported by this server".into(),
        )),
    }
}

/// The template's build and snapshot, and a shape check: a machine
/// restored from a snapshot has the snapshot's shape.
async fn resolve(state: &Shared, c: &Caller, raw: &str, res: &WarmPoolResources) -> R<Source> {
    let src = template_source(state, c, raw.trim()).await?;
    if (res.vcpus, res.memory_mb) != (src.vcpus, src.memory_mb) {
        return Err(MachineError::Incompatible(format!(
            "template {raw:?}'s snapshot was taken with {} vCPUs and {} MiB, and its machines have exactly that shape; make the warm pool with resources vcpus={} memory_mb={} (asked: {} and {})",
            src.vcpus, src.memory_mb, src.vcpus, src.memory_mb, res.vcpus, res.memory_mb
        )));
    }
    Ok(src)
}

/// Keeps the VM pool in step with `p` (pins an enabled pool, unpins any
/// other); blocking work, off the async threads.
async fn apply(state: &Shared, p: &Pool, snapshot: Option<Snapshot>) {
    let rt = state.machines.clone();
    let (id, label, min, max) = (
        p.row.id.clone(),
        p.row.template_id.clone(),
        p.doc.min_ready as usize,
        p.doc.max_ready as usize,
    );
    let enabled = p.state == WarmPoolState::Enabled;
    let _ = tokio::task::spawn_blocking(move || {
        let Some(pool) = rt.pool() else { return };
        match snapshot.filter(|_| enabled) {
            Some(s) => pool.pin(&id, &label, &s, min, max),
            None => pool.unpin(&id),
        }
    })
    .await;
}

/// The API's view of `p`, with its key's counts; `known` is its
/// template's snapshot when the caller resolved it already (else it is
/// resolved here).
async fn info(state: &Shared, c: &Caller, p: &Pool, known: Option<Snapshot>) -> WarmPoolInfo {
    let d = &p.doc;
    let snapshot = match known {
        Some(s) => Some(s),
        None => template_source(state, c, &p.doc.template_ref)
            .await
            .ok()
            .map(|src| src.snapshot),
    };
    let stats = match snapshot {
        Some(snap) => {
            let rt = state.machines.clone();
            let tid = p.row.template_id.clone();
            tokio::task::spawn_blocking(move || {
                rt.pool().and_then(|pool| pool.key_stats(&tid, &snap))
            })
            .await
            .ok()
            .flatten()
        }
        None => None,
    };
    let enabled = p.state == WarmPoolState::Enabled;
    let s = stats.unwrap_or_default();
    let status = WarmPoolCounts {
        target: if enabled { s.target as u32 } else { 0 },
        ready: s.ready as u32,
        warming: s.warming as u32,
        claimed: s.hits as u32,
        draining: 0,
        failed: s.failures as u32,
        expired: 0,
        unavailable: 0,
    };
    WarmPoolInfo {
        id: p.row.id.clone(),
        name: p.row.name.clone(),
        template_ref: d.template_ref.clone(),
        resolved_template: p.row.template_id.clone(),
        resolved_template_build_id: Some(d.build_id.clone()),
        resources: d.resources,
        min_ready: d.min_ready,
        max_ready: d.max_ready,
        idle_timeout_seconds: d.idle_timeout_seconds,
        stale_after_seconds: d.stale_after_seconds,
        checkout_policy: d.checkout_policy,
        version_policy: "pinned_build".into(),
        rollout_generation: d.generation,
        rollout_status: serde_json::Map::new(),
        status,
        state: p.state,
        degraded_reason: s
            .last_error
            .filter(|_| s.ready == 0 && s.failures > 0)
            .map(|_| "artifact_prewarm_failed".to_string()),
        labels: d.labels.clone(),
        metadata: d.metadata.clone(),
        created_at: iso(p.row.created_at),
        updated_at: iso(p.row.updated_at),
        enabled_at: d.enabled_at.map(iso),
        disabled_at: d.disabled_at.map(iso),
        drain_requested_at: d.drain_requested_at.map(iso),
        last_reconciled_at: d.last_reconciled_at.map(iso),
    }
}

async fn load(state: &Shared, c: &Caller, id: &str) -> R<Pool> {
    let row = state
        .store
        .warm_pool(&c.namespace, id)
        .await?
        .ok_or_else(|| not_found(id))?;
    Pool::of(row)
}

async fn save(state: &Shared, p: &mut Pool) -> R<()> {
    let row = p.to_row()?;
    if !state.store.update_warm_pool(&row).await? {
        return Err(
            match state.store.warm_pool(&row.namespace, &row.id).await? {
                None => not_found(&row.id),
                Some(_) => MachineError::conflict(
                    "warm_pool_name_conflict",
                    format!("a warm pool named {:?} exists already", row.name),
                ),
            },
        );
    }
    p.row = row;
    Ok(())
}

pub async fn create(state: &Shared, c: &Caller, b: &CreateWarmPoolBody) -> R<WarmPoolInfo> {
    name(&b.name)?;
    bounds(b.min_ready, b.max_ready)?;
    let checkout = policy(b.checkout_policy.as_deref())?.unwrap_or(CheckoutMode::Prefer);
    pinned_build_only(b.version_policy.as_deref(), b.track_tag.as_deref())?;
    if b.host_pool_id.is_some() || b.cell_id.is_some() {
        return Err(MachineError::NotImplemented(
            "host_pool_id and cell_id are not supported by this server (one node places every machine)".into(),
        ));
    }
    let raw = b
        .template_ref
        .as_deref()
        .or(b.template.as_deref())
        .ok_or_else(|| MachineError::Invalid("template_ref is required".into()))?;
    let src = resolve(state, c, raw, &b.resources).await?;
    let now = now_ms();
    let doc = Doc {
        template_ref: raw.to_string(),
        build_id: src.build_id.clone(),
        resources: b.resources,
        min_ready: b.min_ready,
        max_ready: b.max_ready,
        idle_timeout_seconds: b.idle_timeout_seconds.unwrap_or(600),
        stale_after_seconds: b.stale_after_seconds.unwrap_or(900),
        checkout_policy: checkout,
        labels: b.labels.clone().unwrap_or_default(),
        metadata: b.metadata.clone().unwrap_or_default(),
        generation: 1,
        enabled_at: Some(now),
        disabled_at: None,
        drain_requested_at: None,
        last_reconciled_at: Some(now),
    };
    let mut p = Pool {
        row: WarmPoolRow {
            id: nullspace_store::new_id("twp_"),
            namespace: c.namespace.clone(),
            name: b.name.clone(),
            template_id: src.template_id.clone(),
            state: String::new(),
            record: String::new(),
            created_at: now,
            updated_at: now,
        },
        doc,
        state: WarmPoolState::Enabled,
    };
    p.row = p.to_row()?;
    if !state.store.insert_warm_pool(&p.row).await? {
        return Err(MachineError::conflict(
            "warm_pool_name_conflict",
            format!("a warm pool named {:?} exists already", b.name),
        ));
    }
    apply(state, &p, Some(src.snapshot.clone())).await;
    Ok(info(state, c, &p, Some(src.snapshot)).await)
}

/// `GET /v1/template-warm-pools` filters.
#[derive(Debug, Default)]
pub struct ListFilter {
    pub template: Option<String>,
    pub state: Option<String>,
    /// `key=value` (or a bare key): every one must match.
    pub labels: Vec<String>,
    /// `ready` (target met), `warming`, `degraded`, `draining`, `unavailable`.
    pub status: Option<String>,
    pub limit: Option<usize>,
}

pub async fn list(state: &Shared, c: &Caller, f: &ListFilter) -> R<Vec<WarmPoolInfo>> {
    let mut out = vec![];
    for row in state.store.warm_pools(Some(&c.namespace)).await? {
        let p = Pool::of(row)?;
        let i = info(state, c, &p, None).await;
        let template_ok = f
            .template
            .as_deref()
            .is_none_or(|t| t == i.template_ref || t == i.resolved_template);
        let state_ok = f.state.as_deref().is_none_or(|s| s == i.state.as_str());
        let labels_ok = f.labels.iter().all(|l| match l.split_once('=') {
            Some((k, v)) => i.labels.get(k).is_some_and(|x| x == v),
            None => i.labels.contains_key(l),
        });
        let status_ok = f.status.as_deref().is_none_or(|s| status_of(&i) == s);
        if template_ok && state_ok && labels_ok && status_ok {
            out.push(i);
        }
        if f.limit.is_some_and(|l| out.len() >= l) {
            break;
        }
    }
    Ok(out)
}

/// One word for where a pool stands (the list's `status` filter).
fn status_of(i: &WarmPoolInfo) -> &'static str {
    match i.state {
        WarmPoolState::Draining => "draining",
        WarmPoolState::Disabled => "unavailable",
        WarmPoolState::Enabled if i.degraded_reason.is_some() => "degraded",
        WarmPoolState::Enabled if i.status.ready >= i.status.target => "ready",
        WarmPoolState::Enabled => "warming",
    }
}

pub async fn get(state: &Shared, c: &Caller, id: &str) -> R<WarmPoolInfo> {
    let p = load(state, c, id).await?;
    Ok(info(state, c, &p, None).await)
}

pub async fn update(
    state: &Shared,
    c: &Caller,
    id: &str,
    b: &UpdateWarmPoolBody,
) -> R<WarmPoolInfo> {
    let mut p = load(state, c, id).await?;
    if let Some(n) = &b.name {
        name(n)?;
        p.row.name = n.clone();
    }
    let (min, max) = (
        b.min_ready.unwrap_or(p.doc.min_ready),
        b.max_ready.unwrap_or(p.doc.max_ready),
    );
    bounds(min, max)?;
    (p.doc.min_ready, p.doc.max_ready) = (min, max);
    if let Some(m) = policy(b.checkout_policy.as_deref())? {
        p.doc.checkout_policy = m;
    }
    pinned_build_only(b.version_policy.as_deref(), b.track_tag.as_deref())?;
    if let Some(r) = b.resources {
        p.doc.resources = r;
    }
    if let Some(t) = b.template_ref.as_deref().or(b.template.as_deref()) {
        p.doc.template_ref = t.to_string();
    }
    if let Some(v) = b.idle_timeout_seconds {
        p.doc.idle_timeout_seconds = v;
    }
    if let Some(v) = b.stale_after_seconds {
        p.doc.stale_after_seconds = v;
    }
    if let Some(l) = &b.labels {
        p.doc.labels = l.clone();
    }
    if let Some(m) = &b.metadata {
        p.doc.metadata = m.clone();
    }
    let src = resolve(state, c, &p.doc.template_ref.clone(), &p.doc.resources).await?;
    rebind(&mut p, &src);
    save(state, &mut p).await?;
    apply(state, &p, Some(src.snapshot.clone())).await;
    Ok(info(state, c, &p, Some(src.snapshot)).await)
}

/// Points the pool at `src`'s build (a new generation when it moved).
fn rebind(p: &mut Pool, src: &Source) {
    if p.doc.build_id != src.build_id || p.row.template_id != src.template_id {
        p.doc.generation += 1;
    }
    p.doc.build_id = src.build_id.clone();
    p.row.template_id = src.template_id.clone();
}

pub async fn act(state: &Shared, c: &Caller, id: &str, action: WarmPoolAction) -> R<WarmPoolInfo> {
    let mut p = load(state, c, id).await?;
    let now = now_ms();
    p.state = p.state.after(action);
    match action {
        WarmPoolAction::Enable => p.doc.enabled_at = Some(now),
        WarmPoolAction::Disable => p.doc.disabled_at = Some(now),
        WarmPoolAction::Drain => p.doc.drain_requested_at = Some(now),
    }
    // Enabling needs the template still there; the others do not.
    let snapshot = if p.state == WarmPoolState::Enabled {
        let src = resolve(state, c, &p.doc.template_ref.clone(), &p.doc.resources).await?;
        rebind(&mut p, &src);
        Some(src.snapshot)
    } else {
        None
    };
    save(state, &mut p).await?;
    apply(state, &p, snapshot.clone()).await;
    Ok(info(state, c, &p, snapshot).await)
}

/// Moves the pool to its ref's current build and pins it again.
pub async fn reconcile(state: &Shared, c: &Caller, id: &str) -> R<WarmPoolInfo> {
    let mut p = load(state, c, id).await?;
    p.doc.last_reconciled_at = Some(now_ms());
    let snapshot = match resolve(state, c, &p.doc.template_ref.clone(), &p.doc.resources).await {
        Ok(src) => {
            rebind(&mut p, &src);
            Some(src.snapshot)
        }
        Err(e) if p.state == WarmPoolState::Enabled => return Err(e),
        Err(_) => None,
    };
    save(state, &mut p).await?;
    apply(state, &p, snapshot.clone()).await;
    Ok(info(state, c, &p, snapshot).await)
}

pub async fn delete(state: &Shared, c: &Caller, id: &str) -> R<()> {
    if !state.store.delete_warm_pool(&c.namespace, id).await? {
        return Err(not_found(id));
    }
    let rt = state.machines.clone();
    let id = id.to_string();
    let _ = tokio::task::spawn_blocking(move || {
        if let Some(p) = rt.pool() {
            p.unpin(&id)
        }
    })
    .await;
    Ok(())
}

/// Pins every enabled pool again (a starting server). A pool whose
/// template is gone stays in the store, unpinned, with a target of 0.
pub async fn restore(state: &Shared) {
    let rows = match state.store.warm_pools(None).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("warm pools not restored: {e}");
            return;
        }
    };
    for row in rows {
        let Ok(p) = Pool::of(row) else { continue };
        if p.state != WarmPoolState::Enabled {
            continue;
        }
        let c = Caller {
            key_id: String::new(),
            namespace: p.row.namespace.clone(),
        };
        // The ref's build now (a restart follows the ref, as reconcile does).
        match resolve(state, &c, &p.doc.template_ref.clone(), &p.doc.resources).await {
            Ok(src) => apply(state, &p, Some(src.snapshot)).await,
            Err(e) => tracing::warn!(pool = %p.row.id, "warm pool not pinned: {e}"),
        }
    }
}

/// What a create asked of the pools, read from its `warm_pool` field.
pub struct Checkout {
    pub pool_id: Option<String>,
    pub mode: CheckoutMode,
    pub wait: Duration,
}

/// Reads a create's `warm_pool` (none: the server's own pool, `prefer`)
/// and checks the named pool serves `src`.
pub async fn plan_checkout(
    state: &Shared,
    c: &Caller,
    raw: Option<&Value>,
    src: &Source,
) -> R<Checkout> {
    let req: CheckoutRequest = match raw.filter(|v| !v.is_null()) {
        None => CheckoutRequest {
            id: None,
            mode: None,
            wait_ms: None,
        },
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
            MachineError::Invalid(format!(
                "warm_pool must be {{id, mode: prefer|require|bypass, wait_ms}}: {e}"
            ))
        })?,
    };
    let wait = Duration::from_millis(req.wait_ms.unwrap_or(0)).min(MAX_WAIT);
    let Some(id) = req.id.filter(|s| !s.trim().is_empty()) else {
        return match req.mode {
            None | Some(CheckoutMode::Bypass) => Ok(Checkout {
                pool_id: None,
                mode: req.mode.unwrap_or(CheckoutMode::Prefer),
                wait,
            }),
            Some(m) => Err(MachineError::Invalid(format!(
                "warm_pool.id is required with mode {}",
                m.as_str()
            ))),
        };
    };
    let p = load(state, c, &id).await?;
    let mode = req.mode.unwrap_or(p.doc.checkout_policy);
    if mode != CheckoutMode::Bypass && p.row.template_id != src.template_id {
        return Err(MachineError::Invalid(format!(
            "warm pool {id} serves template {:?}, not {:?}",
            p.doc.template_ref, src.template
        )));
    }
    if mode == CheckoutMode::Require && p.state != WarmPoolState::Enabled {
        return Err(unavailable(&id, &format!("it is {}", p.state.as_str())));
    }
    Ok(Checkout {
        pool_id: Some(id),
        mode,
        wait,
    })
}

fn unavailable(id: &str, why: &str) -> MachineError {
    err(
        StatusCode::CONFLICT,
        "warm_pool_unavailable",
        format!(
            "warm pool {id} has no ready machine ({why}) and the create asked for mode require"
        ),
    )
}

/// Takes a prepared machine as `plan` says (blocking: call off the async
/// threads); the entry, and what the create's answer says of it.
pub fn take(
    rt: &crate::runtime::Runtime,
    plan: &Checkout,
    template_id: &str,
    snapshot: &Snapshot,
) -> R<(Option<Entry>, CheckoutResult)> {
    let result = |source, hit| CheckoutResult {
        source,
        hit,
        id: plan.pool_id.clone(),
        mode: plan.mode,
        wait_ms: (!plan.wait.is_zero()).then_some(plan.wait.as_millis() as u64),
    };
    if plan.mode == CheckoutMode::Bypass {
        return Ok((None, result(CheckoutSource::Bypassed, false)));
    }
    let got = rt
        .pool()
        .and_then(|p| p.take_within(template_id, snapshot, plan.wait));
    match got {
        Some(e) => Ok((Some(e), result(CheckoutSource::ReadyInstance, true))),
        None if plan.mode == CheckoutMode::Require => Err(unavailable(
            plan.pool_id.as_deref().unwrap_or("(none)"),
            &format!("none became ready within {} ms", plan.wait.as_millis()),
        )),
        None => Ok((None, result(CheckoutSource::ColdCreate, false))),
    }
}
