//! Handlers of upload sessions and signed transfer URLs, for both machine
//! prefixes: parameters, bodies streamed to the engine
//! ([`crate::uploads`]), signed grants ([`crate::signed_url`]), status
//! codes and the SDK's error shape (`code: file_upload_error` with an
//! `error_detail` whose `reason` picks the SDK's exception class).

use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use nullspace_model::upload::*;
use nullspace_store::Caller;
use serde_json::json;

use super::{Speak as _, flavor};
use crate::guest::Guest;
use crate::http::JsonBody;
use crate::machine_model::Flavor;
use crate::machines::{self, MachineError};
use crate::signed_url::{Method, SignedUrlError};
use crate::state::Shared;
use crate::uploads::{self, Conflict, Info, Kind, NewUpload, Owner, UploadError};

/// How long a signed transfer URL works.
pub const URL_TTL: Duration = Duration::from_secs(3600);
/// Per-call limit of the guest operations of a completion.
const GUEST_CALL: Duration = Duration::from_secs(300);

/// A refusal, already in the API's shape (boxed: results stay small).
pub struct Refusal(Box<Response>);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        *self.0
    }
}

impl From<Response> for Refusal {
    fn from(r: Response) -> Refusal {
        Refusal(Box::new(r))
    }
}

type Res = Result<Response, Refusal>;

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn wire(i: &Info, limits: &uploads::Limits) -> UploadSessionInfo {
    UploadSessionInfo {
        upload_id: i.id.clone(),
        kind: i.kind.as_str().into(),
        source_kind: i.source_kind.clone(),
        target_path: i.target_path.clone(),
        content_length: i.content_length,
        accepted_bytes: i.accepted_bytes,
        reserved_staging_bytes: if i.status.is_terminal() {
            0
        } else {
            i.content_length
        },
        part_size: i.part_size,
        part_count: i.part_count,
        max_concurrency: i.max_concurrency,
        status: i.status.as_str().into(),
        conflict: i.conflict.as_str().into(),
        checksum_algorithm: "sha256".into(),
        limits: UploadLimits {
            max_upload_bytes: limits.max_upload_bytes,
            max_part_bytes: limits.part_size,
            max_concurrency: limits.max_concurrency,
            machine_staging_quota_bytes: limits.machine_staging_quota_bytes,
        },
        created_at: rfc3339(i.created_at),
        updated_at: rfc3339(i.updated_at),
        expires_at: rfc3339(i.expires_at),
        user: i.user.clone(),
        next_part: i.next_part,
        archive_format: (i.kind == Kind::DirectoryTar).then(|| "tar".into()),
        whole_checksum_sha256: i.whole_sha256.clone(),
    }
}

/// An engine refusal in the SDK's shape.
fn upload_error(id: Option<&str>, e: UploadError) -> Refusal {
    use UploadError as E;
    let status = match &e {
        E::NotFound { .. } => StatusCode::NOT_FOUND,
        E::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        E::Quota { .. } | E::DiskFull { .. } => StatusCode::INSUFFICIENT_STORAGE,
        E::TooManySessions(_) => StatusCode::SERVICE_UNAVAILABLE,
        E::PartDiffers { .. }
        | E::Completing { .. }
        | E::AlreadyCompleted { .. }
        | E::TargetConflict { .. }
        | E::Failed { .. } => StatusCode::CONFLICT,
        E::Expired { .. } | E::Aborted { .. } => StatusCode::GONE,
        E::WholeChecksum { .. } | E::PartChecksum { .. } | E::Entry { .. } => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        E::Spool { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        E::Guest { .. } => StatusCode::BAD_GATEWAY,
        E::Invalid(_)
        | E::MalformedPart { .. }
        | E::PartOutOfRange { .. }
        | E::PartSize { .. }
        | E::MissingParts { .. }
        | E::Body { .. } => StatusCode::BAD_REQUEST,
    };
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        tracing::error!("upload: {e}");
    }
    let message = e.to_string();
    let mut body = json!({"error": message, "code": "file_upload_error"});
    if let Some(reason) = e.reason() {
        let path = match &e {
            E::TargetConflict { path, .. } => Some(path.clone()),
            E::Entry { entry, .. } => Some(entry.clone()),
            _ => None,
        };
        body["error_detail"] = serde_json::to_value(UploadFailureDetail {
            reason: reason.as_str().into(),
            message: message.clone(),
            retryable: e.retryable(),
            upload_id: id.map(str::to_string),
            path,
            part_number: e.part(),
        })
        .unwrap_or_default();
    } else if matches!(e, E::Invalid(_)) {
        body["code"] = "invalid_request".into();
    }
    (status, Json(body)).into_response().into()
}

fn api(e: crate::error::ApiError) -> Refusal {
    e.into_response().into()
}

/// The guest of a running machine the caller may use.
async fn guest_of(s: &Shared, c: &Caller, f: u8, id: &str) -> Result<Guest, Refusal> {
    let (_, live) = machines::commands::running(s, c, id)
        .await
        .speak(f)
        .map_err(api)?;
    Ok(live.guest.clone())
}

fn owner(c: &Caller, id: &str) -> Owner {
    Owner {
        namespace: c.namespace.clone(),
        machine: id.to_string(),
    }
}

/// `POST …/{id}/uploads`.
pub async fn upload_create<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<CreateUploadRequest>,
) -> Res {
    // The machine must exist and run (its guest receives the upload).
    guest_of(&s, &c, F, &id).await?;
    let invalid = |m: String| upload_error(None, UploadError::Invalid(m));
    let kind = Kind::parse(&req.kind)
        .ok_or_else(|| invalid(format!("kind {:?} is not file or directory_tar", req.kind)))?;
    if !["restartable_file", "spooled_stream", "directory_archive"]
        .contains(&req.source_kind.as_str())
    {
        return Err(invalid(format!(
            "source_kind {:?} is not known",
            req.source_kind
        )));
    }
    let conflict = match req.conflict.as_deref() {
        None => Conflict::Merge,
        Some(c) => Conflict::parse(c)
            .ok_or_else(|| invalid(format!("conflict {c:?} is not merge, replace or error")))?,
    };
    if let Some(a) = &req.archive_format
        && a != "tar"
    {
        return Err(invalid(format!("archive_format {a:?} is not tar")));
    }
    if let Some(a) = &req.checksum_algorithm
        && a != "sha256"
    {
        return Err(invalid(format!("checksum_algorithm {a:?} is not sha256")));
    }
    let info = s
        .uploads
        .create(NewUpload {
            owner: owner(&c, &id),
            kind,
            source_kind: req.source_kind,
            target_path: req.target_path,
            user: req.user.filter(|u| !u.trim().is_empty()),
            content_length: req.content_length,
            conflict,
            whole_sha256: req.whole_checksum_sha256,
        })
        .map_err(|e| upload_error(None, e))?;
    let body = CreateUploadResponse {
        session: wire(&info, s.uploads.limits()),
    };
    Ok(Json(body).into_response())
}

/// `GET …/{id}/uploads/{upload_id}`.
pub async fn upload_status<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((id, upload)): Path<(String, String)>,
) -> Res {
    let info = s
        .uploads
        .status(&owner(&c, &id), &upload)
        .map_err(|e| upload_error(Some(&upload), e))?;
    Ok(Json(wire(&info, s.uploads.limits())).into_response())
}

/// `PUT …/{id}/uploads/{upload_id}/parts/{n}`: the body streams to the
/// spool.
pub async fn upload_part<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((id, upload, n)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Res {
    let sha = match headers.get("x-nullspace-part-sha256") {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| {
            upload_error(
                Some(&upload),
                UploadError::Invalid("x-nullspace-part-sha256 is not ASCII".into()),
            )
        })?),
    };
    let info = s
        .uploads
        .put_part(&owner(&c, &id), &upload, &n, sha, body.into_data_stream())
        .await
        .map_err(|e| upload_error(Some(&upload), e))?;
    Ok(Json(wire(&info, s.uploads.limits())).into_response())
}

/// `POST …/{id}/uploads/{upload_id}/complete`.
pub async fn upload_complete<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((id, upload)): Path<(String, String)>,
    JsonBody(req): JsonBody<CompleteUploadRequest>,
) -> Res {
    let o = owner(&c, &id);
    let info = s
        .uploads
        .status(&o, &upload)
        .map_err(|e| upload_error(Some(&upload), e))?;
    let job = match s
        .uploads
        .begin_complete(&o, &upload, req.whole_checksum_sha256.as_deref())
        .map_err(|e| upload_error(Some(&upload), e))?
    {
        uploads::Begin::Done(info) => return Ok(completed(&s, &info)),
        uploads::Begin::Publish(job) => job,
    };
    let guest = match guest_of(&s, &c, F, &id).await {
        Ok(g) => g,
        Err(r) => {
            // Not published: the session stays staged for another try.
            let _ = s.uploads.finish(
                &job,
                &Err(UploadError::Guest {
                    op: "connect",
                    path: info.target_path.clone(),
                    source: std::io::Error::other("the machine is not running"),
                }),
            );
            return Err(r);
        }
    };
    // On a task of its own: a client that goes away does not leave the
    // session `completing` forever (its retry finds the outcome).
    let (st, j) = (s.clone(), job.clone());
    let publishing = tokio::spawn(async move {
        let jj = j.clone();
        let result = guest
            .with_files(info.user.clone(), GUEST_CALL, move |g| {
                uploads::publish::publish(&jj, g)
            })
            .await
            .unwrap_or_else(|e| {
                Err(UploadError::Guest {
                    op: "connect",
                    path: j.target.clone(),
                    source: std::io::Error::other(e.to_string()),
                })
            });
        let info = st.uploads.finish(&j, &result);
        (result, info)
    });
    let (result, info) = publishing.await.map_err(|e| {
        upload_error(
            Some(&upload),
            UploadError::Guest {
                op: "publish",
                path: job.target.clone(),
                source: std::io::Error::other(e.to_string()),
            },
        )
    })?;
    let info = info.map_err(|e| upload_error(Some(&upload), e))?;
    match result {
        Ok(_) => Ok(completed(&s, &info)),
        Err(e) => Err(upload_error(Some(&upload), e)),
    }
}

fn completed(s: &Shared, info: &Info) -> Response {
    let p = info
        .published
        .unwrap_or(uploads::Published { bytes: 0, files: 0 });
    Json(CompleteUploadResponse {
        session: wire(info, s.uploads.limits()),
        published_bytes: p.bytes,
        published_file_count: p.files,
    })
    .into_response()
}

/// `DELETE …/{id}/uploads/{upload_id}`.
pub async fn upload_abort<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((id, upload)): Path<(String, String)>,
) -> Res {
    s.uploads
        .abort(&owner(&c, &id), &upload)
        .map_err(|e| upload_error(Some(&upload), e))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---- signed transfer URLs ---------------------------------------------

/// `scheme://host` the client reached this server at.
fn origin(headers: &HeaderMap) -> String {
    let host = headers
        .get("x-forwarded-host")
        .or_else(|| headers.get(header::HOST))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost");
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .filter(|p| *p == "https" || *p == "http")
        .unwrap_or("http");
    format!("{scheme}://{host}")
}

fn prefix(f: Flavor) -> &'static str {
    match f {
        Flavor::Sandbox => "/v1/sandboxes",
        Flavor::Machine => "/v1/machines",
    }
}

async fn grant_url<const F: u8>(
    s: &Shared,
    c: &Caller,
    id: &str,
    headers: &HeaderMap,
    req: &TransferUrlRequest,
    method: Method,
) -> Result<(String, String), Refusal> {
    let user = req.user.as_deref().filter(|u| !u.trim().is_empty());
    let path = machines::rules::file_path("path", &req.path, user)
        .speak(F)
        .map_err(api)?;
    guest_of(s, c, F, id).await?;
    let (_, token) = s
        .signing_key
        .grant(
            method,
            id,
            &c.namespace,
            &path,
            user,
            URL_TTL,
            SystemTime::now(),
        )
        .map_err(|e| signed_error(&e))?;
    let url = format!(
        "{}/signed{}/{id}/file?token={token}",
        origin(headers),
        prefix(flavor(F))
    );
    Ok((url, token))
}

/// `POST …/{id}/files/upload-url`.
pub async fn upload_url<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<TransferUrlRequest>,
) -> Res {
    let (url, token) = grant_url::<F>(&s, &c, &id, &headers, &req, Method::Put).await?;
    Ok(Json(SignedUploadUrl { url, token }).into_response())
}

/// `POST …/{id}/files/download-url`.
pub async fn download_url<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<TransferUrlRequest>,
) -> Res {
    if let Some(a) = &req.archive_format {
        return Err(api(crate::error::ApiError::invalid(format!(
            "archive_format {a:?}: download URLs serve single files"
        ))));
    }
    let (url, _) = grant_url::<F>(&s, &c, &id, &headers, &req, Method::Get).await?;
    Ok(Json(SignedDownloadUrl { url }).into_response())
}

fn signed_error(e: &SignedUrlError) -> Refusal {
    let (status, code) = match e {
        SignedUrlError::Key { .. }
        | SignedUrlError::KeyMode { .. }
        | SignedUrlError::KeyLength { .. } => {
            tracing::error!("{e}");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal_error")
        }
        SignedUrlError::Expired { .. } => (StatusCode::FORBIDDEN, "signed_url_expired"),
        SignedUrlError::Lifetime(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
        _ => (StatusCode::FORBIDDEN, "signed_url_invalid"),
    };
    (status, Json(json!({"error": e.to_string(), "code": code})))
        .into_response()
        .into()
}

#[derive(serde::Deserialize)]
pub struct TokenQuery {
    token: Option<String>,
}

/// The grant of the request's token, and a caller for its namespace.
fn verified(
    s: &Shared,
    id: &str,
    q: &TokenQuery,
    method: Method,
) -> Result<(crate::signed_url::Grant, Caller), Refusal> {
    let token = q.token.as_deref().ok_or_else(|| {
        signed_error(&SignedUrlError::Malformed(
            "the token query parameter is missing",
        ))
    })?;
    let g = s
        .signing_key
        .verify(token, method, id, SystemTime::now())
        .map_err(|e| signed_error(&e))?;
    let c = Caller {
        key_id: "signed-url".into(),
        namespace: g.namespace.clone(),
    };
    Ok((g, c))
}

/// `GET /signed/v1/…/{id}/file?token=`: the file, streamed in chunks.
pub async fn signed_get<const F: u8>(
    State(s): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<TokenQuery>,
) -> Res {
    let (g, c) = verified(&s, &id, &q, Method::Get)?;
    // Streamed as `GET …/file` streams it (its first chunk read before the
    // answer: a missing file is a 404, not a broken 200).
    let (size, stream) = machines::files::read_stream(&s, &c, &id, &g.path, g.user.as_deref())
        .await
        .speak(F)
        .map_err(api)?;
    Ok(super::files::octet_stream(size, stream))
}

/// `PUT /signed/v1/…/{id}/file?token=`: the body is spooled, then written to
/// the file (replaced whole, never partly).
pub async fn signed_put<const F: u8>(
    State(s): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<TokenQuery>,
    body: Body,
) -> Res {
    let (g, c) = verified(&s, &id, &q, Method::Put)?;
    let guest = guest_of(&s, &c, F, &id).await?;
    let o = owner(&c, &id);
    let job = s
        .uploads
        .spool_direct(&o, &g.path, g.user.clone(), body.into_data_stream())
        .await
        .map_err(|e| upload_error(None, e))?;
    let j = job.clone();
    let result = guest
        .with_files(g.user.clone(), GUEST_CALL, move |files| {
            uploads::publish::publish(&j, files)
        })
        .await;
    s.uploads.drop_direct(&job);
    match result {
        Ok(Ok(_)) => Ok(StatusCode::NO_CONTENT.into_response()),
        Ok(Err(e)) => Err(upload_error(None, e)),
        Err(e) => Err(api(super::dialect(flavor(F), MachineError::guest(&id, e)))),
    }
}
