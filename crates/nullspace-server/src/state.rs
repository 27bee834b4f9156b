//! Server state shared by handlers and workers.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use nullspace_store::Store;
use nullspace_store::artifacts::Artifacts;
use serde_json::Value;
use tokio::sync::{Notify, broadcast};

use crate::model::BuildSecret;
use crate::validate::Engines;

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    /// `None`: the embedded SQLite database in the data directory.
    pub database_url: Option<String>,
    /// Builds run at once by this server.
    pub workers: usize,
    pub insecure_registries: Vec<String>,
    /// Layer cache bound.
    pub cache_max_bytes: u64,
    /// A BuildKit daemon (`buildctl --addr`), if there is one.
    pub buildkit_addr: Option<String>,
    /// Boot every template in a build VM, run its start command, wait for
    /// readiness and snapshot it (QEMU). Off: the rootfs is the artifact.
    pub build_vm: BuildVm,
    /// The static guest init (`nullspace-init`) for the build VM; `None`:
    /// found by `nullspace_vm::init_binary::discover`.
    pub init_bin: Option<PathBuf>,
    /// Give build VMs outbound network (QEMU user networking) when a build
    /// asks for `internet_access`. Opt-in: user networking also reaches the
    /// host's loopback services, which hostile build steps must not see
    /// unless the operator accepts that.
    pub build_vm_network: bool,
    /// How many machines (and how much guest memory) this server runs.
    pub machine_limits: crate::runtime::Limits,
    /// Build `nullspace/base` at start-up when it is missing (with the build VM).
    pub base_template: bool,
}

impl Config {
    pub fn new(data_dir: PathBuf) -> Config {
        Config {
            data_dir,
            database_url: None,
            workers: 2,
            insecure_registries: vec![],
            cache_max_bytes: 20 << 30,
            buildkit_addr: None,
            build_vm: BuildVm::Off,
            init_bin: None,
            build_vm_network: false,
            machine_limits: crate::runtime::Limits::default_for_host(),
            base_template: true,
        }
    }
}

/// Whether builds end in a build VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildVm {
    /// Never (CLI commands that only open the store, `--no-build-vm`).
    Off,
    /// When this machine can run one: QEMU, a guest kernel and the guest
    /// init are all found and the VMM starts. Otherwise the server logs why
    /// and runs without (the default of `nullspace serve`).
    Auto,
    /// Always: start-up fails with the reason if the VM cannot run.
    On,
}

/// Request-time credentials of a build: in memory only, handed from the
/// request to the worker and dropped when the build ends.
#[derive(Default)]
pub struct RunSecrets {
    pub base_image_auth: Option<Value>,
    pub registry_auth: Vec<Value>,
    pub build_secrets: Vec<BuildSecret>,
}

/// Wakes SSE followers when a build gets a new log entry.
#[derive(Default)]
pub struct Hub {
    channels: Mutex<HashMap<String, broadcast::Sender<()>>>,
}

impl Hub {
    pub fn subscribe(&self, build_id: &str) -> broadcast::Receiver<()> {
        let mut m = self.channels.lock().expect("hub lock");
        m.entry(build_id.to_string())
            .or_insert_with(|| broadcast::channel(16).0)
            .subscribe()
    }
    pub fn notify(&self, build_id: &str) {
        let m = self.channels.lock().expect("hub lock");
        if let Some(tx) = m.get(build_id) {
            let _ = tx.send(());
        }
    }
    pub fn forget(&self, build_id: &str) {
        let mut m = self.channels.lock().expect("hub lock");
        if m.get(build_id).is_some_and(|tx| tx.receiver_count() == 0) {
            m.remove(build_id);
        }
    }
}

pub struct AppState {
    pub config: Config,
    pub store: Store,
    pub artifacts: Artifacts,
    pub cache_dir: PathBuf,
    pub work_dir: PathBuf,
    pub hub: Hub,
    pub engines: Engines,
    /// The Dockerfile engines found at start-up, default first.
    pub engine_list: Vec<Arc<dyn nullspace_build::engine::DockerfileEngine>>,
    /// The build VM driver, when `Config::build_vm` is on.
    pub vmm: Option<Arc<nullspace_vm::QemuVmm>>,
    pub wake: Notify,
    pub cancels: Mutex<HashMap<String, Arc<AtomicBool>>>,
    pub secrets: Mutex<HashMap<String, RunSecrets>>,
    /// The machines this server (node) runs.
    pub machines: Arc<crate::runtime::Runtime>,
}

pub type Shared = Arc<AppState>;
