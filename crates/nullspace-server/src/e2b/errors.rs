//! E2B's two error shapes. The control plane and `/files` answer
//! `{"code": <HTTP status>, "message"}` (the SDK reads `message`); the
//! Connect services answer `{"code": "not_found", "message"}` with the
//! HTTP status Connect gives that code. Both come from the machine API's
//! own mapping ([`crate::machine_api::dialect`]), so a machine error means
//! the same on every API.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::ApiError;
use crate::machine_model::Flavor;
use crate::machines::MachineError;

/// A control-plane (or `/files`) error.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status}: {message}")]
pub struct RestError {
    pub status: StatusCode,
    pub message: String,
}

impl RestError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> RestError {
        RestError {
            status,
            message: message.into(),
        }
    }
}

impl From<ApiError> for RestError {
    fn from(e: ApiError) -> RestError {
        RestError::new(e.status, e.message)
    }
}

impl From<MachineError> for RestError {
    fn from(e: MachineError) -> RestError {
        crate::machine_api::dialect(Flavor::Sandbox, e).into()
    }
}

impl IntoResponse for RestError {
    fn into_response(self) -> Response {
        let body = json!({"code": self.status.as_u16(), "message": self.message});
        (self.status, Json(body)).into_response()
    }
}

/// A Connect error: its code by name.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct RpcError {
    pub code: &'static str,
    pub message: String,
}

impl RpcError {
    pub fn new(code: &'static str, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> RpcError {
        RpcError::new("invalid_argument", message)
    }

    pub fn not_found(message: impl Into<String>) -> RpcError {
        RpcError::new("not_found", message)
    }

    /// The Connect code of an HTTP status (the inverse of Connect's table).
    pub fn from_status(status: StatusCode, message: impl Into<String>) -> RpcError {
        let code = match status.as_u16() {
            400 | 413 | 422 => "invalid_argument",
            401 => "unauthenticated",
            403 => "permission_denied",
            404 => "not_found",
            408 | 504 => "deadline_exceeded",
            409 => "already_exists",
            412 => "failed_precondition",
            429 => "resource_exhausted",
            499 => "canceled",
            501 => "unimplemented",
            502 | 503 => "unavailable",
            _ => "internal",
        };
        RpcError::new(code, message)
    }

    /// The HTTP status of a unary answer with this code.
    pub fn status(&self) -> StatusCode {
        match self.code {
            "canceled" => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            "invalid_argument" | "failed_precondition" | "out_of_range" => StatusCode::BAD_REQUEST,
            "unauthenticated" => StatusCode::UNAUTHORIZED,
            "permission_denied" => StatusCode::FORBIDDEN,
            "not_found" => StatusCode::NOT_FOUND,
            "already_exists" | "aborted" => StatusCode::CONFLICT,
            "resource_exhausted" => StatusCode::TOO_MANY_REQUESTS,
            "unimplemented" => StatusCode::NOT_IMPLEMENTED,
            "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            "deadline_exceeded" => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"code": self.code, "message": self.message})
    }
}

impl From<MachineError> for RpcError {
    fn from(e: MachineError) -> RpcError {
        let a = crate::machine_api::dialect(Flavor::Sandbox, e);
        // A machine that is not running (paused, in a transition) is a
        // precondition, not an existing file.
        if a.status == StatusCode::CONFLICT && a.code != "file_conflict" {
            return RpcError::new("failed_precondition", a.message);
        }
        RpcError::from_status(a.status, a.message)
    }
}

impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        (self.status(), Json(self.body())).into_response()
    }
}
