//! A build's life in the store: creation, durable logs, cancel requests and
//! every status write. Each write is a [`Store::transition`] that names who
//! writes it (the owning server, a recovering one, or anyone for a waiting
//! build), so a worker that lost its build can change nothing, and a
//! terminal status is written once, with its entry last in the log.
//!
//! [`Store::transition`]: nullspace_store::Store::transition

use nullspace_model::build::status::BuildStatus as Status;
use nullspace_store::artifacts::Leased;
use nullspace_store::{BuildRow, Caller, LogGate, Transition, Writer, now_ms};
use serde_json::{Value, json};

use super::ArtifactManifest;
use crate::error::{ApiError, ApiResult};
use crate::model::*;
use crate::state::{RunSecrets, Shared};
use crate::templates;
use crate::validate;
use nullspace_model::build::plan::Source;
use nullspace_model::build::probe::Readiness;

pub fn entry(
    rec: &BuildRecord,
    kind: LogKind,
    level: LogLevel,
    message: impl Into<String>,
) -> LogEntry {
    LogEntry {
        build_id: rec.build_id.clone(),
        template_id: rec.template_id.clone(),
        offset: 0,
        timestamp: String::new(),
        kind,
        level,
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
    kind: LogKind,
    level: LogLevel,
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
    if !rec.status.is_terminal() {
        return Ok(false);
    }
    rec.updated_at = iso(now_ms());
    let json = serde_json::to_string(rec).map_err(ApiError::internal)?;
    Ok(state
        .store
        .update_build(
            &rec.build_id,
            rec.status.as_str(),
            &json,
            &[rec.status.as_str()],
        )
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
        status: Status::Waiting,
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
    let pinned = needs_credentials(&def);
    let row = BuildRow {
        id: id.clone(),
        namespace: caller.namespace.clone(),
        template_id,
        status: rec.status.as_str().into(),
        source_type: rec.source_type.clone(),
        backend: p.backend.as_str().into(),
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
        LogKind::Start,
        LogLevel::Info,
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
        log(
            state,
            LogGate::Live,
            &rec,
            LogKind::Warning,
            LogLevel::Warn,
            Some("preparing"),
            w.clone(),
        )
        .await;
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

/// One status write of a build: see [`Store::transition`].
///
/// [`Store::transition`]: nullspace_store::Store::transition
struct Write<'a> {
    from: &'a [Status],
    writer: Writer<'a>,
    entry: Option<LogEntry>,
    tags: &'a [(&'a str, &'a str)],
    cache: Option<(&'a str, &'a str)>,
}

async fn write(state: &Shared, rec: &mut BuildRecord, w: Write<'_>) -> bool {
    let from: Vec<&str> = w.from.iter().map(|s| s.as_str()).collect();
    rec.updated_at = iso(now_ms());
    let Ok(json) = serde_json::to_string(rec) else {
        return false;
    };
    let make = w.entry.as_ref().map(|e| move |o: i64| entry_json(e, o));
    let t = Transition {
        from: &from,
        writer: w.writer,
        status: rec.status.as_str(),
        record: &json,
        owner: None,
        entry: make.as_ref().map(|f| f as &(dyn Fn(i64) -> String + Sync)),
        tags: w.tags,
        cache: w.cache,
        finished_at: rec.status.is_terminal().then(now_ms),
    };
    match state.store.transition(&rec.build_id, &t).await {
        Ok(done) => {
            if done {
                state.hub.notify(&rec.build_id);
                if rec.status.is_terminal() {
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
    fail_detail(state, writer, rec, detail, None).await
}

/// Terminal failure with a whole `error_detail`: a failed step carries its
/// 1-based `step_index`, which the entry repeats with `total_steps`.
pub async fn fail_detail(
    state: &Shared,
    writer: Writer<'_>,
    rec: &mut BuildRecord,
    detail: FailureDetail,
    total_steps: Option<i64>,
) -> bool {
    let message = detail.message.clone();
    let phase = detail.phase.clone();
    let mut e = entry(rec, LogKind::Error, LogLevel::Error, &message);
    e.phase = Some(phase.clone());
    e.step_index = detail.step_index;
    e.total_steps = total_steps.filter(|_| detail.step_index.is_some());
    e.error_detail = Some(detail.clone());
    let now = now_ms();
    rec.status = Status::Error;
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
    write(
        state,
        rec,
        Write {
            from: &[Status::Waiting, Status::Building],
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
    if rec.status.is_terminal() {
        return Ok(rec);
    }
    state
        .store
        .request_cancel(id, &caller.key_id, reason.as_deref(), now_ms())
        .await?;
    if row.status == Status::Waiting.as_str() {
        // Any server may end a waiting build; the claim query skips builds
        // with a cancel request, and the write is conditional on `waiting`.
        let (_, mut fresh) = load(state, caller, id).await?;
        finish_cancelled(state, Writer::Anyone, &mut fresh, &[Status::Waiting]).await;
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
    from: &[Status],
) -> bool {
    let msg = match &rec.cancellation_reason {
        Some(r) => format!("build cancelled: {r}"),
        None => "build cancelled".to_string(),
    };
    let mut e = entry(rec, LogKind::Cancelled, LogLevel::Warn, msg);
    e.phase = Some("cleanup".into());
    let now = now_ms();
    rec.status = Status::Cancelled;
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
        LogKind::Message,
        LogLevel::Warn,
        format!("{why}; the build is queued again"),
    );
    e.phase = Some("preparing".into());
    rec.status = Status::Waiting;
    rec.started_at = None;
    rec.engine = None;
    rec.cache_summary = CacheSummary::default();
    write(
        state,
        rec,
        Write {
            from: &[Status::Building],
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
    let building = row.status == Status::Building.as_str();
    if building && !needs_credentials(&def) {
        return requeue(state, writer, rec, why).await;
    }
    let msg = if building {
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
    let holder = rec.build_id.clone();
    let to_store = bytes.clone();
    // Leased until the ready record below references it.
    let stored = tokio::task::spawn_blocking(move || {
        let w = artifacts.writing()?;
        let stored = w.put(&to_store[..])?;
        w.lease(&holder, &Leased::Artifact(stored.0.clone()))?;
        Ok(stored)
    })
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
    // Many nodes: published before it is ready, so that a ready template
    // is one every node can restore.
    match crate::replicate::publish(state, rec, &m, &bytes).await {
        Ok(Some(reference)) => rec.artifact_ids.push(reference),
        Ok(None) => {}
        Err(e) => {
            return fail(
                state,
                Writer::Owner(owner),
                rec,
                "finalize",
                &format!("publishing to the artifact registry: {e}"),
                true,
                "retry the build once the artifact registry answers",
            )
            .await;
        }
    }
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
        LogKind::End,
        LogLevel::Info,
        format!("template {} ready", rec.canonical_ref),
    );
    end.phase = Some("finalize".into());
    end.result = info.map(|i| serde_json::to_value(i).unwrap_or_default());
    end.result_metadata =
        Some(json!({"runtime_defaults": rec.runtime_defaults, "oci_metadata": rec.oci_metadata}));
    let now = now_ms();
    rec.status = Status::Ready;
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
            from: &[Status::Building],
            writer: Writer::Owner(owner),
            entry: Some(end),
            tags: &tags,
            cache: cache_key.map(|k| (ns.as_str(), k)),
        },
    )
    .await
}
