//! The machines this server (node) runs: their QEMU processes, agent
//! connections and directories, and the capacity they take.
//!
//! A machine's VMM is a QEMU restored by `nullspace_vm::machine` into
//! `DATA_DIR/machines/<id>/` (overlay, sockets, pidfile, console log, and
//! `env.json` with its create-time envs, mode 0600). It is detached from
//! the request that made it and from this process: the server can stop
//! and start again and find it (see [`Runtime::adopt`]). The node identity
//! (`DATA_DIR/node-id`) names this server in the machine records, so that
//! servers sharing a database each manage only their own VMs.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nullspace_model::machine::egress::Egress;
use nullspace_vm::machine::MachineHandle;
use nullspace_vm::machine::{self, MachineSpec};
use nullspace_vm::net::{HostNet, MachineNet};
use nullspace_vm::pool::{self, Pool, PoolConfig, PoolKey};
use nullspace_vm::{AfterSnapshot, CancellationToken, QemuVm, Snapshot};

use crate::guest::Guest;

pub const ENV_FILE: &str = "env.json";

/// The bounds of what this node runs at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_machines: usize,
    /// Guest memory of running (and restoring) machines, MiB.
    pub max_memory_mb: u64,
    /// Prepared machines kept ready per template snapshot and shape at
    /// least (`--machine-pool-size`; 0: none but warm pools'). They count
    /// against the bounds above, and give way to creates.
    pub pool_size: usize,
    /// What recent demand may grow a template's stock to
    /// (`--machine-pool-max`; never below `pool_size`; with `pool_size` 0
    /// demand grows nothing).
    pub pool_max: usize,
}

/// Template keys the pool keeps entries for at most (least recently used
/// dropped first), and how long a key nobody created from keeps them.
pub const POOL_MAX_KEYS: usize = 8;
pub const POOL_IDLE: Duration = Duration::from_secs(600);
/// A template's demand is its creates within this window: enough stock to
/// absorb that many while refills (about 0.6 s each under TCG here) catch
/// up.
pub const POOL_DEMAND_WINDOW: Duration = Duration::from_secs(10);

impl Limits {
    /// 64 machines and three quarters of the host's memory.
    pub fn default_for_host() -> Limits {
        let total_mb = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .map(|kb| kb / 1024)
            .unwrap_or(4096);
        Limits {
            max_machines: 64,
            max_memory_mb: total_mb * 3 / 4,
            pool_size: 2,
            pool_max: 8,
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    machines: usize,
    memory_mb: u64,
}

/// Capacity for one machine of `memory_mb`, or which bound it would break.
fn try_reserve(
    usage: &Arc<Mutex<Usage>>,
    limits: &Limits,
    memory_mb: u64,
) -> Result<Reservation, RuntimeError> {
    let mut u = usage.lock().unwrap_or_else(|p| p.into_inner());
    if u.machines >= limits.max_machines {
        return Err(RuntimeError::Capacity(format!(
            "this server runs at most {} machines (--max-machines) and runs {} now",
            limits.max_machines, u.machines
        )));
    }
    if u.memory_mb + memory_mb > limits.max_memory_mb {
        return Err(RuntimeError::Capacity(format!(
            "a machine of {memory_mb} MiB does not fit: this server's machines may use {} MiB of guest memory (--max-machine-memory-mb) and use {} MiB now",
            limits.max_memory_mb, u.memory_mb
        )));
    }
    u.machines += 1;
    u.memory_mb += memory_mb;
    Ok(Reservation {
        usage: usage.clone(),
        memory_mb,
    })
}

/// Capacity held for a machine that runs or is being restored; released
/// when dropped.
pub struct Reservation {
    usage: Arc<Mutex<Usage>>,
    memory_mb: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut u = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        u.machines = u.machines.saturating_sub(1);
        u.memory_mb = u.memory_mb.saturating_sub(self.memory_mb);
    }
}

/// A running machine of this node.
pub struct Live {
    pub id: String,
    pub handle: MachineHandle,
    /// The VM (what snapshots it); `None` once it ended.
    vm: std::sync::Mutex<Option<QemuVm>>,
    pub guest: Guest,
    pub envs: BTreeMap<String, String>,
    /// Serialises lifecycle changes (snapshot, pause, fork, destroy).
    pub lifecycle: tokio::sync::Mutex<()>,
    _reservation: Reservation,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{0}")]
    Capacity(String),
    /// The machine cannot do it now.
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Vm(#[from] nullspace_vm::VmError),
    #[error("{0}")]
    Io(String),
}

pub struct Runtime {
    pub node_id: String,
    /// The data directory (canonical): records keep paths relative to it.
    pub data_dir: PathBuf,
    /// `DATA_DIR/machines`.
    pub machines_dir: PathBuf,
    /// `DATA_DIR/snapshots`: machine snapshots.
    pub machine_snapshots_dir: PathBuf,
    pub limits: Limits,
    usage: Arc<Mutex<Usage>>,
    live: Mutex<HashMap<String, Arc<Live>>>,
    /// Prepared machines ([`Runtime::start_pool`]; none before, and none
    /// for commands that only open the store).
    pool: std::sync::OnceLock<Pool>,
    /// Machine networking through namespaces ([`Runtime::init_net`];
    /// unset: QEMU's user-mode network, and no egress policies).
    net: std::sync::OnceLock<HostNet>,
}

/// How a machine was started, for logs and benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct Started {
    /// Create to the guest's first answer (ms).
    pub ms: u64,
    /// Taken from the pool (prepared ahead).
    pub pooled: bool,
    pub phases: nullspace_vm::RestorePhases,
    /// Setting another size than the snapshot's (ms), when asked for.
    pub resize_ms: Option<u64>,
}

/// Reads the node identity in `data_dir/node-id`, creating it once.
pub fn node_id(data_dir: &Path) -> std::io::Result<String> {
    let p = data_dir.join("node-id");
    match std::fs::read_to_string(&p) {
        Ok(s) if s.trim().starts_with("node_") => return Ok(s.trim().to_string()),
        Ok(_) | Err(_) => {}
    }
    let id = nullspace_store::new_id("node_");
    let tmp = data_dir.join(".node-id.tmp");
    std::fs::write(&tmp, format!("{id}\n"))?;
    std::fs::rename(&tmp, &p)?;
    Ok(id)
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Writes a machine's envs beside its VM or snapshot (mode 0600).
pub fn save_envs(dir: &Path, envs: &BTreeMap<String, String>) -> std::io::Result<()> {
    write_private(
        &dir.join(ENV_FILE),
        &serde_json::to_vec(envs).unwrap_or_default(),
    )
}

pub fn load_envs(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read(dir.join(ENV_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

impl Runtime {
    pub fn open(data_dir: &Path, limits: Limits) -> std::io::Result<Runtime> {
        let machines_dir = data_dir.join("machines");
        let snapshots_dir = data_dir.join("snapshots");
        std::fs::create_dir_all(&machines_dir)?;
        std::fs::create_dir_all(&snapshots_dir)?;
        Ok(Runtime {
            node_id: node_id(data_dir)?,
            data_dir: std::fs::canonicalize(data_dir)?,
            machines_dir: std::fs::canonicalize(&machines_dir)?,
            machine_snapshots_dir: std::fs::canonicalize(&snapshots_dir)?,
            limits,
            usage: Default::default(),
            live: Default::default(),
            pool: Default::default(),
            net: Default::default(),
        })
    }

    /// Sets machine networking up (before the pool starts): namespaces
    /// with egress policies when this process may make them, else says
    /// why not (machines then get QEMU's user-mode network, restricted
    /// unless their template was built with network).
    pub fn init_net(&self, resolver: Option<std::net::Ipv4Addr>) -> Result<(), String> {
        let h = HostNet::init(&self.data_dir, resolver).map_err(|e| e.to_string())?;
        let _ = self.net.set(h);
        Ok(())
    }

    /// Machine networking with egress policies, if set up.
    pub fn net(&self) -> Option<&HostNet> {
        self.net.get()
    }

    /// Replaces running machine `id`'s egress policy (its namespace's
    /// table, one transaction).
    pub async fn apply_egress(&self, id: &str, egress: Egress) -> Result<(), RuntimeError> {
        let resolver = self.net().and_then(HostNet::resolver);
        let dir = self.machine_dir(id);
        tokio::task::spawn_blocking(move || {
            let ns = MachineNet::of_dir(&dir, resolver).ok_or_else(|| {
                RuntimeError::Io(format!("{}: no network namespace", dir.display()))
            })?;
            ns.apply(&egress)
                .map_err(|e| RuntimeError::Io(e.to_string()))
        })
        .await
        .map_err(|e| RuntimeError::Io(format!("egress task: {e}")))?
    }

    /// Starts the pool of prepared machines (when `limits.pool_size` > 0):
    /// entries live in `DATA_DIR/machines/<id>` like machines, and each
    /// entry's QEMU is recorded in `pids` (this server's run directory)
    /// while it is pooled, so that a server that finds this one dead ends
    /// it; the next start of this node sweeps its directory.
    pub fn start_pool(&self, pids: nullspace_vm::process::PidDir) {
        let recorder: Arc<pool::Recorder> = Arc::new(move |pid| match pids.record(pid) {
            Ok(f) => Some(Box::new(f) as Box<dyn Send>),
            Err(e) => {
                tracing::warn!(pid, "recording a pooled QEMU: {e}");
                None
            }
        });
        let (usage, limits) = (self.usage.clone(), self.limits);
        let admit: Arc<pool::Admit> = Arc::new(move |k: &PoolKey| {
            try_reserve(&usage, &limits, k.memory_mb as u64)
                .ok()
                .map(|r| Box::new(r) as Box<dyn std::any::Any + Send>)
        });
        let max_size = if self.limits.pool_size == 0 {
            0
        } else {
            self.limits.pool_max.max(self.limits.pool_size)
        };
        let _ = self.pool.set(Pool::new(PoolConfig {
            size: self.limits.pool_size,
            max_size,
            demand_window: POOL_DEMAND_WINDOW,
            admit: Some(admit),
            // A restore here takes 230-400 ms and would share the CPU with
            // the preparation: waiting up to 350 ms for that VM is sooner.
            wait_for_refill: Duration::from_millis(350),
            max_keys: POOL_MAX_KEYS,
            idle: POOL_IDLE,
            dir: self.machines_dir.clone(),
            new_id: Arc::new(|| nullspace_store::new_id("mch_")),
            timeout: Duration::from_secs(90),
            warm_up: true,
            // Niced only where a take can set it back (root here).
            nice: if nullspace_vm::process::may_raise_priority() {
                10
            } else {
                0
            },
            quiet: Duration::from_millis(300),
            recorder: Some(recorder),
            net: self.net.get().cloned(),
        }));
    }

    /// The pool of prepared machines (none before [`Runtime::start_pool`]).
    pub fn pool(&self) -> Option<&Pool> {
        self.pool.get()
    }

    /// The capacity a pool entry was granted, for its machine to hold.
    pub fn admission_of(entry: &mut pool::Entry) -> Option<Reservation> {
        entry
            .take_admission()
            .and_then(|a| a.downcast::<Reservation>().ok())
            .map(|r| *r)
    }

    /// Ends the pooled machines that `drop_it` picks (a deleted template,
    /// a collected snapshot); how many.
    pub fn drop_pooled(&self, drop_it: impl Fn(&PoolKey) -> bool) -> usize {
        self.pool.get().map(|p| p.remove(drop_it)).unwrap_or(0)
    }

    /// The pool's figures per key.
    pub fn pool_stats(&self) -> Vec<(PoolKey, pool::KeyStats)> {
        self.pool.get().map(Pool::stats).unwrap_or_default()
    }

    /// Stops the pool and ends its machines (a stopping server).
    pub fn shutdown_pool(&self) {
        if let Some(p) = self.pool.get() {
            p.shutdown();
        }
    }

    pub fn machine_dir(&self, id: &str) -> PathBuf {
        self.machines_dir.join(id)
    }

    /// Holds capacity for one machine of `memory_mb`, or says which bound
    /// it would break.
    ///
    /// Prepared machines of the pool hold capacity too: when the host is
    /// full they give way, one at a time, before a create is refused.
    pub fn reserve(&self, memory_mb: u32) -> Result<Reservation, RuntimeError> {
        loop {
            match try_reserve(&self.usage, &self.limits, memory_mb as u64) {
                Ok(r) => return Ok(r),
                // Outside the usage lock: an ended entry releases its own.
                Err(e) => match self.pool.get() {
                    Some(p) if p.shed_one() => continue,
                    _ => return Err(e),
                },
            }
        }
    }

    /// `(machines, memory MiB)` held now.
    pub fn usage(&self) -> (usize, u64) {
        let u = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        (u.machines, u.memory_mb)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Live>> {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    pub fn all(&self) -> Vec<Arc<Live>> {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Lets every running machine's VM go without ending it (a stopping
    /// server: the next start takes them over), waiting for a lifecycle
    /// change that holds a VM; returns their QEMU pids.
    pub async fn detach_all(&self) -> Vec<u32> {
        let all = self.all();
        tokio::task::spawn_blocking(move || {
            all.iter()
                .map(|l| {
                    if let Some(vm) = l.vm.lock().unwrap_or_else(|p| p.into_inner()).take() {
                        // Dropping a QemuVm kills its QEMU; a detached one runs on.
                        let _ = vm.detach();
                    }
                    l.handle.pid
                })
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    /// Forgets a machine (its reservation is released when the last
    /// reference goes).
    pub fn remove(&self, id: &str) -> Option<Arc<Live>> {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
    }

    /// Forgets `live` if it is still the machine's registered VM.
    pub fn remove_if(&self, live: &Arc<Live>) {
        let mut m = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(&live.id).is_some_and(|l| Arc::ptr_eq(l, live)) {
            m.remove(&live.id);
        }
    }

    fn insert(&self, live: Live) -> Arc<Live> {
        let live = Arc::new(live);
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(live.id.clone(), live.clone());
        live
    }

    /// Restores `base` as machine `id` (its directory must not exist) and
    /// records its envs beside it; with `pooled` (an entry prepared for
    /// `id` from `base`), only starts that one (a failed start falls back
    /// to a restore). The returned machine is registered.
    // One restore path for creates (a pooled entry, no volumes) and resumes
    // (no pool, the volumes the guest has mounted): each argument is one
    // of its inputs.
    #[allow(clippy::too_many_arguments)]
    pub async fn restore(
        &self,
        id: &str,
        base: Snapshot,
        envs: BTreeMap<String, String>,
        reservation: Reservation,
        pooled: Option<pool::Entry>,
        egress: Egress,
        volumes: Vec<Option<nullspace_vm::spares::SpareImage>>,
        size: Option<(u32, u32)>,
    ) -> Result<(Arc<Live>, Started), RuntimeError> {
        let spec = MachineSpec {
            dir: self.machine_dir(id),
            timeout: Duration::from_secs(90),
            nice: 0,
            net: self.net.get().cloned(),
        };
        let resolver = self.net().and_then(HostNet::resolver);
        let e = envs.clone();
        let mid = id.to_string();
        let (restored, started) =
            tokio::task::spawn_blocking(move || -> Result<_, RuntimeError> {
                let t0 = std::time::Instant::now();
                let nc = CancellationToken::new();
                let mut started = Started::default();
                let from_pool = pooled.and_then(|p| {
                    debug_assert_eq!(p.id, mid);
                    let phases = p.prepared().phases();
                    match p.start(Duration::from_secs(30), &nc) {
                        Ok(r) => {
                            started.pooled = true;
                            started.phases = phases;
                            Some(r)
                        }
                        Err(e) => {
                            tracing::warn!(machine = %mid, "a pooled VM did not start ({e}); restoring instead");
                            None
                        }
                    }
                });
                let mut r = match from_pool {
                    Some(r) => r,
                    None => machine::restore_with(&base, &spec, &volumes, &nc)?,
                };
                if let Some((vcpus, memory_mb)) = size {
                    let t = std::time::Instant::now();
                    if let Err(e) = r.vm.resize(vcpus, memory_mb, Duration::from_secs(60)) {
                        drop(r);
                        let _ = machine::remove_dir(&spec.dir);
                        return Err(RuntimeError::Vm(e));
                    }
                    started.resize_ms = Some(t.elapsed().as_millis() as u64);
                }
                if !started.pooled {
                    started.phases = r.vm.phases;
                }
                started.phases.start = r.vm.phases.start;
                if let Err(err) = save_envs(&spec.dir, &e) {
                    drop(r);
                    let _ = machine::remove_dir(&spec.dir);
                    return Err(RuntimeError::Io(format!("machine envs: {err}")));
                }
                // A machine's namespace denies everything until its own
                // policy is in place (fail closed).
                if let Some(ns) = MachineNet::of_dir(&spec.dir, resolver)
                    && let Err(err) = ns.apply(&egress)
                {
                    drop(r);
                    let _ = machine::remove_dir(&spec.dir);
                    return Err(RuntimeError::Io(format!("machine egress policy: {err}")));
                }
                started.ms = t0.elapsed().as_millis() as u64;
                Ok((r, started))
            })
            .await
            .map_err(|e| RuntimeError::Io(format!("restore task: {e}")))??;
        let live = self.insert(Live {
            id: id.to_string(),
            guest: Guest::new(restored.handle.agent_socket.clone(), Some(restored.agent)),
            handle: restored.handle,
            vm: std::sync::Mutex::new(Some(restored.vm)),
            envs,
            lifecycle: Default::default(),
            _reservation: reservation,
        });
        Ok((live, started))
    }

    /// Spare disks of the machine's VM (0: a template from before volumes).
    pub fn spare_disks(live: &Live) -> u32 {
        live.vm
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, |vm| vm.meta().spare_disks)
    }

    /// Takes over a machine a previous run of this server started: its
    /// QEMU runs (the pid's command line names its sockets) and its agent
    /// answers. The caller ends it otherwise.
    pub async fn adopt(
        &self,
        id: &str,
        handle: MachineHandle,
        base: Snapshot,
        reservation: Reservation,
        size: (u32, u32),
    ) -> Result<Arc<Live>, RuntimeError> {
        let h = handle.clone();
        let r = tokio::task::spawn_blocking(move || {
            machine::reattach(&h, base, Duration::from_secs(15)).map(|mut r| {
                // A create may have resized it from its snapshot's size.
                r.vm.assume_size(size.0, size.1);
                r
            })
        })
        .await
        .map_err(|e| RuntimeError::Io(format!("adopt task: {e}")))??;
        let envs = load_envs(&self.machine_dir(id));
        Ok(self.insert(Live {
            id: id.to_string(),
            guest: Guest::new(handle.agent_socket.clone(), Some(r.agent)),
            handle,
            vm: std::sync::Mutex::new(Some(r.vm)),
            envs,
            lifecycle: Default::default(),
            _reservation: reservation,
        }))
    }

    /// Snapshots a running machine into `out` (see `QemuVm::snapshot`), with
    /// its envs. With [`AfterSnapshot::Stop`] the VM is gone afterwards,
    /// the machine forgotten and its directory removed.
    pub async fn snapshot(
        &self,
        live: &Arc<Live>,
        out: PathBuf,
        after: AfterSnapshot,
    ) -> Result<Snapshot, RuntimeError> {
        let l = live.clone();
        let dir = self.machine_dir(&live.id);
        let snap = tokio::task::spawn_blocking(move || -> Result<_, RuntimeError> {
            let mut guard = l.vm.lock().unwrap_or_else(|p| p.into_inner());
            let vm = guard
                .as_mut()
                .ok_or_else(|| RuntimeError::Io("the machine's VM has ended".into()))?;
            // A full disk would show up as a failed migration: say what it is.
            let need = ((vm.meta().qemu_memory_mb() as u64) << 20)
                + std::fs::metadata(l.handle.dir.join("disk.qcow2"))
                    .map(|m| m.len())
                    .unwrap_or(0);
            if let Some(free) = out.parent().and_then(machine::free_bytes)
                && free < need
            {
                return Err(RuntimeError::Io(format!(
                    "not enough free space for a snapshot: up to {} MiB needed, {} MiB free",
                    need >> 20,
                    free >> 20
                )));
            }
            // A VM that goes on gets a new agent connection: the calls in
            // flight end first (fork and snapshot wait for them, briefly).
            let quiet = match after {
                AfterSnapshot::Stop => None,
                _ => Some(l.guest.quiesce(Duration::from_secs(15)).ok_or_else(|| {
                    RuntimeError::Busy(
                        "it is running commands (foreground or streamed); snapshot or fork it when they end".into(),
                    )
                })?),
            };
            let r = vm.snapshot(&out, after, &CancellationToken::new());
            if quiet.is_some() {
                // One connection, held by the VM and shared by the calls
                // (whatever the snapshot left of the old one).
                let agent = vm
                    .reconnect_agent_with(Default::default(), Duration::from_secs(30))
                    .ok();
                l.guest.resume_with(agent);
            }
            drop(quiet);
            let snap = r?;
            if let Err(e) = save_envs(&out, &l.envs) {
                let _ = nullspace_vm::snapshot::remove_dir(&out);
                return Err(RuntimeError::Io(format!("snapshot envs: {e}")));
            }
            if after == AfterSnapshot::Stop {
                // QEMU ended: drop the VM (its directory goes) and the machine's.
                guard.take();
                let _ = l.handle.kill(Duration::from_secs(1));
                let _ = machine::remove_dir(&dir);
            }
            Ok(snap)
        })
        .await
        .map_err(|e| RuntimeError::Io(format!("snapshot task: {e}")))??;
        if after == AfterSnapshot::Stop {
            self.remove_if(live);
        }
        Ok(snap)
    }

    /// The handle of machine `id`'s VM, whose QEMU is `pid`: its directory
    /// (the `ns-sbx-*` one a restore makes in the machine's) and sockets.
    pub fn handle_of(&self, id: &str, pid: u32) -> MachineHandle {
        let mdir = self.machine_dir(id);
        MachineHandle::new(pid, machine::vm_dir(&mdir).unwrap_or(mdir))
    }

    /// A path under the data directory as records keep it: relative, so a
    /// moved data directory still resolves.
    pub fn relative(&self, p: &Path) -> String {
        let p = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        p.strip_prefix(&self.data_dir)
            .unwrap_or(&p)
            .display()
            .to_string()
    }

    /// A path a record keeps (relative; absolute in older records).
    pub fn resolve(&self, recorded: &str) -> PathBuf {
        self.data_dir.join(recorded)
    }

    /// Ends a machine's VM and removes its directory; forgets it.
    pub async fn destroy(
        &self,
        id: &str,
        handle: Option<MachineHandle>,
    ) -> Result<(), RuntimeError> {
        let live = self.remove(id);
        let handle = live.as_ref().map(|l| l.handle.clone()).or(handle);
        let dir = self.machine_dir(id);
        tokio::task::spawn_blocking(move || -> Result<(), RuntimeError> {
            if let Some(h) = handle {
                // QMP quit, then SIGKILL: also a VM this process did not start.
                h.kill(Duration::from_secs(3))?;
            }
            if let Some(l) = live {
                l.vm.lock().unwrap_or_else(|p| p.into_inner()).take();
            }
            match machine::remove_dir(&dir) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(RuntimeError::Io(format!("{}: {e}", dir.display()))),
            }
        })
        .await
        .map_err(|e| RuntimeError::Io(format!("destroy task: {e}")))?
    }

    /// Machine directories that no running machine of `known` owns (nor
    /// the pool: a previous run's pooled machines are swept too): their
    /// QEMU (if it still runs, matched by the pidfile and its command line)
    /// is killed and the directory removed. Returns the ids swept.
    /// Ends every process whose command line names machine `id`'s
    /// directory: a QEMU a crash caught mid-restore, which its record
    /// never learnt of (its pid file or VM directory may not exist yet).
    pub fn end_strays(&self, id: &str) {
        let needle = format!("{}/", self.machine_dir(id).display());
        for pid in nullspace_vm::process::procfs::naming(needle.as_bytes()) {
            let _ = nullspace_vm::process::signal::kill_naming(
                pid,
                needle.as_bytes(),
                Duration::from_secs(2),
            );
        }
    }

    pub fn sweep_orphans(&self, known: &[String]) -> Vec<String> {
        let mut swept = vec![];
        let Ok(rd) = std::fs::read_dir(&self.machines_dir) else {
            return swept;
        };
        let pooled = self.pool.get().map(Pool::ids).unwrap_or_default();
        for e in rd.flatten() {
            let id = e.file_name().to_string_lossy().to_string();
            if known.contains(&id) || self.get(&id).is_some() || pooled.contains(&id) {
                continue;
            }
            let dir = e.path();
            // Its QEMU, if any, is found by its command line (which names
            // the directory), with or without a pid file.
            self.end_strays(&id);
            let _ = machine::remove_dir(&dir);
            swept.push(id);
        }
        // Namespaces whose machine directory is gone (a crash between the
        // two).
        if let Some(net) = self.net() {
            let ids: Vec<String> = std::fs::read_dir(&self.machines_dir)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().to_string())
                        .collect()
                })
                .unwrap_or_default();
            for name in net.sweep(|id| ids.iter().any(|i| i == id)) {
                swept.push(name);
            }
        }
        swept
    }
}
