//! Ports and preview URLs on the wire (`…/host`, `…/ports/{port}/…`,
//! `…/preview-urls`), with the keys 1.0.3 parses (`machine.py`;
//! `PreviewGrantInfo`, `PreviewUrl`, `PreviewProxyTarget` and
//! `PreviewReadiness` are built with `**data`, so no key beyond theirs).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct HostBody {
    pub port: i64,
}

/// `POST …/host`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct HostInfo {
    /// `{port}-{id}.{domain}[:port]`, or the API's own host with path addressing.
    pub host: String,
    /// A signed URL that opens the port in a browser.
    pub url: String,
    pub websocket_url: String,
    pub access_token_expires_at: String,
    /// Always `query` (the token rides in the URL).
    pub access_token_transport: String,
}

/// `POST …/ports/{port}/signed-preview-url` and `…/preview-proxy-target`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GrantBody {
    #[serde(default)]
    pub expires_in_seconds: Option<i64>,
    #[serde(default)]
    pub transports: Option<Vec<String>>,
    #[serde(default)]
    pub token_transport: Option<String>,
    #[serde(default)]
    pub include_traffic_token_hint: Option<bool>,
}

/// A preview grant (`PreviewGrantInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PreviewGrantInfo {
    pub id: String,
    pub machine_id: String,
    pub port: u16,
    /// `direct` (signed URL) or `proxy` (header token).
    pub auth_mode: String,
    pub bootstrap_transport: String,
    /// `active`, `expired` or `revoked`.
    pub status: String,
    pub token_kinds: Vec<String>,
    pub principal_kind: String,
    pub issued_at: String,
    pub expires_at: String,
    pub revoked_at: Option<String>,
    pub first_used_at: Option<String>,
    pub last_used_at: Option<String>,
    /// Requests and connections admitted with it, and bytes each way
    /// (since the server started).
    pub use_count: u64,
    pub http_request_count: u64,
    pub websocket_connection_count: u64,
    pub bytes_in_count: u64,
    pub bytes_out_count: u64,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PreviewUrl {
    pub grant: PreviewGrantInfo,
    pub url: String,
    pub websocket_url: String,
    pub access_token_expires_at: String,
    pub access_token_transport: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PreviewProxyTarget {
    pub grant: PreviewGrantInfo,
    pub machine_id: String,
    pub port: u16,
    pub token_header_name: String,
    pub expires_at: String,
    pub token_transport: String,
    pub http_url: Option<String>,
    pub websocket_url: Option<String>,
    pub http_token: Option<String>,
    pub websocket_token: Option<String>,
    pub required_forwarded_headers: Vec<String>,
    pub traffic_access_required: Option<bool>,
    pub traffic_access_header_name: Option<String>,
    pub warnings: Vec<String>,
}

/// `GET …/preview-urls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PreviewGrantList {
    pub items: Vec<PreviewGrantInfo>,
}

/// `DELETE …/preview-urls/{grant_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct RevokedGrant {
    pub success: bool,
    pub grant: PreviewGrantInfo,
}

/// `POST …/ports/{port}/readiness`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ReadinessBody {
    /// `tcp` (default) or `http`.
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    #[serde(default)]
    pub interval_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PreviewReadiness {
    pub ready: bool,
    pub route_ready: bool,
    pub service_ready: bool,
    pub machine_id: String,
    pub port: u16,
    pub kind: String,
    pub checked_at: String,
    pub elapsed_ms: u64,
    pub attempts: u32,
    pub path: Option<String>,
    pub code: Option<String>,
    pub error: Option<String>,
    pub suggested_action: Option<String>,
}
