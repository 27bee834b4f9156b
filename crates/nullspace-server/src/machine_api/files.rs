//! File handlers: write (JSON or raw body), read (JSON or raw), info,
//! exists, list.

use std::collections::HashMap;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine as _;
use futures_util::StreamExt as _;
use nullspace_store::Caller;

use super::{Speak, uint};
use crate::error::{ApiError, ApiResult};
use crate::guest::GuestError;
use crate::http::JsonBody;
use crate::machine_model::*;
use crate::machines::{MachineError, commands::lossy, files};
use crate::state::Shared;

pub async fn files_write<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<WriteFileBody>,
) -> ApiResult<Json<FileInfo>> {
    let data = match b.encoding.as_deref().unwrap_or("utf8") {
        "utf8" | "utf-8" | "text" => b.content.into_bytes(),
        "base64" => base64::engine::general_purpose::STANDARD
            .decode(b.content.as_bytes())
            .map_err(|e| ApiError::invalid(format!("content is not valid base64: {e}")))?,
        o => {
            return Err(ApiError::invalid(format!(
                "encoding {o:?} must be utf8 or base64"
            )));
        }
    };
    files::write_file(&s, &c, &id, &b.path, data, b.user.as_deref())
        .await
        .speak(F)
        .map(Json)
}

/// Text reads (`…/files/read`) in flight on this server. Each holds the
/// whole file (at most [`crate::guest::READ_MAX`]), its text and its JSON
/// answer (about four times the file at the peak, with the buffers' growth)
/// until the answer is sent; more wait their turn, so a client asking for
/// many at once cannot multiply that.
pub const WHOLE_READS: usize = 2;
static WHOLE_READ_PERMITS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(WHOLE_READS);

pub async fn files_read<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<PathBody>,
) -> ApiResult<Response> {
    let permit = WHOLE_READ_PERMITS
        .acquire()
        .await
        .map_err(|e| ApiError::internal(format!("text reads: {e}")))?;
    let data = files::read_file(&s, &c, &id, &b.path, b.user.as_deref())
        .await
        .speak(F)?;
    let content = match b.encoding.as_deref().unwrap_or("utf8") {
        "base64" => base64::engine::general_purpose::STANDARD.encode(&data),
        _ => lossy(&data),
    };
    drop(data);
    // Sized up front: a growing buffer would hold two copies at its last step.
    let mut json = Vec::with_capacity(content.len() + content.len() / 16 + 32);
    serde_json::to_writer(&mut json, &FileContent { content })
        .map_err(|e| ApiError::internal(format!("file content: {e}")))?;
    let body = Bytes::from(json);
    // Sent in slices; the permit goes with the last one (or the client).
    let slices = (0..body.len())
        .step_by(256 << 10)
        .map(move |at| body.slice(at..(at + (256 << 10)).min(body.len())));
    let stream = futures_util::stream::iter(slices).map(move |b| {
        let _held = &permit;
        Ok::<_, std::convert::Infallible>(b)
    });
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response())
}

pub async fn files_info<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<PathBody>,
) -> ApiResult<Json<FileInfo>> {
    files::stat_file(&s, &c, &id, &b.path, b.user.as_deref())
        .await
        .speak(F)
        .map(Json)
}

pub async fn files_exists<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<PathBody>,
) -> ApiResult<Json<Exists>> {
    match files::stat_file(&s, &c, &id, &b.path, b.user.as_deref()).await {
        Ok(_) => Ok(Json(Exists { exists: true })),
        Err(MachineError::Guest {
            err: GuestError::NotFound(_),
            ..
        }) => Ok(Json(Exists { exists: false })),
        Err(e) => Err(e).speak(F),
    }
}

pub async fn files_list<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Vec<FileInfo>>> {
    let path = q.get("path").map(String::as_str).unwrap_or("/");
    let depth = uint::<u32>(&q, "depth")?.unwrap_or(1);
    files::list_files(&s, &c, &id, path, depth, q.get("user").map(String::as_str))
        .await
        .speak(F)
        .map(Json)
}

fn path_param(q: &HashMap<String, String>) -> ApiResult<&str> {
    q.get("path")
        .map(String::as_str)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::invalid("the path query parameter is required"))
}

pub async fn file_get<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let (size, stream) = files::read_stream(
        &s,
        &c,
        &id,
        path_param(&q)?,
        q.get("user").map(String::as_str),
    )
    .await
    .speak(F)?;
    Ok(octet_stream(size, stream))
}

/// A file's bytes as they stream from the guest, `size` announced.
pub(super) fn octet_stream(
    size: u64,
    stream: impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> + Send + 'static,
) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

pub async fn file_put<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    files::write_file(
        &s,
        &c,
        &id,
        path_param(&q)?,
        body.to_vec(),
        q.get("user").map(String::as_str),
    )
    .await
    .speak(F)?;
    Ok(StatusCode::NO_CONTENT)
}
