//! Volumes at the edge (SDK 1.0.3 only; 0.1.9 has none): `/v1/volumes`
//! (create, list, get, by name, delete, attachments, and the file routes
//! `Volume.files` uses) and `/v1/machines/{id}/volumes` (attach, list,
//! detach, health, remount). The logic is `crate::volumes`; here are the
//! shapes and the status codes: a missing volume (or another namespace's)
//! 404 `volume_not_found`, a lock refusal or an attached delete 409
//! `volume_busy` (the SDK's ConflictError), a machine that cannot take it 409 `volume_conflict`.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use nullspace_model::machine::volume::{
    CreateVolumeBody, VolumeAttachment, VolumeInfo, VolumeMountBody, VolumeReadReply,
};
use nullspace_model::machine::{Exists, FileInfo, PathBody, WriteFileBody};
use nullspace_store::Caller;

use super::{MACHINE, dialect, flavor, uint};
use crate::error::{ApiError, ApiResult};
use crate::http::JsonBody;
use crate::state::Shared;
use crate::volumes::{VolumeError, attach, catalog, files};

/// A volume failure as the SDK reads it.
pub fn speak(e: VolumeError) -> ApiError {
    let msg = e.to_string();
    match e {
        VolumeError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "volume_not_found", msg),
        VolumeError::AttachmentNotFound(_) => {
            ApiError::new(StatusCode::NOT_FOUND, "volume_attachment_not_found", msg)
        }
        VolumeError::NameTaken(_) => ApiError::conflict("volume_name_conflict", msg),
        VolumeError::Invalid(_) => ApiError::invalid(msg),
        VolumeError::InUse { .. } | VolumeError::Attached { .. } => {
            ApiError::conflict("volume_busy", msg)
        }
        VolumeError::Conflict(_) => ApiError::conflict("volume_conflict", msg),
        VolumeError::Machine(m) => dialect(flavor(MACHINE), m),
        VolumeError::Image(i) => match i {
            nullspace_vm::volume_image::ImageError::BadPath { .. }
            | nullspace_vm::volume_image::ImageError::IsADirectory(_)
            | nullspace_vm::volume_image::ImageError::TooLarge(_) => ApiError::invalid(msg),
            nullspace_vm::volume_image::ImageError::NotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "file_not_found", msg)
            }
            nullspace_vm::volume_image::ImageError::NotEmpty(_) => {
                ApiError::conflict("directory_not_empty", msg)
            }
            nullspace_vm::volume_image::ImageError::Full(_) => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "volume_full", msg)
            }
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "volume_error", msg),
        },
        VolumeError::Device { .. } => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "volume_mount_failed",
            msg,
        ),
        VolumeError::Store(e) => ApiError::internal(e),
    }
}

type R<T> = ApiResult<Json<T>>;

pub async fn create(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    JsonBody(b): JsonBody<CreateVolumeBody>,
) -> R<VolumeInfo> {
    catalog::create(&s, &c, &b).await.map(Json).map_err(speak)
}

pub async fn list(State(s): State<Shared>, Extension(c): Extension<Caller>) -> R<Vec<VolumeInfo>> {
    catalog::list(&s, &c).await.map(Json).map_err(speak)
}

pub async fn get(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> R<VolumeInfo> {
    let v = catalog::get(&s, &c, &id).await.map_err(speak)?;
    Ok(Json(catalog::info(&s, &v).await))
}

pub async fn get_by_name(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> R<VolumeInfo> {
    let v = catalog::get_by_name(&s, &c, &name).await.map_err(speak)?;
    Ok(Json(catalog::info(&s, &v).await))
}

pub async fn delete(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    catalog::delete(&s, &c, &id).await.map_err(speak)?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn volume_attachments(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> R<Vec<VolumeAttachment>> {
    attach::list_for_volume(&s, &c, &id)
        .await
        .map(Json)
        .map_err(speak)
}

pub async fn machine_attach(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<VolumeMountBody>,
) -> ApiResult<(StatusCode, Json<VolumeAttachment>)> {
    let a = attach::attach(&s, &c, &id, &b).await.map_err(speak)?;
    Ok((StatusCode::CREATED, Json(a)))
}

pub async fn machine_list(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> R<Vec<VolumeAttachment>> {
    attach::list_for_machine(&s, &c, &id)
        .await
        .map(Json)
        .map_err(speak)
}

pub async fn machine_detach(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((id, aid)): Path<(String, String)>,
) -> R<VolumeAttachment> {
    attach::detach(&s, &c, &id, &aid)
        .await
        .map(Json)
        .map_err(speak)
}

pub async fn machine_health(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((id, aid)): Path<(String, String)>,
) -> R<VolumeAttachment> {
    attach::health(&s, &c, &id, &aid)
        .await
        .map(Json)
        .map_err(speak)
}

pub async fn machine_remount(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((id, aid)): Path<(String, String)>,
) -> R<VolumeAttachment> {
    attach::remount(&s, &c, &id, &aid)
        .await
        .map(Json)
        .map_err(speak)
}

pub async fn files_list(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> R<Vec<FileInfo>> {
    let path = q.get("path").map(String::as_str).unwrap_or("/");
    let depth = uint::<u32>(&q, "depth")?.unwrap_or(1);
    files::list(&s, &c, &id, path, depth)
        .await
        .map(Json)
        .map_err(speak)
}

pub async fn files_read(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<PathBody>,
) -> R<VolumeReadReply> {
    files::read(&s, &c, &id, &b.path, b.encoding.as_deref())
        .await
        .map(Json)
        .map_err(speak)
}

pub async fn files_write(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<WriteFileBody>,
) -> R<FileInfo> {
    files::write(&s, &c, &id, &b.path, &b.content, b.encoding.as_deref())
        .await
        .map(Json)
        .map_err(speak)
}

pub async fn files_info(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<PathBody>,
) -> R<FileInfo> {
    files::stat(&s, &c, &id, &b.path)
        .await
        .map_err(speak)?
        .map(Json)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "file_not_found",
                format!("volume {id}: {}: no such file or directory", b.path),
            )
        })
}

pub async fn files_exists(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<PathBody>,
) -> R<Exists> {
    let e = files::stat(&s, &c, &id, &b.path).await.map_err(speak)?;
    Ok(Json(Exists {
        exists: e.is_some(),
    }))
}

pub async fn files_mkdir(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<PathBody>,
) -> ApiResult<StatusCode> {
    files::make_dir(&s, &c, &id, &b.path).await.map_err(speak)?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn files_remove(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<PathBody>,
) -> ApiResult<StatusCode> {
    files::remove(&s, &c, &id, &b.path).await.map_err(speak)?;
    Ok(StatusCode::NO_CONTENT)
}
