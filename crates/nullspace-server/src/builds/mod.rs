//! Builds, by concern:
//!
//! - [`lifecycle`]: creation (validation, sanitized persistence), durable
//!   logs, cancel requests, and every status write (terminal or not), each
//!   one a store transition checked against the build's owner.
//! - [`queue`]: the worker pool, claims with leases, lease renewal and the
//!   cancel poll, recovery of builds whose owner is gone, and shutdown.
//! - [`execute`]: running one build as stages (resolve base → engine or
//!   import → rootfs → build VM → publish).
//! - [`cache`]: the final-artifact cache key (resolved digests) and lookup.
//!
//! Status moves `waiting → building → ready | error | cancelled`, and a
//! running build can go back to `waiting` when its server stops or dies
//! (re-queued: it held no request-time credentials). A build's terminal
//! entry is written in the same transaction as its terminal status, and no
//! entry is accepted after it.

pub mod cache;
pub mod execute;
pub mod lifecycle;
pub mod queue;

use nullspace_model::build::status::BuildStatus as Status;
use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::model::OciMetadataOut;

pub use lifecycle::{
    append, cancel, create, fail, fail_detail, fail_with, load, log, parse_record, plausible_id,
    save,
};

/// Whether a stored status (a row's column) is terminal.
pub fn is_terminal(status: &str) -> bool {
    Status::parse(status).is_some_and(Status::is_terminal)
}

/// What a ready build produced, stored in the artifact store (runtime env
/// values live here, never in API responses).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArtifactManifest {
    pub rootfs: String,
    pub rootfs_size: u64,
    pub env: BTreeMap<String, String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    pub start_cmd: Option<String>,
    pub readiness: Option<Value>,
    pub image: Value,
    pub oci: OciMetadataOut,
    /// The build VM's snapshot directory (memory + disk), when built with
    /// one: relative to the artifact store (`snapshots/<build>.<attempt>`),
    /// so a moved data directory still restores (absolute in records of
    /// older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// The packages of the final disk (`nullspace_sbom::Inventory` as JSON,
    /// an artifact digest), listed when the build ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sbom: Option<String>,
    /// Why the packages could not be listed (a corrupt package database).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sbom_error: Option<String>,
}

/// Why a running build was stopped before it ended by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A caller cancelled it (on this server or another): it ends
    /// `cancelled`.
    Cancel,
    /// Another server recovered it (this one stopped renewing the lease in
    /// time): this worker stops and writes nothing more.
    LeaseLost,
    /// This server is shutting down: the build is handed back (re-queued,
    /// or `interrupted` when it held request-time credentials).
    Shutdown,
}

/// A build this server is running: its one cancellation token, passed by
/// reference through the worker to the engine, the importer and the VM.
#[derive(Debug)]
pub struct RunHandle {
    pub token: CancellationToken,
    reason: OnceLock<StopReason>,
    /// When the worker registered it (a lease check that started earlier
    /// cannot have seen the claim).
    pub since: Instant,
}

impl RunHandle {
    pub fn new() -> RunHandle {
        RunHandle {
            token: CancellationToken::new(),
            reason: OnceLock::new(),
            since: Instant::now(),
        }
    }

    /// Stops the build; the first reason given wins.
    pub fn stop(&self, reason: StopReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    pub fn reason(&self) -> Option<StopReason> {
        self.reason.get().copied()
    }
}

/// A manifest's snapshot directory: relative to the artifact store, or
/// absolute (records of older versions).
pub fn snapshot_path(state: &crate::state::Shared, snapshot: &str) -> std::path::PathBuf {
    state.config.data_dir.join("artifacts").join(snapshot)
}

impl Default for RunHandle {
    fn default() -> Self {
        RunHandle::new()
    }
}

/// How a build's execution ended when it did not produce an artifact.
#[derive(Debug)]
pub enum Failure {
    /// Its token was cancelled (see [`RunHandle::reason`] for why).
    Cancelled,
    Failed {
        phase: &'static str,
        message: String,
        retryable: bool,
        action: &'static str,
        /// `build_error`, or `file_upload_error` for context failures.
        code: &'static str,
        /// The step that failed, when one did.
        step: Option<FailedStep>,
    },
}

impl Failure {
    /// The one line a caller outside a run shows (a dry-run's "unknown").
    pub fn message(&self) -> String {
        match self {
            Failure::Cancelled => "cancelled".to_string(),
            Failure::Failed { message, .. } => message.clone(),
        }
    }
}

/// A failed step: its 1-based index among the plan's steps (the SDK's
/// `error_detail.step_index`) and how many steps the plan has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailedStep {
    pub index: i64,
    pub total: i64,
}

/// A build context that cannot be used (not uploaded, not kept, not
/// materialisable): the spec's `file_upload_error`, never retryable.
pub fn upload_failed(message: impl Into<String>, action: &'static str) -> Failure {
    Failure::Failed {
        phase: "blob_upload",
        message: message.into(),
        retryable: false,
        action,
        code: "file_upload_error",
        step: None,
    }
}

pub fn failed(
    phase: &'static str,
    message: impl Into<String>,
    retryable: bool,
    action: &'static str,
) -> Failure {
    Failure::Failed {
        phase,
        message: message.into(),
        retryable,
        action,
        code: "build_error",
        step: None,
    }
}
