//! Routes and handlers. Auth runs first on every `/v1` route; handlers only
//! see an authenticated [`Caller`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use nullspace_store::{BuildFilter, Caller};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::builds::{self, is_terminal};
use crate::error::{ApiError, ApiResult};
use crate::model::*;
use crate::state::Shared;
use crate::templates;
use crate::validate;

pub fn router(state: Shared) -> Router {
    let v1 = Router::new()
        .route(
            "/templates",
            get(list_templates).post(build_blocking_deprecated),
        )
        .route("/templates/build", post(build_stream))
        .route("/templates/builds", post(build_background))
        .route("/templates/builds/{id}", get(build_status))
        .route("/templates/builds/{id}/logs", get(build_logs))
        .route("/templates/builds/{id}/cancel", post(build_cancel))
        .route("/templates/builds/{id}/retry", post(build_retry))
        .route("/templates/builds/{id}/promote", post(build_promote))
        .route("/templates/validate", post(validate_request))
        .route("/templates/plan", post(plan_request))
        .route("/templates/blobs/preflight", post(blobs_preflight))
        .route("/templates/blobs/{blob_id}", put(blob_put))
        .route("/templates/claims", post(claim_create))
        .route(
            "/templates/claims/{token}",
            axum::routing::delete(claim_release),
        )
        .route("/templates/namespaces/{slug}", get(namespace_get))
        .route(
            "/templates/refs/{r}",
            get(template_get).delete(template_delete),
        )
        .route("/templates/refs/{r}/builds", get(ref_builds))
        .route("/templates/{id}/builds", get(ref_builds))
        .route("/templates/refs/{r}/tags", get(tags_get).post(tags_assign))
        .route(
            "/templates/refs/{r}/tags/{tag}",
            axum::routing::delete(tag_remove),
        )
        .route("/templates/refs/{r}/aliases", get(aliases_get))
        .route(
            "/templates/refs/{r}/aliases/{alias}",
            axum::routing::delete(alias_remove),
        )
        .route("/templates/refs/{r}/rename", post(template_rename))
        .route(
            "/templates/refs/{r}/visibility",
            axum::routing::patch(template_visibility),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .nest("/v1", v1)
        .route("/openapi.json", get(crate::openapi::document))
        .route("/healthz", get(|| async { "ok" }))
        // Context blobs are streamed to disk; JSON bodies are bounded.
        .layer(DefaultBodyLimit::max(64 << 20))
        .with_state(state)
}

async fn auth(State(state): State<Shared>, mut req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .map(str::to_string);
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing_api_key",
            "Authorization: Bearer <API key> is required",
        )
        .into_response();
    };
    match state.store.authenticate(&token).await {
        Ok(Some(caller)) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Ok(None) => ApiError::unauthorized("the API key is not valid").into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// JSON bodies: a malformed one is a clear 400 in the API's error shape.
pub struct JsonBody<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::invalid(format!("request body: {e}")))?;
        let bytes = if bytes.is_empty() {
            Bytes::from_static(b"{}")
        } else {
            bytes
        };
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            ApiError::invalid(format!(
                "request body is not valid JSON for this endpoint: {e}"
            ))
        })
    }
}

// ---- builds ---------------------------------------------------------------

async fn build_background(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    JsonBody(req): JsonBody<BuildRequest>,
) -> ApiResult<Response> {
    let rec = builds::create(&s, &c, req, None).await?;
    Ok((StatusCode::ACCEPTED, Json(rec)).into_response())
}

async fn build_blocking_deprecated(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    JsonBody(req): JsonBody<BuildRequest>,
) -> ApiResult<Response> {
    // Deprecated blocking create: wait for the build, answer with the artifact.
    let rec = builds::create(&s, &c, req, None).await?;
    let mut rx = s.hub.subscribe(&rec.build_id);
    loop {
        let (_, cur) = builds::load(&s, &c, &rec.build_id).await?;
        if is_terminal(&cur.status) {
            if cur.status == "ready" {
                return Ok(Json(templates::info_by_id(&s, &cur.template_id).await?).into_response());
            }
            let detail = cur.error_detail.clone();
            let mut e = ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "build_error",
                cur.error.unwrap_or_else(|| format!("build {}", cur.status)),
            );
            if let Some(d) = detail {
                e = e.with_detail(d);
            }
            return Err(e);
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await;
    }
}

async fn build_stream(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    JsonBody(req): JsonBody<BuildRequest>,
) -> ApiResult<Response> {
    let rec = builds::create(&s, &c, req, None).await?;
    Ok(sse(s, rec.build_id, 0, true))
}

fn parse_offset(raw: &HashMap<String, String>, key: &str) -> ApiResult<Option<i64>> {
    match raw.get(key) {
        None => Ok(None),
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .map(Some)
            .ok_or_else(|| ApiError::invalid(format!("{key} must be a non-negative integer"))),
    }
}

async fn build_status(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let offset = parse_offset(&q, "offset")?.unwrap_or(0);
    status_snapshot(&s, &c, &id, offset).await.map(Json)
}

async fn status_snapshot(s: &Shared, c: &Caller, id: &str, offset: i64) -> ApiResult<Value> {
    // Record first, entries second: a terminal status implies every entry.
    let (_, rec) = builds::load(s, c, id).await?;
    let entries = s.store.logs(id, offset).await?;
    let next = entries.last().map(|e| e.0 + 1).unwrap_or(offset);
    let entries: Vec<Value> = entries
        .iter()
        .filter_map(|e| serde_json::from_str(&e.1).ok())
        .collect();
    Ok(json!({"build": rec, "entries": entries, "next_offset": next}))
}

async fn build_logs(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    builds::load(&s, &c, &id).await?;
    // `offset` wins over `cursor` (an alias kept for reconnecting clients).
    let offset = match parse_offset(&q, "offset")? {
        Some(o) => o,
        None => parse_offset(&q, "cursor")?.unwrap_or(0),
    };
    let follow = match q.get("follow").map(String::as_str) {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(v) => {
            return Err(ApiError::invalid(format!(
                "follow must be true or false, not {v:?}"
            )));
        }
    };
    Ok(sse(s, id, offset, follow))
}

/// A log stream: replays durable entries from `offset`; with `follow`,
/// forwards new ones until the build is terminal and drained. Frames are
/// written by hand so each is exactly `id:`/`event:`/`data: <json>`.
fn sse(s: Shared, build_id: String, offset: i64, follow: bool) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
    tokio::spawn(async move {
        let mut rx_notify = s.hub.subscribe(&build_id);
        let mut next = offset;
        let mut last_sent = tokio::time::Instant::now();
        loop {
            let status = match s.store.build(&build_id).await {
                Ok(Some(row)) => row.status,
                _ => break,
            };
            let entries = match s.store.logs(&build_id, next).await {
                Ok(e) => e,
                Err(_) => break,
            };
            for (off, e) in entries {
                let frame = format!("id: {off}\nevent: log\ndata: {e}\n\n");
                if tx.send(Ok(Bytes::from(frame))).await.is_err() {
                    return;
                }
                next = off + 1;
                last_sent = tokio::time::Instant::now();
            }
            if !follow || is_terminal(&status) {
                break;
            }
            match tokio::time::timeout(Duration::from_secs(1), rx_notify.recv()).await {
                Ok(Ok(())) | Err(_) => {}
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(_)) => rx_notify = s.hub.subscribe(&build_id),
            }
            // Keep idle clients (30 s read timeout) connected.
            if last_sent.elapsed() > Duration::from_secs(10) {
                if tx
                    .send(Ok(Bytes::from_static(b": ping\n\n")))
                    .await
                    .is_err()
                {
                    return;
                }
                last_sent = tokio::time::Instant::now();
            }
        }
    });
    let stream = tokio_stream_from(rx);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, Infallible>>,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[derive(Deserialize, Default)]
struct CancelBody {
    reason: Option<String>,
}

async fn build_cancel(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<CancelBody>,
) -> ApiResult<Json<Value>> {
    builds::cancel(&s, &c, &id, b.reason).await?;
    status_snapshot(&s, &c, &id, 0).await.map(Json)
}

#[derive(Deserialize, Default)]
struct RetryBody {
    tags: Option<Vec<String>>,
    base_image_auth: Option<Value>,
    registry_auth: Option<Vec<Value>>,
    build_secrets: Option<Vec<BuildSecret>>,
}

async fn build_retry(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<RetryBody>,
) -> ApiResult<Response> {
    let (row, rec) = builds::load(&s, &c, &id).await?;
    if !is_terminal(&rec.status) {
        return Err(ApiError::conflict(
            "template_build_conflict",
            format!(
                "build {id} is {}; only finished builds can be retried",
                rec.status
            ),
        ));
    }
    let def: Definition = serde_json::from_str(&row.definition).map_err(ApiError::internal)?;
    if def.had_inline_context {
        return Err(ApiError::conflict(
            "template_build_conflict",
            format!(
                "build {id} is not retryable: its inline context bytes were not persisted (upload the context as blobs)"
            ),
        ));
    }
    if def.base_image_auth_kind.is_some() && b.base_image_auth.is_none() {
        return Err(ApiError::invalid(format!(
            "build {id} used private base-image credentials ({}); send fresh base_image_auth to retry",
            def.base_image_auth_kind.as_deref().unwrap_or("?")
        )));
    }
    let given: Vec<String> = b
        .build_secrets
        .iter()
        .flatten()
        .map(|s| s.id.clone())
        .collect();
    let mut want = def.secret_ids.clone();
    let mut have = given.clone();
    want.sort();
    have.sort();
    if want != have {
        return Err(ApiError::invalid(format!(
            "retry must resupply the same build_secrets ids ({}); old values are never replayed",
            want.join(", ")
        )));
    }
    let mut req = def.request.clone();
    if let Some(t) = b.tags {
        req.tags = Some(t);
    }
    req.base_image_auth = b.base_image_auth;
    req.registry_auth = b.registry_auth;
    req.build_secrets = b.build_secrets;
    req.name = Some(rec.name.clone());
    let original = rec
        .original_build_id
        .clone()
        .unwrap_or_else(|| rec.build_id.clone());
    let new = builds::create(&s, &c, req, Some((rec.build_id.clone(), original))).await?;
    Ok((StatusCode::ACCEPTED, Json(new)).into_response())
}

#[derive(Deserialize)]
struct PromoteBody {
    tag: String,
}

async fn build_promote(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<PromoteBody>,
) -> ApiResult<Json<TemplateInfo>> {
    templates::promote(&s, &c, &id, &b.tag).await.map(Json)
}

async fn ref_builds(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(r): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let (row, _) = templates::resolve(&s, &c, &r, true).await?;
    let limit = match q.get("limit") {
        None => 20,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=100).contains(n))
            .ok_or_else(|| ApiError::invalid("limit must be 1-100"))?,
    };
    let enum_param = |k: &str, allowed: &[&str]| -> ApiResult<Option<String>> {
        match q.get(k) {
            None => Ok(None),
            Some(v) if allowed.contains(&v.as_str()) => Ok(Some(v.clone())),
            Some(v) => Err(ApiError::invalid(format!(
                "{k} {v:?} must be one of {}",
                allowed.join(", ")
            ))),
        }
    };
    let filter = BuildFilter {
        status: enum_param(
            "status",
            &["waiting", "building", "ready", "error", "cancelled"],
        )?,
        backend: enum_param("backend", &["native", "buildkit", "buildah"])?,
        source_type: enum_param(
            "source_type",
            &["declarative", "dockerfile", "oci_import", "template_base"],
        )?,
    };
    let before = match q.get("cursor") {
        None => None,
        Some(cur) => {
            let (t, id) = cur
                .split_once('.')
                .ok_or_else(|| ApiError::invalid("cursor is malformed"))?;
            Some((
                t.parse::<i64>()
                    .map_err(|_| ApiError::invalid("cursor is malformed"))?,
                id.to_string(),
            ))
        }
    };
    let rows = s.store.builds(&row.id, &filter, limit + 1, before).await?;
    let more = rows.len() as i64 > limit;
    let page = &rows[..rows.len().min(limit as usize)];
    let builds: Vec<Value> = page
        .iter()
        .filter_map(|r| serde_json::from_str(&r.record).ok())
        .collect();
    let next_cursor = if more {
        page.last().map(|r| format!("{}.{}", r.created_at, r.id))
    } else {
        None
    };
    Ok(Json(json!({"builds": builds, "next_cursor": next_cursor})))
}

// ---- validate and plan -----------------------------------------------------

async fn validate_request(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    JsonBody(req): JsonBody<BuildRequest>,
) -> Json<Value> {
    match validate::normalize(&req, &c.namespace, &s.engines) {
        Ok(n) => Json(json!({"valid": true, "errors": [], "warnings": n.warnings})),
        Err(issues) => Json(json!({"valid": false, "errors": issues, "warnings": []})),
    }
}

async fn plan_request(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    JsonBody(req): JsonBody<BuildRequest>,
) -> ApiResult<Json<Value>> {
    let n = validate::normalize(&req, &c.namespace, &s.engines).map_err(|issues| {
        ApiError::invalid(
            issues
                .iter()
                .map(|i| i.message.clone())
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    Ok(Json(crate::plan::plan(&req, &n)))
}

// ---- blobs -----------------------------------------------------------------

#[derive(Deserialize)]
struct PreflightBody {
    files: Vec<PreflightFile>,
}

#[derive(Deserialize)]
struct PreflightFile {
    path: String,
    entry_type: String,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    size_bytes: Option<i64>,
    #[serde(default)]
    force_upload: Option<bool>,
}

const MAX_BLOB_BYTES: i64 = 1 << 30;

fn upload_error(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "file_upload_error", message)
}

async fn blobs_preflight(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    JsonBody(b): JsonBody<PreflightBody>,
) -> ApiResult<Json<Value>> {
    if b.files.len() > validate::MAX_CONTEXT_FILES {
        return Err(upload_error(format!(
            "at most {} context files",
            validate::MAX_CONTEXT_FILES
        )));
    }
    let mut out = Vec::with_capacity(b.files.len());
    for f in &b.files {
        if f.entry_type == "dir" {
            out.push(json!({"path": f.path, "entry_type": "dir", "mode": f.mode}));
            continue;
        }
        if f.entry_type != "file" {
            return Err(upload_error(format!(
                "{:?}: entry_type {:?} is not file or dir",
                f.path, f.entry_type
            )));
        }
        let sha = f.sha256.as_deref().unwrap_or_default();
        let digest = nullspace_digest::Digest::parse(&format!("sha256:{sha}")).map_err(|_| {
            upload_error(format!(
                "{:?}: sha256 must be 64 lowercase hex characters",
                f.path
            ))
        })?;
        let size = f
            .size_bytes
            .filter(|n| (0..=MAX_BLOB_BYTES).contains(n))
            .ok_or_else(|| {
                upload_error(format!(
                    "{:?}: size_bytes must be 0-{MAX_BLOB_BYTES}",
                    f.path
                ))
            })?;
        let blob_id = format!("blob_{}", digest.hex());
        let have = s
            .store
            .blob_meta(&c.namespace, &blob_id)
            .await?
            .is_some_and(|m| m.2)
            && s.artifacts.contains(&digest);
        let missing = !have || f.force_upload == Some(true);
        if !have {
            s.store
                .put_blob_meta(&c.namespace, &blob_id, sha, size, false)
                .await?;
        }
        out.push(
            json!({"path": f.path, "entry_type": "file", "blob_id": blob_id, "missing": missing}),
        );
    }
    Ok(Json(json!({"files": out})))
}

async fn blob_put(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(blob_id): Path<String>,
    _h: HeaderMap,
    body: Body,
) -> ApiResult<StatusCode> {
    let Some((sha, size, _)) = s.store.blob_meta(&c.namespace, &blob_id).await? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "blob_not_found",
            format!("blob {blob_id:?} was not announced by a preflight"),
        ));
    };
    let expected =
        nullspace_digest::Digest::parse(&format!("sha256:{sha}")).map_err(ApiError::internal)?;
    // Stream the body to a temp file through the verifier.
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let tmp = s
        .artifacts
        .tmp_dir()
        .join(format!("{blob_id}.{}", nullspace_store::new_id("")));
    let mut f = tokio::fs::File::create(&tmp)
        .await
        .map_err(ApiError::internal)?;
    let mut hasher = nullspace_digest::Hasher::new(nullspace_digest::Algorithm::Sha256);
    let mut n: i64 = 0;
    use tokio::io::AsyncWriteExt;
    let res: ApiResult<()> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| upload_error(format!("reading the upload: {e}")))?;
            n += chunk.len() as i64;
            if n > size {
                return Err(upload_error(format!(
                    "blob {blob_id}: more than the {size} bytes announced"
                )));
            }
            hasher.update(&chunk);
            f.write_all(&chunk).await.map_err(ApiError::internal)?;
        }
        f.flush().await.map_err(ApiError::internal)?;
        if n != size {
            return Err(upload_error(format!(
                "blob {blob_id}: {n} bytes uploaded, {size} announced"
            )));
        }
        if hasher.clone().finish() != expected {
            return Err(upload_error(format!(
                "blob {blob_id}: content does not match its sha256"
            )));
        }
        Ok(())
    }
    .await;
    if let Err(e) = res {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    let artifacts = s.artifacts.clone();
    tokio::task::spawn_blocking(move || artifacts.adopt(&tmp))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    s.store
        .put_blob_meta(&c.namespace, &blob_id, &sha, size, true)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- templates -------------------------------------------------------------

fn mask(v: Value, fields: Option<&String>) -> Value {
    let Some(fields) = fields else { return v };
    let keep: Vec<&str> = fields
        .split(',')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .collect();
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(k, _)| keep.contains(&k.as_str()))
                .collect(),
        ),
        other => other,
    }
}

async fn list_templates(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let list = templates::list(&s, &c).await?;
    Ok(Json(Value::Array(
        list.into_iter()
            .map(|i| mask(serde_json::to_value(i).unwrap_or_default(), q.get("fields")))
            .collect(),
    )))
}

async fn template_get(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(r): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let (row, _) = templates::resolve(&s, &c, &r, false).await?;
    let info = templates::info(&s, &row).await?;
    Ok(Json(mask(
        serde_json::to_value(info).map_err(ApiError::internal)?,
        q.get("fields"),
    )))
}

async fn template_delete(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(r): Path<String>,
) -> ApiResult<StatusCode> {
    templates::delete(&s, &c, &r).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn tags_get(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(r): Path<String>,
) -> ApiResult<Json<Value>> {
    templates::tags(&s, &c, &r).await.map(Json)
}

#[derive(Deserialize)]
struct TagsBody {
    tags: Vec<String>,
}

async fn tags_assign(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(r): Path<String>,
    JsonBody(b): JsonBody<TagsBody>,
) -> ApiResult<Json<TemplateInfo>> {
    templates::assign_tags(&s, &c, &r, &b.tags).await.map(Json)
}

async fn tag_remove(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((r, tag)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    templates::remove_tag(&s, &c, &r, &tag).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn aliases_get(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(r): Path<String>,
) -> ApiResult<Json<Value>> {
    templates::aliases(&s, &c, &r).await.map(Json)
}

async fn alias_remove(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((r, alias)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    templates::remove_alias(&s, &c, &r, &alias).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct RenameBody {
    new_name: String,
}

async fn template_rename(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(r): Path<String>,
    JsonBody(b): JsonBody<RenameBody>,
) -> ApiResult<Json<TemplateInfo>> {
    templates::rename(&s, &c, &r, &b.new_name).await.map(Json)
}

#[derive(Deserialize)]
struct VisibilityBody {
    visibility: String,
}

async fn template_visibility(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(r): Path<String>,
    JsonBody(b): JsonBody<VisibilityBody>,
) -> ApiResult<Json<TemplateInfo>> {
    templates::set_visibility(&s, &c, &r, &b.visibility)
        .await
        .map(Json)
}

#[derive(Deserialize)]
struct ClaimBody {
    template_ref: String,
}

async fn claim_create(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    JsonBody(b): JsonBody<ClaimBody>,
) -> ApiResult<Response> {
    let v = templates::reserve(&s, &c, &b.template_ref).await?;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

async fn claim_release(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(token): Path<String>,
) -> ApiResult<StatusCode> {
    if !s.store.release_claim(&c.namespace, &token).await? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "claim_not_found",
            "claim not found",
        ));
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn namespace_get(
    Extension(c): Extension<Caller>,
    Path(slug): Path<String>,
) -> ApiResult<Json<Value>> {
    if slug == c.namespace {
        return Ok(Json(
            json!({"slug": slug, "kind": "user", "is_default": true}),
        ));
    }
    if slug == "nullspace" {
        return Ok(Json(
            json!({"slug": slug, "kind": "system", "is_default": false}),
        ));
    }
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "namespace_not_found",
        format!("namespace {slug:?} not found"),
    ))
}
