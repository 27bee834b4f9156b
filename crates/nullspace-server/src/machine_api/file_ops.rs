//! Handlers of the file routes beyond read and write (remove, rename,
//! mkdir, permissions, batch write, search, find, replace) and of
//! metrics, with the SDK's request and answer shapes.

use axum::extract::{Multipart, Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use nullspace_model::machine_files::{
    BatchEntry, BatchManifest, BatchWriteResult, MachineMetrics, PatternBody, PermissionsBody,
    RenameBody, ReplaceBody, ReplaceResult, SearchMatch,
};
use nullspace_store::Caller;

use super::Speak;
use crate::error::{ApiError, ApiResult};
use crate::http::JsonBody;
use crate::machine_model::*;
use crate::machines::file_ops::{self, BatchItem, MAX_BATCH_FILES};
use crate::state::Shared;

/// Largest `manifest` part of a batch write.
const MAX_MANIFEST: usize = 1 << 20;

pub async fn files_remove<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<PathBody>,
) -> ApiResult<StatusCode> {
    file_ops::remove(&s, &c, &id, &b.path, b.user.as_deref())
        .await
        .speak(F)?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn files_rename<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<RenameBody>,
) -> ApiResult<Json<FileInfo>> {
    file_ops::rename(&s, &c, &id, &b.old_path, &b.new_path, b.user.as_deref())
        .await
        .speak(F)
        .map(Json)
}

pub async fn files_mkdir<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<PathBody>,
) -> ApiResult<StatusCode> {
    file_ops::make_dir(&s, &c, &id, &b.path, b.user.as_deref())
        .await
        .speak(F)?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn files_permissions<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<PermissionsBody>,
) -> ApiResult<StatusCode> {
    file_ops::set_permissions(&s, &c, &id, &b.path, &b.permissions, b.user.as_deref())
        .await
        .speak(F)?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn files_search<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<PatternBody>,
) -> ApiResult<Json<Vec<String>>> {
    file_ops::search_names(&s, &c, &id, &b.path, &b.pattern, b.user.as_deref())
        .await
        .speak(F)
        .map(Json)
}

pub async fn files_find<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<PatternBody>,
) -> ApiResult<Json<Vec<SearchMatch>>> {
    file_ops::find_content(&s, &c, &id, &b.path, &b.pattern, b.user.as_deref())
        .await
        .speak(F)
        .map(Json)
}

pub async fn files_replace<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<ReplaceBody>,
) -> ApiResult<Json<ReplaceResult>> {
    file_ops::replace(&s, &c, &id, &b).await.speak(F).map(Json)
}

pub async fn metrics<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<MachineMetrics>>> {
    file_ops::metrics(&s, &c, &id).await.speak(F).map(Json)
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    ApiError::new(
        e.status(),
        "invalid_request",
        format!("batch write: {}", e.body_text()),
    )
}

/// `POST …/files/batch-write`: a `manifest` part (`{"files": [{"path",
/// "field"}], "user"}`) first, then one part per file, each written as it
/// arrives (so the server holds one file at a time; the route's body limit
/// bounds the whole). One entry per manifest file, in its order; a file
/// that fails is its entry's error, a file without a part too.
pub async fn files_batch_write<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    mut form: Multipart,
) -> ApiResult<Json<BatchWriteResult>> {
    let first = form
        .next_field()
        .await
        .map_err(multipart_error)?
        .ok_or_else(|| ApiError::invalid("batch write: the manifest part is missing"))?;
    if first.name() != Some("manifest") {
        return Err(ApiError::invalid(format!(
            "batch write: the first part must be the manifest, not {:?}",
            first.name().unwrap_or("")
        )));
    }
    let raw = bounded(first, MAX_MANIFEST).await?;
    let manifest: BatchManifest = serde_json::from_slice(&raw)
        .map_err(|e| ApiError::invalid(format!("batch write: the manifest is not valid: {e}")))?;
    let n = manifest.files.len();
    if n == 0 || n > MAX_BATCH_FILES {
        return Err(ApiError::invalid(format!(
            "batch write: the manifest must list 1 to {MAX_BATCH_FILES} files, not {n}"
        )));
    }
    for (i, f) in manifest.files.iter().enumerate() {
        if manifest.files[..i].iter().any(|o| o.field == f.field) {
            return Err(ApiError::invalid(format!(
                "batch write: part {:?} is named twice in the manifest",
                f.field
            )));
        }
    }
    let user = manifest
        .user
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty());
    let mut results: Vec<Option<BatchEntry>> = vec![None; n];
    while let Some(field) = form.next_field().await.map_err(multipart_error)? {
        let name = field.name().unwrap_or("").to_string();
        let Some(i) = manifest.files.iter().position(|f| f.field == name) else {
            return Err(ApiError::invalid(format!(
                "batch write: part {name:?} is not in the manifest"
            )));
        };
        if results[i].is_some() {
            return Err(ApiError::invalid(format!(
                "batch write: part {name:?} came twice"
            )));
        }
        let data = field.bytes().await.map_err(multipart_error)?.to_vec();
        let item = BatchItem {
            path: manifest.files[i].path.clone(),
            data,
        };
        results[i] = Some(
            file_ops::write_one(&s, &c, &id, item, user)
                .await
                .speak(F)?,
        );
    }
    let results = results
        .into_iter()
        .zip(&manifest.files)
        .map(|(r, f)| {
            r.unwrap_or_else(|| BatchEntry::Error {
                path: f.path.clone(),
                error: format!("no part named {:?} was sent", f.field),
            })
        })
        .collect();
    Ok(Json(BatchWriteResult { results }))
}

/// A part's bytes, refused past `max`.
async fn bounded(mut field: axum::extract::multipart::Field<'_>, max: usize) -> ApiResult<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
        if out.len() + chunk.len() > max {
            return Err(ApiError::invalid(format!(
                "batch write: the manifest is larger than {max} bytes"
            )));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}
