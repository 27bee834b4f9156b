//! API errors in the shape the SDK maps to exceptions: the `code` string
//! decides the exception class; `error_detail`, when present, carries
//! exactly the keys the SDK's strict parser accepts.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::model::FailureDetail;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    /// Boxed: most errors have none, and results stay small.
    pub detail: Option<Box<FailureDetail>>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code: code.to_string(),
            message: message.into(),
            detail: None,
        }
    }
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    /// Not found; also what another caller's private objects look like.
    pub fn template_not_found(r: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "template_not_found",
            format!("template {r:?} not found"),
        )
    }
    pub fn build_not_found(id: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "template_build_not_found",
            format!("build {id:?} not found"),
        )
    }
    pub fn conflict(code: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, code, message)
    }
    pub fn internal(message: impl std::fmt::Display) -> ApiError {
        tracing::error!("internal error: {message}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal server error",
        )
    }
    pub fn with_detail(mut self, d: FailureDetail) -> ApiError {
        self.detail = Some(Box::new(d));
        self
    }
}

impl From<nullspace_store::StoreError> for ApiError {
    fn from(e: nullspace_store::StoreError) -> ApiError {
        ApiError::internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.message, "code": self.code});
        if let Some(d) = self.detail {
            body["error_detail"] = serde_json::to_value(d).unwrap_or_default();
        }
        (self.status, axum::Json(body)).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
