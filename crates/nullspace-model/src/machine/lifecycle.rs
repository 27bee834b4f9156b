//! Lifecycle events on the wire: `GET …/lifecycle` (the SDK's
//! `list_lifecycle`) and the frames of `…/lifecycle/ws` (`stream_events`),
//! with exactly the keys 1.0.3 parses (`LifecycleEvent._from_api`,
//! `LifecycleEventListResponse._from_api`, `lifecycle._handle_stream_handshake`).
//! Optional keys are absent rather than `null`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Declares a closed word set with its wire spelling, parsed and printed
/// the same way everywhere (`as_str`, `FromStr`, serde).
macro_rules! words {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $text)] $variant),+
        }
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $name {
            type Err = UnknownWord;
            fn from_str(s: &str) -> Result<Self, UnknownWord> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownWord { kind: stringify!($name), word: s.chars().take(64).collect() }),
                }
            }
        }
    };
}

/// A word outside its set (a query filter, a stored row).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{word:?} is not a {kind}")]
pub struct UnknownWord {
    pub kind: &'static str,
    pub word: String,
}

words! {
    /// What happened to the machine (the SDK's `LifecycleOperation`). A
    /// failure is the operation it interrupted with status `failed`.
    LifecycleOperation {
        Create = "create",
        /// Killed (by the client, the timeout or an error).
        Destroy = "destroy",
        TimeoutUpdated = "timeout_updated",
        TimeoutExpired = "timeout_expired",
        /// Paused to a snapshot.
        Hibernate = "hibernate",
        SnapshotCreated = "snapshot_created",
        /// Resumed from its pause snapshot.
        ResumeFromSnapshot = "resume_from_snapshot",
        Fork = "fork",
        /// The server took over or ended a machine after a restart.
        Reconcile = "reconcile",
    }
}

words! {
    LifecycleStatus {
        Requested = "requested",
        Succeeded = "succeeded",
        Failed = "failed",
    }
}

words! {
    /// Who may see the event; public routes serve `customer` only.
    LifecycleAudience {
        Customer = "customer",
        Internal = "internal",
    }
}

words! {
    /// Who caused the event.
    LifecycleActorKind {
        User = "user",
        System = "system",
        Reconcile = "reconcile",
    }
}

words! {
    /// `order` of `GET …/lifecycle` (default `desc`: newest first).
    LifecycleOrder {
        Asc = "asc",
        Desc = "desc",
    }
}

/// One event (the SDK's `LifecycleEvent`; generated: `LifecycleEventInfo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct LifecycleEventInfo {
    /// Opaque; a stream resumes after it (`after_event_id`).
    pub id: String,
    /// RFC 3339, UTC.
    pub occurred_at: String,
    pub audience: LifecycleAudience,
    pub operation: LifecycleOperation,
    pub status: LifecycleStatus,
    pub actor_kind: LifecycleActorKind,
    pub metadata: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_machine_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_machine_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
}

/// `GET …/lifecycle`: one page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct LifecycleEventList {
    pub events: Vec<LifecycleEventInfo>,
    pub offset: u64,
    pub limit: u64,
    pub has_more: bool,
}

/// The query of `GET …/lifecycle`, as the SDK builds it (`from`/`to` are
/// RFC 3339 strings). Unknown keys are ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct LifecycleQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<LifecycleOrder>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<LifecycleOperation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<LifecycleStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<LifecycleAudience>,
}

/// The client's one message on `…/lifecycle/ws` (`type: subscribe`); the
/// machine comes from the path. Unknown keys are ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct LifecycleSubscribe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<LifecycleOperation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<LifecycleStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<LifecycleAudience>,
    /// Only events after the subscription (no replay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_only: Option<bool>,
    /// Replay what came after this event (the last one the client saw).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_event_id: Option<String>,
    /// Most events replayed (the SDK's default is 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_limit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
}

/// What the client sends on `…/lifecycle/ws`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LifecycleClientFrame {
    Subscribe(LifecycleSubscribe),
}

/// The subscription as the server understood it (echoed in `subscribed`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct LifecycleSubscription {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<LifecycleOperation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<LifecycleAudience>,
}

words! {
    /// How the stream began: `replay` (stored events after the client's
    /// cursor first, then live ones) or `live_only`. 1.0.3's generated
    /// schema names only `live_only`; the SDK's stream reads the field as
    /// free text and never rejects the other.
    ReconnectMode {
        LiveOnly = "live_only",
        Replay = "replay",
    }
}

/// What the server sends on `…/lifecycle/ws`: `subscribed` once, then
/// `event`s; `error` ends the stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LifecycleServerFrame {
    Subscribed {
        subscription: LifecycleSubscription,
        reconnect_mode: ReconnectMode,
    },
    Event {
        /// Boxed: the other frames are small.
        event: Box<LifecycleEventInfo>,
    },
    Error {
        message: String,
    },
}

/// Fixed part of an event id; the last 12 hex digits are the sequence
/// number.
const ID_PREFIX: &str = "00000000-0000-4000-8000-";

/// The event id of a stored sequence number, and back. Ids are opaque to
/// clients, and UUID-shaped: 1.0.3's generated model parses them with
/// `UUID(…)`, its hand-written one as text. The server pages replays by
/// the number.
pub fn event_id(seq: i64) -> String {
    format!("{ID_PREFIX}{:012x}", seq.clamp(0, 0xffff_ffff_ffff))
}

pub fn event_seq(id: &str) -> Option<i64> {
    let n = id.strip_prefix(ID_PREFIX)?;
    // Exactly the canonical form event_id writes.
    if n.len() != 12 || !n.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    i64::from_str_radix(n, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keys(v: &Value) -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    }

    fn sample() -> LifecycleEventInfo {
        LifecycleEventInfo {
            id: event_id(7),
            occurred_at: "2026-12-06T20:00:00.123Z".into(),
            audience: LifecycleAudience::Customer,
            operation: LifecycleOperation::Hibernate,
            status: LifecycleStatus::Succeeded,
            actor_kind: LifecycleActorKind::User,
            metadata: Map::new(),
            machine_id: Some("mch_1".into()),
            snapshot_id: Some("snap_1".into()),
            source_machine_id: None,
            target_machine_id: None,
            user_id: None,
            reason: None,
            error_code: None,
            error_message: None,
        }
    }

    /// Required keys always, optional ones only when set, never `null`.
    #[test]
    fn event_has_the_sdk_keys() {
        let v = serde_json::to_value(sample()).unwrap();
        assert_eq!(
            keys(&v),
            [
                "actor_kind",
                "audience",
                "id",
                "machine_id",
                "metadata",
                "occurred_at",
                "operation",
                "snapshot_id",
                "status"
            ]
        );
        assert_eq!(v["operation"], "hibernate");
        assert_eq!(v["status"], "succeeded");
        let list = LifecycleEventList {
            events: vec![sample()],
            offset: 0,
            limit: 50,
            has_more: false,
        };
        assert_eq!(
            keys(&serde_json::to_value(list).unwrap()),
            ["events", "has_more", "limit", "offset"]
        );
    }

    #[test]
    fn frames_are_tagged_by_type() {
        let f = LifecycleServerFrame::Subscribed {
            subscription: LifecycleSubscription {
                machine_id: Some("mch_1".into()),
                ..Default::default()
            },
            reconnect_mode: ReconnectMode::Replay,
        };
        assert_eq!(
            serde_json::to_value(&f).unwrap(),
            json!({"type": "subscribed", "subscription": {"machine_id": "mch_1"}, "reconnect_mode": "replay"})
        );
        let e = serde_json::to_value(LifecycleServerFrame::Event {
            event: Box::new(sample()),
        })
        .unwrap();
        assert_eq!(keys(&e), ["event", "type"]);
        assert_eq!(e["event"]["id"], "00000000-0000-4000-8000-000000000007");
        assert_eq!(
            serde_json::to_value(LifecycleServerFrame::Error {
                message: "m".into()
            })
            .unwrap(),
            json!({"type": "error", "message": "m"})
        );
    }

    /// What `_subscription_payload` sends parses, extra keys and all.
    #[test]
    fn subscribe_parses_the_sdk_payload() {
        let f: LifecycleClientFrame = serde_json::from_value(json!({
            "type": "subscribe", "operation": "create", "status": "failed",
            "live_only": false, "after_event_id": "x", "replay_limit": 100,
            "metadata": {"k": 1}, "something_new": true
        }))
        .unwrap();
        let LifecycleClientFrame::Subscribe(s) = f;
        assert_eq!(s.operation, Some(LifecycleOperation::Create));
        assert_eq!(s.status, Some(LifecycleStatus::Failed));
        assert_eq!(s.after_event_id.as_deref(), Some("x"));
        assert_eq!(s.replay_limit, Some(100));
        assert!(
            serde_json::from_value::<LifecycleClientFrame>(json!({"type": "publish"})).is_err()
        );
    }

    #[test]
    fn words_round_trip_and_refuse_strangers() {
        for op in LifecycleOperation::ALL {
            assert_eq!(op.as_str().parse::<LifecycleOperation>(), Ok(*op));
            assert_eq!(
                serde_json::to_value(op).unwrap(),
                Value::String(op.as_str().into())
            );
        }
        let e = "pause".parse::<LifecycleOperation>().unwrap_err();
        assert_eq!(e.to_string(), "\"pause\" is not a LifecycleOperation");
        let q: LifecycleQuery = serde_json::from_value(json!({
            "offset": 5, "limit": 10, "order": "asc", "operation": "fork",
            "status": "succeeded", "from": "2026-01-01T00:00:00Z"
        }))
        .unwrap();
        assert_eq!(q.order, Some(LifecycleOrder::Asc));
        assert_eq!(q.operation, Some(LifecycleOperation::Fork));
        assert!(serde_json::from_value::<LifecycleQuery>(json!({"order": "up"})).is_err());
    }

    #[test]
    fn event_ids_map_to_sequence_numbers() {
        assert_eq!(event_seq(&event_id(42)), Some(42));
        assert_eq!(event_id(0xabc), "00000000-0000-4000-8000-000000000abc");
        for bad in [
            "",
            "42",
            "00000000-0000-4000-8000-",
            "00000000-0000-4000-8000-00000000000A",
            "00000000-0000-4000-8000-0000000000001",
            "00000000-0000-4000-8000-+0000000000a",
            "10000000-0000-4000-8000-000000000001",
        ] {
            assert_eq!(event_seq(bad), None, "{bad}");
        }
    }
}
