//! Template warm pools on the wire (SDK 1.0.3's `TemplateWarmPool`,
//! `CreateTemplateWarmPoolRequest`, `UpdateTemplateWarmPoolRequest`,
//! `WarmPoolCheckoutRequest`/`Result`), and what a pool's state may become.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Ready machines one warm pool may ask for at most (each is a paused VM
/// holding its guest memory's capacity).
pub const MAX_READY_LIMIT: u32 = 64;

/// A warm pool's state. `deleted` is not kept: a deleted pool is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum WarmPoolState {
    /// Kept at `min_ready`..`max_ready`, and served to creates.
    Enabled,
    /// Not kept, not served.
    Disabled,
    /// Its ready machines given back; not kept, not served until enabled.
    Draining,
}

/// The calls that change a pool's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmPoolAction {
    Enable,
    Disable,
    Drain,
}

impl WarmPoolState {
    /// The state `action` leads to. Every action is allowed from every
    /// state (each is idempotent), so this never refuses; it exists so
    /// that the rule is in one place if that changes.
    pub fn after(self, action: WarmPoolAction) -> WarmPoolState {
        match action {
            WarmPoolAction::Enable => WarmPoolState::Enabled,
            WarmPoolAction::Disable => WarmPoolState::Disabled,
            WarmPoolAction::Drain => WarmPoolState::Draining,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            WarmPoolState::Enabled => "enabled",
            WarmPoolState::Disabled => "disabled",
            WarmPoolState::Draining => "draining",
        }
    }
}

/// The VM shape of a pool's machines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct WarmPoolResources {
    pub vcpus: u32,
    pub memory_mb: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mb: Option<u64>,
}

/// `POST /v1/template-warm-pools`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CreateWarmPoolBody {
    pub name: String,
    /// A template ref of the caller's namespace (`template` is an alias).
    #[serde(default)]
    pub template_ref: Option<String>,
    #[serde(default)]
    pub template: Option<String>,
    pub min_ready: u32,
    pub max_ready: u32,
    pub resources: WarmPoolResources,
    /// `prefer` (default), `require` or `bypass`: what a create naming the
    /// pool without a mode does.
    #[serde(default)]
    pub checkout_policy: Option<String>,
    #[serde(default)]
    pub idle_timeout_seconds: Option<u64>,
    #[serde(default)]
    pub stale_after_seconds: Option<u64>,
    /// Only `pinned_build`.
    #[serde(default)]
    pub version_policy: Option<String>,
    #[serde(default)]
    pub track_tag: Option<String>,
    #[serde(default)]
    pub host_pool_id: Option<String>,
    #[serde(default)]
    pub cell_id: Option<String>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub metadata: Option<serde_json::Map<String, Value>>,
}

/// `PATCH /v1/template-warm-pools/{id}`: what is present changes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct UpdateWarmPoolBody {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub template_ref: Option<String>,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub min_ready: Option<u32>,
    #[serde(default)]
    pub max_ready: Option<u32>,
    #[serde(default)]
    pub resources: Option<WarmPoolResources>,
    #[serde(default)]
    pub checkout_policy: Option<String>,
    #[serde(default)]
    pub idle_timeout_seconds: Option<u64>,
    #[serde(default)]
    pub stale_after_seconds: Option<u64>,
    #[serde(default)]
    pub version_policy: Option<String>,
    #[serde(default)]
    pub track_tag: Option<String>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub metadata: Option<serde_json::Map<String, Value>>,
}

/// How a create uses a warm pool (`warm_pool` in the create body).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum CheckoutMode {
    /// A ready machine if there is one (within `wait_ms`), else a new one.
    Prefer,
    /// A ready machine within `wait_ms`, else `warm_pool_unavailable`.
    Require,
    /// Always a new machine.
    Bypass,
}

impl CheckoutMode {
    pub fn parse(s: &str) -> Option<CheckoutMode> {
        match s {
            "prefer" => Some(CheckoutMode::Prefer),
            "require" => Some(CheckoutMode::Require),
            "bypass" => Some(CheckoutMode::Bypass),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CheckoutMode::Prefer => "prefer",
            CheckoutMode::Require => "require",
            CheckoutMode::Bypass => "bypass",
        }
    }
}

/// `warm_pool` in a create body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CheckoutRequest {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub mode: Option<CheckoutMode>,
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

/// Where a created machine came from (`warm_pool_checkout` in its info).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum CheckoutSource {
    /// A prepared VM was taken.
    ReadyInstance,
    /// None was ready: a new VM was restored.
    ColdCreate,
    /// The create asked for a new VM.
    Bypassed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CheckoutResult {
    pub source: CheckoutSource,
    /// `source` is `ready_instance`.
    pub hit: bool,
    /// The warm pool named (none: the server's own pool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub mode: CheckoutMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

/// `status` of a pool (also `GET …/{id}/status`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct WarmPoolCounts {
    /// What it keeps ready now (0 unless enabled).
    pub target: u32,
    pub ready: u32,
    pub warming: u32,
    /// Machines created from it so far.
    pub claimed: u32,
    pub draining: u32,
    /// Preparations that failed so far.
    pub failed: u32,
    pub expired: u32,
    pub unavailable: u32,
}

/// A warm pool as the SDK reads it (`TemplateWarmPool`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct WarmPoolInfo {
    pub id: String,
    pub name: String,
    pub template_ref: String,
    /// The template id the ref resolved to when the pool was made or
    /// changed (`pinned_build`: later builds of the ref are not followed).
    pub resolved_template: String,
    pub resolved_template_build_id: Option<String>,
    pub resources: WarmPoolResources,
    pub min_ready: u32,
    pub max_ready: u32,
    pub idle_timeout_seconds: u64,
    pub stale_after_seconds: u64,
    pub checkout_policy: CheckoutMode,
    pub version_policy: String,
    pub rollout_generation: u64,
    pub rollout_status: serde_json::Map<String, Value>,
    pub status: WarmPoolCounts,
    pub state: WarmPoolState,
    pub degraded_reason: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub metadata: serde_json::Map<String, Value>,
    /// RFC 3339.
    pub created_at: String,
    pub updated_at: String,
    pub enabled_at: Option<String>,
    pub disabled_at: Option<String>,
    pub drain_requested_at: Option<String>,
    pub last_reconciled_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct WarmPoolList {
    pub items: Vec<WarmPoolInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_follow_actions_and_read_as_the_sdk_spells_them() {
        use WarmPoolAction::*;
        use WarmPoolState::*;
        assert_eq!(Enabled.after(Drain), Draining);
        assert_eq!(Draining.after(Enable), Enabled);
        assert_eq!(Enabled.after(Disable), Disabled);
        assert_eq!(serde_json::to_value(Draining).unwrap(), "draining");
        assert_eq!(Disabled.as_str(), "disabled");
        let r: CheckoutRequest =
            serde_json::from_str(r#"{"id":"twp_1","mode":"require","wait_ms":50}"#).unwrap();
        assert_eq!(r.mode, Some(CheckoutMode::Require));
        assert!(serde_json::from_str::<CheckoutRequest>(r#"{"mode":"sometimes"}"#).is_err());
        let out = serde_json::to_value(CheckoutResult {
            source: CheckoutSource::ReadyInstance,
            hit: true,
            id: None,
            mode: CheckoutMode::Prefer,
            wait_ms: None,
        })
        .unwrap();
        assert_eq!(
            out,
            serde_json::json!({"source":"ready_instance","hit":true,"mode":"prefer"})
        );
    }
}
