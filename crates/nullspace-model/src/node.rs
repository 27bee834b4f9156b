//! Nodes: the servers that share one store (many-node mode). Each node
//! registers under its id with the URL other nodes reach it at, its
//! capacity and its labels, and keeps a lease alive by the database's
//! clock. A registration starts a new epoch; a write that names an older
//! epoch comes from a process that was fenced and changes nothing.
//!
//! ```text
//! (register) ─▶ ready ⇄ draining
//!                 │        │
//!                 ├────────┴──▶ dead     (its lease ran out: any live node declares it)
//!                 └────────┴──▶ stopped  (it left cleanly)
//! dead | stopped ─▶ (register again: a new epoch) ─▶ ready
//! ```

use serde::{Deserialize, Serialize};

/// A node's status in the store. Transitions are checked ([`NodeStatus::to`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    /// Takes new machines.
    Ready,
    /// Serves its machines but takes no new ones.
    Draining,
    /// Its lease ran out and another node declared it dead: its machines
    /// ended; the process, if it still runs, is fenced.
    Dead,
    /// It left cleanly (SIGTERM).
    Stopped,
}

/// A status name that is none of [`NodeStatus::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node status {0:?} must be one of ready, draining, dead, stopped")]
pub struct UnknownNodeStatus(pub String);

/// A transition [`NodeStatus::to`] refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a {from} node cannot become {to}")]
pub struct IllegalNodeTransition {
    pub from: NodeStatus,
    pub to: NodeStatus,
}

impl NodeStatus {
    pub const ALL: [NodeStatus; 4] = [
        NodeStatus::Ready,
        NodeStatus::Draining,
        NodeStatus::Dead,
        NodeStatus::Stopped,
    ];
    /// The statuses of a node that holds a lease (may be declared dead).
    pub const LIVE: [NodeStatus; 2] = [NodeStatus::Ready, NodeStatus::Draining];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Ready => "ready",
            NodeStatus::Draining => "draining",
            NodeStatus::Dead => "dead",
            NodeStatus::Stopped => "stopped",
        }
    }

    /// Whether a node in this status may move to `next` (a registration,
    /// which starts a new epoch, is not a transition: it is always allowed).
    pub fn can_become(self, next: NodeStatus) -> bool {
        use NodeStatus::*;
        matches!(
            (self, next),
            (Ready, Draining) | (Draining, Ready) | (Ready | Draining, Dead | Stopped)
        )
    }

    pub fn to(self, next: NodeStatus) -> Result<NodeStatus, IllegalNodeTransition> {
        if self.can_become(next) {
            Ok(next)
        } else {
            Err(IllegalNodeTransition {
                from: self,
                to: next,
            })
        }
    }
}

impl std::fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for NodeStatus {
    type Err = UnknownNodeStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeStatus::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| UnknownNodeStatus(s.to_string()))
    }
}

/// What a template's snapshot needs of the node that restores it: a
/// snapshot's device state loads only on the same QEMU and accelerator and
/// architecture. Placement matches these against a template's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeLabels {
    /// `x86_64`, `aarch64` (the host's `uname -m`).
    pub arch: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// QEMU's version, `major.minor.micro`.
    pub qemu: String,
}

#[cfg(test)]
mod tests {
    use super::NodeStatus::*;
    use super::*;

    #[test]
    fn transitions() {
        assert!(Ready.can_become(Draining));
        assert!(Draining.can_become(Ready));
        assert!(Ready.can_become(Dead));
        assert!(Draining.can_become(Stopped));
        assert!(!Dead.can_become(Ready));
        assert!(!Stopped.can_become(Dead));
        assert!(!Ready.can_become(Ready));
        assert_eq!(
            Dead.to(Draining).unwrap_err().to_string(),
            "a dead node cannot become draining"
        );
        for s in NodeStatus::ALL {
            assert_eq!(s.as_str().parse::<NodeStatus>().unwrap(), s);
        }
        assert!("alive".parse::<NodeStatus>().is_err());
    }
}
