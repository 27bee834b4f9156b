//! The control plane's JSON, in E2B's field names: what create, connect,
//! get, list and metrics answer, made from a machine's view
//! ([`MachineInfo`]), and what create reads.

use std::collections::BTreeMap;

use nullspace_model::machine::{MachineInfo, MachineStatus};
use nullspace_model::machine_files::MachineMetrics;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::ENVD_VERSION;

/// What E2B calls the client (one per server here).
const CLIENT_ID: &str = "nullspace";

/// `POST /sandboxes` and `/v2/sandboxes` (`NewSandbox`, `NewSandboxV2`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewSandbox {
    #[serde(rename = "templateID")]
    pub template_id: Option<String>,
    /// Seconds.
    pub timeout: Option<u64>,
    pub metadata: Option<BTreeMap<String, String>>,
    pub env_vars: Option<BTreeMap<String, String>>,
    pub auto_pause: Option<bool>,
    pub auto_resume: Option<AutoResume>,
    #[serde(rename = "allow_internet_access")]
    pub allow_internet_access: Option<bool>,
    pub volume_mounts: Option<Vec<Value>>,
    pub mcp: Option<Value>,
    pub network: Option<Value>,
    pub iam: Option<Value>,
    pub cpu_count: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
pub struct AutoResume {
    #[serde(default)]
    pub enabled: bool,
}

/// `POST …/connect` and `…/timeout`: seconds.
#[derive(Debug, Default, Deserialize)]
pub struct Timeout {
    pub timeout: Option<u64>,
}

/// E2B's metadata is string to string; a nullspace value that is not a
/// string is shown as its JSON.
pub fn metadata_of(m: &Option<Map<String, Value>>) -> BTreeMap<String, String> {
    m.iter()
        .flatten()
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            (k.clone(), v)
        })
        .collect()
}

/// `Sandbox`: what create and connect answer.
#[derive(Debug, Serialize)]
pub struct Sandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: &'static str,
    #[serde(rename = "envdVersion")]
    pub envd_version: &'static str,
    #[serde(rename = "envdAccessToken")]
    pub envd_access_token: String,
    /// Absent: the SDK uses `E2B_SANDBOX_URL`.
    pub domain: Option<String>,
}

impl Sandbox {
    pub fn of(m: &MachineInfo, token: String) -> Sandbox {
        Sandbox {
            template_id: m.template.clone(),
            sandbox_id: m.id.clone(),
            client_id: CLIENT_ID,
            envd_version: ENVD_VERSION,
            envd_access_token: token,
            domain: None,
        }
    }
}

/// `SandboxDetail` (get) and `ListedSandbox` (list).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Detail {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: &'static str,
    pub started_at: String,
    pub end_at: String,
    pub envd_version: &'static str,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
    /// Not in a machine's view: 0.
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    pub state: &'static str,
    pub metadata: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
}

impl Detail {
    pub fn of(m: &MachineInfo, token: Option<String>) -> Detail {
        let started = m.started_at.clone().unwrap_or_else(|| m.created_at.clone());
        Detail {
            template_id: m.template.clone(),
            sandbox_id: m.id.clone(),
            client_id: CLIENT_ID,
            end_at: m
                .timeout_at
                .clone()
                .or_else(|| m.expires_at.clone())
                .unwrap_or_else(|| started.clone()),
            started_at: started,
            envd_version: ENVD_VERSION,
            cpu_count: m.config.vcpus,
            memory_mb: m.config.memory_mb,
            disk_size_mb: 0,
            state: state_of(m.status),
            metadata: metadata_of(&m.metadata),
            envd_access_token: token,
        }
    }
}

/// E2B knows two states; a machine being created already runs for it.
pub fn state_of(s: MachineStatus) -> &'static str {
    match s {
        MachineStatus::Paused => "paused",
        _ => "running",
    }
}

/// `SandboxMetric`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Metric {
    pub timestamp: String,
    pub timestamp_unix: i64,
    pub cpu_count: u32,
    pub cpu_used_pct: f64,
    pub mem_used: u64,
    pub mem_total: u64,
    pub mem_cache: u64,
    pub disk_used: u64,
    pub disk_total: u64,
}

impl Metric {
    pub fn of(m: &MachineMetrics) -> Metric {
        let unix = chrono::DateTime::parse_from_rfc3339(&m.timestamp)
            .map(|t| t.timestamp())
            .unwrap_or_default();
        Metric {
            timestamp: m.timestamp.clone(),
            timestamp_unix: unix,
            cpu_count: m.cpu_count,
            cpu_used_pct: m.cpu_percent,
            mem_used: m.mem_used_bytes,
            mem_total: m.mem_total_bytes,
            mem_cache: 0,
            disk_used: m.disk_used_bytes,
            disk_total: m.disk_total_bytes,
        }
    }
}
