//! The build lifecycle: creation (validation, sanitized persistence),
//! durable logs, the worker pool, execution, cancellation, recovery.
//!
//! Status moves `waiting → building → ready | error | cancelled`; the
//! terminal write is guarded so it happens once. A build's final log entry
//! is written before its terminal status, so a reader that sees the status
//! also sees every entry.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nullspace_build::import::{ImportError, ImportOptions, import};
use nullspace_oci::layout::NoProgress;
use nullspace_oci::{Image, ResolveOptions, SourceRef};
use nullspace_store::{BuildRow, Caller, now_ms};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{ApiError, ApiResult};
use crate::model::*;
use crate::state::{RunSecrets, Shared};
use crate::templates;
use crate::validate;
use nullspace_model::build::context::{Content, ContextManifest};
use nullspace_model::build::plan::{BuildPlan, Route, Source};
use nullspace_model::build::probe::Readiness;

pub const TERMINAL: &[&str] = &["ready", "error", "cancelled"];

pub fn is_terminal(status: &str) -> bool {
    TERMINAL.contains(&status)
}

/// What a ready build produced, stored in the artifact store (runtime env
/// values live here, never in API responses).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArtifactManifest {
    pub rootfs: String,
    pub rootfs_size: u64,
    pub env: std::collections::BTreeMap<String, String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    pub start_cmd: Option<String>,
    pub readiness: Option<Value>,
    pub image: Value,
    pub oci: OciMetadataOut,
    /// The build VM's snapshot directory (memory + disk), when built with
    /// one: relative to the artifact store (`snapshots/<build>`), so a moved
    /// data directory still restores (absolute in records of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

fn entry(rec: &BuildRecord, kind: &str, level: &str, message: impl Into<String>) -> LogEntry {
    LogEntry {
        build_id: rec.build_id.clone(),
        template_id: rec.template_id.clone(),
        offset: 0,
        timestamp: String::new(),
        kind: kind.into(),
        level: level.into(),
        message: message.into(),
        phase: None,
        step_index: None,
        total_steps: None,
        cache_kind: None,
        cache_status: None,
        cache_reason: None,
        cache_subject: None,
        error_detail: None,
        result: None,
        result_metadata: None,
    }
}

/// Appends a durable log entry and wakes followers.
pub async fn append(state: &Shared, mut e: LogEntry) -> ApiResult<i64> {
    e.timestamp = iso(now_ms());
    let build_id = e.build_id.clone();
    let off = state
        .store
        .append_log(&build_id, |o| {
            e.offset = o;
            serde_json::to_string(&e).unwrap_or_default()
        })
        .await?;
    state.hub.notify(&build_id);
    Ok(off)
}

pub async fn log(
    state: &Shared,
    rec: &BuildRecord,
    kind: &str,
    level: &str,
    phase: Option<&str>,
    msg: impl Into<String>,
) {
    let mut e = entry(rec, kind, level, msg);
    e.phase = phase.map(str::to_string);
    if let Err(err) = append(state, e).await {
        tracing::error!("log append failed for {}: {}", rec.build_id, err.message);
    }
}

pub fn parse_record(row: &BuildRow) -> ApiResult<BuildRecord> {
    serde_json::from_str(&row.record).map_err(ApiError::internal)
}

/// Loads a build the caller owns; anything else is "not found".
/// Ids we issue are `[A-Za-z0-9_]`; anything else cannot exist, and must
/// not reach the database (Postgres rejects NUL bytes in text).
pub fn plausible_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

pub async fn load(state: &Shared, caller: &Caller, id: &str) -> ApiResult<(BuildRow, BuildRecord)> {
    if !plausible_id(id) {
        return Err(ApiError::build_not_found(id));
    }
    let row = state
        .store
        .build(id)
        .await?
        .filter(|r| r.namespace == caller.namespace)
        .ok_or_else(|| ApiError::build_not_found(id))?;
    let rec = parse_record(&row)?;
    Ok((row, rec))
}

pub async fn save(state: &Shared, rec: &mut BuildRecord, only_if: &[&str]) -> ApiResult<bool> {
    rec.updated_at = iso(now_ms());
    let json = serde_json::to_string(rec).map_err(ApiError::internal)?;
    Ok(state
        .store
        .update_build(&rec.build_id, &rec.status, &json, only_if)
        .await?)
}

fn sanitize(req: &BuildRequest) -> Definition {
    let mut r = req.clone();
    let base_image_auth_kind = r
        .base_image_auth
        .take()
        .and_then(|a| a.get("kind").and_then(Value::as_str).map(str::to_string));
    let registry_auth_hosts = r
        .registry_auth
        .take()
        .unwrap_or_default()
        .iter()
        .filter_map(|a| {
            a.get("registry")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .collect();
    let secret_ids = r
        .build_secrets
        .take()
        .unwrap_or_default()
        .into_iter()
        .map(|s| s.id)
        .collect();
    let mut had_inline_context = false;
    if let Some(ctx) = r.build_context.as_mut() {
        for f in &mut ctx.files {
            if f.content_base64.take().is_some() {
                had_inline_context = true;
            }
        }
    }
    r.claim_token = None;
    Definition {
        request: r,
        base_image_auth_kind,
        registry_auth_hosts,
        secret_ids,
        had_inline_context,
    }
}

/// Validates, persists (sanitized) and queues a build.
pub async fn create(
    state: &Shared,
    caller: &Caller,
    req: BuildRequest,
    retry_of: Option<(String, String)>,
) -> ApiResult<BuildRecord> {
    let p = validate::plan(&req, &caller.namespace, &state.engines)
        .map_err(|issues| validate::rejection(&issues))?;
    let name = p
        .name
        .clone()
        .unwrap_or_else(|| nullspace_store::new_id("t-").replace('_', "-"));
    templates::check_claim(state, caller, &name, req.claim_token.as_deref()).await?;
    let template_id = templates::ensure(state, caller, &name).await?;
    let info = templates::info_by_id(state, &template_id).await?;
    let now = iso(now_ms());
    let id = nullspace_store::new_id("tb_");
    let def = sanitize(&req);
    let rec = BuildRecord {
        build_id: id.clone(),
        template_id: template_id.clone(),
        name: name.clone(),
        tags: p.tags.clone(),
        status: "waiting".into(),
        created_at: now.clone(),
        updated_at: now.clone(),
        // The ref this build's tags will make resolvable (`default` first,
        // as TemplateInfo picks its default tag).
        canonical_ref: format!(
            "{}/{}:{}",
            caller.namespace,
            name,
            if p.tags.iter().any(|t| t == "default") {
                "default"
            } else {
                p.tags[0].as_str()
            }
        ),
        namespace_slug: caller.namespace.clone(),
        visibility: info.visibility.clone(),
        // The published SDK parses this as native|buildkit only: any
        // Dockerfile engine reports as `buildkit`; `engine` says which ran.
        build_backend: p.backend.record().as_str().into(),
        source_type: p.source_type.as_str().into(),
        // The plan's digests: `POST /v1/templates/plan` shows the same.
        source_digest: Some(p.digests.source_digest.clone()),
        context_digest: p.digests.context_digest.clone(),
        dockerfile_digest: p.digests.dockerfile_digest.clone(),
        triggered_by: caller.key_id.clone(),
        queued_at: now.clone(),
        started_at: None,
        finished_at: None,
        duration_ms: None,
        failure_phase: None,
        build_config: req.build_config.clone().unwrap_or_default(),
        cache_summary: CacheSummary::default(),
        artifact_availability: Availability {
            status: "unavailable".into(),
            reason: Some("build not finished".into()),
        },
        promotability: Promotability {
            promotable: false,
            status: "not_ready".into(),
            reason: Some("build not finished".into()),
        },
        runtime_defaults: RuntimeDefaultsOut {
            default_env_keys: p.runtime.env.0.keys().cloned().collect(),
            start_cmd: p.runtime.start_cmd.clone(),
            default_user: p.runtime.user.clone(),
            default_workdir: p.runtime.workdir.clone(),
            readiness: p.runtime.readiness.as_ref().map(Readiness::to_json),
        },
        oci_metadata: OciMetadataOut::default(),
        artifact_ids: vec![],
        error: None,
        error_detail: None,
        retry_of_build_id: retry_of.as_ref().map(|r| r.0.clone()),
        original_build_id: retry_of.as_ref().map(|r| r.1.clone()),
        cancel_requested_at: None,
        cancel_requested_by: None,
        cancellation_reason: None,
        engine: None,
    };
    let row = BuildRow {
        id: id.clone(),
        namespace: caller.namespace.clone(),
        template_id,
        status: rec.status.clone(),
        source_type: rec.source_type.clone(),
        backend: p.backend.as_str().into(),
        created_at: now_ms(),
        record: serde_json::to_string(&rec).map_err(ApiError::internal)?,
        definition: serde_json::to_string(&def).map_err(ApiError::internal)?,
    };
    state.secrets.lock().expect("secrets lock").insert(
        id.clone(),
        RunSecrets {
            base_image_auth: req.base_image_auth.clone(),
            registry_auth: req.registry_auth.clone().unwrap_or_default(),
            build_secrets: req.build_secrets.clone().unwrap_or_default(),
        },
    );
    state
        .cancels
        .lock()
        .expect("cancel lock")
        .insert(id.clone(), Arc::new(AtomicBool::new(false)));
    state.store.insert_build(&row).await?;
    // The first entry of every build is its `start` (the SDK's streams
    // expect one); the worker's own start is a message.
    log(
        state,
        &rec,
        "start",
        "info",
        Some("preparing"),
        format!(
            "build {} queued: {} from {}",
            rec.build_id,
            rec.source_type,
            describe_source(&p.source)
        ),
    )
    .await;
    for w in &p.warnings {
        log(state, &rec, "warning", "warn", Some("preparing"), w.clone()).await;
    }
    state.wake.notify_one();
    Ok(rec)
}

fn describe_source(source: &Source) -> String {
    match source {
        Source::Image { reference } => reference.clone(),
        Source::Template { reference } => format!("template {reference}"),
        Source::Dockerfile { .. } => "a Dockerfile".into(),
    }
}

/// Marks builds this server was running when it stopped: they cannot be
/// resumed (credentials were in memory), so they fail with phase
/// `interrupted` and can be retried.
pub async fn recover(state: &Shared) -> ApiResult<()> {
    for status in ["building", "waiting"] {
        for id in state.store.builds_in_status(status).await? {
            let Some(row) = state.store.build(&id).await? else {
                continue;
            };
            let mut rec = parse_record(&row)?;
            let def: Definition = serde_json::from_str(&row.definition).unwrap_or_default();
            // A waiting build without request-time credentials can simply run.
            if status == "waiting"
                && def.base_image_auth_kind.is_none()
                && def.secret_ids.is_empty()
                && def.registry_auth_hosts.is_empty()
            {
                state
                    .cancels
                    .lock()
                    .expect("cancel lock")
                    .insert(id.clone(), Arc::new(AtomicBool::new(false)));
                continue;
            }
            let msg = if status == "building" {
                "the server stopped while this build was running"
            } else {
                "the server restarted before this build started, and its credentials were not persisted"
            };
            fail(
                state,
                &mut rec,
                "interrupted",
                msg,
                true,
                "retry the build (resupply credentials and secrets)",
            )
            .await;
        }
    }
    Ok(())
}

/// Terminal failure: an `error` entry, then the status.
pub async fn fail(
    state: &Shared,
    rec: &mut BuildRecord,
    phase: &str,
    message: &str,
    retryable: bool,
    action: &str,
) {
    fail_with(state, rec, "build_error", phase, message, retryable, action).await
}

/// Terminal failure with an explicit `error_detail.code` (the SDK picks the
/// exception class from it).
pub async fn fail_with(
    state: &Shared,
    rec: &mut BuildRecord,
    code: &str,
    phase: &str,
    message: &str,
    retryable: bool,
    action: &str,
) {
    let detail = FailureDetail {
        code: code.into(),
        message: message.to_string(),
        phase: phase.into(),
        retryable,
        suggested_action: action.into(),
        step_index: None,
        build_id: Some(rec.build_id.clone()),
        details: None,
    };
    fail_detail(state, rec, detail, None).await
}

/// Terminal failure with a whole `error_detail` (a failed step carries its
/// 1-based `step_index`, which the entry repeats with `total_steps`).
async fn fail_detail(
    state: &Shared,
    rec: &mut BuildRecord,
    detail: FailureDetail,
    total_steps: Option<i64>,
) {
    let message = detail.message.clone();
    let phase = detail.phase.clone();
    let mut e = entry(rec, "error", "error", &message);
    e.phase = Some(phase.clone());
    e.step_index = detail.step_index;
    e.total_steps = total_steps.filter(|_| detail.step_index.is_some());
    e.error_detail = Some(detail.clone());
    let _ = append(state, e).await;
    let now = now_ms();
    rec.status = "error".into();
    rec.error = Some(message.clone());
    rec.error_detail = Some(detail);
    rec.failure_phase = Some(phase);
    rec.finished_at = Some(iso(now));
    rec.duration_ms = started_ms(rec).map(|s| now - s);
    rec.artifact_availability = Availability {
        status: "failed".into(),
        reason: Some(message),
    };
    rec.promotability = Promotability {
        promotable: false,
        status: "unavailable".into(),
        reason: Some("build failed".into()),
    };
    let _ = save(state, rec, &["waiting", "building"]).await;
    state.hub.notify(&rec.build_id);
}

fn started_ms(rec: &BuildRecord) -> Option<i64> {
    rec.started_at
        .as_deref()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map(|d| d.timestamp_millis())
}

/// Cancels a build: waiting builds stop at once, running ones at their
/// next check; terminal builds are returned unchanged (idempotent).
pub async fn cancel(
    state: &Shared,
    caller: &Caller,
    id: &str,
    reason: Option<String>,
) -> ApiResult<BuildRecord> {
    let (_, mut rec) = load(state, caller, id).await?;
    if is_terminal(&rec.status) {
        return Ok(rec);
    }
    if let Some(flag) = state.cancels.lock().expect("cancel lock").get(id) {
        flag.store(true, Ordering::SeqCst);
    }
    rec.cancel_requested_at = Some(iso(now_ms()));
    rec.cancel_requested_by = Some(caller.key_id.clone());
    rec.cancellation_reason = reason.clone();
    // Take a waiting build the way a worker would (atomically), so no
    // worker starts it; then write the entry before the terminal status.
    let json = serde_json::to_string(&rec).map_err(ApiError::internal)?;
    if rec.status == "waiting" && state.store.claim(id, &json).await? {
        finish_cancelled(state, &mut rec, &["building"]).await;
    } else {
        let _ = save(state, &mut rec, &["building"]).await;
    }
    // Return the freshest record (the worker may have finished meanwhile).
    let (_, rec) = load(state, caller, id).await?;
    Ok(rec)
}

async fn finish_cancelled(state: &Shared, rec: &mut BuildRecord, only_if: &[&str]) {
    let msg = match &rec.cancellation_reason {
        Some(r) => format!("build cancelled: {r}"),
        None => "build cancelled".to_string(),
    };
    let mut e = entry(rec, "cancelled", "warn", msg);
    e.phase = Some("cleanup".into());
    let _ = append(state, e).await;
    let now = now_ms();
    rec.status = "cancelled".into();
    rec.finished_at = Some(iso(now));
    rec.duration_ms = started_ms(rec).map(|s| now - s);
    rec.artifact_availability = Availability {
        status: "unavailable".into(),
        reason: Some("build cancelled".into()),
    };
    rec.promotability = Promotability {
        promotable: false,
        status: "unavailable".into(),
        reason: Some("build cancelled".into()),
    };
    let _ = save(state, rec, only_if).await;
    state
        .secrets
        .lock()
        .expect("secrets lock")
        .remove(&rec.build_id);
    state.hub.notify(&rec.build_id);
}

/// Starts `n` workers that take waiting builds, oldest first. `0` only
/// queues (a server that accepts builds for others to run).
pub fn spawn_workers(state: Shared, n: usize) {
    for _ in 0..n {
        let state = state.clone();
        tokio::spawn(async move {
            loop {
                match next_build(&state).await {
                    Ok(Some(id)) => run(&state, &id).await,
                    Ok(None) => {
                        // Poll too: another server sharing the database may
                        // have queued work.
                        let _ = tokio::time::timeout(Duration::from_secs(1), state.wake.notified())
                            .await;
                    }
                    Err(e) => {
                        tracing::error!("worker: {}", e.message);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
    }
}

async fn next_build(state: &Shared) -> ApiResult<Option<String>> {
    for id in state.store.builds_in_status("waiting").await? {
        let Some(row) = state.store.build(&id).await? else {
            continue;
        };
        let mut rec = parse_record(&row)?;
        rec.status = "building".into();
        rec.started_at = Some(iso(now_ms()));
        rec.updated_at = iso(now_ms());
        let json = serde_json::to_string(&rec).map_err(ApiError::internal)?;
        if state.store.claim(&id, &json).await? {
            return Ok(Some(id));
        }
    }
    Ok(None)
}

async fn run(state: &Shared, id: &str) {
    let Ok(Some(row)) = state.store.build(id).await else {
        return;
    };
    let Ok(mut rec) = parse_record(&row) else {
        return;
    };
    let def: Definition = serde_json::from_str(&row.definition).unwrap_or_default();
    let secrets = state
        .secrets
        .lock()
        .expect("secrets lock")
        .remove(id)
        .unwrap_or_default();
    let cancel = state
        .cancels
        .lock()
        .expect("cancel lock")
        .entry(id.to_string())
        .or_insert_with(|| Arc::new(AtomicBool::new(false)))
        .clone();
    let mut start = entry(
        &rec,
        "message",
        "info",
        format!("build {} started", rec.build_id),
    );
    start.phase = Some("preparing".into());
    let _ = append(state, start).await;

    tracing::info!(build = %rec.build_id, source = %rec.source_type, "build started");
    let outcome = execute(state, &mut rec, &def, &secrets, &cancel).await;
    drop(secrets);
    match outcome {
        Ok((manifest, cache_key)) => {
            finish_ready(state, &mut rec, manifest).await;
            if let Some(key) = cache_key
                && rec.status == "ready"
                && let Err(e) = state
                    .store
                    .cache_put(&rec.namespace_slug, &key, &rec.build_id)
                    .await
            {
                tracing::warn!(build = %rec.build_id, "final-artifact cache store failed: {e}");
            }
        }
        Err(Failure::Cancelled) => {
            // The cancel request was recorded by another task: keep it.
            if let Ok(Some(row)) = state.store.build(id).await
                && let Ok(stored) = parse_record(&row)
            {
                rec.cancel_requested_at = stored.cancel_requested_at;
                rec.cancel_requested_by = stored.cancel_requested_by;
                rec.cancellation_reason = stored.cancellation_reason;
            }
            finish_cancelled(state, &mut rec, &["building"]).await
        }
        Err(Failure::Failed {
            phase,
            message,
            retryable,
            action,
            code,
            step,
        }) => {
            let detail = FailureDetail {
                code: code.into(),
                message,
                phase: phase.into(),
                retryable,
                suggested_action: action.into(),
                step_index: step.map(|s| s.0),
                build_id: Some(rec.build_id.clone()),
                details: None,
            };
            fail_detail(state, &mut rec, detail, step.map(|s| s.1)).await
        }
    }
    tracing::info!(build = %rec.build_id, status = %rec.status, phase = ?rec.failure_phase, "build finished");
    state.cancels.lock().expect("cancel lock").remove(id);
    state.hub.forget(id);
}

enum Failure {
    Cancelled,
    Failed {
        phase: &'static str,
        message: String,
        retryable: bool,
        action: &'static str,
        /// `build_error`, or `file_upload_error` for context failures.
        code: &'static str,
        /// A failed step: its 1-based index and the number of steps.
        step: Option<(i64, i64)>,
    },
}

fn failed(
    phase: &'static str,
    message: impl Into<String>,
    retryable: bool,
    action: &'static str,
) -> Failure {
    Failure::Failed {
        phase,
        message: message.into(),
        retryable,
        action,
        code: "build_error",
        step: None,
    }
}

async fn execute(
    state: &Shared,
    rec: &mut BuildRecord,
    def: &Definition,
    secrets: &RunSecrets,
    cancel: &Arc<AtomicBool>,
) -> Result<(ArtifactManifest, Option<String>), Failure> {
    let req = &def.request;
    let ns = rec.namespace_slug.clone();
    let p = validate::plan(req, &ns, &state.engines).map_err(|i| {
        failed(
            "preflight",
            i.iter()
                .map(|x| x.message.clone())
                .collect::<Vec<_>>()
                .join("; "),
            false,
            "fix the request",
        )
    })?;
    let mut cache_key = None;
    let base = match p.route {
        Route::NativeSteps => {
            // The native backend: the steps run inside the build VM.
            let Some(vmm) = state.vmm.clone() else {
                return Err(failed(
                    "prepare",
                    format!(
                        "{} declarative step(s) with the native backend need the build VM, and this server runs without --build-vm",
                        p.steps.len()
                    ),
                    false,
                    "send build_backend buildah (or buildkit) to run the steps through a Dockerfile engine, or use a server started with --build-vm",
                ));
            };
            let mut m = resolve_base(state, rec, &p, secrets, cancel).await?;
            // Steps start from the image's defaults; the native plan applies
            // the request's runtime workdir/user/envs after them (where the
            // SDK's own `workdir`/`user` steps put them too).
            if p.runtime.start_cmd.is_some() {
                m.start_cmd = p.runtime.start_cmd.clone();
            }
            if let Some(r) = &p.runtime.readiness {
                m.readiness = Some(r.to_json());
            }
            let m = snapshot_in_vm(state, rec, m, &p, cancel, vmm, true).await?;
            return Ok((m, None));
        }
        Route::Engine => {
            if matches!(p.source, Source::Template { .. }) {
                return Err(failed(
                    "prepare",
                    "declarative steps on a template base need the build VM, which this server does not have yet",
                    false,
                    "build the steps on an OCI base image",
                ));
            }
            let key = p.cache.final_artifact_inputs.clone();
            if p.cache.skip_cache {
                rec.cache_summary.final_artifact_bypasses = 1;
                cache_entry(
                    state,
                    rec,
                    "final_artifact",
                    "bypass",
                    Some("whole_build_skip_cache"),
                    &key,
                )
                .await;
            } else if let Some(m) = cached_artifact(state, &ns, &key).await {
                rec.cache_summary.final_artifact_hits = 1;
                cache_entry(state, rec, "final_artifact", "hit", None, &key).await;
                return Ok((with_request_overrides(m, &p), None));
            } else {
                rec.cache_summary.final_artifact_misses = 1;
                cache_entry(
                    state,
                    rec,
                    "final_artifact",
                    "miss",
                    Some("missing_or_incompatible"),
                    &key,
                )
                .await;
                cache_key = Some(key);
            }
            let layout = engine_build(state, rec, &p, secrets, cancel).await?;
            let source = SourceRef::OciDir {
                path: layout,
                reference: Some("latest".into()),
            };
            let imported = import_source(state, rec, source, None, &p, cancel).await;
            // The engine's work dir (context, output layout) is done with.
            let _ = std::fs::remove_dir_all(state.work_dir.join(&rec.build_id));
            imported?
        }
        Route::Import => resolve_base(state, rec, &p, secrets, cancel).await?,
    };
    if cancel.load(Ordering::SeqCst) {
        return Err(Failure::Cancelled);
    }
    if cache_key.is_some() {
        rec.cache_summary.final_artifact_stores = 1;
    }
    let m = with_request_overrides(base, &p);
    let m = match state.vmm.clone() {
        Some(vmm) => snapshot_in_vm(state, rec, m, &p, cancel, vmm, false).await?,
        None => m,
    };
    Ok((m, cache_key))
}

/// Boots the template in the build VM, runs its start command with the
/// runtime defaults, waits for readiness and snapshots memory and disk.
/// With `native`, the plan's steps run in the VM first.
async fn snapshot_in_vm(
    state: &Shared,
    rec: &mut BuildRecord,
    mut m: ArtifactManifest,
    p: &BuildPlan,
    cancel: &Arc<AtomicBool>,
    vmm: Arc<nullspace_vm::QemuVmm>,
    native: bool,
) -> Result<ArtifactManifest, Failure> {
    use nullspace_model::build::step::Step;
    use nullspace_vm::template::{
        NativeSteps, StepEvent, TemplateSpec, build_snapshot, build_snapshot_with_steps,
    };
    let rootfs = nullspace_digest::Digest::parse(&m.rootfs)
        .map(|d| state.artifacts.path(&d))
        .map_err(|e| failed("finalize", e.to_string(), false, "retry"))?;
    let mut config = nullspace_vm::GuestConfig::new(&rec.name);
    config.env = m.env.clone();
    config.user = m.user.clone();
    config.workdir = m.workdir.clone();
    config.start_cmd = m.start_cmd.clone();
    let mut spec = TemplateSpec::new(&rootfs, config);
    // Network only when the operator allows it and the build wants it.
    spec.network = state.config.build_vm_network && p.vm.internet_access;
    spec.readiness = m
        .readiness
        .as_ref()
        .map(Readiness::parse)
        .transpose()
        .map_err(|e| {
            failed(
                "preflight",
                format!("readiness: {e}"),
                false,
                "fix the readiness probe",
            )
        })?;
    spec.memory_mb = p.vm.memory_mib;
    spec.vcpus = p.vm.vcpus;
    spec.disk_mb = p.vm.disk_mb;
    let dir = state.config.data_dir.join("artifacts/snapshots");
    std::fs::create_dir_all(&dir).map_err(|e| failed("snapshot", e.to_string(), true, "retry"))?;
    let out = dir.join(&rec.build_id);
    log(
        state,
        rec,
        "message",
        "info",
        Some("vm_create"),
        format!(
            "booting the build VM ({} MiB, {} vCPU, {:?}, network {}); start command: {}",
            spec.memory_mb,
            spec.vcpus,
            vmm.accel,
            if spec.network { "on" } else { "off" },
            m.start_cmd.as_deref().unwrap_or("none")
        ),
    )
    .await;
    // Native steps: the context is materialized on the host and copied in
    // by the agent; each step logs its start, output and end with its
    // 1-based index among the plan's steps.
    let total = p.total_steps() as i64;
    let native = if native && !p.steps.is_empty() {
        let entries = context_entries(state, rec, p.context.as_ref()).await?;
        let ctx = state.work_dir.join(format!("{}-native", rec.build_id));
        let _ = std::fs::remove_dir_all(&ctx);
        std::fs::create_dir_all(&ctx)
            .map_err(|e| failed("prepare", e.to_string(), true, "retry"))?;
        nullspace_build::context::materialize(&ctx, &entries).map_err(|e| Failure::Failed {
            phase: "blob_upload",
            message: e.to_string(),
            retryable: false,
            action: "fix the build context",
            code: "file_upload_error",
            step: None,
        })?;
        // Every copy source must be in the uploaded context.
        for src in p
            .steps
            .iter()
            .flat_map(|s| s.copies())
            .flat_map(|c| &c.sources)
        {
            if !p.context.as_ref().is_some_and(|c| c.covers(src)) {
                return Err(failed(
                    "blob_upload",
                    format!(
                        "source {src:?} is not in the uploaded build context; upload it with the build"
                    ),
                    false,
                    "upload the build context",
                ));
            }
        }
        Some((p.clone(), ctx))
    } else {
        None
    };
    let task_out = out.clone();
    let handle = tokio::runtime::Handle::current();
    let st = state.clone();
    let log_rec = rec.clone();
    let native_task = native.clone();
    // The VM driver takes a CancellationToken; the worker still signals
    // with its flag. Wait for the VM call to return (it kills and reaps
    // QEMU and removes its directories on cancel) before this build ends.
    let token = nullspace_vm::CancellationToken::new();
    let bridge = {
        let (token, cancel) = (token.clone(), cancel.clone());
        tokio::spawn(async move {
            while !token.is_cancelled() {
                if cancel.load(Ordering::SeqCst) {
                    token.cancel();
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let vm_token = token.clone();
    let task = tokio::task::spawn_blocking(move || match &native_task {
        None => build_snapshot(&vmm, &spec, &task_out, &vm_token),
        Some((plan, ctx)) => {
            let mut on_step = |i: usize, step: &Step, ev: StepEvent<'_>| {
                let index = Some(i as i64 + 1);
                let msg = match ev {
                    StepEvent::Started => {
                        format!("step {}/{total}: {}", i + 1, step.describe())
                    }
                    StepEvent::Output(b) => String::from_utf8_lossy(b).trim_end().to_string(),
                    StepEvent::Finished { elapsed } => {
                        format!("step done in {} ms", elapsed.as_millis())
                    }
                };
                if msg.is_empty() {
                    return;
                }
                let mut e = entry(&log_rec, "message", "info", msg);
                e.phase = Some("step".into());
                e.step_index = index;
                e.total_steps = index.map(|_| total);
                let _ = handle.block_on(append(&st, e));
            };
            let steps = NativeSteps::of_plan(plan, ctx);
            build_snapshot_with_steps(&vmm, &spec, &steps, &mut on_step, &task_out, &vm_token)
        }
    });
    let result = task.await.map_err(|e| {
        failed(
            "prepare",
            format!("worker task failed: {e}"),
            true,
            "retry the build",
        )
    });
    bridge.abort();
    if let Some((_, ctx)) = &native {
        let _ = std::fs::remove_dir_all(ctx);
    }
    let snap = match result {
        Ok(Ok(snap)) => snap,
        Ok(Err(nullspace_vm::VmError::Cancelled)) => return Err(Failure::Cancelled),
        Ok(Err(e)) => {
            // Log phases follow the VM's own steps; error_detail.phase must
            // stay within the SDK's enum.
            let (log_phase, phase) = match e.code() {
                "step" => ("step", "build_step"),
                "vm_create" | "kernel" => ("vm_create", "prepare"),
                "invalid_rootfs" => ("vm_create", "preflight"),
                "readiness" | "readiness_timeout" => ("readiness", "readiness"),
                "snapshot" => ("snapshot", "snapshot"),
                _ => ("startup", "finalize"),
            };
            // A failed step is named by its 1-based place among the
            // request's steps.
            let (message, step) = match &e {
                nullspace_vm::VmError::StepFailed {
                    index,
                    action,
                    exit_code,
                    tail,
                } => {
                    let n = index.map(|i| i as i64 + 1);
                    let exit = exit_code
                        .map(|c| format!(" with exit code {c}"))
                        .unwrap_or_default();
                    let which = match n {
                        Some(n) => format!("step {n} of {total} ({action})"),
                        None => format!("the runtime {action} setting"),
                    };
                    (
                        format!("step: {which} failed{exit}: {tail}"),
                        n.map(|n| (n, total)),
                    )
                }
                _ => (format!("{}: {e}", e.code()), None),
            };
            // A `message` at error level: the SDK stops at the first `error`
            // entry, which must be the terminal one with its error_detail.
            let mut entry_ = entry(rec, "message", "error", message.clone());
            entry_.phase = Some(log_phase.into());
            entry_.step_index = step.map(|s| s.0);
            entry_.total_steps = step.map(|s| s.1);
            let _ = append(state, entry_).await;
            return Err(Failure::Failed {
                phase,
                message,
                retryable: e.code() == "vm_create",
                action: if step.is_some() {
                    "fix the failing step; its output is in the log"
                } else {
                    "check the start command and readiness probe; see the log"
                },
                code: "build_error",
                step,
            });
        }
        Err(f) => {
            let _ = std::fs::remove_dir_all(&out);
            return Err(f);
        }
    };
    let t = &snap.meta.timings_ms;
    log(
        state,
        rec,
        "message",
        "info",
        Some("snapshot"),
        format!(
            "snapshot taken: {} MiB memory, {} MiB disk (boot {} ms, ready {} ms)",
            snap.meta.memory_bytes >> 20,
            snap.meta.disk_bytes >> 20,
            t.boot,
            t.ready
        ),
    )
    .await;
    if native.is_some() {
        // Steps set the final runtime defaults (workdir, user, envs).
        let c = &snap.meta.config;
        m.env = c.env.clone();
        m.user = c.user.clone();
        m.workdir = c.workdir.clone();
    }
    m.snapshot = Some(format!("snapshots/{}", rec.build_id));
    Ok(m)
}

/// The base of a non-engine build: a registry image imported, or a
/// template's artifact.
async fn resolve_base(
    state: &Shared,
    rec: &mut BuildRecord,
    p: &BuildPlan,
    secrets: &RunSecrets,
    cancel: &Arc<AtomicBool>,
) -> Result<ArtifactManifest, Failure> {
    let ns = rec.namespace_slug.clone();
    Ok(match &p.source {
        Source::Template { reference } => {
            log(
                state,
                rec,
                "message",
                "info",
                Some("preparing"),
                format!("resolving template {reference}"),
            )
            .await;
            let r = crate::refs::TemplateRef::parse(reference)
                .map_err(|e| failed("prepare", e, false, "check the template reference"))?;
            templates::resolve_artifact(state, &ns, &r)
                .await
                .map_err(|e| failed("prepare", e.message, false, "check the template reference"))?
        }
        Source::Image { reference } => {
            log(
                state,
                rec,
                "message",
                "info",
                Some("preparing"),
                format!("resolving {reference}"),
            )
            .await;
            let source = SourceRef::parse(reference)
                .map_err(|e| failed("prepare", e.to_string(), false, "fix base_image"))?;
            if !matches!(source, SourceRef::Registry(_)) {
                return Err(failed(
                    "prepare",
                    format!("base_image {reference:?} must be a registry reference"),
                    false,
                    "use a registry reference",
                ));
            }
            let credentials = basic_credentials(secrets)?;
            import_source(state, rec, source, credentials, p, cancel).await?
        }
        Source::Dockerfile { .. } => {
            return Err(failed(
                "preflight",
                "a Dockerfile has no base to resolve",
                false,
                "send base_image",
            ));
        }
    })
}

/// The request's runtime settings (the plan's) override the image's (and
/// the steps').
fn with_request_overrides(mut m: ArtifactManifest, p: &BuildPlan) -> ArtifactManifest {
    let r = &p.runtime;
    m.env.extend(r.env.0.clone());
    if r.user.is_some() {
        m.user = r.user.clone();
    }
    if r.workdir.is_some() {
        m.workdir = r.workdir.clone();
    }
    if let Some(rd) = &r.readiness {
        m.readiness = Some(rd.to_json());
    }
    if r.start_cmd.is_some() {
        m.start_cmd = r.start_cmd.clone();
    }
    m
}

async fn cached_artifact(state: &Shared, ns: &str, key: &str) -> Option<ArtifactManifest> {
    let build_id = state.store.cache_get(ns, key).await.ok()??;
    let row = state.store.build(&build_id).await.ok()??;
    let rec = parse_record(&row).ok()?;
    if rec.status != "ready" {
        return None;
    }
    let digest = nullspace_digest::Digest::parse(rec.artifact_ids.first()?).ok()?;
    let bytes = std::fs::read(state.artifacts.path(&digest)).ok()?;
    let m: ArtifactManifest = serde_json::from_slice(&bytes).ok()?;
    let rootfs = nullspace_digest::Digest::parse(&m.rootfs).ok()?;
    state.artifacts.contains(&rootfs).then_some(m)
}

async fn cache_entry(
    state: &Shared,
    rec: &BuildRecord,
    kind: &str,
    status: &str,
    reason: Option<&str>,
    subject: &str,
) {
    let mut e = entry(rec, "cache", "info", format!("{kind} cache {status}"));
    e.phase = Some("cache".into());
    e.cache_kind = Some(kind.into());
    e.cache_status = Some(status.into());
    e.cache_reason = reason.map(str::to_string);
    e.cache_subject = Some(subject.to_string());
    let _ = append(state, e).await;
}

fn basic_credentials(
    secrets: &RunSecrets,
) -> Result<Option<nullspace_oci::auth::Credentials>, Failure> {
    let Some(a) = &secrets.base_image_auth else {
        return Ok(None);
    };
    let field = |k: &str| {
        a.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    match a.get("kind").and_then(Value::as_str) {
        Some("basic") => Ok(Some(nullspace_oci::auth::Credentials {
            username: field("username"),
            password: field("password"),
        })),
        other => Err(failed(
            "auth",
            format!(
                "base_image_auth kind {} is not supported by this server (basic is)",
                other.unwrap_or("unknown")
            ),
            false,
            "use basic credentials",
        )),
    }
}

/// Runs blocking work; a cancel stops waiting for it at once (the work's
/// late result is discarded).
async fn blocking<T: Send + 'static>(
    cancel: &Arc<AtomicBool>,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Failure> {
    let mut task = tokio::task::spawn_blocking(f);
    loop {
        tokio::select! {
            r = &mut task => return r.map_err(|e| failed("prepare", format!("worker task failed: {e}"), true, "retry the build")),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                if cancel.load(Ordering::SeqCst) {
                    return Err(Failure::Cancelled);
                }
            }
        }
    }
}

/// The build context of a request as entries to materialize: uploaded
/// blobs (verified by sha256 at upload) of the caller's namespace.
async fn context_entries(
    state: &Shared,
    rec: &BuildRecord,
    context: Option<&ContextManifest>,
) -> Result<Vec<nullspace_build::context::ContextEntry>, Failure> {
    use nullspace_build::context::{ContextEntry, EntrySource};
    let mut entries = Vec::new();
    for e in context.iter().flat_map(|c| &c.entries) {
        let source = match &e.content {
            None => None,
            Some(Content::Blob { blob_id, sha256 }) => {
                let uploaded = state
                    .store
                    .blob_meta(&rec.namespace_slug, blob_id)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|m| m.2);
                let digest = sha256
                    .as_ref()
                    .and_then(|h| nullspace_digest::Digest::parse(&format!("sha256:{h}")).ok())
                    .filter(|_| uploaded)
                    .ok_or_else(|| Failure::Failed {
                        phase: "blob_upload",
                        message: format!(
                            "build_context {:?}: blob {blob_id} was not uploaded",
                            e.path
                        ),
                        retryable: false,
                        action: "upload the context again (preflight, then PUT)",
                        code: "file_upload_error",
                        step: None,
                    })?;
                Some(EntrySource::File(state.artifacts.path(&digest)))
            }
            Some(Content::Inline { .. }) => {
                // Inline bytes are not persisted: a build created with them
                // and run later (after a restart) cannot have them.
                return Err(Failure::Failed {
                    phase: "blob_upload",
                    message: format!(
                        "build_context {:?}: inline content is not kept for builds; upload it as a blob",
                        e.path
                    ),
                    retryable: false,
                    action: "upload the context with the blob preflight",
                    code: "file_upload_error",
                    step: None,
                });
            }
        };
        entries.push(ContextEntry {
            path: e.path.clone(),
            entry_type: e.entry_type,
            mode: e.mode.bits(),
            source,
        });
    }
    Ok(entries)
}

/// Why an engine build failed, as it crosses from the blocking task.
#[derive(Debug, thiserror::Error)]
enum EngineFailure {
    /// The uploaded context could not be laid out (the caller's input).
    #[error(transparent)]
    Context(#[from] nullspace_build::context::ContextError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Engine(#[from] nullspace_build::engine::EngineError),
}

/// Builds the Dockerfile (given, or rendered from the plan's steps) with
/// the plan's engine; returns the OCI layout it produced.
async fn engine_build(
    state: &Shared,
    rec: &mut BuildRecord,
    p: &BuildPlan,
    secrets: &RunSecrets,
    cancel: &Arc<AtomicBool>,
) -> Result<std::path::PathBuf, Failure> {
    use nullspace_build::context::materialize;
    use nullspace_build::engine::{EngineBuild, RegistryCredential};
    let engine = state
        .engine_list
        .iter()
        .find(|e| e.name() == p.backend.as_str())
        .cloned()
        .ok_or_else(|| {
            failed(
                "preflight",
                format!("engine {} is not available on this server", p.backend),
                false,
                "choose an available build_backend",
            )
        })?;
    rec.engine = Some(format!("{} {}", engine.name(), engine.version()));
    let (dockerfile, bust, build_args, target) = match &p.source {
        Source::Dockerfile {
            text,
            build_args,
            target,
            ..
        } => (text.clone(), None, build_args.clone(), target.clone()),
        Source::Image { .. } | Source::Template { .. } => {
            let r = nullspace_build::render::render_plan(p)
                .map_err(|e| failed("preflight", e.to_string(), false, "fix the steps"))?;
            (r.dockerfile, r.cache_bust_arg, Default::default(), None)
        }
    };
    let entries = context_entries(state, rec, p.context.as_ref()).await?;
    let df_name = if entries.iter().any(|e| e.path == "Dockerfile") {
        ".nullspace.Dockerfile"
    } else {
        "Dockerfile"
    };
    let mut creds: Vec<RegistryCredential> = secrets
        .registry_auth
        .iter()
        .filter_map(|a| match RegistryAuth::parse(a).ok()? {
            RegistryAuth {
                registry,
                auth: Credentials::Basic { username, password },
            } => Some(RegistryCredential {
                registry,
                username,
                password,
            }),
            _ => None,
        })
        .collect();
    if let Some(c) = basic_credentials(secrets)? {
        let host = match &p.source {
            Source::Dockerfile { .. } => {
                nullspace_build::dockerfile::analyze(&dockerfile, &build_args)
                    .map_err(|e| failed("preflight", e.to_string(), false, "fix the Dockerfile"))?
                    .base_image_auth_host(&|r: &str| crate::refs::names_template(r, None).is_some())
                    .map_err(|e| {
                        failed(
                            "preflight",
                            format!("base_image_auth: {e}"),
                            false,
                            "use registry_auth per registry instead",
                        )
                    })?
            }
            other => {
                nullspace_build::dockerfile::registry_host(other.base_ref().unwrap_or_default())
            }
        };
        creds.push(RegistryCredential {
            registry: host,
            username: c.username,
            password: c.password,
        });
    }
    let mut args = build_args;
    if let Some(b) = bust {
        args.insert(b, rec.build_id.clone());
    }
    let build_secrets: Vec<(String, String)> = secrets
        .build_secrets
        .iter()
        .map(|s| (s.id.clone(), s.value.clone().unwrap_or_default()))
        .collect();
    let network = p.vm.internet_access;
    let work = state.work_dir.join(&rec.build_id);
    let ctx = work.join("context");
    let out = work.join("engine-out");
    let handle = tokio::runtime::Handle::current();
    let st = state.clone();
    let log_rec = rec.clone();
    let flag = cancel.clone();
    log(
        state,
        rec,
        "message",
        "info",
        Some("step"),
        format!(
            "building with {} ({} context entries)",
            rec.engine.as_deref().unwrap_or_default(),
            entries.len()
        ),
    )
    .await;
    let result = blocking(
        cancel,
        move || -> Result<std::path::PathBuf, EngineFailure> {
            let _ = std::fs::remove_dir_all(&work);
            std::fs::create_dir_all(&ctx)?;
            materialize(&ctx, &entries)?;
            std::fs::write(ctx.join(df_name), &dockerfile)?;
            let forward = |line: &str| {
                let mut e = entry(&log_rec, "message", "info", line.to_string());
                e.phase = Some("step".into());
                let _ = handle.block_on(append(&st, e));
            };
            let mut b = EngineBuild::new(&ctx, &out, &forward);
            b.dockerfile = df_name;
            b.build_args = args;
            b.target = target;
            b.secrets = build_secrets;
            b.network = network;
            b.registry_auth = creds;
            b.cancel = Some(flag);
            let output = engine.build(&b)?;
            Ok(output.layout_dir)
        },
    )
    .await?;
    match result {
        Ok(layout) => Ok(layout),
        Err(_) if cancel.load(Ordering::SeqCst) => Err(Failure::Cancelled),
        Err(EngineFailure::Context(e)) => Err(Failure::Failed {
            phase: "blob_upload",
            message: e.to_string(),
            retryable: false,
            action: "fix the build context",
            code: "file_upload_error",
            step: None,
        }),
        Err(e) => Err(failed(
            "build_step",
            e.to_string(),
            false,
            "fix the Dockerfile or steps; see the log",
        )),
    }
}

async fn import_source(
    state: &Shared,
    rec: &mut BuildRecord,
    source: SourceRef,
    credentials: Option<nullspace_oci::auth::Credentials>,
    p: &BuildPlan,
    cancel: &Arc<AtomicBool>,
) -> Result<ArtifactManifest, Failure> {
    let opts = ResolveOptions {
        platform: None,
        credentials,
        insecure_registries: state.config.insecure_registries.clone(),
    };
    let work = state.work_dir.join(format!("{}-import", rec.build_id));
    // Only registry layers are worth caching: an engine's output layout is
    // unique to its build (the engine keeps its own layer cache), and caching
    // it would keep another copy of whatever the build wrote.
    let cache_dir = if p.cache.skip_cache || !matches!(source, SourceRef::Registry(_)) {
        None
    } else {
        Some(state.cache_dir.clone())
    };
    let import_opts = ImportOptions {
        disk_mb: p.vm.disk_mb,
        cache_dir,
        cache_max_bytes: state.config.cache_max_bytes,
        cancel: Some(cancel.clone()),
        ..Default::default()
    };
    let out = work.join("template");
    let flag = cancel.clone();
    let mut task = tokio::task::spawn_blocking({
        let work = work.clone();
        let out = out.clone();
        move || -> Result<(Image, nullspace_build::template::TemplateMeta), String> {
            let _ = std::fs::remove_dir_all(&work);
            std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
            let result = Image::resolve(&source, &opts)
                .map_err(|e| format!("auth-or-resolve:{e}"))
                .and_then(|image| {
                    let meta =
                        import(&image, &out, &import_opts, &NoProgress).map_err(|e| match e {
                            ImportError::Cancelled { .. } => "cancelled".to_string(),
                            other => other.to_string(),
                        })?;
                    Ok((image, meta))
                });
            // A cancelled build's late result is discarded: clean up here,
            // since the build has already been finished by the worker.
            if flag.load(Ordering::SeqCst) {
                let _ = std::fs::remove_dir_all(&work);
                return Err("cancelled".into());
            }
            result
        }
    });
    // A network call may block the import thread for minutes; cancellation
    // must not wait for it.
    let result = loop {
        tokio::select! {
            r = &mut task => break r,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                if cancel.load(Ordering::SeqCst) {
                    return Err(Failure::Cancelled);
                }
            }
        }
    }
    .map_err(|e| {
        failed(
            "prepare",
            format!("import worker failed: {e}"),
            true,
            "retry the build",
        )
    })?;
    let (image, meta) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            if e == "cancelled" || cancel.load(Ordering::SeqCst) {
                return Err(Failure::Cancelled);
            }
            if let Some(msg) = e.strip_prefix("auth-or-resolve:") {
                let auth = msg.contains("authentication failed");
                return Err(failed(
                    if auth { "auth" } else { "prepare" },
                    msg.to_string(),
                    !auth,
                    if auth {
                        "check base_image_auth"
                    } else {
                        "check base_image and retry"
                    },
                ));
            }
            return Err(failed("prepare", e, false, "check the image"));
        }
    };
    for l in &meta.image.layers {
        let hit = meta.cache.reused.contains(&l.digest);
        let mut e = entry(
            rec,
            "cache",
            "debug",
            format!(
                "layer {} {}",
                l.digest,
                if hit { "reused" } else { "fetched" }
            ),
        );
        e.phase = Some("cache".into());
        e.cache_kind = Some("layer".into());
        e.cache_subject = Some(l.digest.to_string());
        e.cache_status = Some(
            if p.cache.skip_cache {
                "bypass"
            } else if hit {
                "hit"
            } else {
                "miss"
            }
            .into(),
        );
        if p.cache.skip_cache {
            e.cache_reason = Some("whole_build_skip_cache".into());
        }
        let _ = append(state, e).await;
    }
    let cs = &mut rec.cache_summary;
    if p.cache.skip_cache {
        cs.layer_bypasses = meta.image.layers.len() as i64;
    } else {
        cs.layer_hits = meta.cache.layers_reused as i64;
        cs.layer_misses = meta.cache.layers_fetched as i64;
        cs.layer_stores = meta.cache.layers_fetched as i64;
    }
    log(
        state,
        rec,
        "message",
        "info",
        Some("finalize"),
        format!(
            "rootfs: {} MiB, {} files, {} dirs ({} of {} layers from cache)",
            meta.rootfs.size_bytes >> 20,
            meta.rootfs.files,
            meta.rootfs.dirs,
            meta.cache.layers_reused,
            meta.image.layers.len()
        ),
    )
    .await;
    let artifacts = state.artifacts.clone();
    let rootfs = out.join("rootfs.ext4");
    let (digest, size) = tokio::task::spawn_blocking(move || artifacts.adopt(&rootfs))
        .await
        .map_err(|e| failed("finalize", e.to_string(), true, "retry"))?
        .map_err(|e| {
            failed(
                "finalize",
                format!("storing the rootfs: {e}"),
                true,
                "retry",
            )
        })?;
    let _ = std::fs::remove_dir_all(&work);
    let rt = image.runtime_defaults();
    let oci = image.oci_metadata();
    // A mapped HEALTHCHECK is a command probe with the default schedule.
    let readiness = rt
        .ready_cmd
        .as_ref()
        .map(|c| Readiness::command(c).to_json());
    Ok(ArtifactManifest {
        rootfs: digest.to_string(),
        rootfs_size: size,
        env: rt.env.clone(),
        user: rt.user.clone(),
        workdir: rt.workdir.clone(),
        start_cmd: rt.start_cmd.clone(),
        readiness: readiness.clone(),
        image: serde_json::to_value(&meta.image).unwrap_or_default(),
        snapshot: None,
        oci: OciMetadataOut {
            labels: oci.labels.clone(),
            exposed_ports: oci.exposed_ports.clone(),
            volumes: oci.volumes.clone(),
            healthcheck: oci.healthcheck.as_ref().map(|h| HealthcheckOut {
                test: h.test.clone(),
                interval_ns: h.interval_ns,
                timeout_ns: h.timeout_ns,
                start_period_ns: h.start_period_ns,
                retries: h.retries,
                mapped_readiness: if h.mapped_readiness.is_some() {
                    readiness.clone()
                } else {
                    None
                },
            }),
        },
    })
}

async fn finish_ready(state: &Shared, rec: &mut BuildRecord, m: ArtifactManifest) {
    let bytes = serde_json::to_vec(&m).unwrap_or_default();
    let stored = state.artifacts.put(&bytes[..]);
    let (manifest_digest, _) = match stored {
        Ok(v) => v,
        Err(e) => {
            return fail(
                state,
                rec,
                "finalize",
                &format!("storing the artifact manifest: {e}"),
                true,
                "retry",
            )
            .await;
        }
    };
    rec.artifact_ids = vec![manifest_digest.to_string()];
    rec.runtime_defaults = RuntimeDefaultsOut {
        default_env_keys: m.env.keys().cloned().collect(),
        start_cmd: m.start_cmd.clone(),
        default_user: m.user.clone(),
        default_workdir: m.workdir.clone(),
        readiness: m.readiness.clone(),
    };
    rec.oci_metadata = m.oci.clone();
    rec.artifact_availability = Availability {
        status: "available".into(),
        reason: None,
    };
    rec.promotability = Promotability {
        promotable: true,
        status: "promotable".into(),
        reason: None,
    };
    // Tags move to this build only once it is ready.
    for tag in &rec.tags {
        if let Err(e) = state
            .store
            .set_tag(&rec.template_id, tag, &rec.build_id)
            .await
        {
            return fail(
                state,
                rec,
                "finalize",
                &format!("assigning tag {tag}: {e}"),
                true,
                "retry",
            )
            .await;
        }
    }
    let info = templates::info_by_id(state, &rec.template_id).await.ok();
    let mut end = entry(
        rec,
        "end",
        "info",
        format!("template {} ready", rec.canonical_ref),
    );
    end.phase = Some("finalize".into());
    end.result = info.map(|i| serde_json::to_value(i).unwrap_or_default());
    end.result_metadata =
        Some(json!({"runtime_defaults": rec.runtime_defaults, "oci_metadata": rec.oci_metadata}));
    let _ = append(state, end).await;
    let now = now_ms();
    rec.status = "ready".into();
    rec.finished_at = Some(iso(now));
    rec.duration_ms = started_ms(rec).map(|s| now - s);
    let _ = save(state, rec, &["building"]).await;
    state.hub.notify(&rec.build_id);
}
