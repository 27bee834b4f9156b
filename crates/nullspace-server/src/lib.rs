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
pub mod error;
pub mod guest;
pub mod http;
pub mod machine_api;
pub mod machine_model;
pub mod machines;
pub mod model;
pub mod native;
pub mod openapi;
pub mod plan;
pub mod refs;
pub mod runtime;
pub mod state;
pub mod templates;
pub mod validate;

use std::sync::Arc;

use nullspace_store::Store;
use nullspace_store::artifacts::Artifacts;

pub use state::{AppState, BuildVm, Config, Shared};

/// Opens the data directory and the database. Recovery (interrupted
/// builds, machines) is [`serve`]'s: `nullspace keys create` opens the same
/// directory while a server runs, and must not touch its work.
pub async fn open(config: Config) -> anyhow_like::Result<Shared> {
    std::fs::create_dir_all(&config.data_dir)?;
    let url = config
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite:{}", config.data_dir.join("nullspace.db").display()));
    let store = Store::open(&url).await?;
    let artifacts = Artifacts::open(&config.data_dir.join("artifacts"))?;
    let work_dir = config.data_dir.join("work");
    std::fs::create_dir_all(&work_dir)?;
    let mut engine_config =
        nullspace_build::engine::EngineConfig::new(config.data_dir.join("engines"));
    engine_config.buildkit_addr = config.buildkit_addr.clone();
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
        mode => match start_vmm(&config).await {
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
            Err(e) => return Err(anyhow_like::Error(format!("build VM: {e}"))),
        },
    };
    let machines = Arc::new(runtime::Runtime::open(
        &config.data_dir,
        config.machine_limits,
    )?);
    let state = Arc::new(AppState {
        cache_dir: config.data_dir.join("cache"),
        work_dir,
        config,
        store,
        artifacts,
        hub: Default::default(),
        engines: validate::Engines {
            available: engine_list.iter().map(|e| e.name().to_string()).collect(),
        },
        engine_list,
        vmm,
        wake: Default::default(),
        cancels: Default::default(),
        secrets: Default::default(),
        machines,
    });
    Ok(state)
}

/// The build VM driver: QEMU, the guest kernel and the guest init, found
/// on this machine (the KVM probe and the initramfs take a few seconds).
async fn start_vmm(config: &Config) -> Result<nullspace_vm::QemuVmm, nullspace_vm::VmError> {
    let init =
        nullspace_vm::init_binary::discover(config.init_bin.as_deref(), Some(&config.data_dir))?;
    let cache = config.data_dir.join("vm-cache");
    // Build VMs keep their sockets, owner record and QEMU pidfile here.
    let run = config.data_dir.join("run");
    tokio::task::spawn_blocking(move || {
        // QEMUs that a server which died left behind (a live server's VMs
        // on the same data directory are left alone).
        match nullspace_vm::reap_stale(&run) {
            Ok(k) if !k.is_empty() => {
                tracing::warn!(pids = ?k, "ended QEMU processes a previous run left")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "checking for QEMU processes a previous run left")
            }
        }
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

/// Serves the API on `listener` with `config.workers` build workers.
///
/// First the machines of this node are reconciled with their VMs
/// ([`machines::recover`]); then timeouts are enforced in the background,
/// and the base template is built if it is missing. Machines keep running
/// when the server stops (whatever the signal): the next start takes them
/// over.
pub async fn serve(state: Shared, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    builds::recover(&state)
        .await
        .map_err(|e| std::io::Error::other(format!("recovering builds: {}", e.message)))?;
    machines::recover(&state)
        .await
        .map_err(|e| std::io::Error::other(format!("recovering machines: {}", e.message)))?;
    machines::spawn_reaper(state.clone());
    builds::spawn_workers(state.clone(), state.config.workers);
    base::ensure(&state).await;
    axum::serve(listener, http::router(state)).await
}

/// A minimal error type for start-up (the binary adds context).
pub mod anyhow_like {
    #[derive(Debug)]
    pub struct Error(pub String);
    impl std::fmt::Display for Error {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl std::error::Error for Error {}
    impl From<std::io::Error> for Error {
        fn from(e: std::io::Error) -> Self {
            Error(e.to_string())
        }
    }
    impl From<nullspace_store::StoreError> for Error {
        fn from(e: nullspace_store::StoreError) -> Self {
            Error(e.to_string())
        }
    }
    pub type Result<T> = std::result::Result<T, Error>;
}
