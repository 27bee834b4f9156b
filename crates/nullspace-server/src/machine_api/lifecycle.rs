//! Machine lifecycle handlers: create, list, get, delete, timeout,
//! snapshot, pause (hibernate), resume and fork.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use nullspace_store::Caller;
use serde_json::Value;

use super::{Speak, flavor, idempotency_key, json_object, json_status, snapshot_info, uint};
use crate::error::{ApiError, ApiResult};
use crate::http::{JsonBody, mask};
use crate::machine_model::*;
use crate::machines::{create as creating, end, pause, query, snapshots};
use crate::state::Shared;

pub async fn create<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    headers: HeaderMap,
    JsonBody(b): JsonBody<CreateMachineBody>,
) -> ApiResult<Response> {
    let key = idempotency_key(&headers)?;
    let m = creating::create(&s, &c, flavor(F), b, key).await.speak(F)?;
    Ok(json_status(StatusCode::CREATED, m))
}

pub async fn list<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let lq = query::ListQuery {
        limit: uint::<i64>(&q, "limit")?,
        next_token: q.get("next_token").cloned().filter(|t| !t.is_empty()),
        states: q
            .get("state")
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default(),
        template: q.get("template").cloned().filter(|t| !t.is_empty()),
        metadata: json_object(&q, "metadata")?,
    };
    let page = query::list(&s, &c, lq).await.speak(F)?;
    if q.contains_key("fields") {
        let items: Vec<Value> = page
            .items
            .into_iter()
            .map(|m| mask(serde_json::to_value(m).unwrap_or_default(), q.get("fields")))
            .collect();
        // The page with projected items (only the asked-for keys).
        #[derive(serde::Serialize)]
        struct Projected {
            items: Vec<Value>,
            has_next: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            next_token: Option<String>,
        }
        return Ok(Json(Projected {
            items,
            has_next: page.has_next,
            next_token: page.next_token,
        })
        .into_response());
    }
    Ok(Json(page).into_response())
}

pub async fn get<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let m = query::get(&s, &c, &id).await.speak(F)?;
    let v = serde_json::to_value(m).map_err(ApiError::internal)?;
    Ok(Json(mask(v, q.get("fields"))).into_response())
}

pub async fn destroy<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<Destroyed>> {
    end::destroy(&s, &c, &id).await.speak(F).map(Json)
}

pub async fn set_timeout<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<TimeoutBody>,
) -> ApiResult<Json<TimeoutLease>> {
    end::set_timeout(&s, &c, &id, b).await.speak(F).map(Json)
}

pub async fn create_snapshot<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let key = idempotency_key(&headers)?;
    let doc = snapshots::create(&s, &c, &id, key).await.speak(F)?;
    Ok(json_status(
        StatusCode::CREATED,
        snapshot_info(&doc, flavor(F)),
    ))
}

pub async fn hibernate<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<SnapshotInfo>> {
    let doc = pause::hibernate(&s, &c, &id).await.speak(F)?;
    Ok(Json(snapshot_info(&doc, flavor(F))))
}

pub async fn resume<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<MachineInfo>> {
    pause::resume(&s, &c, &id).await.speak(F).map(Json)
}

pub async fn fork<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let key = idempotency_key(&headers)?;
    let m = pause::fork(&s, &c, &id, key).await.speak(F)?;
    Ok(json_status(StatusCode::CREATED, m))
}
