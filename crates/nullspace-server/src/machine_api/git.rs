//! Git handlers (`…/git/{clone,status,log,branch,checkout,add,commit,pull,
//! push}`): the running machine, then [`crate::git`]'s plan run in its
//! guest, its output as the SDK's result. Request bodies may hold
//! credentials: nothing here logs them.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use nullspace_model::machine::git::{
    GitAddBody, GitBranchBody, GitBranchList, GitCheckoutBody, GitCloneBody, GitCloneReply,
    GitCommitBody, GitCommitReply, GitLogQuery, GitLogReply, GitOk, GitStatusReply, GitSyncBody,
    GitSyncReply,
};
use nullspace_store::Caller;

use super::{Speak, dialect, flavor};
use crate::error::{ApiError, ApiResult};
use crate::git::{self, Direction, GitError, Plan};
use crate::guest::Finished;
use crate::http::JsonBody;
use crate::machines::{MachineError, commands};
use crate::state::Shared;

/// A git error as the client reads it: request mistakes are 400, a git
/// that failed or is missing 422 (`git_error`), guest trouble as usual.
fn api(f: u8, id: &str, e: GitError) -> ApiError {
    match e {
        e @ GitError::Invalid { .. } => ApiError::invalid(e.to_string()),
        e @ GitError::NotARepository { .. } => ApiError::new(
            StatusCode::NOT_FOUND,
            "git_repository_not_found",
            e.to_string(),
        ),
        e @ (GitError::NotInstalled { .. }
        | GitError::Failed { .. }
        | GitError::TooMuchOutput { .. }
        | GitError::Unreadable { .. }) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "git_error", e.to_string())
        }
        GitError::Guest(g) => dialect(flavor(f), MachineError::guest(id, g)),
    }
    .tap_noun(f)
}

trait TapNoun {
    fn tap_noun(self, f: u8) -> Self;
}

impl TapNoun for ApiError {
    /// Messages name the object as the client's dialect does.
    fn tap_noun(mut self, f: u8) -> ApiError {
        let noun = flavor(f).noun();
        if noun != "machine" {
            self.message = self.message.replace("machine ", &format!("{noun} "));
        }
        self
    }
}

/// Runs `plan` in the caller's running machine `id`.
async fn run<const F: u8>(
    s: &Shared,
    c: &Caller,
    id: &str,
    plan: Result<Plan, GitError>,
) -> ApiResult<Vec<Finished>> {
    let plan = plan.map_err(|e| api(F, id, e))?;
    let (_m, live) = commands::running(s, c, id).await.speak(F)?;
    git::run(&live.guest, id, &plan)
        .await
        .map_err(|e| api(F, id, e))
}

fn path_of(q: &HashMap<String, String>) -> ApiResult<String> {
    q.get("path")
        .cloned()
        .ok_or_else(|| ApiError::invalid("query parameter path is required"))
}

pub async fn git_clone<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<GitCloneBody>,
) -> ApiResult<Json<GitCloneReply>> {
    run::<F>(&s, &c, &id, git::plan_clone(&b)).await?;
    Ok(Json(GitCloneReply { path: b.path }))
}

pub async fn git_status<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<GitStatusReply>> {
    let out = run::<F>(&s, &c, &id, git::plan_status(&path_of(&q)?)).await?;
    git::parse_status(&out[0].stdout)
        .map(Json)
        .map_err(|e| api(F, &id, e))
}

pub async fn git_log<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<GitLogReply>> {
    let limit = q
        .get("limit")
        .map(|l| {
            l.parse::<u32>().map_err(|_| {
                ApiError::invalid(format!("query parameter limit {l:?} is not a count"))
            })
        })
        .transpose()?;
    let lq = GitLogQuery {
        path: path_of(&q)?,
        limit,
    };
    let plan = git::plan_log(&lq).map_err(|e| api(F, &id, e))?;
    let (_m, live) = commands::running(&s, &c, &id).await.speak(F)?;
    match git::run(&live.guest, &id, &plan).await {
        Ok(out) => git::parse_log(&out[0].stdout)
            .map(|commits| Json(GitLogReply { commits }))
            .map_err(|e| api(F, &id, e)),
        // No commit yet: an empty history, not an error.
        Err(e) if git::is_empty_history(&e) => Ok(Json(GitLogReply { commits: vec![] })),
        Err(e) => Err(api(F, &id, e)),
    }
}

pub async fn git_branches<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<GitBranchList>> {
    let out = run::<F>(&s, &c, &id, git::plan_branches(&path_of(&q)?)).await?;
    git::parse_branches(&out[0].stdout, &out[1].stdout)
        .map(Json)
        .map_err(|e| api(F, &id, e))
}

pub async fn git_branch<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<GitBranchBody>,
) -> ApiResult<Json<GitOk>> {
    run::<F>(&s, &c, &id, git::plan_branch(&b)).await?;
    Ok(Json(GitOk { ok: true }))
}

pub async fn git_checkout<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<GitCheckoutBody>,
) -> ApiResult<Json<GitOk>> {
    run::<F>(&s, &c, &id, git::plan_checkout(&b)).await?;
    Ok(Json(GitOk { ok: true }))
}

pub async fn git_add<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<GitAddBody>,
) -> ApiResult<Json<GitOk>> {
    run::<F>(&s, &c, &id, git::plan_add(&b)).await?;
    Ok(Json(GitOk { ok: true }))
}

pub async fn git_commit<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<GitCommitBody>,
) -> ApiResult<Json<GitCommitReply>> {
    let out = run::<F>(&s, &c, &id, git::plan_commit(&b)).await?;
    let last = out.last().map(|f| f.stdout.as_slice()).unwrap_or_default();
    git::parse_sha(last)
        .map(|sha| Json(GitCommitReply { sha }))
        .map_err(|e| api(F, &id, e))
}

async fn sync<const F: u8>(
    s: &Shared,
    c: &Caller,
    id: &str,
    dir: Direction,
    b: &GitSyncBody,
) -> ApiResult<Json<GitSyncReply>> {
    let out = run::<F>(s, c, id, git::plan_sync(dir, b)).await?;
    Ok(Json(GitSyncReply {
        summary: out.first().map(git::summary).unwrap_or_default(),
    }))
}

pub async fn git_pull<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<GitSyncBody>,
) -> ApiResult<Json<GitSyncReply>> {
    sync::<F>(&s, &c, &id, Direction::Pull, &b).await
}

pub async fn git_push<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<GitSyncBody>,
) -> ApiResult<Json<GitSyncReply>> {
    sync::<F>(&s, &c, &id, Direction::Push, &b).await
}
