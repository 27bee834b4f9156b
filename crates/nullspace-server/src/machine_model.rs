//! The machine API's server-side records. The wire model (request and
//! response bodies, both SDK dialects) is `nullspace_model::machine`,
//! shared with the CLI, and re-exported here.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use nullspace_model::machine::*;

/// What the server keeps of a machine (the `record` column). Env values
/// are not here: they live in the machine's directory and its snapshots
/// (files of mode 0600), next to the memory and disk they belong with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineDoc {
    pub id: String,
    pub flavor: Flavor,
    /// The ref as the client gave it.
    pub template: String,
    pub template_id: String,
    pub build_id: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub created_at: i64,
    #[serde(default)]
    pub started_at: Option<i64>,
    pub timeout_ms: u64,
    pub timeout_action: TimeoutAction,
    /// Running: when the timeout fires.
    #[serde(default)]
    pub timeout_at: Option<i64>,
    #[serde(default)]
    pub inactivity_timeout_ms: Option<u64>,
    #[serde(default)]
    pub auto_delete_after_ms: Option<u64>,
    #[serde(default)]
    pub ephemeral: bool,
    #[serde(default)]
    pub auto_resume: bool,
    #[serde(default)]
    pub last_active_at: i64,
    #[serde(default)]
    pub paused_at: Option<i64>,
    #[serde(default)]
    pub metadata: Map<String, Value>,
    #[serde(default)]
    pub env_keys: Vec<String>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default = "yes")]
    pub internet_access: bool,
    /// The egress policy asked for (`None`: all, if `internet_access`);
    /// see `machines::egress::effective`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<nullspace_model::machine::egress::EgressPolicy>,
    /// Who may reach its ports (`machines::ports`).
    #[serde(default)]
    pub access: crate::machines::ports::PortAccess,
    /// The snapshot directory its disk sits on (template or machine
    /// snapshot), relative to the data directory (absolute in records of
    /// older servers; both resolve, see `machines::record::resolve`).
    pub base_dir: String,
    /// The template snapshot at the root of its disk's chain (what a
    /// collector must keep while the machine lives), likewise relative.
    #[serde(default)]
    pub template_dir: String,
    /// Paused: the hibernation snapshot. Created from a snapshot: that one.
    #[serde(default)]
    pub snapshot_id: Option<String>,
    /// Forked from this machine.
    #[serde(default)]
    pub parent_id: Option<String>,
    /// The running VMM. Its directory and sockets follow from the id
    /// (`Runtime::handle_of`), so the record holds no path.
    #[serde(default)]
    pub vm: Option<VmRecord>,
    /// The Idempotency-Key of its create (released if the create fails,
    /// so that a retry starts afresh).
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Why it ended (destroyed or error).
    #[serde(default)]
    pub ended_reason: Option<String>,
    #[serde(default)]
    pub ended_at: Option<i64>,
}

fn yes() -> bool {
    true
}

/// A running machine's VMM as its record keeps it. (Older records held
/// the whole handle with absolute paths: the extra keys are ignored.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub pid: u32,
}

/// What the server keeps of a snapshot (the `record` column).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotDoc {
    pub id: String,
    /// The dialect of the machine it was taken from: `/v1/snapshots`
    /// answers in it unless the query names `machine_id` or `sandbox_id`.
    pub flavor: Flavor,
    pub machine_id: String,
    pub kind: SnapshotKind,
    /// Relative to the data directory (absolute in older records).
    pub dir: String,
    /// The template snapshot at the root of its disk's chain.
    #[serde(default)]
    pub template_dir: String,
    pub size_bytes: u64,
    pub created_at: i64,
    /// The source machine's shape and template (a machine created from
    /// the snapshot takes them).
    pub template: String,
    pub template_id: String,
    pub build_id: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub env_keys: Vec<String>,
    #[serde(default)]
    pub metadata: Map<String, Value>,
}
