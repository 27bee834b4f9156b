//! Request validation is the build plan's: [`plan`] normalises a request
//! with this server's context (the caller's namespace, its engines) through
//! `nullspace_model::build::plan::plan`, the one place every rule is
//! written. Build, validate, plan and retry all call it, so all four agree.

use axum::http::StatusCode;
use nullspace_model::build::plan::{self, BuildPlan, Issue, PlanContext};
use nullspace_model::build::status::{Backend, ErrorCode};

use crate::error::ApiError;
use crate::model::BuildRequest;

pub use nullspace_model::build::plan::MAX_CONTEXT_FILES;

/// The Dockerfile engines this server has, the default first.
#[derive(Debug, Clone, Default)]
pub struct Engines {
    pub available: Vec<Backend>,
}

/// The plan of `req` for a caller in `namespace`; `Err` lists every problem.
pub fn plan(
    req: &BuildRequest,
    namespace: &str,
    engines: &Engines,
) -> Result<BuildPlan, Vec<Issue>> {
    plan::plan(
        req,
        &PlanContext {
            namespace: Some(namespace),
            engines: Some(&engines.available),
        },
    )
}

/// One 400 for every problem: `file_upload_error` when a context file was
/// not uploaded (the SDK raises `FileUploadError`), else `invalid_request`.
pub fn rejection(issues: &[Issue]) -> ApiError {
    let msg = issues
        .iter()
        .map(|i| i.message.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    let code = if issues.iter().any(|i| i.code == ErrorCode::FileUploadError) {
        ErrorCode::FileUploadError
    } else {
        ErrorCode::InvalidRequest
    };
    ApiError::new(StatusCode::BAD_REQUEST, code.as_str(), msg)
}
