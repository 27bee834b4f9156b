//! This node's membership of a many-node cluster: the start-up rules, the
//! registration (a new epoch), the heartbeat that renews the lease or finds
//! this process fenced, and ending the machines of nodes declared dead.
//!
//! A node joins with `--node-url` (where the others reach it). One node
//! with SQLite stays the default and none of this runs. The lease is timed
//! by the database's clock (`nullspace_store::nodes`); see
//! `docs/ARCHITECTURE.md`, "Many nodes".

pub mod forward;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use nullspace_model::machine::MachineStatus;
use nullspace_model::node::{NodeLabels, NodeStatus};
use nullspace_store::Backend;
use nullspace_store::nodes::Registration;

use crate::state::{Config, Shared};

/// Why this server may not start as configured (one line each).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "many nodes need a shared Postgres store: --node-url needs --database postgres://… (this server uses SQLite)"
    )]
    NeedsPostgres,
    #[error(
        "many nodes need an artifact registry: --node-url needs --artifact-registry HOST[:PORT]/REPO (other nodes restore templates from it)"
    )]
    NeedsRegistry,
    #[error("--node-url {0:?} must be an http:// or https:// URL with a host")]
    BadUrl(String),
    #[error(
        "this store is shared by live nodes ({0}): start with --node-url and --artifact-registry to join them"
    )]
    NotJoined(String),
    #[error("registering node {node}: {message}")]
    Store { node: String, message: String },
}

/// The start-up rules that need no database: many nodes (`node_url`) need
/// Postgres and an artifact registry.
pub fn check_config(config: &Config, backend: Backend) -> Result<(), ClusterError> {
    let Some(url) = &config.node_url else {
        return Ok(());
    };
    let host_ok = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'));
    if !host_ok {
        return Err(ClusterError::BadUrl(url.clone()));
    }
    if backend != Backend::Postgres {
        return Err(ClusterError::NeedsPostgres);
    }
    if config.artifact_registry.is_none() {
        return Err(ClusterError::NeedsRegistry);
    }
    Ok(())
}

/// This process's hold on its node: the epoch it registered, and whether
/// it has been fenced since.
#[derive(Debug)]
pub struct Membership {
    pub node_id: String,
    pub url: String,
    epoch: AtomicI64,
    fenced: AtomicBool,
}

impl Membership {
    pub fn epoch(&self) -> i64 {
        self.epoch.load(Ordering::Acquire)
    }
    /// Another process registered this node since, or it was declared dead:
    /// this one takes no new work.
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }
}

/// This host's labels: what a template's snapshot needs of a node.
pub fn labels(state: &Shared) -> NodeLabels {
    NodeLabels {
        arch: std::env::consts::ARCH.to_string(),
        accel: match state.vmm.as_ref().map(|v| v.accel) {
            Some(nullspace_vm::Accel::Kvm) => "kvm".into(),
            Some(nullspace_vm::Accel::Tcg) => "tcg".into(),
            None => "none".into(),
        },
        qemu: nullspace_vm::qemu_version().unwrap_or_default(),
    }
}

/// At start-up: a server without `--node-url` on a store that live nodes
/// share is refused; one with it registers (a new epoch) and starts its
/// heartbeat. `None`: a single node.
pub async fn join(state: &Shared) -> Result<Option<Arc<Membership>>, ClusterError> {
    let node = state.machines.node_id.clone();
    let store_err = |e: nullspace_store::StoreError| ClusterError::Store {
        node: node.clone(),
        message: e.to_string(),
    };
    let Some(url) = state.config.node_url.clone() else {
        if state.store.backend == Backend::Postgres {
            let live: Vec<String> = state
                .store
                .nodes()
                .await
                .map_err(store_err)?
                .into_iter()
                .filter(|n| n.live && n.id != node)
                .map(|n| format!("{} at {}", n.id, n.url))
                .collect();
            if !live.is_empty() {
                return Err(ClusterError::NotJoined(live.join(", ")));
            }
        }
        return Ok(None);
    };
    let limits = state.machines.limits;
    let labels = labels(state);
    let lease = state
        .store
        .register_node(&Registration {
            id: &node,
            url: &url,
            max_machines: limits.max_machines as i64,
            memory_mib: limits.max_memory_mb as i64,
            labels: &labels,
            lease_ms: state.config.node_lease.as_millis() as i64,
        })
        .await
        .map_err(store_err)?;
    tracing::info!(node = %node, url = %url, epoch = lease.epoch, ?labels, "joined the cluster");
    let m = Arc::new(Membership {
        node_id: node,
        url,
        epoch: AtomicI64::new(lease.epoch),
        fenced: AtomicBool::new(false),
    });
    let _ = state.cluster.set(m.clone());
    Ok(Some(m))
}

/// Renews the lease every fifth of it. A renewal that finds the node held
/// by a newer epoch (or declared dead) fences this process for good. A
/// node whose own renewals have succeeded for a whole lease declares dead
/// the nodes whose lease ran out past the grace, and ends their machines;
/// it does not when more than half the nodes look dead at once (more
/// likely its own view of the database is wrong than half the cluster).
pub fn spawn_heartbeat(state: Shared, m: Arc<Membership>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let lease = state.config.node_lease;
        let lease_ms = lease.as_millis() as i64;
        let mut healthy_since: Option<Instant> = Some(Instant::now());
        loop {
            tokio::select! {
                _ = state.shutdown.cancelled() => return,
                _ = tokio::time::sleep(lease / 5) => {}
            }
            match state
                .store
                .renew_node(&m.node_id, m.epoch(), lease_ms)
                .await
            {
                Ok(Some(_)) => {
                    let since = *healthy_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= lease {
                        declare_dead(&state).await;
                    }
                }
                Ok(None) => {
                    m.fenced.store(true, Ordering::Release);
                    tracing::error!(
                        node = %m.node_id,
                        epoch = m.epoch(),
                        "this node was fenced (declared dead, or registered by another process): it takes no new work; restart it to join again"
                    );
                    return;
                }
                Err(e) => {
                    // The database is unreachable: machines keep running;
                    // no node is declared dead until renewals succeed for a
                    // whole lease again.
                    healthy_since = None;
                    tracing::warn!("renewing the node lease: {e}");
                }
            }
        }
    })
}

async fn declare_dead(state: &Shared) {
    let grace = state.config.node_grace.as_millis() as i64;
    let nodes = match state.store.nodes().await {
        Ok(n) => n,
        Err(e) => return tracing::warn!("reading nodes: {e}"),
    };
    let held: Vec<_> = nodes
        .iter()
        .filter(|n| NodeStatus::LIVE.contains(&n.status))
        .collect();
    let expired = held.iter().filter(|n| !n.live).count();
    if expired == 0 {
        return;
    }
    if expired * 2 > held.len() {
        tracing::warn!(
            expired,
            of = held.len(),
            "more than half the nodes look dead: declaring none (unhealthy-zone rule)"
        );
        return;
    }
    let dead = match state.store.declare_dead_nodes(grace).await {
        Ok(d) => d,
        Err(e) => return tracing::warn!("declaring dead nodes: {e}"),
    };
    for n in dead {
        tracing::warn!(node = %n.id, url = %n.url, "node declared dead: its lease ran out");
        end_machines_of(state, &n.id).await;
    }
}

/// Ends the live machines of a dead node (`error`, with the reason); its
/// paused machines keep their snapshots.
async fn end_machines_of(state: &Shared, node: &str) {
    let rows = match state
        .store
        .machines_on_node(node, &[MachineStatus::Creating, MachineStatus::Running])
        .await
    {
        Ok(r) => r,
        Err(e) => return tracing::warn!(node, "listing a dead node's machines: {e}"),
    };
    let why = format!("its node {node} stopped renewing its lease and was declared dead");
    for row in rows {
        let Ok(m) = crate::machines::record::Machine::from_row(row) else {
            continue;
        };
        if let Err(e) = crate::machines::end::end(
            state,
            m,
            MachineStatus::Error,
            &why,
            &[MachineStatus::Creating, MachineStatus::Running],
        )
        .await
        {
            tracing::warn!(node, "ending a dead node's machine: {e}");
        }
    }
}

/// At a clean stop: the node is `stopped` (nobody declares it dead; its
/// machines run on for its next start).
pub async fn leave(state: &Shared) {
    let Some(m) = state.cluster.get() else {
        return;
    };
    if m.is_fenced() {
        return;
    }
    for from in NodeStatus::LIVE {
        match state
            .store
            .set_node_status(&m.node_id, m.epoch(), from, NodeStatus::Stopped)
            .await
        {
            Ok(true) => return tracing::info!(node = %m.node_id, "left the cluster"),
            Ok(false) => {}
            Err(e) => return tracing::warn!("leaving the cluster: {e}"),
        }
    }
}

/// Defaults for the lease and the grace after it.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);
pub const DEFAULT_GRACE: Duration = Duration::from_secs(20);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_up_rules() {
        let mut c = Config::new("/tmp/x".into());
        assert_eq!(check_config(&c, Backend::Sqlite), Ok(()));
        c.node_url = Some("http://127.0.0.2:7101".into());
        assert_eq!(
            check_config(&c, Backend::Sqlite),
            Err(ClusterError::NeedsPostgres)
        );
        assert_eq!(
            check_config(&c, Backend::Postgres),
            Err(ClusterError::NeedsRegistry)
        );
        c.artifact_registry = Some("127.0.0.1:5000/nullspace".into());
        assert_eq!(check_config(&c, Backend::Postgres), Ok(()));
        c.node_url = Some("127.0.0.2:7101".into());
        assert!(matches!(
            check_config(&c, Backend::Postgres),
            Err(ClusterError::BadUrl(_))
        ));
    }
}
