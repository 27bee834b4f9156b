//! `/v1/snapshots`: get, list, delete. A snapshot answers in the dialect
//! the query names (`machine_id` or `sandbox_id`), else in its machine's.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use nullspace_store::Caller;

use super::{MACHINE, Speak, json_object, snapshot_info};
use crate::error::ApiResult;
use crate::machine_model::*;
use crate::machines::snapshots;
use crate::state::Shared;

pub async fn snapshot_get(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<SnapshotInfo>> {
    let doc = snapshots::get(&s, &c, &id).await.speak(MACHINE)?;
    Ok(Json(snapshot_info(&doc, doc.flavor)))
}

pub async fn snapshot_list(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Vec<SnapshotInfo>>> {
    let (machine, f) = match (q.get("machine_id"), q.get("sandbox_id")) {
        (Some(m), _) => (Some(m.as_str()), Some(Flavor::Machine)),
        (None, Some(m)) => (Some(m.as_str()), Some(Flavor::Sandbox)),
        (None, None) => (None, None),
    };
    let metadata = json_object(&q, "metadata")?;
    let docs = snapshots::list(&s, &c, machine, metadata.as_ref())
        .await
        .speak(MACHINE)?;
    Ok(Json(
        docs.iter()
            .map(|d| snapshot_info(d, f.unwrap_or(d.flavor)))
            .collect(),
    ))
}

pub async fn snapshot_delete(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    snapshots::delete(&s, &c, &id).await.speak(MACHINE)?;
    Ok(StatusCode::NO_CONTENT)
}
