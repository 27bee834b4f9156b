//! `POST …/processes/{pid}/stdin`.

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use nullspace_model::machine::stdin::StdinBody;
use nullspace_store::Caller;

use super::Speak;
use super::commands::pid_of;
use crate::error::ApiResult;
use crate::http::JsonBody;
use crate::machines::stdin;
use crate::state::Shared;

pub async fn send_stdin<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((id, pid)): Path<(String, String)>,
    JsonBody(b): JsonBody<StdinBody>,
) -> ApiResult<StatusCode> {
    stdin::send(&s, &c, &id, pid_of(&pid)?, b.data.as_bytes())
        .await
        .speak(F)?;
    Ok(StatusCode::NO_CONTENT)
}
