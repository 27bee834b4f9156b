//! The template API's response bodies, as the published SDK (`nullspace-sdk`
//! 0.1.9 and 1.0.3) parses them: see `docs/sdk-contract.md`. Shared by the
//! server, which sends them, and the CLI, which reads them. Unset optional
//! fields are omitted rather than sent as `null` where the SDK rejects it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::request::{BuildConfig, BuildRequest};
use super::status::{LogKind, LogLevel};

/// `error_detail`: exactly the keys the SDK's strict parser accepts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct FailureDetail {
    pub code: String,
    pub message: String,
    pub phase: String,
    pub retryable: bool,
    pub suggested_action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_index: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CacheSummary {
    pub final_artifact_hits: i64,
    pub final_artifact_misses: i64,
    pub final_artifact_bypasses: i64,
    pub final_artifact_stores: i64,
    pub layer_hits: i64,
    pub layer_misses: i64,
    pub layer_bypasses: i64,
    pub layer_stores: i64,
    pub file_blob_hits: i64,
    pub file_blob_misses: i64,
    pub file_blob_bypasses: i64,
    pub file_blob_stores: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct RuntimeDefaultsOut {
    pub default_env_keys: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_cmd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_workdir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub readiness: Option<Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct OciMetadataOut {
    pub labels: BTreeMap<String, String>,
    pub exposed_ports: Vec<String>,
    pub volumes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<HealthcheckOut>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct HealthcheckOut {
    pub test: Vec<String>,
    pub interval_ns: Option<i64>,
    pub timeout_ns: Option<i64>,
    pub start_period_ns: Option<i64>,
    pub retries: Option<i64>,
    pub mapped_readiness: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Availability {
    pub status: String,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Promotability {
    pub promotable: bool,
    pub status: String,
    pub reason: Option<String>,
}

/// The build record (`POST /v1/templates/builds`, status, cancel, retry).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct BuildRecord {
    pub build_id: String,
    pub template_id: String,
    pub name: String,
    pub tags: Vec<String>,
    pub status: super::status::BuildStatus,
    pub created_at: String,
    pub updated_at: String,
    pub canonical_ref: String,
    pub namespace_slug: String,
    pub visibility: String,
    pub build_backend: String,
    pub source_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context_digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dockerfile_digest: Option<String>,
    pub triggered_by: String,
    pub queued_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_phase: Option<String>,
    pub build_config: BuildConfig,
    pub cache_summary: CacheSummary,
    pub artifact_availability: Availability,
    pub promotability: Promotability,
    pub runtime_defaults: RuntimeDefaultsOut,
    pub oci_metadata: OciMetadataOut,
    pub artifact_ids: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_detail: Option<FailureDetail>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_of_build_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_build_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel_requested_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel_requested_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancellation_reason: Option<String>,
    /// Which engine ran the build, with its version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
}

/// A log entry (status `entries[]` and SSE `data:`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct LogEntry {
    pub build_id: String,
    pub template_id: String,
    pub offset: i64,
    pub timestamp: String,
    pub kind: LogKind,
    pub level: LogLevel,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_index: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_detail: Option<FailureDetail>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_metadata: Option<Value>,
}

/// TemplateInfo (`end.result`, list/get, tags, visibility, rename, promote).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct TemplateInfo {
    pub id: String,
    pub name: String,
    pub description: String,
    pub tags: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_tag: Option<String>,
    pub builtin: bool,
    pub canonical_ref: String,
    pub namespace_slug: String,
    pub visibility: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime_defaults: Option<RuntimeDefaultsOut>,
}

/// What the server keeps per template (the `doc` column).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TemplateDoc {
    #[serde(default)]
    pub description: String,
    #[serde(default = "private")]
    pub visibility: String,
}

fn private() -> String {
    "private".into()
}

/// The sanitized build definition persisted for retry: everything needed
/// to run the build again except credentials, secret values and inline
/// context bytes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Definition {
    pub request: BuildRequest,
    /// `base_image_auth.kind`, kept to demand fresh credentials on retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_image_auth_kind: Option<String>,
    /// Registries that had request-time credentials.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub registry_auth_hosts: Vec<String>,
    /// Ids of the secrets the build used (values are never kept).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_ids: Vec<String>,
    /// Whether inline context bytes were dropped (then it cannot retry).
    #[serde(default)]
    pub had_inline_context: bool,
}

// ---- responses built in `http.rs` and `templates.rs` ------------------------

/// Every error: `code` picks the SDK's exception class.
#[derive(Debug, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ErrorBody {
    pub error: String,
    pub code: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_detail: Option<FailureDetail>,
}

/// Build status (`GET /v1/templates/builds/{build_id}`, cancel).
#[derive(Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct BuildStatus {
    pub build: BuildRecord,
    /// Durable log entries from `offset`, as stored.
    pub entries: Vec<LogEntry>,
    pub next_offset: i64,
}

/// A page of build history, newest first.
#[derive(Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct BuildPage {
    /// The records as stored (a cancel request is in the build's status).
    pub builds: Vec<BuildRecord>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PreflightResult {
    pub files: Vec<PreflightAnswer>,
}

/// One answer per announced path, in request order.
#[derive(Debug, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PreflightAnswer {
    pub path: String,
    pub entry_type: String,
    /// Dirs: echoed from the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Files: where to `PUT` the bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blob_id: Option<String>,
    /// Files: whether the bytes must be uploaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missing: Option<bool>,
}

/// `GET /v1/templates/refs/{ref}/tags` items (built in `templates.rs`).
#[derive(Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct TagEntry {
    pub tag: String,
    pub build_id: String,
    pub created_at: String,
}

/// `GET /v1/templates/refs/{ref}/aliases` items (built in `templates.rs`).
#[derive(Debug, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct AliasEntry {
    pub alias_ref: String,
    pub created_at: String,
}

/// `POST /v1/templates/claims` (built in `templates.rs`).
#[derive(Debug, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct NameClaim {
    pub claim_token: String,
    pub canonical_ref: String,
    pub expires_at: String,
}

/// `GET /v1/templates/namespaces/{slug}`.
#[derive(Debug, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct NamespaceInfo {
    pub slug: String,
    /// `user` or `system`.
    pub kind: String,
    pub is_default: bool,
}
