//! Server state shared by handlers and workers.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nullspace_store::Store;
use nullspace_store::artifacts::Artifacts;
use serde_json::Value;
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;

use crate::builds::RunHandle;
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
    /// Run each machine in a network namespace of its own under its
    /// egress policy (`nullspace_vm::net`; needs root, `ip` and `nft`).
    /// Off, or where it cannot be set up: QEMU's user-mode network and no
    /// egress policies.
    pub machine_namespaces: bool,
    /// The resolver machines' DNS queries go to (`None`: the host's first
    /// non-loopback `nameserver`).
    pub machine_dns: Option<std::net::Ipv4Addr>,
    /// How build VMs keep guest memory, and so how their machines restore:
    /// `Mapped` (the default: a RAM file that machines map copy-on-write)
    /// or `Streamed` (the earlier design, all RAM in the migration stream;
    /// kept for comparison benchmarks).
    pub build_vm_memory: nullspace_vm::MemoryMode,
    /// How many machines (and how much guest memory) this server runs.
    pub machine_limits: crate::runtime::Limits,
    /// Build `nullspace/base` at start-up when it is missing (with the build VM).
    pub base_template: bool,
    /// How long a build stays owned by its server without a renewal; after
    /// that any server may recover it.
    pub lease: Duration,
    /// How often the owner renews its leases (well under `lease`).
    pub lease_renew: Duration,
    /// How often the owner checks its running builds for cancel requests
    /// (from any server) and for builds another server took over.
    pub cancel_poll: Duration,
    /// How often every server looks for builds whose owner is gone.
    pub recovery_interval: Duration,
    /// At SIGTERM/SIGINT, how long running builds may go on before they are
    /// stopped and handed back (re-queued, or `interrupted` when they hold
    /// request-time credentials).
    pub shutdown_grace: Duration,
    /// How often the server runs the garbage collector (`None`: never).
    pub gc_interval: Option<Duration>,
    /// Bytes of one native step's output (or of a Dockerfile engine's whole
    /// output) kept in the build log; the rest is counted and left out.
    pub step_log_limit: u64,
    pub gc: crate::gc::Policy,
    /// Where the SSH endpoint listens (`None`: no endpoint).
    pub ssh_listen: Option<String>,
    /// The host SSH access answers name (default: the host the client
    /// reached the API at).
    pub ssh_public_host: Option<String>,
    /// Preview host names are `{port}-{id}.{this}` (`None`: addressed by
    /// path only, under `/preview/`).
    pub preview_domain: Option<String>,
    /// How long the proxy waits for a guest's server to begin answering.
    pub preview_response_timeout: Duration,
    /// Connections and header deadlines at the HTTP edge.
    pub http: crate::edge::HttpLimits,
    /// Many nodes: where the other nodes reach this one's API (`None`: a
    /// single node; see [`crate::cluster`]).
    pub node_url: Option<String>,
    /// Many nodes: the registry templates are published to and pulled
    /// from (`HOST[:PORT]/REPO`).
    pub artifact_registry: Option<String>,
    /// How long a node's lease runs without a renewal (renewed every fifth).
    pub node_lease: Duration,
    /// How long after its lease ran out a node is declared dead.
    pub node_grace: Duration,
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
            machine_namespaces: true,
            machine_dns: None,
            build_vm_memory: nullspace_vm::MemoryMode::Mapped,
            machine_limits: crate::runtime::Limits::default_for_host(),
            base_template: true,
            lease: Duration::from_secs(30),
            lease_renew: Duration::from_secs(5),
            cancel_poll: Duration::from_millis(500),
            recovery_interval: Duration::from_secs(5),
            shutdown_grace: Duration::ZERO,
            gc_interval: Some(Duration::from_secs(3600)),
            gc: crate::gc::Policy::default(),
            step_log_limit: 4 << 20,
            ssh_listen: None,
            ssh_public_host: None,
            preview_domain: Some("localhost".into()),
            preview_response_timeout: Duration::from_secs(60),
            http: crate::edge::HttpLimits::default(),
            node_url: None,
            artifact_registry: None,
            node_lease: crate::cluster::DEFAULT_LEASE,
            node_grace: crate::cluster::DEFAULT_GRACE,
        }
    }

    /// Sets the lease and derives the renewal and recovery periods from it
    /// (tests use short leases).
    pub fn with_lease(mut self, lease: Duration) -> Config {
        self.lease = lease;
        self.lease_renew = (lease / 6).max(Duration::from_millis(200));
        self.recovery_interval = (lease / 6).max(Duration::from_millis(200));
        self
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
pub struct RunSecrets {
    pub base_image_auth: Option<Value>,
    pub registry_auth: Vec<Value>,
    pub build_secrets: Vec<BuildSecret>,
    pub created: Instant,
}

impl Default for RunSecrets {
    fn default() -> Self {
        RunSecrets {
            base_image_auth: None,
            registry_auth: vec![],
            build_secrets: vec![],
            created: Instant::now(),
        }
    }
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
    /// This server process's owner id (builds it runs or holds credentials
    /// for carry it, with a lease).
    pub owner: String,
    /// The builds this server runs, by id.
    pub running: Mutex<HashMap<String, Arc<RunHandle>>>,
    pub secrets: Mutex<HashMap<String, RunSecrets>>,
    /// The machines this server (node) runs.
    pub machines: Arc<crate::runtime::Runtime>,
    /// Cancelled when the server begins to shut down: workers stop taking
    /// builds, log streams end.
    pub shutdown: CancellationToken,
    /// The lock on `run/<owner>/` (held while serving) and the pidfiles of
    /// this server's child processes.
    pub run_lock: Mutex<Option<nullspace_vm::process::OwnerLock>>,
    /// Upload sessions, spooled in `DATA_DIR/uploads`.
    pub uploads: Arc<crate::uploads::Uploads>,
    /// The key of signed transfer URLs (`DATA_DIR/signing.key`).
    pub signing_key: crate::signed_url::SigningKey,
    /// SSH access: the CA and host keys (`DATA_DIR/ssh`), grants, the endpoint.
    pub ssh: Arc<crate::ssh::Ssh>,
    /// Use of preview grants since this server started.
    pub preview_usage: crate::machines::ports::UsageTable,
    /// This node's membership of a cluster, once joined (many nodes only).
    pub cluster: std::sync::OnceLock<Arc<crate::cluster::Membership>>,
    /// Templates being pulled from the artifact registry (one per build).
    pub pulls: crate::replicate::Pulls,
}

pub type Shared = Arc<AppState>;

impl AppState {
    /// A state for commands that only read or write the store (`keys`,
    /// `gc`, `sandbox`): no engines, no build VM, no workers.
    pub fn offline(
        config: Config,
        store: Store,
        artifacts: Artifacts,
    ) -> std::io::Result<AppState> {
        let machines = Arc::new(crate::runtime::Runtime::open(
            &config.data_dir,
            config.machine_limits,
        )?);
        let uploads = crate::uploads::Uploads::open(
            &config.data_dir.join("uploads"),
            crate::uploads::Limits::default(),
        )
        .map_err(std::io::Error::other)?;
        let signing_key =
            crate::signed_url::SigningKey::open(&config.data_dir).map_err(std::io::Error::other)?;
        let ssh = crate::ssh::Ssh::open(&config.data_dir).map_err(std::io::Error::other)?;
        Ok(AppState {
            ssh: Arc::new(ssh),
            uploads: Arc::new(uploads),
            signing_key,
            preview_usage: Default::default(),
            cluster: Default::default(),
            pulls: Default::default(),
            cache_dir: config.data_dir.join("cache"),
            work_dir: config.data_dir.join("work"),
            config,
            store,
            artifacts,
            hub: Default::default(),
            engines: Engines { available: vec![] },
            engine_list: vec![],
            vmm: None,
            wake: Default::default(),
            owner: nullspace_store::new_id(nullspace_vm::process::OWNER_PREFIX),
            running: Default::default(),
            secrets: Default::default(),
            shutdown: CancellationToken::new(),
            run_lock: Mutex::new(None),
            machines,
        })
    }

    /// A lease taken or renewed now ends at this time (epoch ms).
    pub fn lease_until(&self) -> i64 {
        nullspace_store::now_ms() + self.config.lease.as_millis() as i64
    }

    /// `DATA_DIR/run`: one directory per live server (see
    /// [`nullspace_vm::process`]).
    pub fn run_root(&self) -> PathBuf {
        self.config.data_dir.join("run")
    }

    /// `DATA_DIR/artifacts/snapshots`: the snapshots builds take, which
    /// templates start from (machines' own are `Runtime::machine_snapshots_dir`).
    pub fn template_snapshots_dir(&self) -> PathBuf {
        self.config.data_dir.join("artifacts/snapshots")
    }
}
