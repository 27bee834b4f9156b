//! A build's life in the store: creation, durable logs, cancel requests and
//! every status write. Each write is a [`Store::transition`] that names who
//! writes it (the owning server, a recovering one, or anyone for a waiting
//! build), so a worker that lost its build can change nothing, and a
//! terminal status is written once, with its entry last in the log.
//!
//! [`Store::transition`]: nullspace_store::Store::transition

use nullspace_store::{BuildRow, Caller, LogGate, Transition, Writer, now_ms};
use serde::Serialize;
use serde_json::{Value, json};

use super::{ArtifactManifest, is_terminal};
use crate::error::{ApiError, ApiResult};
use crate::model::*;
use crate::state::{RunSecrets, Shared};
use crate::templates;
use crate::validate::{self, Base, Normalized};

pub fn entry(rec: &BuildRecord, kind: &str, level: &str, message: impl Into<String>) -> LogEntry {
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

/// The stored JSON of `e` at offset `o`.
fn entry_json(e: &LogEntry, o: i64) -> String {
    let mut e = e.clone();
    e.offset = o;
    e.timestamp = iso(now_ms());
    serde_json::to_string(&e).unwrap_or_default()
}

/// Appends a durable log entry while `gate` holds and wakes followers;
/// `None` when the build is terminal (or no longer this server's).
pub async fn append(state: &Shared, gate: LogGate<'_>, e: LogEntry) -> ApiResult<Option<i64>> {
    let build_id = e.build_id.clone();
    let off = state
        .store
        .append_log(&build_id, gate, move |o| entry_json(&e, o))
        .await?;
    if off.is_some() {
        state.hub.notify(&build_id);
    }
    Ok(off)
}

/// Appends a message; failures are logged, not returned (a log line never
/// fails a build).
pub async fn log(
    state: &Shared,
    gate: LogGate<'_>,
    rec: &BuildRecord,
    kind: &str,
    level: &str,
    phase: Option<&str>,
    msg: impl Into<String>,
) {
    let mut e = entry(rec, kind, level, msg);
    e.phase = phase.map(str::to_string);
    if let Err(err) = append(state, gate, e).await {
        tracing::error!("log append failed for {}: {}", rec.build_id, err.message);
    }
}

/// The record a row holds, with the row's cancel request (kept in its own
/// columns, since any server may set it while the owner writes the record).
pub fn parse_record(row: &BuildRow) -> ApiResult<BuildRecord> {
    let mut rec: BuildRecord = serde_json::from_str(&row.record).map_err(ApiError::internal)?;
    if let Some(c) = &row.cancel {
        rec.cancel_requested_at = Some(iso(c.at));
        rec.cancel_requested_by = Some(c.by.clone());
        rec.cancellation_reason = c.reason.clone();
    }
    Ok(rec)
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

/// Rewrites a terminal build's record (e.g. the collector marking its
/// artifacts gone); never a live build's.
pub async fn save(state: &Shared, rec: &mut BuildRecord) -> ApiResult<bool> {
    if !is_terminal(&rec.status) {
        return Ok(false);
    }
    rec.updated_at = iso(now_ms());
    let json = serde_json::to_string(rec).map_err(ApiError::internal)?;
    Ok(state
        .store
        .update_build(&rec.build_id, &rec.status, &json, &[rec.status.as_str()])
        .await?)
}

/// Whether a build's definition carries request-time credentials, which
/// live only in the memory of the server that took the request.
pub fn needs_credentials(def: &Definition) -> bool {
    def.base_image_auth_kind.is_some()
        || !def.secret_ids.is_empty()
        || !def.registry_auth_hosts.is_empty()
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

pub fn sha256_json(v: &impl Serialize) -> String {
    use sha2::Digest as _;
    format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(
            serde_json::to_vec(v).unwrap_or_default()
        ))
    )
}

/// Validates, persists (sanitized) and queues a build. A build with
/// request-time credentials is owned by this server from the start (only
/// it holds them), under a lease it renews; others are free for any
/// server's workers.
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
    let pinned = needs_credentials(&def);
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
        owner: pinned.then(|| state.owner.clone()),
        lease_expires_at: pinned.then(|| state.lease_until()),
        ..Default::default()
    };
    state.secrets.lock().expect("secrets lock").insert(
        id.clone(),
        RunSecrets {
            base_image_auth: req.base_image_auth.clone(),
            registry_auth: req.registry_auth.clone().unwrap_or_default(),
            build_secrets: req.build_secrets.clone().unwrap_or_default(),
            created: std::time::Instant::now(),
        },
    );
    state.store.insert_build(&row).await?;
    // The first entry of every build is its `start` (the SDK's streams
    // expect one); the worker's own start is a message.
    log(
        state,
        LogGate::Live,
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
        log(
            state,
            LogGate::Live,
            &rec,
            "warning",
            "warn",
            Some("preparing"),
            w.clone(),
        )
        .await;
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

/// One status write of a build: see [`Store::transition`].
///
/// [`Store::transition`]: nullspace_store::Store::transition
struct Write<'a> {
    from: &'a [&'a str],
    writer: Writer<'a>,
    entry: Option<LogEntry>,
    tags: &'a [(&'a str, &'a str)],
    cache: Option<(&'a str, &'a str)>,
}

async fn write(state: &Shared, rec: &mut BuildRecord, w: Write<'_>) -> bool {
    rec.updated_at = iso(now_ms());
    let Ok(json) = serde_json::to_string(rec) else {
        return false;
    };
    let make = w.entry.as_ref().map(|e| move |o: i64| entry_json(e, o));
    let t = Transition {
        from: w.from,
        writer: w.writer,
        status: &rec.status,
        record: &json,
        owner: None,
        entry: make.as_ref().map(|f| f as &(dyn Fn(i64) -> String + Sync)),
        tags: w.tags,
        cache: w.cache,
        finished_at: is_terminal(&rec.status).then(now_ms),
    };
    match state.store.transition(&rec.build_id, &t).await {
        Ok(done) => {
            if done {
                state.hub.notify(&rec.build_id);
                if is_terminal(&rec.status) {
                    state
                        .secrets
                        .lock()
                        .expect("secrets lock")
                        .remove(&rec.build_id);
                }
            }
            done
        }
        Err(e) => {
            tracing::error!(build = %rec.build_id, "status write failed: {e}");
            false
        }
    }
}

/// Terminal failure: an `error` entry with the status, in one write.
pub async fn fail(
    state: &Shared,
    writer: Writer<'_>,
    rec: &mut BuildRecord,
    phase: &str,
    message: &str,
    retryable: bool,
    action: &str,
) -> bool {
    fail_with(
        state,
        writer,
        rec,
        "build_error",
        phase,
        message,
        retryable,
        action,
    )
    .await
}

/// Terminal failure with an explicit `error_detail.code` (the SDK picks the
/// exception class from it).
#[allow(clippy::too_many_arguments)]
pub async fn fail_with(
    state: &Shared,
    writer: Writer<'_>,
    rec: &mut BuildRecord,
    code: &str,
    phase: &str,
    message: &str,
    retryable: bool,
    action: &str,
) -> bool {
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
    write(
        state,
        rec,
        Write {
            from: &["waiting", "building"],
            writer,
            entry: Some(e),
            tags: &[],
            cache: None,
        },
    )
    .await
}

fn started_ms(rec: &BuildRecord) -> Option<i64> {
    rec.started_at
        .as_deref()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map(|d| d.timestamp_millis())
}

/// Cancels a build: a waiting one ends at once; a running one is stopped
/// by its owner (at once when that is this server, at the owner's next
/// cancel poll otherwise) and ends `cancelled` when its processes are gone.
/// Terminal builds are returned unchanged (idempotent).
pub async fn cancel(
    state: &Shared,
    caller: &Caller,
    id: &str,
    reason: Option<String>,
) -> ApiResult<BuildRecord> {
    let (row, rec) = load(state, caller, id).await?;
    if is_terminal(&rec.status) {
        return Ok(rec);
    }
    state
        .store
        .request_cancel(id, &caller.key_id, reason.as_deref(), now_ms())
        .await?;
    if row.status == "waiting" {
        // Any server may end a waiting build; the claim query skips builds
        // with a cancel request, and the write is conditional on `waiting`.
        let (_, mut fresh) = load(state, caller, id).await?;
        finish_cancelled(state, Writer::Anyone, &mut fresh, &["waiting"]).await;
    }
    if let Some(h) = state.running.lock().expect("running lock").get(id) {
        h.stop(super::StopReason::Cancel);
    }
    // Return the freshest record (the worker may have finished meanwhile).
    let (_, rec) = load(state, caller, id).await?;
    Ok(rec)
}

/// Terminal `cancelled`: its entry and status in one write.
pub async fn finish_cancelled(
    state: &Shared,
    writer: Writer<'_>,
    rec: &mut BuildRecord,
    from: &[&str],
) -> bool {
    let msg = match &rec.cancellation_reason {
        Some(r) => format!("build cancelled: {r}"),
        None => "build cancelled".to_string(),
    };
    let mut e = entry(rec, "cancelled", "warn", msg);
    e.phase = Some("cleanup".into());
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
    write(
        state,
        rec,
        Write {
            from,
            writer,
            entry: Some(e),
            tags: &[],
            cache: None,
        },
    )
    .await
}

/// Puts a running build back in the queue (its server stopped, or died
/// and its lease expired) with a message saying why; another worker, here
/// or on another server, runs it again from the start.
pub async fn requeue(state: &Shared, writer: Writer<'_>, rec: &mut BuildRecord, why: &str) -> bool {
    let mut e = entry(
        rec,
        "message",
        "warn",
        format!("{why}; the build is queued again"),
    );
    e.phase = Some("preparing".into());
    rec.status = "waiting".into();
    rec.started_at = None;
    rec.engine = None;
    rec.cache_summary = CacheSummary::default();
    write(
        state,
        rec,
        Write {
            from: &["building"],
            writer,
            entry: Some(e),
            tags: &[],
            cache: None,
        },
    )
    .await
}

/// Hands a build whose server stopped (or died) back: re-queued when it
/// holds no request-time credentials, `error`/`interrupted` otherwise (its
/// credentials were only in that server's memory).
pub async fn hand_back(
    state: &Shared,
    writer: Writer<'_>,
    row: &BuildRow,
    rec: &mut BuildRecord,
    why: &str,
) -> bool {
    let def: Definition = serde_json::from_str(&row.definition).unwrap_or_default();
    if row.status == "building" && !needs_credentials(&def) {
        return requeue(state, writer, rec, why).await;
    }
    let msg = if row.status == "building" {
        format!("{why} while this build was running")
    } else {
        format!("{why} before this build started, and its credentials were not persisted")
    };
    fail(
        state,
        writer,
        rec,
        "interrupted",
        &msg,
        true,
        "retry the build (resupply credentials and secrets)",
    )
    .await
}

/// Ready: stores the artifact manifest, then in one write the `end` entry,
/// the tags (moved to this build only now), the final-artifact cache entry
/// and the status. Returns false when this server no longer owns the build.
pub async fn finish_ready(
    state: &Shared,
    owner: &str,
    rec: &mut BuildRecord,
    m: ArtifactManifest,
    cache_key: Option<&str>,
) -> bool {
    let bytes = serde_json::to_vec(&m).unwrap_or_default();
    let artifacts = state.artifacts.clone();
    let stored = tokio::task::spawn_blocking(move || artifacts.put(&bytes[..]))
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
    let manifest_digest = match stored {
        Ok((d, _)) => d,
        Err(e) => {
            return fail(
                state,
                Writer::Owner(owner),
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
    let info = templates::info_after_tagging(state, rec).await.ok();
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
    let now = now_ms();
    rec.status = "ready".into();
    rec.finished_at = Some(iso(now));
    rec.duration_ms = started_ms(rec).map(|s| now - s);
    let template_id = rec.template_id.clone();
    let tag_names = rec.tags.clone();
    let tags: Vec<(&str, &str)> = tag_names
        .iter()
        .map(|t| (template_id.as_str(), t.as_str()))
        .collect();
    let ns = rec.namespace_slug.clone();
    write(
        state,
        rec,
        Write {
            from: &["building"],
            writer: Writer::Owner(owner),
            entry: Some(end),
            tags: &tags,
            cache: cache_key.map(|k| (ns.as_str(), k)),
        },
    )
    .await
}
