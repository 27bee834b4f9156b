//! `PATCH /v1/machines/{id}/egress` at the edge ([`crate::machines::egress`]
//! does the work).

use axum::extract::{Path, State};
use axum::{Extension, Json};
use nullspace_model::machine::egress::{EgressBody, EgressReply};
use nullspace_store::Caller;

use super::{MACHINE, dialect, flavor};
use crate::error::ApiResult;
use crate::http::JsonBody;
use crate::state::Shared;

/// `PATCH …/egress`: the policy in effect in the answer.
pub async fn update_egress(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<EgressBody>,
) -> ApiResult<Json<EgressReply>> {
    let egress = crate::machines::egress::update(&s, &c, &id, b.egress)
        .await
        .map_err(|e| dialect(flavor(MACHINE), e))?;
    Ok(Json(EgressReply {
        machine_id: id,
        egress,
    }))
}
