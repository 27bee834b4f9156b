//! Command handlers: exec (foreground or background), processes, a
//! process's logs, kill.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use nullspace_store::Caller;

use super::Speak;
use crate::error::{ApiError, ApiResult};
use crate::http::JsonBody;
use crate::machine_model::*;
use crate::machines::commands;
use crate::state::Shared;

pub async fn exec<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<ExecBody>,
) -> ApiResult<Json<ExecReply>> {
    commands::exec(&s, &c, &id, b).await.speak(F).map(Json)
}

pub async fn processes<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<ProcessEntry>>> {
    commands::processes(&s, &c, &id).await.speak(F).map(Json)
}

pub(crate) fn pid_of(raw: &str) -> ApiResult<u32> {
    raw.parse::<u32>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ApiError::invalid(format!("pid {raw:?} must be a positive integer")))
}

pub async fn process_logs<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((id, pid)): Path<(String, String)>,
) -> ApiResult<Json<ProcessLogs>> {
    commands::process_logs(&s, &c, &id, pid_of(&pid)?)
        .await
        .speak(F)
        .map(Json)
}

pub async fn kill_process<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((id, pid)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    commands::kill_process(&s, &c, &id, pid_of(&pid)?)
        .await
        .speak(F)?;
    Ok(StatusCode::NO_CONTENT)
}
