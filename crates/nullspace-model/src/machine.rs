//! The wire model of the machine API, as the published SDK sends and
//! parses it: 1.0.3 (`Machine`, `/v1/machines`) and 0.1.9 (`Sandbox`,
//! `/v1/sandboxes`); see `/work/shared/spec/nullspace-machines.md` and the
//! wheels. The server parses its requests and writes its answers with these
//! types, and `nullspace machine` sends and reads the same ones. Rules the
//! client enforces:
//! - `FileInfo`, `ProcessInfo` and snapshot objects are built with
//!   `**data`: an extra key crashes the client, so these have exactly its
//!   fields;
//! - in machine objects, `metadata`, `started_at`, `timeout_at`,
//!   `expires_at`, `timeout_action` are absent rather than `null`;
//! - the two prefixes differ in snapshot objects (`machine_id` vs
//!   `sandbox_id`) and error codes (`machine_*` vs `sandbox_*`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub mod egress;
pub mod git;
pub mod lifecycle;
pub mod ports;
pub mod ssh;
pub mod stdin;
pub mod volume;
pub mod warm_pool;

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

/// A machine's status, as the SDK spells it. Transitions are checked
/// ([`MachineStatus::to`]): `creating` also marks a paused machine being
/// resumed, so that two resumes never restore it twice.
///
/// ```text
/// creating ──▶ running ⇄ paused      (paused ─▶ creating ─▶ running: a resume;
///    │            │        │          creating ─▶ paused: that resume failed)
///    └────────────┴────────┴──▶ destroyed | error   (final)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum MachineStatus {
    Creating,
    Running,
    Paused,
    Destroyed,
    Error,
}

/// A transition [`MachineStatus::to`] refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a {from} machine cannot become {to}")]
pub struct IllegalTransition {
    pub from: MachineStatus,
    pub to: MachineStatus,
}

/// A status name that is none of [`MachineStatus::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("status {0:?} must be one of creating, running, paused, destroyed, error")]
pub struct UnknownStatus(pub String);

impl MachineStatus {
    pub const ALL: [MachineStatus; 5] = [
        MachineStatus::Creating,
        MachineStatus::Running,
        MachineStatus::Paused,
        MachineStatus::Destroyed,
        MachineStatus::Error,
    ];
    /// What `GET /v1/machines` lists without a `state` filter.
    pub const LIVE: [MachineStatus; 3] = [
        MachineStatus::Creating,
        MachineStatus::Running,
        MachineStatus::Paused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MachineStatus::Creating => "creating",
            MachineStatus::Running => "running",
            MachineStatus::Paused => "paused",
            MachineStatus::Destroyed => "destroyed",
            MachineStatus::Error => "error",
        }
    }

    /// Destroyed and error machines never change again.
    pub fn is_final(self) -> bool {
        matches!(self, MachineStatus::Destroyed | MachineStatus::Error)
    }

    /// Whether a machine in this status may move to `next`.
    pub fn can_become(self, next: MachineStatus) -> bool {
        use MachineStatus::*;
        match (self, next) {
            (Destroyed | Error, _) => false,
            (_, Destroyed | Error) => true,
            (Creating, Running | Paused) => true,
            (Running, Paused) => true,
            (Paused, Creating) => true,
            _ => false,
        }
    }

    /// `next`, when the transition is allowed.
    pub fn to(self, next: MachineStatus) -> Result<MachineStatus, IllegalTransition> {
        if self.can_become(next) {
            Ok(next)
        } else {
            Err(IllegalTransition {
                from: self,
                to: next,
            })
        }
    }
}

impl std::fmt::Display for MachineStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for MachineStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MachineStatus::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

/// What happens when a running machine's timeout fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum TimeoutAction {
    #[default]
    Destroy,
    /// Snapshot memory and disk, end the VM: the machine is `paused`.
    Hibernate,
}

impl TimeoutAction {
    pub fn as_str(self) -> &'static str {
        match self {
            TimeoutAction::Destroy => "destroy",
            TimeoutAction::Hibernate => "hibernate",
        }
    }

    /// `timeout_action` as the SDK sends it, or `lifecycle.on_timeout`
    /// (`destroy`, `pause`; `hibernate` accepted too).
    pub fn parse(s: &str) -> Option<TimeoutAction> {
        match s {
            "destroy" => Some(TimeoutAction::Destroy),
            "hibernate" | "pause" => Some(TimeoutAction::Hibernate),
            _ => None,
        }
    }
}

impl std::fmt::Display for TimeoutAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a machine snapshot exists: a user's (`snapshot`, kept until
/// deleted), or the server's own (`hibernate`: a paused machine's state;
/// `fork`: a fork's source), collected when nothing uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    Snapshot,
    Hibernate,
    Fork,
}

impl SnapshotKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::Snapshot => "snapshot",
            SnapshotKind::Hibernate => "hibernate",
            SnapshotKind::Fork => "fork",
        }
    }
    /// The server's own snapshots, which it deletes when unused.
    pub fn is_internal(self) -> bool {
        !matches!(self, SnapshotKind::Snapshot)
    }
}

/// `POST /v1/machines` (and `/v1/sandboxes`). Every field the SDK sends;
/// unknown keys are ignored.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CreateMachineBody {
    /// A template ref (`name`, `name:tag`, `team/name:tag`, `name:tb_…`,
    /// `tmpl_…`); `base` is the server's base template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Restore a machine snapshot instead of a template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u32>,
    /// At most the template's disk size (fixed when it was built).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mb: Option<u64>,
    /// Default 300000 (what the SDK sends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// `destroy` (default) or `hibernate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inactivity_timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_delete_after_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_resume: Option<bool>,
    /// Environment of the machine's commands (never of the start command).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envs: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internet_access: Option<bool>,
    /// Default working directory of commands (absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(with = "Option<Value>"))]
    pub network: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(with = "Option<Value>"))]
    pub desktop: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(with = "Option<Value>"))]
    pub volumes: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(with = "Option<Value>"))]
    pub warm_pool: Option<Value>,
    /// `{"on_timeout": "destroy"|"pause"}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(with = "Option<Value>"))]
    pub lifecycle: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MachineConfig {
    pub vcpus: u32,
    pub memory_mb: u32,
}

/// A machine as every endpoint that returns one answers (create, get,
/// list, resume, fork): the SDK's `MachineInfo` (also a valid
/// `MachineHandle` and `CreateMachineResponse`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MachineInfo {
    pub id: String,
    pub status: MachineStatus,
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
    pub timeout_action: Option<TimeoutAction>,
    pub last_active_at: Option<String>,
    pub inactivity_timeout_ms: Option<u64>,
    pub auto_delete_after_ms: Option<u64>,
    pub ephemeral: bool,
    pub cwd: Option<String>,
    /// Paused: the snapshot `resume` restores; else the snapshot it was
    /// created from, if any.
    pub snapshot_id: Option<String>,
    /// A private machine's (`network.allow_public_traffic: false`): the
    /// `x-nullspace-traffic-access-token` its preview URLs need.
    #[serde(default)]
    pub traffic_access_token: Option<String>,
    /// A create's answer: whether a prepared VM was taken (the server's
    /// own pool, or the warm pool the create named).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_pool_checkout: Option<warm_pool::CheckoutResult>,
}

/// `GET /v1/machines`: one page.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MachinePage {
    pub items: Vec<MachineInfo>,
    pub has_next: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
}

/// `DELETE /v1/machines/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Destroyed {
    pub id: String,
    pub status: MachineStatus,
}

/// `POST …/exec`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ExecBody {
    /// With `args`: the program; without, a shell line (`sh -c`).
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// The command is killed after this long (default 30; 0: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envs: Option<BTreeMap<String, String>>,
    /// Run `command` (and the quoted `args`) under `sh -c`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<bool>,
    /// Answer `{pid}` at once; output goes to the process's logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub background: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ExecResult {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Spawned {
    pub pid: u32,
}

/// Exactly the SDK's `ProcessInfo`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ProcessEntry {
    pub pid: u32,
    pub command: String,
    pub running: bool,
}

/// `GET …/processes/{pid}/logs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ProcessLogs {
    pub stdout: String,
    pub stderr: String,
    /// stdout followed by stderr.
    pub output: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

/// `POST …/files/write`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct WriteFileBody {
    pub path: String,
    pub content: String,
    /// `utf8` (default) or `base64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// `POST …/files/read`, `…/files/info` and the other path-only calls.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PathBody {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct FileContent {
    pub content: String,
}

/// Exactly the SDK's `FileInfo` keys (optional ones only when known).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Exists {
    pub exists: bool,
}

/// `POST …/timeout`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct TimeoutBody {
    pub timeout_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_action: Option<String>,
}

/// The SDK's `TimeoutLease`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct TimeoutLease {
    pub timeout_ms: u64,
    pub timeout_action: TimeoutAction,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining_ms: Option<i64>,
}

/// A snapshot as 1.0.3 parses it (exactly these keys).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MachineSnapshotInfo {
    pub id: String,
    pub machine_id: String,
    pub size_bytes: u64,
    pub created_at: String,
    pub metadata: Map<String, Value>,
}

/// A snapshot as 0.1.9 parses it (exactly these keys).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SandboxSnapshotInfo {
    pub id: String,
    pub sandbox_id: String,
    pub size_bytes: u64,
    pub created_at: String,
    pub metadata: Map<String, Value>,
}

/// `POST …/exec` answers a foreground command's result, or a background
/// command's pid (untagged: the SDK tells them apart by their keys).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(untagged)]
pub enum ExecReply {
    Finished(ExecResult),
    Background(Spawned),
}

/// A snapshot in the dialect of the path that asked for it (untagged: each
/// dialect's keys exactly).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(untagged)]
pub enum SnapshotInfo {
    Machine(MachineSnapshotInfo),
    Sandbox(SandboxSnapshotInfo),
}

impl SnapshotInfo {
    pub fn id(&self) -> &str {
        match self {
            SnapshotInfo::Machine(s) => &s.id,
            SnapshotInfo::Sandbox(s) => &s.id,
        }
    }
}

/// What the server sends on the exec channel (`GET …/ws?channel=exec`),
/// one JSON text message each; `id` echoes the client's request id (any
/// JSON value, `null` when the request had none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEvent {
    ExecStarted { id: Value, pid: u32 },
    ExecStdout { id: Value, pid: u32, data: String },
    ExecStderr { id: Value, pid: u32, data: String },
    ExecExit { id: Value, pid: u32, exit_code: i32 },
    Error { id: Value, message: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CLI sends only what it sets, as before these were shared.
    #[test]
    fn request_bodies_omit_unset_fields() {
        let b = CreateMachineBody {
            template: Some("base".into()),
            timeout_ms: Some(300_000),
            envs: Some(BTreeMap::new()),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&b).unwrap(),
            serde_json::json!({"template": "base", "timeout_ms": 300000, "envs": {}})
        );
        let e = ExecBody {
            command: "true".into(),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"command": "true", "args": []})
        );
    }

    #[test]
    fn exec_events_are_the_channel_frames() {
        let e = ExecEvent::ExecExit {
            id: serde_json::json!("r1"),
            pid: 4,
            exit_code: 0,
        };
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"type": "exec_exit", "id": "r1", "pid": 4, "exit_code": 0})
        );
        let e = ExecEvent::Error {
            id: Value::Null,
            message: "m".into(),
        };
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"type": "error", "id": null, "message": "m"})
        );
    }

    #[test]
    fn exec_replies_and_snapshots_parse_by_their_keys() {
        let r: ExecReply = serde_json::from_str(r#"{"pid": 7}"#).unwrap();
        assert!(matches!(r, ExecReply::Background(Spawned { pid: 7 })));
        let r: ExecReply =
            serde_json::from_str(r#"{"exit_code": 3, "stdout": "o", "stderr": ""}"#).unwrap();
        assert!(matches!(
            r,
            ExecReply::Finished(ExecResult { exit_code: 3, .. })
        ));
        let s: SnapshotInfo = serde_json::from_str(
            r#"{"id":"s","sandbox_id":"m","size_bytes":1,"created_at":"t","metadata":{}}"#,
        )
        .unwrap();
        assert!(matches!(s, SnapshotInfo::Sandbox(_)));
        assert_eq!(s.id(), "s");
        let back = serde_json::to_value(&s).unwrap();
        assert!(back.get("machine_id").is_none(), "{back}");
    }

    #[test]
    fn statuses_have_one_spelling_and_checked_transitions() {
        for st in MachineStatus::ALL {
            let wire = serde_json::to_value(st).unwrap();
            assert_eq!(wire, st.as_str());
            assert_eq!(st.as_str().parse::<MachineStatus>().unwrap(), st);
        }
        assert!("stopped".parse::<MachineStatus>().is_err());
        use MachineStatus::*;
        // Every allowed edge of the lifecycle, and nothing else.
        let allowed = [
            (Creating, Running),
            (Creating, Paused),
            (Running, Paused),
            (Paused, Creating),
        ];
        for from in MachineStatus::ALL {
            for to in MachineStatus::ALL {
                let ok = from.to(to).is_ok();
                let expect = !from.is_final() && (to.is_final() || allowed.contains(&(from, to)));
                assert_eq!(ok, expect, "{from} -> {to}");
            }
        }
        assert_eq!(
            Destroyed.to(Running).unwrap_err().to_string(),
            "a destroyed machine cannot become running"
        );
    }

    #[test]
    fn timeout_actions_and_snapshot_kinds_keep_the_sdk_spelling() {
        assert_eq!(
            serde_json::to_value(TimeoutAction::Hibernate).unwrap(),
            "hibernate"
        );
        assert_eq!(
            TimeoutAction::parse("pause"),
            Some(TimeoutAction::Hibernate)
        );
        assert_eq!(TimeoutAction::parse("stop"), None);
        let k: SnapshotKind = serde_json::from_value("fork".into()).unwrap();
        assert!(k.is_internal() && !SnapshotKind::Snapshot.is_internal());
    }
}
