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
use crate::validate::{self, Base, Normalized};

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

fn sha256_json(v: &impl Serialize) -> String {
    use sha2::Digest as _;
    format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(
            serde_json::to_vec(v).unwrap_or_default()
        ))
    )
}

/// Validates, persists (sanitized) and queues a build.
pub async fn create(
    state: &Shared,
    caller: &Caller,
    req: BuildRequest,
    retry_of: Option<(String, String)>,
) -> ApiResult<BuildRecord> {
    let n: Normalized =
        validate::normalize(&req, &caller.namespace, &state.engines).map_err(|issues| {
            let msg = issues
                .iter()
                .map(|i| i.message.clone())
                .collect::<Vec<_>>()
                .join("; ");
            let code = if issues.iter().any(|i| i.code == "file_upload_error") {
                "file_upload_error"
            } else {
                "invalid_request"
            };
            ApiError::new(axum::http::StatusCode::BAD_REQUEST, code, msg)
        })?;
    templates::check_claim(state, caller, &n.name, req.claim_token.as_deref()).await?;
    let template_id = templates::ensure(state, caller, &n.name).await?;
    let info = templates::info_by_id(state, &template_id).await?;
    let now = iso(now_ms());
    let id = nullspace_store::new_id("tb_");
    let def = sanitize(&req);
    let rc = req.runtime_config.clone().unwrap_or_default();
    let rec = BuildRecord {
        build_id: id.clone(),
        template_id: template_id.clone(),
        name: n.name.clone(),
        tags: n.tags.clone(),
        status: "waiting".into(),
        created_at: now.clone(),
        updated_at: now.clone(),
        // The ref this build's tags will make resolvable (`default` first,
        // as TemplateInfo picks its default tag).
        canonical_ref: format!(
            "{}/{}:{}",
            caller.namespace,
            n.name,
            if n.tags.iter().any(|t| t == "default") {
                "default"
            } else {
                n.tags[0].as_str()
            }
        ),
        namespace_slug: caller.namespace.clone(),
        visibility: info.visibility.clone(),
        // The published SDK parses this as native|buildkit only: any
        // Dockerfile engine reports as `buildkit`; `engine` says which ran.
        build_backend: if n.backend == "native" {
            "native".into()
        } else {
            "buildkit".into()
        },
        source_type: n.source_type.into(),
        source_digest: Some(sha256_json(&def.request)),
        context_digest: req.build_context.as_ref().map(|c| {
            let mut files: Vec<(String, String, Option<String>)> = c
                .files
                .iter()
                .map(|f| (f.path.clone(), f.entry_type.clone(), f.blob_id.clone()))
                .collect();
            files.sort();
            sha256_json(&files)
        }),
        dockerfile_digest: req.dockerfile.as_ref().map(sha256_json),
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
            default_env_keys: rc
                .default_envs
                .iter()
                .flat_map(|m| m.keys().cloned())
                .collect(),
            start_cmd: req.start_cmd.clone(),
            default_user: rc.default_user.clone(),
            default_workdir: rc.default_workdir.clone(),
            readiness: rc.readiness.clone(),
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
        backend: n.backend.clone(),
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
            describe_base(&n.base, &req)
        ),
    )
    .await;
    for w in &n.warnings {
        log(state, &rec, "warning", "warn", Some("preparing"), w.clone()).await;
    }
    state.wake.notify_one();
    Ok(rec)
}

fn describe_base(base: &Base, req: &BuildRequest) -> String {
    match base {
        Base::Image(i) => i.clone(),
        Base::Template(_) => format!("template {}", req.base_image.as_deref().unwrap_or_default()),
        Base::Dockerfile => "a Dockerfile".into(),
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
    let mut e = entry(rec, "error", "error", message);
    e.phase = Some(phase.into());
    e.error_detail = Some(detail.clone());
    let _ = append(state, e).await;
    let now = now_ms();
    rec.status = "error".into();
    rec.error = Some(message.to_string());
    rec.error_detail = Some(detail);
    rec.failure_phase = Some(phase.into());
    rec.finished_at = Some(iso(now));
    rec.duration_ms = started_ms(rec).map(|s| now - s);
    rec.artifact_availability = Availability {
        status: "failed".into(),
        reason: Some(message.to_string()),
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
        }) => fail_with(state, &mut rec, code, phase, &message, retryable, action).await,
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
    let n = validate::normalize(req, &ns, &state.engines).map_err(|i| {
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
    let engine_path = matches!(n.base, Base::Dockerfile) || !n.steps.is_empty();
    let mut cache_key = None;
    if engine_path && n.backend == "native" && !matches!(n.base, Base::Dockerfile) {
        // The native backend: the steps run inside the build VM.
        let Some(vmm) = state.vmm.clone() else {
            return Err(failed(
                "prepare",
                format!(
                    "{} declarative step(s) with the native backend need the build VM, and this server runs without --build-vm",
                    n.steps.len()
                ),
                false,
                "send build_backend buildah (or buildkit) to run the steps through a Dockerfile engine, or use a server started with --build-vm",
            ));
        };
        let mut m = resolve_base(state, rec, &n, req, secrets, cancel).await?;
        // Steps start from the image's defaults; the native plan applies the
        // request's runtime workdir/user/envs after them (where the SDK's
        // own `workdir`/`user` steps put them too).
        if req.start_cmd.is_some() {
            m.start_cmd = req.start_cmd.clone();
        }
        if let Some(r) = req
            .runtime_config
            .as_ref()
            .and_then(|r| r.readiness.clone())
        {
            m.readiness = Some(r);
        }
        let m = snapshot_in_vm(state, rec, m, req, cancel, vmm, &n.steps).await?;
        return Ok((m, None));
    }
    let base = if engine_path {
        if matches!(n.base, Base::Template(_)) {
            return Err(failed(
                "prepare",
                "declarative steps on a template base need the build VM, which this server does not have yet",
                false,
                "build the steps on an OCI base image",
            ));
        }
        let key = final_cache_key(def, &n);
        if req.skip_cache == Some(true) {
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
            return Ok((with_request_overrides(m, req), None));
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
        let layout = engine_build(state, rec, def, secrets, cancel, &n).await?;
        let source = SourceRef::OciDir {
            path: layout,
            reference: Some("latest".into()),
        };
        let imported = import_source(state, rec, source, None, req, cancel).await;
        // The engine's work dir (context, output layout) is done with.
        let _ = std::fs::remove_dir_all(state.work_dir.join(&rec.build_id));
        imported?
    } else {
        resolve_base(state, rec, &n, req, secrets, cancel).await?
    };
    if cancel.load(Ordering::SeqCst) {
        return Err(Failure::Cancelled);
    }
    if cache_key.is_some() {
        rec.cache_summary.final_artifact_stores = 1;
    }
    let m = with_request_overrides(base, req);
    let m = match state.vmm.clone() {
        Some(vmm) => snapshot_in_vm(state, rec, m, req, cancel, vmm, &[]).await?,
        None => m,
    };
    Ok((m, cache_key))
}

/// Boots the template in the build VM, runs its start command with the
/// runtime defaults, waits for readiness and snapshots memory and disk.
async fn snapshot_in_vm(
    state: &Shared,
    rec: &mut BuildRecord,
    mut m: ArtifactManifest,
    req: &BuildRequest,
    cancel: &Arc<AtomicBool>,
    vmm: Arc<nullspace_vm::QemuVmm>,
    steps: &[Value],
) -> Result<ArtifactManifest, Failure> {
    use nullspace_vm::template::{
        StepEvent, TemplateSpec, build_snapshot, build_snapshot_with_steps,
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
    spec.network = state.config.build_vm_network
        && req.build_config.as_ref().and_then(|c| c.internet_access) != Some(false);
    spec.readiness = m
        .readiness
        .as_ref()
        .map(nullspace_vm::Readiness::from_json)
        .transpose()
        .map_err(|e| {
            failed(
                "preflight",
                format!("readiness: {e}"),
                false,
                "fix the readiness probe",
            )
        })?;
    if let Some(c) = &req.build_config {
        if let Some(mem) = c.memory_mib {
            spec.memory_mb = mem as u32;
        }
        if let Some(v) = c.vcpus {
            spec.vcpus = v as u32;
        }
        spec.disk_mb = c.disk_mb.map(|d| d as u64);
    }
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
    // by the agent; each step logs its start, output and end.
    let native = if steps.is_empty() {
        None
    } else {
        let entries = context_entries(state, rec, req).await?;
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
        })?;
        let plan = crate::native::plan(
            req.build_envs.as_ref(),
            steps,
            req.runtime_config.as_ref(),
            &ctx,
        )
        .map_err(|e| failed("preflight", e, false, "fix the steps"))?;
        Some((plan, ctx))
    };
    let task_out = out.clone();
    let handle = tokio::runtime::Handle::current();
    let st = state.clone();
    let log_rec = rec.clone();
    let total = steps.len() as i64;
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
        Some((plan, _)) => {
            let mut on_step = |i: usize, step: &nullspace_vm::template::Step, ev: StepEvent<'_>| {
                let index = plan.request_index(i).map(|x| x as i64 + 1);
                let (kind, msg) = match ev {
                    StepEvent::Started => (
                        "message",
                        format!(
                            "step {}: {step:?}",
                            index.map(|x| x.to_string()).unwrap_or_else(|| "-".into())
                        ),
                    ),
                    StepEvent::Output(b) => {
                        ("message", String::from_utf8_lossy(b).trim_end().to_string())
                    }
                    StepEvent::Finished { elapsed } => (
                        "message",
                        format!("step done in {} ms", elapsed.as_millis()),
                    ),
                };
                if msg.is_empty() {
                    return;
                }
                let mut e = entry(&log_rec, kind, "info", msg);
                e.phase = Some("step".into());
                e.step_index = index;
                e.total_steps = Some(total);
                let _ = handle.block_on(append(&st, e));
            };
            build_snapshot_with_steps(&vmm, &spec, &plan.steps, &mut on_step, &task_out, &vm_token)
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
            // A `message` at error level: the SDK stops at the first `error`
            // entry, which must be the terminal one with its error_detail.
            log(
                state,
                rec,
                "message",
                "error",
                Some(log_phase),
                format!("{}: {e}", e.code()),
            )
            .await;
            return Err(failed(
                phase,
                format!("{}: {e}", e.code()),
                e.code() == "vm_create",
                "check the start command and readiness probe; see the log",
            ));
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
    if !steps.is_empty() {
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
    n: &Normalized,
    req: &BuildRequest,
    secrets: &RunSecrets,
    cancel: &Arc<AtomicBool>,
) -> Result<ArtifactManifest, Failure> {
    let ns = rec.namespace_slug.clone();
    Ok(match &n.base {
        Base::Template(r) => {
            log(
                state,
                rec,
                "message",
                "info",
                Some("preparing"),
                format!(
                    "resolving template {}",
                    req.base_image.as_deref().unwrap_or_default()
                ),
            )
            .await;
            templates::resolve_artifact(state, &ns, r)
                .await
                .map_err(|e| failed("prepare", e.message, false, "check the template reference"))?
        }
        Base::Image(image_ref) => {
            log(
                state,
                rec,
                "message",
                "info",
                Some("preparing"),
                format!("resolving {image_ref}"),
            )
            .await;
            let source = SourceRef::parse(image_ref)
                .map_err(|e| failed("prepare", e.to_string(), false, "fix base_image"))?;
            // The one local source: the server's own base image layout.
            if !matches!(source, SourceRef::Registry(_))
                && image_ref != &crate::base::source_ref(state)
            {
                return Err(failed(
                    "prepare",
                    format!("base_image {image_ref:?} must be a registry reference"),
                    false,
                    "use a registry reference",
                ));
            }
            let credentials = basic_credentials(secrets)?;
            import_source(state, rec, source, credentials, req, cancel).await?
        }
        Base::Dockerfile => unreachable!("engine path"),
    })
}

/// Request runtime settings override the image's (and the steps').
fn with_request_overrides(mut m: ArtifactManifest, req: &BuildRequest) -> ArtifactManifest {
    if let Some(rc) = &req.runtime_config {
        if let Some(envs) = &rc.default_envs {
            m.env.extend(envs.clone());
        }
        if rc.default_user.is_some() {
            m.user = rc.default_user.clone();
        }
        if rc.default_workdir.is_some() {
            m.workdir = rc.default_workdir.clone();
        }
        if rc.readiness.is_some() {
            m.readiness = rc.readiness.clone();
        }
    }
    if req.start_cmd.is_some() {
        m.start_cmd = req.start_cmd.clone();
    }
    m
}

/// The final-artifact cache key: every input that decides an engine build's
/// result (source, steps, Dockerfile, context blobs, args, target, backend,
/// envs, runtime settings, disk size), never names, tags or credentials.
fn final_cache_key(def: &Definition, n: &Normalized) -> String {
    let mut r = def.request.clone();
    r.name = None;
    r.alias = None;
    r.tags = None;
    r.skip_cache = None;
    r.claim_token = None;
    if let Some(c) = r.build_config.as_mut() {
        // Build VM size does not change what an engine produces.
        c.vcpus = None;
        c.memory_mib = None;
    }
    sha256_json(&json!({"v": 1, "backend": n.backend, "request": r, "secret_ids": def.secret_ids}))
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
    req: &BuildRequest,
) -> Result<Vec<nullspace_build::context::ContextEntry>, Failure> {
    use nullspace_build::context::{ContextEntry, EntrySource, EntryType};
    let mut entries = Vec::new();
    for f in req.build_context.iter().flat_map(|c| &c.files) {
        let is_dir = f.entry_type == "dir";
        let mode = f
            .mode
            .as_deref()
            .and_then(|m| u32::from_str_radix(m, 8).ok())
            .unwrap_or(if is_dir { 0o755 } else { 0o644 });
        let source = if is_dir {
            None
        } else if let Some(blob) = &f.blob_id {
            let uploaded = state
                .store
                .blob_meta(&rec.namespace_slug, blob)
                .await
                .ok()
                .flatten()
                .is_some_and(|m| m.2);
            let digest = blob
                .strip_prefix("blob_")
                .and_then(|h| nullspace_digest::Digest::parse(&format!("sha256:{h}")).ok())
                .filter(|_| uploaded)
                .ok_or_else(|| Failure::Failed {
                    phase: "blob_upload",
                    message: format!("build_context {:?}: blob {blob} was not uploaded", f.path),
                    retryable: false,
                    action: "upload the context again (preflight, then PUT)",
                    code: "file_upload_error",
                })?;
            Some(EntrySource::File(state.artifacts.path(&digest)))
        } else {
            // Inline bytes are not persisted: a build created with them and
            // run later (after a restart) cannot have them.
            return Err(Failure::Failed {
                phase: "blob_upload",
                message: format!(
                    "build_context {:?}: inline content is not kept for builds; upload it as a blob",
                    f.path
                ),
                retryable: false,
                action: "upload the context with the blob preflight",
                code: "file_upload_error",
            });
        };
        entries.push(ContextEntry {
            path: f.path.clone(),
            entry_type: if is_dir {
                EntryType::Dir
            } else {
                EntryType::File
            },
            mode,
            source,
        });
    }
    Ok(entries)
}

/// Builds the Dockerfile (given, or rendered from the steps) with the
/// requested engine; returns the OCI layout it produced.
async fn engine_build(
    state: &Shared,
    rec: &mut BuildRecord,
    def: &Definition,
    secrets: &RunSecrets,
    cancel: &Arc<AtomicBool>,
    n: &Normalized,
) -> Result<std::path::PathBuf, Failure> {
    use nullspace_build::context::materialize;
    use nullspace_build::engine::{EngineBuild, RegistryCredential};
    let req = &def.request;
    let engine = state
        .engine_list
        .iter()
        .find(|e| e.name() == n.backend)
        .cloned()
        .ok_or_else(|| {
            failed(
                "preflight",
                format!("engine {} is not available on this server", n.backend),
                false,
                "choose an available build_backend",
            )
        })?;
    rec.engine = Some(format!("{} {}", engine.name(), engine.version()));
    let (dockerfile, bust) = match &n.base {
        Base::Dockerfile => (req.dockerfile.clone().unwrap_or_default(), None),
        _ => {
            let empty = std::collections::BTreeMap::new();
            let input = nullspace_build::render::RenderInput {
                base_image: req.base_image.as_deref().unwrap_or_default(),
                steps: &n.steps,
                build_envs: req.build_envs.as_ref().unwrap_or(&empty),
                runtime_envs: req
                    .runtime_config
                    .as_ref()
                    .and_then(|r| r.default_envs.as_ref())
                    .unwrap_or(&empty),
            };
            let r = nullspace_build::render::render(&input)
                .map_err(|e| failed("preflight", e.to_string(), false, "fix the steps"))?;
            (r.dockerfile, r.cache_bust_arg)
        }
    };
    let entries = context_entries(state, rec, req).await?;
    let df_name = if entries.iter().any(|e| e.path == "Dockerfile") {
        ".nullspace.Dockerfile"
    } else {
        "Dockerfile"
    };
    let mut creds: Vec<RegistryCredential> = secrets
        .registry_auth
        .iter()
        .filter_map(|a| {
            let auth = a.get("auth")?;
            if auth.get("kind")?.as_str()? != "basic" {
                return None;
            }
            Some(RegistryCredential {
                registry: a.get("registry")?.as_str()?.to_string(),
                username: auth.get("username")?.as_str()?.to_string(),
                password: auth.get("password")?.as_str()?.to_string(),
            })
        })
        .collect();
    if let Some(c) = basic_credentials(secrets)? {
        let host = match &n.base {
            Base::Dockerfile => nullspace_build::dockerfile::analyze(
                &dockerfile,
                &req.build_args.clone().unwrap_or_default(),
            )
            .map_err(|e| failed("preflight", e.to_string(), false, "fix the Dockerfile"))?
            .base_image_auth_host(&|r: &str| r.starts_with("tmpl_") || r.starts_with("nullspace/"))
            .map_err(|e| {
                failed(
                    "preflight",
                    format!("base_image_auth: {e}"),
                    false,
                    "use registry_auth per registry instead",
                )
            })?,
            _ => nullspace_build::dockerfile::registry_host(
                req.base_image.as_deref().unwrap_or_default(),
            ),
        };
        creds.push(RegistryCredential {
            registry: host,
            username: c.username,
            password: c.password,
        });
    }
    let mut args = req.build_args.clone().unwrap_or_default();
    if let Some(b) = bust {
        args.insert(b, rec.build_id.clone());
    }
    let build_secrets: Vec<(String, String)> = secrets
        .build_secrets
        .iter()
        .map(|s| (s.id.clone(), s.value.clone().unwrap_or_default()))
        .collect();
    let network = req.build_config.as_ref().and_then(|c| c.internet_access) != Some(false);
    let target = req.target.clone();
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
    let result = blocking(cancel, move || -> Result<std::path::PathBuf, String> {
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&ctx).map_err(|e| e.to_string())?;
        materialize(&ctx, &entries).map_err(|e| format!("context:{e}"))?;
        std::fs::write(ctx.join(df_name), &dockerfile).map_err(|e| e.to_string())?;
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
        let output = engine.build(&b).map_err(|e| e.to_string())?;
        Ok(output.layout_dir)
    })
    .await?;
    match result {
        Ok(layout) => Ok(layout),
        Err(e) if cancel.load(Ordering::SeqCst) => {
            let _ = e;
            Err(Failure::Cancelled)
        }
        Err(e) if e.starts_with("context:") => Err(Failure::Failed {
            phase: "blob_upload",
            message: e["context:".len()..].to_string(),
            retryable: false,
            action: "fix the build context",
            code: "file_upload_error",
        }),
        Err(e) => Err(failed(
            "build_step",
            e,
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
    req: &BuildRequest,
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
    let cache_dir = if req.skip_cache == Some(true) || !matches!(source, SourceRef::Registry(_)) {
        None
    } else {
        Some(state.cache_dir.clone())
    };
    let import_opts = ImportOptions {
        disk_mb: req
            .build_config
            .as_ref()
            .and_then(|c| c.disk_mb)
            .map(|d| d as u64),
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
            if req.skip_cache == Some(true) {
                "bypass"
            } else if hit {
                "hit"
            } else {
                "miss"
            }
            .into(),
        );
        if req.skip_cache == Some(true) {
            e.cache_reason = Some("whole_build_skip_cache".into());
        }
        let _ = append(state, e).await;
    }
    let cs = &mut rec.cache_summary;
    if req.skip_cache == Some(true) {
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
    let readiness = rt.ready_cmd.as_ref().map(|c| {
        json!({"kind": "command", "command": c, "timeout_secs": 30, "interval_ms": 500, "startup_grace_secs": 2})
    });
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
