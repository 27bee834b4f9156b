//! What can go wrong with a machine operation, in the domain's terms. The
//! HTTP status, the SDK's error code and the dialect's noun (`machine` or
//! `sandbox`) are chosen at the edge (`machine_api::dialect`), never here.

use nullspace_model::machine::{IllegalTransition, MachineStatus};

use crate::error::ApiError;
use crate::guest::GuestError;
use crate::runtime::RuntimeError;

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// No such machine in the caller's namespace (another namespace's
    /// machines look exactly like this).
    #[error("machine {0:?} not found")]
    NotFound(String),
    /// Destroyed or failed: it can never serve a request again.
    #[error("machine {id} is {status}{}", reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default())]
    Ended {
        id: String,
        status: MachineStatus,
        reason: Option<String>,
    },
    /// It exists but cannot do this now (paused, still being created).
    #[error("machine {id} {why}")]
    NotReady { id: String, why: String },
    /// Another transition of it is under way; the client may retry.
    #[error("machine {id} {why}")]
    InTransition { id: String, why: String },
    /// A transition the state machine refuses (a lost race, read again).
    #[error("machine {id}: {err}")]
    Illegal { id: String, err: IllegalTransition },
    /// The request conflicts with where or what something is (`code`:
    /// `machine_conflict`, `snapshot_conflict`, `snapshot_in_use`,
    /// `template_build_conflict`, `rebuild_required`).
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// The request breaks a rule (one line naming the field).
    #[error("{0}")]
    Invalid(String),
    /// The asked shape differs from what the snapshot can restore.
    #[error("{0}")]
    Incompatible(String),
    /// Something this server does not offer.
    #[error("{0}")]
    NotImplemented(String),
    #[error("snapshot {0:?} not found")]
    SnapshotNotFound(String),
    #[error("preview grant {0:?} not found")]
    GrantNotFound(String),
    #[error("{0}")]
    ProcessNotFound(String),
    /// A foreground command outlived its `timeout_secs` and was killed.
    #[error("the command ran longer than timeout_secs ({0} s) and was killed")]
    ExecTimeout(u64),
    /// Resolving the template failed (the template API's own error).
    #[error("{}", .0.message)]
    Template(ApiError),
    /// The guest agent failed or refused.
    #[error("machine {id}: {err}")]
    Guest { id: String, err: GuestError },
    /// The node has no room for it.
    #[error("{0}")]
    Capacity(String),
    /// This node was fenced (another process registered it, or it was
    /// declared dead): it takes no new machines.
    /// The template is on another node and could not be fetched now (the
    /// artifact registry is unreachable, or what it holds did not verify).
    #[error("{0}")]
    TemplateUnavailable(String),
    #[error("node {0} was fenced and takes no new machines; send the request to another node")]
    Fenced(String),
    /// The VM could not be started, snapshotted or ended.
    #[error("machine {id}: {reason}")]
    Vm { id: String, reason: String },
    #[error("{0}")]
    Store(#[from] nullspace_store::StoreError),
    /// A record this server cannot read.
    #[error("{0}")]
    Internal(String),
}

pub type MachineResult<T> = Result<T, MachineError>;

impl MachineError {
    pub fn guest(id: &str, err: GuestError) -> MachineError {
        MachineError::Guest {
            id: id.to_string(),
            err,
        }
    }

    pub fn not_ready(id: &str, why: impl Into<String>) -> MachineError {
        MachineError::NotReady {
            id: id.to_string(),
            why: why.into(),
        }
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> MachineError {
        MachineError::Conflict {
            code,
            message: message.into(),
        }
    }

    pub fn runtime(id: &str, e: RuntimeError) -> MachineError {
        match e {
            RuntimeError::Capacity(m) => MachineError::Capacity(m),
            RuntimeError::Busy(m) => MachineError::not_ready(id, m),
            other => MachineError::Vm {
                id: id.to_string(),
                reason: other.to_string(),
            },
        }
    }
}

impl From<ApiError> for MachineError {
    /// Only the template API's errors come this way (resolving refs).
    fn from(e: ApiError) -> MachineError {
        MachineError::Template(e)
    }
}
