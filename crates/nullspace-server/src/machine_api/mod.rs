//! The machine API's edge: handlers for both SDK dialects. Each handler is
//! instantiated twice, for `/v1/machines` (1.0.3) and `/v1/sandboxes`
//! (0.1.9): the const parameter is the [`Flavor`] (see `http::routes`, the
//! one route table). Here are parameters, status codes, the dialect's
//! error codes and shapes ([`dialect`]), and the WebSocket channels; the
//! logic is in [`crate::machines`].
//!
//! | module | its one job |
//! |---|---|
//! | [`lifecycle`] | create, list, get, delete, timeout, pause, resume, fork, snapshot |
//! | [`commands`] | exec, processes, their logs, kill |
//! | [`files`] | the file routes: read, write, info, exists, list |
//! | [`file_ops`] | the other file routes (remove … replace) and metrics |
//! | [`snapshots`] | `/v1/snapshots` |
//! | [`uploads`] | upload sessions and signed transfer URLs |
//! | [`events`] | lifecycle events: the list and the `…/lifecycle/ws` stream |
//! | [`git`] | the `…/git/*` routes |
//! | [`stdin`] | `…/processes/{pid}/stdin` |
//! | [`ws`] | the WebSocket and its exec channel |
//! | [`pty`] | terminals (the pty routes and channel) and directory watches (`file_watch`) |
//! | [`ports`] | ports and preview URLs (`…/host`, `…/ports/*`, `…/preview-urls`) |
//! | [`ssh`] | `…/ssh-access`: SSH grants and where the endpoint is reached |
//! | [`not_offered`] | what answers a path no route serves (501, JSON 404/405) |

pub mod commands;
pub mod egress;
pub mod events;
pub mod file_ops;
pub mod files;
pub mod git;
pub mod lifecycle;
pub mod not_offered;
pub mod ports;
pub mod pty;
pub mod snapshots;
pub mod ssh;
pub mod stdin;
pub mod uploads;
pub mod volumes;
pub mod warm_pools;
pub mod ws;

pub use commands::*;
pub use events::*;
pub use file_ops::*;
pub use files::*;
pub use git::*;
pub use lifecycle::*;
pub use ports::*;
pub use pty::{pty_get, pty_kill, pty_list, pty_resize};
pub use snapshots::*;
pub use stdin::*;
pub use uploads::*;
pub use ws::ws;

use std::collections::HashMap;

use axum::Json;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

use crate::error::{ApiError, ApiResult};
use crate::guest::GuestError;
use crate::machine_model::{
    Flavor, MachineSnapshotInfo, SandboxSnapshotInfo, SnapshotDoc, SnapshotInfo,
};
use crate::machines::MachineError;
use crate::model::iso;

pub const MACHINE: u8 = 0;
pub const SANDBOX: u8 = 1;

pub(crate) const fn flavor(f: u8) -> Flavor {
    if f == SANDBOX {
        Flavor::Sandbox
    } else {
        Flavor::Machine
    }
}

/// An option or operation this server does not offer: `501` with code
/// `not_implemented`, which the SDK raises as its `NotImplementedError`.
pub fn not_implemented(m: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::NOT_IMPLEMENTED, "not_implemented", m)
}

/// A machine error as the client's dialect says it.
pub fn dialect(f: Flavor, e: MachineError) -> ApiError {
    let noun = f.noun();
    // Messages name the object as the client knows it.
    let say = |m: String| m.replacen("machine ", &format!("{noun} "), 1);
    match e {
        MachineError::NotFound(id) => ApiError::new(
            StatusCode::NOT_FOUND,
            f.not_found(),
            format!("{noun} {id:?} not found"),
        ),
        e @ MachineError::Ended { .. } => {
            ApiError::new(StatusCode::NOT_FOUND, f.not_found(), say(e.to_string()))
        }
        e @ (MachineError::NotReady { .. } | MachineError::Illegal { .. }) => {
            ApiError::new(StatusCode::CONFLICT, f.not_ready(), say(e.to_string()))
        }
        e @ MachineError::InTransition { .. } => {
            ApiError::conflict("transition_in_progress", say(e.to_string()))
        }
        MachineError::Conflict { code, message } => ApiError::conflict(code, say(message)),
        MachineError::Invalid(m) => ApiError::invalid(m),
        MachineError::Incompatible(m) => {
            ApiError::new(StatusCode::BAD_REQUEST, "incompatible_snapshot", m)
        }
        MachineError::NotImplemented(m) => not_implemented(m),
        e @ MachineError::SnapshotNotFound(_) => {
            ApiError::new(StatusCode::NOT_FOUND, "snapshot_not_found", e.to_string())
        }
        e @ MachineError::GrantNotFound(_) => ApiError::new(
            StatusCode::NOT_FOUND,
            "preview_grant_not_found",
            e.to_string(),
        ),
        MachineError::ProcessNotFound(m) => {
            ApiError::new(StatusCode::NOT_FOUND, "process_not_found", m)
        }
        MachineError::ExecTimeout(s) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "exec_timeout",
            MachineError::ExecTimeout(s).to_string(),
        ),
        MachineError::Template(e) => e,
        MachineError::Guest { id, err } => guest(f, &id, err),
        MachineError::TemplateUnavailable(m) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "template_unavailable", m)
        }
        e @ MachineError::Fenced(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "node_fenced",
            e.to_string(),
        ),
        MachineError::Capacity(m) => {
            // Not 429: the client retries those; this does not clear soon.
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "capacity_exceeded", m)
        }
        e @ MachineError::Vm { .. } => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "vm_error",
            say(e.to_string()),
        ),
        MachineError::Store(e) => ApiError::internal(e),
        MachineError::Internal(m) => ApiError::internal(m),
    }
}

/// What a guest failure means for the caller.
fn guest(f: Flavor, id: &str, e: GuestError) -> ApiError {
    let noun = f.noun();
    match e {
        GuestError::Unsupported(_) => not_implemented(e.to_string()),
        GuestError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, "file_not_found", m),
        GuestError::Denied(m) => ApiError::new(StatusCode::FORBIDDEN, "permission_denied", m),
        GuestError::Refused { code, message } => {
            use nullspace_model::agent::ErrorCode as C;
            let (status, code) = match code {
                C::NotADirectory => (StatusCode::BAD_REQUEST, "not_a_directory"),
                C::IsADirectory => (StatusCode::BAD_REQUEST, "is_a_directory"),
                C::AlreadyExists => (StatusCode::CONFLICT, "file_conflict"),
                C::DirectoryNotEmpty => (StatusCode::CONFLICT, "directory_not_empty"),
                C::NameTooLong => (StatusCode::BAD_REQUEST, "name_too_long"),
                C::FileTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "file_too_large"),
                _ => (StatusCode::BAD_REQUEST, "invalid_request"),
            };
            ApiError::new(status, code, message)
        }
        GuestError::Gone(m) => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "exec_failed",
            format!("{noun} {id}: {m}"),
        ),
        GuestError::Timeout(t) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "exec_timeout",
            format!("{noun} {id}: the guest did not answer within {t:?}"),
        ),
        GuestError::Failed(m) => ApiError::invalid(m),
    }
}

/// `.speak(F)`: a core result in the handler's dialect.
pub trait Speak<T> {
    fn speak(self, f: u8) -> ApiResult<T>;
}

impl<T> Speak<T> for Result<T, MachineError> {
    fn speak(self, f: u8) -> ApiResult<T> {
        self.map_err(|e| dialect(flavor(f), e))
    }
}

/// A snapshot as the dialect shows it (`machine_id` or `sandbox_id`).
pub fn snapshot_info(doc: &SnapshotDoc, f: Flavor) -> SnapshotInfo {
    match f {
        Flavor::Machine => SnapshotInfo::Machine(MachineSnapshotInfo {
            id: doc.id.clone(),
            machine_id: doc.machine_id.clone(),
            size_bytes: doc.size_bytes,
            created_at: iso(doc.created_at),
            metadata: doc.metadata.clone(),
        }),
        Flavor::Sandbox => SnapshotInfo::Sandbox(SandboxSnapshotInfo {
            id: doc.id.clone(),
            sandbox_id: doc.machine_id.clone(),
            size_bytes: doc.size_bytes,
            created_at: iso(doc.created_at),
            metadata: doc.metadata.clone(),
        }),
    }
}

/// The `Idempotency-Key` header (both dialects and E2B's create).
pub(crate) fn idempotency_key(h: &HeaderMap) -> ApiResult<Option<String>> {
    match h.get("idempotency-key") {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim().to_string()))
            .map_err(|_| ApiError::invalid("Idempotency-Key must be visible ASCII")),
    }
}

fn json_status<T: serde::Serialize>(status: StatusCode, v: T) -> Response {
    (status, Json(v)).into_response()
}

fn uint<T: std::str::FromStr>(q: &HashMap<String, String>, k: &str) -> ApiResult<Option<T>> {
    q.get(k)
        .map(|v| {
            v.parse::<T>()
                .map_err(|_| ApiError::invalid(format!("{k} must be a non-negative integer")))
        })
        .transpose()
}

fn json_object(q: &HashMap<String, String>, k: &str) -> ApiResult<Option<Map<String, Value>>> {
    q.get(k)
        .map(|v| {
            serde_json::from_str::<Map<String, Value>>(v)
                .map_err(|_| ApiError::invalid(format!("{k} must be a JSON object")))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nullspace_model::machine::MachineStatus;

    #[test]
    fn each_dialect_names_its_own_noun_and_codes() {
        let ended = || MachineError::Ended {
            id: "mch_1".into(),
            status: MachineStatus::Destroyed,
            reason: Some("deleted".into()),
        };
        let m = dialect(Flavor::Machine, ended());
        assert_eq!(
            (m.status, m.code.as_str()),
            (StatusCode::NOT_FOUND, "machine_not_found")
        );
        assert_eq!(m.message, "machine mch_1 is destroyed (deleted)");
        let s = dialect(Flavor::Sandbox, ended());
        assert_eq!(s.code, "sandbox_not_found");
        assert_eq!(s.message, "sandbox mch_1 is destroyed (deleted)");
        let n = dialect(
            Flavor::Sandbox,
            MachineError::not_ready("mch_1", "is paused"),
        );
        assert_eq!(
            (n.status, n.code.as_str()),
            (StatusCode::CONFLICT, "sandbox_not_ready")
        );
        let ni = dialect(
            Flavor::Machine,
            MachineError::NotImplemented("volumes".into()),
        );
        assert_eq!(
            (ni.status, ni.code.as_str()),
            (StatusCode::NOT_IMPLEMENTED, "not_implemented")
        );
    }
}
