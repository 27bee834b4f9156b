//! nullspace-server: the template build API the published Python SDK
//! (`nullspace-sdk` 0.1.9) drives unchanged (see `docs/sdk-contract.md`).
//!
//! - [`http`]: routes, auth, SSE; [`builds`]: lifecycle and workers;
//!   [`templates`]: refs, tags, aliases, claims; [`validate`]/[`plan`]:
//!   request checks shared by build, validate, plan and retry;
//!   [`model`]: the wire types.
//! - State lives in `nullspace-store` (SQLite in the data directory, or
//!   Postgres), artifacts in its content-addressed store.

pub mod base;
pub mod builds;
pub mod cluster;
pub mod e2b;
pub mod edge;
pub mod error;
pub mod export;
pub mod export_disk;
pub mod gc;
pub mod git;
pub mod guest;
pub mod http;
pub mod machine_api;
pub mod machine_model;
pub mod machines;
pub mod metrics;
pub mod model;
pub mod openapi;
pub mod plan;
pub mod plan_views;
pub mod preview;
pub mod refs;
pub mod replicate;

pub mod runtime;
pub mod sbom;
pub mod signed_url;
pub mod ssh;
pub mod state;
pub mod templates;
pub mod uploads;
pub mod validate;
pub mod volumes;
pub mod warm_pools;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nullspace_store::artifacts::Artifacts;
use nullspace_store::{Store, StoreError};

pub use nullspace_vm::MemoryMode;
pub use state::{AppState, BuildVm, Config, Shared};

/// Why [`open_store`] or [`open`] failed: which part of the data
/// directory (the binary adds what it was doing).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("creating directory {}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the database")]
    Store(#[from] StoreError),
    #[error("opening the artifact store {}", path.display())]
    Artifacts {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the machine runtime in {}", path.display())]
    Machines {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the build VM")]
    BuildVm(#[source] nullspace_vm::VmError),
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
}

fn create_dir(path: &Path) -> Result<(), OpenError> {
    std::fs::create_dir_all(path).map_err(|source| OpenError::Dir {
        path: path.to_path_buf(),
        source,
    })
}

/// The database, the artifact store and the machine runtime: what every
/// opening needs.
async fn open_offline(config: Config) -> Result<AppState, OpenError> {
    create_dir(&config.data_dir)?;
    let store = Store::open(&database_url(&config)).await?;
    let path = config.data_dir.join("artifacts");
    let artifacts = Artifacts::open(&path).map_err(|source| OpenError::Artifacts {
        path: path.clone(),
        source,
    })?;
    let path = config.data_dir.clone();
    AppState::offline(config, store, artifacts)
        .map_err(|source| OpenError::Machines { path, source })
}

fn database_url(config: &Config) -> String {
    config
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite:{}", config.data_dir.join("nullspace.db").display()))
}

/// Opens the database (upgrading its schema) and the artifact store, and
/// nothing else: for commands beside a running server (`keys`, `gc`,
/// `sandbox`). Never changes a build.
pub async fn open_store(config: Config) -> Result<Shared, OpenError> {
    Ok(Arc::new(open_offline(config).await?))
}

/// Opens the data directory and the database for serving: detects the
/// Dockerfile engines and (with `build_vm`) the build VM. Never changes a
/// build: recovery of builds whose server is gone runs in [`serve`], and
/// only for builds whose lease expired.
pub async fn open(config: Config) -> Result<Shared, OpenError> {
    let work = config.data_dir.join("work");
    let mut state = open_offline(config).await?;
    cluster::check_config(&state.config, state.store.backend)?;
    create_dir(&work)?;
    let config = &state.config;
    let mut engine_config =
        nullspace_build::engine::EngineConfig::new(config.data_dir.join("engines"));
    engine_config.buildkit_addr = config.buildkit_addr.clone();
    engine_config.pid_dir = Some(nullspace_vm::process::PidDir::new(
        state.run_root().join(&state.owner),
    ));
    let engine_list: Vec<Arc<dyn nullspace_build::engine::DockerfileEngine>> =
        nullspace_build::engine::detect(&engine_config)
            .into_iter()
            .map(Arc::from)
            .collect();
    for e in &engine_list {
        tracing::info!(
            engine = e.name(),
            version = e.version(),
            "Dockerfile engine available"
        );
    }
    let vmm = match config.build_vm {
        state::BuildVm::Off => None,
        mode => match start_vmm(config).await {
            Ok(vmm) => {
                tracing::info!(accel = ?vmm.accel, kernel = %vmm.kernel.version, "build VM ready");
                Some(Arc::new(vmm))
            }
            Err(e) if mode == state::BuildVm::Auto => {
                tracing::warn!(
                    "build VM off: {e}; builds end with the rootfs and native steps fail (--build-vm makes this fatal)"
                );
                None
            }
            Err(e) => return Err(OpenError::BuildVm(e)),
        },
    };
    state.engines = validate::Engines {
        available: engine_list
            .iter()
            .filter_map(|e| nullspace_model::build::status::Backend::parse(e.name()))
            .collect(),
    };
    state.engine_list = engine_list;
    state.vmm = vmm;
    Ok(Arc::new(state))
}

/// The build VM driver: QEMU, the guest kernel and the guest init, found
/// on this machine (the KVM probe and the initramfs take a few seconds).
async fn start_vmm(config: &Config) -> Result<nullspace_vm::QemuVmm, nullspace_vm::VmError> {
    let init =
        nullspace_vm::init_binary::discover(config.init_bin.as_deref(), Some(&config.data_dir))?;
    let cache = config.data_dir.join("vm-cache");
    // Build VMs keep their directories (sockets, lock, QEMU's record) here;
    // what dead servers left is reaped with the rest of `run/`
    // (`builds::queue::reap_dead_owners`, at serve and periodically).
    let run = config.data_dir.join("run");
    tokio::task::spawn_blocking(move || {
        let kernel = nullspace_vm::GuestKernel::find()?;
        match nullspace_vm::QemuVmm::with_run_dir(kernel.clone(), &init, &cache, &run) {
            Err(nullspace_vm::VmError::VmCreate { message, .. })
                if message.contains("too long") =>
            {
                tracing::warn!(%message, "build VM sockets go to the system temp dir");
                nullspace_vm::QemuVmm::new(kernel, &init, &cache)
            }
            r => r,
        }
    })
    .await
    .map_err(|e| nullspace_vm::VmError::Kernel(e.to_string()))?
}

/// Serves the API on `listener` with `config.workers` build workers until
/// SIGTERM or SIGINT, then shuts down cleanly (see [`serve_until`]). A
/// second signal exits at once.
pub async fn serve(state: Shared, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let stop = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("stopping: no new work; stopping running builds");
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::warn!("second signal: exiting now");
            // Children die with us (PR_SET_PDEATHSIG); pidfiles let the next
            // start end anything that did not.
            std::process::exit(130);
        });
    };
    serve_until(state, listener, stop).await
}

/// Serves until `stop` completes (machines are reconciled with their VMs
/// first: [`machines::recover`]), then: stops accepting requests (axum's
/// graceful shutdown) and taking builds, lets running builds go on for
/// `shutdown_grace`, stops the rest (their process trees are killed) and
/// hands them back (re-queued, or `interrupted` when they hold request-time
/// credentials), waits until every worker and child process but the
/// machines' QEMUs is gone (machines keep running: the next start takes
/// them over), and releases `run/<owner>/`.
pub async fn serve_until(
    state: Shared,
    listener: tokio::net::TcpListener,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // This server's run directory, locked for its life; then whatever
    // servers that died on this data directory left running is ended, and
    // their builds are recovered at once (their owner is known dead).
    let lock = nullspace_vm::process::OwnerLock::acquire(&state.run_root(), &state.owner)
        .map_err(std::io::Error::other)?;
    // Bound first: an address in use fails the start before any work.
    let ssh_listener = match state.config.ssh_listen.clone() {
        Some(addr) => Some(ssh::server::bind(&state, &addr).await?),
        None => None,
    };
    // Machine networking before the pool: pooled VMs get namespaces too.
    if state.vmm.is_some() && state.config.machine_namespaces {
        match state.machines.init_net(state.config.machine_dns) {
            Ok(()) => tracing::info!(
                resolver = ?state.machines.net().and_then(|n| n.resolver()),
                "machine networking: a namespace per machine; egress policies enforced"
            ),
            Err(e) => tracing::warn!(
                "machine networking: QEMU's user-mode network, no egress policies ({e})"
            ),
        }
    }
    // A node of a cluster registers (a new epoch fences any earlier
    // process of it) before it touches machines; a lone server on a store
    // live nodes share is refused.
    let membership = cluster::join(&state)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let heartbeat = membership.map(|m| cluster::spawn_heartbeat(state.clone(), m));
    // Pooled VMs are recorded in this server's run directory while pooled.
    state.machines.start_pool(lock.pids.clone());
    *state.run_lock.lock().expect("run lock") = Some(lock);
    let dead = builds::queue::reap_dead_owners(&state).await;
    if let Err(e) = builds::queue::recover_once(&state, &dead).await {
        tracing::error!("recovering builds: {}", e.message);
    }
    // Machines: reconciled with their VMs before the first request, then
    // timeouts and dead VMs watched; the base template built if missing.
    machines::recover(&state)
        .await
        .map_err(|e| std::io::Error::other(format!("recovering machines: {e}")))?;
    machines::spawn_reaper(state.clone());
    // Warm pools pinned again, after the machines hold their capacity.
    warm_pools::restore(&state).await;
    // A volume file operation cut short by the last run's end holds no lock.
    if let Err(e) = state
        .store
        .release_host_volume_locks(volumes::files::HOST_HOLDER)
        .await
    {
        tracing::warn!("releasing volume locks: {e}");
    }
    state.uploads.clear_spool().map_err(std::io::Error::other)?;
    spawn_upload_sweeper(state.clone());
    base::ensure(&state).await;
    let monitor = tokio::spawn(builds::queue::monitor(state.clone()));
    let recovery = tokio::spawn(builds::queue::recovery_loop(state.clone()));
    let collector = state
        .config
        .gc_interval
        .map(|every| tokio::spawn(gc::periodic(state.clone(), every)));
    let workers = builds::queue::spawn_workers(&state, state.config.workers);
    // The SSH endpoint ends with the shutdown token, its sessions with it.
    let ssh = ssh_listener.map(|l| tokio::spawn(ssh::server::run(state.clone(), l)));
    let shutdown = state.shutdown.clone();
    let served = edge::serve::serve(
        listener,
        http::router(state.clone()),
        state.config.http.clone(),
        async move {
            stop.await;
            shutdown.cancel();
        },
    )
    .await;
    state.shutdown.cancel();
    if let Some(t) = ssh {
        let _ = t.await;
    }
    builds::queue::drain(&state, workers, state.config.shutdown_grace).await;
    let _ = monitor.await;
    let _ = recovery.await;
    if let Some(h) = heartbeat {
        let _ = h.await;
        cluster::leave(&state).await;
    }
    if let Some(c) = collector {
        c.abort();
        let _ = c.await;
    }
    // Pooled VMs are not machines: they end with the server.
    let rt = state.machines.clone();
    let _ = tokio::task::spawn_blocking(move || rt.shutdown_pool()).await;
    // Machines keep running (the next start takes them over): their VMs
    // are let go (a dropped VM value would kill its QEMU), and their QEMUs
    // are not among the children ended here.
    let machines = state.machines.detach_all().await;
    end_children(machines).await;
    if let Some(lock) = state.run_lock.lock().expect("run lock").take() {
        lock.release();
    }
    tracing::info!("stopped");
    served
}

/// Ends any child process still running (a last resort: every stage waits
/// for its own) but `keep` (running machines' QEMUs), and waits until none
/// is left.
async fn end_children(keep: Vec<u32>) {
    let _ = tokio::task::spawn_blocking(move || {
        let me = std::process::id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let children: Vec<u32> = nullspace_vm::process::tree(me)
                .into_iter()
                .filter(|p| *p != me && !keep.contains(p))
                .collect();
            if children.is_empty() || std::time::Instant::now() > deadline {
                break;
            }
            for c in children {
                tracing::warn!(pid = c, "ending a child process left at shutdown");
                nullspace_vm::process::kill_tree(c);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    })
    .await;
}

/// Expires upload sessions (and removes their spool) once a minute until
/// shutdown.
fn spawn_upload_sweeper(state: Shared) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = state.shutdown.cancelled() => return,
                _ = tick.tick() => state.uploads.sweep(),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data directory that cannot be created is named, with the I/O
    /// error as its source; a database that cannot open is `Store`.
    #[tokio::test]
    async fn open_errors_name_what_failed() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let err = open_store(Config::new(file.join("data")))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, OpenError::Dir { .. }), "{err:?}");
        assert!(err.to_string().contains("not-a-dir/data"), "{err}");
        assert!(std::error::Error::source(&err).is_some());
        let mut config = Config::new(tmp.path().join("data"));
        config.database_url = Some("nosuchdb://x".into());
        let err = open_store(config).await.err().unwrap();
        assert!(matches!(err, OpenError::Store(_)), "{err:?}");
    }
}
