//! The machine API's upload bodies, as SDK 1.0.3 sends and reads them:
//! resumable upload sessions (`…/uploads`), and signed transfer URLs
//! (`…/files/upload-url`, `…/files/download-url`).
//!
//! The SDK builds its response classes with `**data`: a key it does not
//! know crashes it, so these carry exactly its fields.

pub mod rules;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `POST …/uploads`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CreateUploadRequest {
    /// `file` or `directory_tar`.
    pub kind: String,
    /// `restartable_file`, `spooled_stream` or `directory_archive`.
    pub source_kind: String,
    pub target_path: String,
    pub content_length: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `merge` (default), `replace` or `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict: Option<String>,
    /// `tar` for a directory upload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_format: Option<String>,
    /// `sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum_algorithm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whole_checksum_sha256: Option<String>,
    /// Free-form; accepted and not kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(with = "Option<Value>"))]
    pub metadata: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct UploadLimits {
    pub max_upload_bytes: u64,
    pub max_part_bytes: u64,
    pub max_concurrency: u32,
    pub machine_staging_quota_bytes: u64,
}

/// A session's state (`GET …/uploads/{id}`, the answer of a part).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct UploadSessionInfo {
    pub upload_id: String,
    pub kind: String,
    pub source_kind: String,
    pub target_path: String,
    pub content_length: u64,
    pub accepted_bytes: u64,
    pub reserved_staging_bytes: u64,
    pub part_size: u64,
    pub part_count: u32,
    pub max_concurrency: u32,
    pub status: String,
    pub conflict: String,
    pub checksum_algorithm: String,
    pub limits: UploadLimits,
    /// RFC 3339.
    pub created_at: String,
    pub updated_at: String,
    pub expires_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The lowest part not received yet (resume from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_part: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_format: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whole_checksum_sha256: Option<String>,
}

/// `POST …/uploads` answers `{"session": …}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CreateUploadResponse {
    pub session: UploadSessionInfo,
}

/// `POST …/uploads/{id}/complete` (the body may be absent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CompleteUploadRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whole_checksum_sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CompleteUploadResponse {
    pub session: UploadSessionInfo,
    pub published_bytes: u64,
    pub published_file_count: u64,
}

/// `POST …/files/upload-url` and `…/download-url`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct TransferUrlRequest {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_format: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SignedUploadUrl {
    pub url: String,
    /// The token the URL carries.
    pub token: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SignedDownloadUrl {
    pub url: String,
}

/// `error_detail` of a refused upload call (the SDK's
/// `UploadFailureDetail`, which picks its exception class by `reason`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct UploadFailureDetail {
    pub reason: String,
    pub message: String,
    pub retryable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part_number: Option<u32>,
}
