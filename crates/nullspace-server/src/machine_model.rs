//! The wire model of the machine API, as the published SDK sends and
//! parses it: 1.0.3 (`Machine`, `/v1/machines`) and 0.1.9 (`Sandbox`,
//! `/v1/sandboxes`); see `/work/shared/spec/nullspace-machines.md` and the
//! wheels. Rules the client enforces:
//! - `FileInfo`, `ProcessInfo` and snapshot objects are built with
//!   `**data`: an extra key crashes the client, so these have exactly its
//!   fields;
//! - in machine objects, `metadata`, `started_at`, `timeout_at`,
//!   `expires_at`, `timeout_action` are absent rather than `null`;
//! - the two prefixes differ in snapshot objects (`machine_id` vs
//!   `sandbox_id`) and error codes (`machine_*` vs `sandbox_*`).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Which client dialect a request speaks (its path prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    /// 1.0.3: `/v1/machines`, `machine_id`, `machine_*` codes.
    Machine,
    /// 0.1.9: `/v1/sandboxes`, `sandbox_id`, `sandbox_*` codes.
    Sandbox,
}

impl Flavor {
    pub fn noun(self) -> &'static str {
        match self {
            Flavor::Machine => "machine",
            Flavor::Sandbox => "sandbox",
        }
    }
    pub fn not_found(self) -> &'static str {
        match self {
            Flavor::Machine => "machine_not_found",
            Flavor::Sandbox => "sandbox_not_found",
        }
    }
    pub fn not_ready(self) -> &'static str {
        match self {
            Flavor::Machine => "machine_not_ready",
            Flavor::Sandbox => "sandbox_not_ready",
        }
    }
}

/// `POST /v1/machines` (and `/v1/sandboxes`). Every field the SDK sends;
/// unknown keys are ignored.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
pub struct CreateMachineBody {
    /// A template ref (`name`, `name:tag`, `team/name:tag`, `name:tb_…`,
    /// `tmpl_…`); `base` is the server's base template.
    #[serde(default)]
    pub template: Option<String>,
    /// Restore a machine snapshot instead of a template.
    #[serde(default)]
    pub snapshot_id: Option<String>,
    #[serde(default)]
    pub vcpus: Option<u32>,
    #[serde(default)]
    pub memory_mb: Option<u32>,
    /// At most the template's disk size (fixed when it was built).
    #[serde(default)]
    pub disk_mb: Option<u64>,
    /// Default 300000 (what the SDK sends).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// `destroy` (default) or `hibernate`.
    #[serde(default)]
    pub timeout_action: Option<String>,
    #[serde(default)]
    pub inactivity_timeout_ms: Option<u64>,
    #[serde(default)]
    pub auto_delete_after_ms: Option<u64>,
    #[serde(default)]
    pub ephemeral: Option<bool>,
    #[serde(default)]
    pub auto_resume: Option<bool>,
    /// Environment of the machine's commands (never of the start command).
    #[serde(default)]
    pub envs: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub metadata: Option<Map<String, Value>>,
    #[serde(default)]
    pub internet_access: Option<bool>,
    /// Default working directory of commands (absolute).
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    #[schemars(with = "Option<Value>")]
    pub network: Option<Value>,
    #[serde(default)]
    #[schemars(with = "Option<Value>")]
    pub desktop: Option<Value>,
    #[serde(default)]
    #[schemars(with = "Option<Value>")]
    pub volumes: Option<Value>,
    #[serde(default)]
    #[schemars(with = "Option<Value>")]
    pub warm_pool: Option<Value>,
    /// `{"on_timeout": "destroy"|"pause"}`.
    #[serde(default)]
    #[schemars(with = "Option<Value>")]
    pub lifecycle: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct MachineConfig {
    pub vcpus: u32,
    pub memory_mb: u32,
}

/// A machine as every endpoint that returns one answers (create, get,
/// list, resume, fork): the SDK's `MachineInfo` (also a valid
/// `MachineHandle` and `CreateMachineResponse`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct MachineInfo {
    pub id: String,
    /// `creating | running | paused | destroyed | error`.
    pub status: String,
    pub config: MachineConfig,
    /// The template ref the machine was created from.
    pub template: String,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    pub remaining_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_action: Option<String>,
    pub last_active_at: Option<String>,
    pub inactivity_timeout_ms: Option<u64>,
    pub auto_delete_after_ms: Option<u64>,
    pub ephemeral: bool,
    pub cwd: Option<String>,
    /// Paused: the snapshot `resume` restores; else the snapshot it was
    /// created from, if any.
    pub snapshot_id: Option<String>,
}

/// `GET /v1/machines`: one page.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct MachinePage {
    pub items: Vec<MachineInfo>,
    pub has_next: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
}

/// `DELETE /v1/machines/{id}`.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct Destroyed {
    pub id: String,
    pub status: String,
}

/// `POST …/exec`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
pub struct ExecBody {
    /// With `args`: the program; without, a shell line (`sh -c`).
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// The command is killed after this long (default 30; 0: no limit).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub envs: Option<BTreeMap<String, String>>,
    /// Run `command` (and the quoted `args`) under `sh -c`.
    #[serde(default)]
    pub shell: Option<bool>,
    /// Answer `{pid}` at once; output goes to the process's logs.
    #[serde(default)]
    pub background: Option<bool>,
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ExecResult {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct Spawned {
    pub pid: u32,
}

/// Exactly the SDK's `ProcessInfo`.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ProcessEntry {
    pub pid: u32,
    pub command: String,
    pub running: bool,
}

/// `GET …/processes/{pid}/logs`.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ProcessLogs {
    pub stdout: String,
    pub stderr: String,
    /// stdout followed by stderr.
    pub output: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

/// `POST …/files/write`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
pub struct WriteFileBody {
    pub path: String,
    pub content: String,
    /// `utf8` (default) or `base64`.
    #[serde(default)]
    pub encoding: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

/// `POST …/files/read`, `…/files/info` and the other path-only calls.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
pub struct PathBody {
    pub path: String,
    #[serde(default)]
    pub encoding: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct FileContent {
    pub content: String,
}

/// Exactly the SDK's `FileInfo` keys (optional ones only when known).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct FileInfo {
    pub name: String,
    pub path: String,
    pub is_dir: bool,
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub r#type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub permissions: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub modified_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct Exists {
    pub exists: bool,
}

/// `POST …/timeout`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
pub struct TimeoutBody {
    pub timeout_ms: u64,
    #[serde(default)]
    pub timeout_action: Option<String>,
}

/// The SDK's `TimeoutLease`.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct TimeoutLease {
    pub timeout_ms: u64,
    pub timeout_action: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining_ms: Option<i64>,
}

/// A snapshot as 1.0.3 parses it (exactly these keys).
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct MachineSnapshotInfo {
    pub id: String,
    pub machine_id: String,
    pub size_bytes: u64,
    pub created_at: String,
    pub metadata: Map<String, Value>,
}

/// A snapshot as 0.1.9 parses it (exactly these keys).
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct SandboxSnapshotInfo {
    pub id: String,
    pub sandbox_id: String,
    pub size_bytes: u64,
    pub created_at: String,
    pub metadata: Map<String, Value>,
}

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
    /// `destroy` or `hibernate`.
    pub timeout_action: String,
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
    /// The snapshot directory its disk sits on (template or machine snapshot).
    pub base_dir: String,
    /// The template snapshot at the root of its disk's chain (what a
    /// collector must keep while the machine lives).
    #[serde(default)]
    pub template_dir: String,
    /// Paused: the hibernation snapshot. Created from a snapshot: that one.
    #[serde(default)]
    pub snapshot_id: Option<String>,
    /// Forked from this machine.
    #[serde(default)]
    pub parent_id: Option<String>,
    /// The running VMM (pid, directory, sockets).
    #[serde(default)]
    pub vm: Option<nullspace_vm::sandbox::SandboxHandle>,
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

/// What the server keeps of a snapshot (the `record` column).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotDoc {
    pub id: String,
    /// The dialect of the machine it was taken from: `/v1/snapshots`
    /// answers in it unless the query names `machine_id` or `sandbox_id`.
    pub flavor: Flavor,
    pub machine_id: String,
    /// `snapshot`, `hibernate` or `fork`.
    pub kind: String,
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
