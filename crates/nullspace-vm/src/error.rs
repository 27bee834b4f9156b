use std::time::Duration;

/// Errors with a stable `code()` for build records (`error_detail.phase`).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The VM did not boot or its agent did not answer in time; the VMM
    /// process has been killed.
    #[error("vm_create: {message}")]
    VmCreate {
        message: String,
        console_tail: String,
    },
    /// The image cannot boot as a template (e.g. no /bin/sh).
    #[error("invalid_rootfs: {0}")]
    InvalidRootfs(String),
    /// The start command exited (or could not start) before readiness.
    #[error("readiness: start command {detail}")]
    StartExited { detail: String, output: String },
    /// The readiness probe did not succeed within its timeout.
    #[error("readiness_timeout: probe did not succeed within {timeout:?}: {last}")]
    ReadinessTimeout { timeout: Duration, last: String },
    /// A build step (native backend) failed: its 0-based index in the step
    /// list (`None`: the runtime settings applied after the steps), the
    /// action, the exit code (None: killed, or it could not run) and the
    /// last lines of its output. The VM has been killed. The message counts
    /// steps from 1, as the build API does.
    #[error(
        "{} ({action}) failed{}: {tail}",
        index.map(|i| format!("step {}", i + 1)).unwrap_or_else(|| "the runtime setting".into()),
        exit_code.map(|c| format!(" with exit code {c}")).unwrap_or_default()
    )]
    StepFailed {
        index: Option<usize>,
        action: String,
        exit_code: Option<i32>,
        tail: String,
    },
    /// The host↔guest channel failed (connection, timeout, protocol).
    #[error("agent: {0}")]
    Agent(String),
    /// The guest agent refused or failed a request (`code` tells why:
    /// `not_found`, `permission_denied`, `busy` …).
    #[error("agent: {op}: {message}")]
    Guest {
        op: String,
        code: nullspace_model::agent::ErrorCode,
        message: String,
    },
    /// The caller's cancellation token fired: what the call started in the
    /// guest has been told to stop; for VM calls (build, restore, snapshot)
    /// its QEMU processes are gone and its directories removed.
    #[error("cancelled")]
    Cancelled,
    #[error("snapshot: {0}")]
    Snapshot(String),
    #[error("restore: {0}")]
    Restore(String),
    #[error("kernel: {0}")]
    Kernel(String),
    /// A size the VM cannot take (outside its ceiling), or that the guest
    /// did not reach.
    #[error("size: {0}")]
    Size(String),
    /// The snapshot cannot be restored by this nullspace or this host's
    /// QEMU (format version, QEMU major version): one line naming the
    /// snapshot and saying to rebuild it.
    #[error("snapshot {dir}: {detail}")]
    Incompatible { dir: String, detail: String },
    /// A snapshot file is missing or differs from its manifest (size,
    /// sha256): one line naming the file.
    #[error("snapshot {dir}: {file}: {detail}")]
    Corrupt {
        dir: String,
        file: String,
        detail: String,
    },
    /// A run directory's records (lock, pidfile) could not be kept.
    #[error(transparent)]
    Process(#[from] crate::process::ProcessError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl VmError {
    pub fn code(&self) -> &'static str {
        match self {
            VmError::VmCreate { .. } => "vm_create",
            VmError::InvalidRootfs(_) => "invalid_rootfs",
            VmError::StartExited { .. } => "readiness",
            VmError::ReadinessTimeout { .. } => "readiness_timeout",
            VmError::StepFailed { .. } => "step",
            VmError::Agent(_) | VmError::Guest { .. } => "agent",
            VmError::Cancelled => "cancelled",
            VmError::Snapshot(_) => "snapshot",
            VmError::Restore(_) => "restore",
            VmError::Kernel(_) => "kernel",
            VmError::Size(_) => "size",
            VmError::Incompatible { .. } => "snapshot_incompatible",
            VmError::Corrupt { .. } => "snapshot_corrupt",
            VmError::Process(_) | VmError::Io { .. } => "io",
        }
    }

    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
        let context = context.into();
        move |source| VmError::Io { context, source }
    }
}
