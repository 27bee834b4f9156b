//! Template warm pools at the edge (SDK 1.0.3's `TemplateWarmPool`):
//! `/v1/template-warm-pools` create and list, `/{id}` get, update and
//! delete, `/{id}/status`, and the actions enable, disable, drain and
//! reconcile. The logic is `crate::warm_pools`; a missing pool (or another
//! namespace's) is 404 `warm_pool_not_found`.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use nullspace_model::machine::warm_pool::{
    CreateWarmPoolBody, UpdateWarmPoolBody, WarmPoolAction, WarmPoolCounts, WarmPoolInfo,
    WarmPoolList,
};
use nullspace_store::Caller;

use super::{MACHINE, dialect, flavor};
use crate::error::{ApiError, ApiResult};
use crate::http::JsonBody;
use crate::machines::MachineError;
use crate::state::Shared;
use crate::warm_pools::{self, ListFilter};

type R<T> = ApiResult<Json<T>>;

fn speak(e: MachineError) -> ApiError {
    dialect(flavor(MACHINE), e)
}

pub async fn create(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    JsonBody(b): JsonBody<CreateWarmPoolBody>,
) -> R<WarmPoolInfo> {
    warm_pools::create(&s, &c, &b)
        .await
        .map(Json)
        .map_err(speak)
}

/// `?template=&state=&label=k=v&label=…&status=&limit=`.
pub async fn list(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Query(q): Query<Vec<(String, String)>>,
) -> R<WarmPoolList> {
    let mut f = ListFilter::default();
    for (k, v) in q {
        match k.as_str() {
            "template" => f.template = Some(v),
            "state" => f.state = Some(v),
            "label" => f.labels.push(v),
            "status" => f.status = Some(v),
            "limit" => {
                f.limit = Some(v.parse().map_err(|_| {
                    ApiError::invalid(format!("limit must be a whole number, not {v:?}"))
                })?)
            }
            _ => {}
        }
    }
    let items = warm_pools::list(&s, &c, &f).await.map_err(speak)?;
    Ok(Json(WarmPoolList { items }))
}

pub async fn get(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> R<WarmPoolInfo> {
    warm_pools::get(&s, &c, &id).await.map(Json).map_err(speak)
}

pub async fn status(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> R<WarmPoolCounts> {
    let i = warm_pools::get(&s, &c, &id).await.map_err(speak)?;
    Ok(Json(i.status))
}

pub async fn update(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<UpdateWarmPoolBody>,
) -> R<WarmPoolInfo> {
    warm_pools::update(&s, &c, &id, &b)
        .await
        .map(Json)
        .map_err(speak)
}

async fn act(s: Shared, c: Caller, id: String, a: WarmPoolAction) -> R<WarmPoolInfo> {
    warm_pools::act(&s, &c, &id, a)
        .await
        .map(Json)
        .map_err(speak)
}

pub async fn enable(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> R<WarmPoolInfo> {
    act(s, c, id, WarmPoolAction::Enable).await
}

pub async fn disable(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> R<WarmPoolInfo> {
    act(s, c, id, WarmPoolAction::Disable).await
}

pub async fn drain(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> R<WarmPoolInfo> {
    act(s, c, id, WarmPoolAction::Drain).await
}

pub async fn reconcile(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> R<WarmPoolInfo> {
    warm_pools::reconcile(&s, &c, &id)
        .await
        .map(Json)
        .map_err(speak)
}

pub async fn delete(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    warm_pools::delete(&s, &c, &id).await.map_err(speak)?;
    Ok(StatusCode::NO_CONTENT)
}
