//! The machine API's bodies for the file operations beyond read and write
//! (remove, rename, mkdir, permissions, batch write, search by name, find
//! by content, replace) and for metrics, as the published SDKs send and
//! read them (1.0.3 under `/v1/machines`, 0.1.9 under `/v1/sandboxes`, the
//! same shapes). The SDK builds `SearchMatch`, `FileInfo` and the metrics
//! with `**data`: these serialise exactly its keys.

use serde::{Deserialize, Serialize};

use crate::machine::FileInfo;

/// `POST …/files/rename`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct RenameBody {
    pub old_path: String,
    pub new_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// `POST …/files/permissions`: `permissions` is octal (`"0755"`, `"755"`,
/// `"0o755"`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PermissionsBody {
    pub path: String,
    pub permissions: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// `POST …/files/search` (a glob on names) and `…/files/find` (a pattern
/// in contents).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PatternBody {
    pub path: String,
    pub pattern: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// `POST …/files/replace`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ReplaceBody {
    pub files: Vec<String>,
    pub pattern: String,
    pub replacement: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
}

/// The answer of `…/files/replace` (the SDK's `ReplaceResult`).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ReplaceResult {
    pub replacements: u64,
    pub files_modified: u64,
    pub files_skipped: u64,
    pub binary_files_skipped: u64,
}

/// One line found by `…/files/find` (the SDK's `SearchMatch`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SearchMatch {
    pub file: String,
    /// 1-based.
    pub line: u64,
    pub content: String,
}

/// The `manifest` part of `POST …/files/batch-write` (multipart): each
/// file's path and the name of the part that holds its bytes.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct BatchManifest {
    pub files: Vec<BatchFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct BatchFile {
    pub path: String,
    pub field: String,
}

/// The answer of `…/files/batch-write`: one entry per manifest file, in
/// its order.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct BatchWriteResult {
    pub results: Vec<BatchEntry>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum BatchEntry {
    Success { path: String, info: Box<FileInfo> },
    Error { path: String, error: String },
}

/// One sample of `GET …/metrics` (the SDK's `MachineMetrics` and 0.1.9's
/// `SandboxMetrics`; the answer is a list of them).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MachineMetrics {
    /// RFC 3339, UTC.
    pub timestamp: String,
    /// Busy share of the machine's vCPUs, 0..=100.
    pub cpu_percent: f64,
    pub cpu_count: u32,
    pub mem_used_bytes: u64,
    pub mem_total_bytes: u64,
    pub disk_used_bytes: u64,
    pub disk_total_bytes: u64,
    pub network_rx_bytes: u64,
    pub network_tx_bytes: u64,
}

/// Why a `permissions` string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("permissions {0:?} must be an octal mode from 0 to 7777 (like \"0755\")")]
pub struct BadMode(pub String);

/// An octal mode as the SDK sends it: `"0755"`, `"755"`, `"0o755"`, at
/// most `0o7777`.
pub fn parse_mode(s: &str) -> Result<u32, BadMode> {
    let t = s.trim();
    let digits = t
        .strip_prefix("0o")
        .or_else(|| t.strip_prefix("0O"))
        .unwrap_or(t);
    if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
    {
        return Err(BadMode(s.to_string()));
    }
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o7777 => Ok(m),
        _ => Err(BadMode(s.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0755"), Ok(0o755));
        assert_eq!(parse_mode("755"), Ok(0o755));
        assert_eq!(parse_mode("0o600"), Ok(0o600));
        assert_eq!(parse_mode("4755"), Ok(0o4755));
        assert_eq!(parse_mode("07777"), Ok(0o7777));
        for bad in ["", "0o", "rwx", "0758", "17777", "-1", "0x1ff", "u+x"] {
            assert!(parse_mode(bad).is_err(), "{bad:?}");
        }
        assert!(parse_mode("9").unwrap_err().to_string().contains("\"9\""));
    }

    #[test]
    fn shapes_are_the_sdks() {
        let b: RenameBody =
            serde_json::from_value(json!({"old_path": "/a", "new_path": "/b", "user": null}))
                .unwrap();
        assert_eq!(b.user, None);
        let r: ReplaceBody = serde_json::from_value(
            json!({"files": ["/a"], "pattern": "x", "replacement": "y", "user": "app"}),
        )
        .unwrap();
        assert_eq!(r.dry_run, None);
        let m: BatchManifest = serde_json::from_value(
            json!({"files": [{"path": "/tmp/a.txt", "field": "file0"}], "user": "alice"}),
        )
        .unwrap();
        assert_eq!(m.files[0].field, "file0");
        let res = BatchWriteResult {
            results: vec![BatchEntry::Error {
                path: "/x".into(),
                error: "denied".into(),
            }],
        };
        assert_eq!(
            serde_json::to_value(&res).unwrap(),
            json!({"results": [{"status": "error", "path": "/x", "error": "denied"}]})
        );
        let v = serde_json::to_value(SearchMatch {
            file: "/a".into(),
            line: 2,
            content: "x".into(),
        })
        .unwrap();
        assert_eq!(v, json!({"file": "/a", "line": 2, "content": "x"}));
        let v = serde_json::to_value(MachineMetrics {
            timestamp: "2026-01-02T03:04:05Z".into(),
            cpu_percent: 1.5,
            cpu_count: 2,
            mem_used_bytes: 1,
            mem_total_bytes: 2,
            disk_used_bytes: 3,
            disk_total_bytes: 4,
            network_rx_bytes: 5,
            network_tx_bytes: 6,
        })
        .unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 9, "{keys:?}");
    }
}
