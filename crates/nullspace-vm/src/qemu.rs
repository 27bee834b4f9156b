//! The QEMU driver: `qemu-system-x86_64 -M microvm`, TCG unless a probe
//! shows KVM guests really run (see docs/machine-facts: /dev/kvm exists on
//! these hosts but nested guests hang).
//!
//! Guest memory ([`MemoryMode::Mapped`], the default): a build VM's RAM is
//! `memory-backend-file,share=on` on the snapshot's `memory.ram`, so the
//! guest writes its memory straight into that file; the snapshot enables
//! `x-ignore-shared` and the migration stream carries device state only.
//! A restore maps the same file `share=off,readonly=on,rom=off`: a private
//! copy-on-write mapping of a file opened read-only, so the template file
//! can never be written, untouched pages are never read, and clean pages
//! are shared through the page cache by every VM of the template.
//! (QEMU 9+ also has the `mapped-ram` capability, which writes RAM pages
//! at fixed offsets of the migration file; but its restore reads every
//! page into the new VM's own memory, so it saves neither restore time nor
//! memory. `x-ignore-shared` with a file-backed RAM is what allows mapping.)
//!
//! [`MemoryMode::Streamed`] is the earlier design (all RAM in the migration
//! stream, read back by every restore), kept so benchmarks can compare.

use crate::agent::AgentClient;
use crate::kernel::GuestKernel;
use crate::process::{self, Launch, OwnerLock, PidFile, Watch};
use crate::qmp::{MigrationStatus, Qmp, RunState};
use crate::snapshot::{self as snapfs, Snapshot, VmMeta};
use crate::template::GuestConfig;
use crate::{Vm, VmError, Vmm, initramfs};
pub use nullspace_model::snapshot::{Accel, MemoryMode, QemuVersion};
use nullspace_model::snapshot::{DiskFormat, DiskLayer, Memory, Parent, SnapshotManifest};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub use crate::process::QEMU;
pub const AGENT_PORT: &str = nullspace_model::guest::AGENT_PORT;

fn accel_args(a: Accel) -> [&'static str; 2] {
    match a {
        Accel::Kvm => ["-accel", "kvm"],
        // Single-threaded TCG: multi-threaded TCG hangs microvm boots
        // about 1 in 6 here.
        Accel::Tcg => ["-accel", "tcg,thread=single"],
    }
}

static ACCEL: OnceLock<Accel> = OnceLock::new();

/// KVM only if a probe guest boots under it within 5 s; else TCG. Cached
/// per process; `NULLSPACE_VM_ACCEL=tcg|kvm` overrides. The probe's QEMU
/// dies with the calling thread and is killed when the probe ends.
pub fn detect_accel(kernel: &GuestKernel, base_initrd: &Path, run_dir: Option<&Path>) -> Accel {
    *ACCEL.get_or_init(|| match std::env::var("NULLSPACE_VM_ACCEL").as_deref() {
        Ok("tcg") => Accel::Tcg,
        Ok("kvm") => Accel::Kvm,
        _ => {
            if std::fs::File::options()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_err()
            {
                return Accel::Tcg;
            }
            match probe_kvm(kernel, base_initrd, run_dir) {
                Ok(true) => Accel::Kvm,
                _ => Accel::Tcg,
            }
        }
    })
}

fn probe_kvm(
    kernel: &GuestKernel,
    base_initrd: &Path,
    run_dir: Option<&Path>,
) -> Result<bool, VmError> {
    let mut dir = VmDir::owned(run_dir, "ns-kvmprobe-")?;
    let initrd = dir.path().join("initrd");
    let cfg = GuestConfig {
        probe_only: true,
        ..Default::default()
    };
    initramfs::write_with_config(
        base_initrd,
        &serde_json::to_vec(&cfg).unwrap_or_default(),
        &initrd,
    )?;
    let log = dir.path().join("console.log");
    let args: Vec<String> = [
        "-M",
        "microvm",
        "-accel",
        "kvm",
        "-m",
        "128",
        "-nographic",
        "-no-reboot",
        "-append",
        "console=ttyS0 panic=-1 edd=off quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "-kernel".into(),
        kernel.vmlinuz.display().to_string(),
        "-initrd".into(),
        initrd.display().to_string(),
    ])
    .collect();
    // Dies with this thread (the probe is one call) and is killed by the
    // guard on every return path.
    let mut child = ChildGuard(Some(process::spawn::spawn_qemu(
        &args,
        &log,
        Launch::SCOPED_VM,
    )?));
    if let Some(c) = &child.0 {
        dir.record(c.id())?;
    }
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        if std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("NULLSPACE_PROBE_OK")
        {
            return Ok(true);
        }
        if let Some(c) = child.0.as_mut()
            && let Ok(Some(_)) = c.try_wait()
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("NULLSPACE_PROBE_OK"))
}

/// Kills and reaps the child on drop.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits up to `grace` for the child to exit on its own, then kills it.
    fn end(&mut self, grace: Duration) {
        if let Some(c) = self.0.as_mut() {
            let t = Instant::now();
            while t.elapsed() < grace {
                if let Ok(Some(_)) = c.try_wait() {
                    self.0 = None;
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.kill();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A VM's own directory (sockets, console log, initramfs, overlay),
/// removed on drop. A build VM's or the KVM probe's is an owner directory
/// (see [`process::records`]).
pub(crate) struct VmDir {
    /// QEMU's record (removed before the directory).
    record: Option<PidFile>,
    lock: Option<OwnerLock>,
    dir: tempfile::TempDir,
}

impl VmDir {
    /// `prefix` + random under `parent` (or the system temp dir); nothing
    /// recorded.
    pub(crate) fn temp(parent: Option<&Path>, prefix: &str) -> Result<VmDir, VmError> {
        let mut b = tempfile::Builder::new();
        b.prefix(prefix);
        let dir = match parent {
            Some(p) => {
                std::fs::create_dir_all(p).map_err(VmError::io(p.display().to_string()))?;
                b.tempdir_in(p)
            }
            None => b.tempdir(),
        }
        .map_err(VmError::io("VM directory"))?;
        Ok(VmDir {
            record: None,
            lock: None,
            dir,
        })
    }

    /// Like [`VmDir::temp`], and an owner directory: locked by this
    /// process, QEMU recorded in it (under a run root, [`process::reap_stale`]
    /// ends what a dead process left).
    pub(crate) fn owned(parent: Option<&Path>, prefix: &str) -> Result<VmDir, VmError> {
        let mut d = VmDir::temp(parent, prefix)?;
        d.lock = Some(OwnerLock::within(d.dir.path())?);
        Ok(d)
    }

    /// Records `pid` (QEMU) in an owned directory; no-op otherwise.
    fn record(&mut self, pid: u32) -> Result<(), VmError> {
        if let Some(l) = &self.lock {
            self.record = Some(l.pids.record(pid)?);
        }
        Ok(())
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Leaves the directory in place; its path.
    fn keep(self) -> PathBuf {
        let VmDir { record, lock, dir } = self;
        drop((record, lock));
        dir.keep()
    }

    /// Whether QEMU's Unix sockets fit under `parent` (`sun_path` is 108
    /// bytes).
    fn sockets_fit(parent: &Path) -> bool {
        parent.join("ns-vm-XXXXXX/agent.sock").as_os_str().len() < 108
    }
}

/// The QEMU VMM: the guest kernel, the base initramfs, the accelerator,
/// and the run directory for build VMs' directories and pidfiles.
#[derive(Debug, Clone)]
pub struct QemuVmm {
    pub kernel: GuestKernel,
    pub base_initrd: PathBuf,
    pub accel: Accel,
    /// Build VMs (and the KVM probe) keep their directory here, each an
    /// owner directory (locked, QEMU recorded in it; see
    /// [`process::records`]); [`process::reap_stale`] ends what a dead
    /// process left. `None`: the system temp dir, nothing recorded.
    pub run_dir: Option<PathBuf>,
}

impl QemuVmm {
    /// Builds (or reuses from `cache_dir`) the initramfs for `kernel` with
    /// `init_bin` and picks the accelerator.
    pub fn new(kernel: GuestKernel, init_bin: &Path, cache_dir: &Path) -> Result<QemuVmm, VmError> {
        Self::build(kernel, init_bin, cache_dir, None)
    }

    /// Like [`QemuVmm::new`], with build VMs' directories (sockets, lock,
    /// QEMU's record) under `run_dir` (created). The path must leave
    /// room for QEMU's Unix sockets (108 bytes).
    pub fn with_run_dir(
        kernel: GuestKernel,
        init_bin: &Path,
        cache_dir: &Path,
        run_dir: &Path,
    ) -> Result<QemuVmm, VmError> {
        std::fs::create_dir_all(run_dir).map_err(VmError::io(run_dir.display().to_string()))?;
        let run_dir =
            std::fs::canonicalize(run_dir).map_err(VmError::io(run_dir.display().to_string()))?;
        if !VmDir::sockets_fit(&run_dir) {
            return Err(VmError::VmCreate {
                message: format!(
                    "run directory {}: path too long for QEMU's Unix sockets (108 bytes)",
                    run_dir.display()
                ),
                console_tail: String::new(),
            });
        }
        Self::build(kernel, init_bin, cache_dir, Some(run_dir))
    }

    fn build(
        kernel: GuestKernel,
        init_bin: &Path,
        cache_dir: &Path,
        run_dir: Option<PathBuf>,
    ) -> Result<QemuVmm, VmError> {
        which(QEMU)?;
        let base_initrd = initramfs::build_base(&kernel, init_bin, cache_dir)?;
        let accel = detect_accel(&kernel, &base_initrd, run_dir.as_deref());
        Ok(QemuVmm {
            kernel,
            base_initrd,
            accel,
            run_dir,
        })
    }
}

fn which(bin: &str) -> Result<(), VmError> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false);
    if found {
        Ok(())
    } else {
        Err(VmError::VmCreate {
            message: format!("{bin} not found (apt-get install qemu-system-x86)"),
            console_tail: String::new(),
        })
    }
}

#[derive(Debug, Clone)]
pub struct BootSpec {
    /// Raw ext4 disk the VM boots from read-write (`/dev/vda`).
    pub disk: PathBuf,
    pub config: GuestConfig,
    pub memory_mb: u32,
    pub vcpus: u32,
    /// From QEMU start to the agent's first answer; on expiry the VM is
    /// killed and `vm_create` returned.
    pub boot_timeout: Duration,
    /// QEMU user-mode networking (`-netdev user` + `virtio-net-device`);
    /// overrides `config.network`. Recorded in [`VmMeta::network`].
    pub network: bool,
    /// [`MemoryMode::Mapped`]: guest RAM is a shared mapping of
    /// `memory_file`, so that a snapshot's memory is that file.
    pub memory_mode: MemoryMode,
    /// Mapped: where guest RAM lives (must not exist; QEMU creates it).
    /// `None`: `memory.ram` in the VM's own directory.
    pub memory_file: Option<PathBuf>,
}

impl BootSpec {
    /// 512 MiB, 2 vCPUs, 60 s boot limit, no network, mapped memory.
    pub fn new(disk: &Path, config: GuestConfig) -> BootSpec {
        BootSpec {
            disk: disk.to_path_buf(),
            config,
            memory_mb: 512,
            vcpus: 2,
            boot_timeout: Duration::from_secs(60),
            network: false,
            memory_mode: MemoryMode::Mapped,
            memory_file: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RestoreSpec {
    /// Parent of the sandbox's private directory (overlay, sockets);
    /// `None` = the system temp dir.
    pub work_dir: Option<PathBuf>,
    pub timeout: Duration,
    /// QEMU's `-pidfile` (written by QEMU as it starts, so a process that
    /// dies while the restore runs leaves the pid behind for its sweep).
    pub pidfile: Option<PathBuf>,
    /// QEMU's niceness while it is prepared (a pooled VM yields the CPU to
    /// running machines); a start sets every thread back to 0, which needs
    /// the privilege to raise priority (`CAP_SYS_NICE`) when this is > 0.
    pub nice: i32,
}

impl Default for RestoreSpec {
    fn default() -> Self {
        RestoreSpec {
            work_dir: None,
            timeout: Duration::from_secs(60),
            pidfile: None,
            nice: 0,
        }
    }
}

/// What [`QemuVm::snapshot`] leaves of the VM it snapshotted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterSnapshot {
    /// Running again (the agent reconnected).
    Resume,
    /// Paused; [`QemuVm::resume`] continues it.
    Pause,
    /// QEMU ended (the handle is dead: no agent, no pid).
    Stop,
}

pub struct QemuVm {
    child: ChildGuard,
    dir: VmDir,
    agent: Option<AgentClient>,
    meta: VmMeta,
    cmdline: String,
    /// The initramfs it booted.
    initrd: PathBuf,
    /// A restored VM: the snapshot it came from (its disk overlay is
    /// `dir/disk.qcow2`).
    origin: Option<Box<Snapshot>>,
    /// Mapped memory: the RAM file (a build VM's shared file; a restored
    /// VM's snapshot file, mapped privately).
    memory_file: Option<PathBuf>,
    qemu: Option<QemuVersion>,
    /// A VM another process started ([`QemuVm::reattach`]): its QEMU's pid
    /// (`child` is empty).
    adopted: Option<u32>,
    /// Milliseconds from spawn to the agent's first answer.
    pub ready_ms: u128,
    /// A restore's parts (zero for a build VM).
    pub phases: RestorePhases,
    /// Loaded and paused by [`QemuVm::prepare`]; the guest has not run
    /// since the snapshot ([`QemuVm::start_prepared`] starts it).
    prepared: bool,
    /// QEMU's niceness until it starts (a prepared VM's; 0 otherwise).
    nice: i32,
}

/// Where a restore spent its time, in milliseconds (logged and printed by
/// the benchmarks: what is left on a create's critical path).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestorePhases {
    /// The snapshot's files checked against the manifest (hashed once per
    /// file identity per process).
    pub verify: u64,
    /// The machine's disk overlay created.
    pub overlay: u64,
    /// QEMU spawned until QMP answered.
    pub spawn: u64,
    /// Version check, device state (streamed: and all RAM) loaded; paused.
    pub load: u64,
    /// `cont` until the guest answered with its clock and RNG set.
    pub start: u64,
}

/// Guest RAM as QEMU should back it.
enum Ram<'a> {
    Anonymous,
    /// `private`: copy-on-write of a file opened read-only; else shared.
    File {
        path: &'a Path,
        private: bool,
    },
}

/// One disk layer for `-blockdev` (base first).
struct Layer {
    path: PathBuf,
    format: DiskFormat,
    read_only: bool,
}

/// QemuOpts values escape `,` by doubling it.
fn opt(s: &Path) -> String {
    s.display().to_string().replace(',', ",,")
}

struct Machine<'a> {
    meta: &'a VmMeta,
    cmdline: &'a str,
    /// Sockets (`agent.sock`, `qmp.sock`) go here.
    dir: &'a Path,
    initrd: &'a Path,
    disk: &'a [Layer],
    ram: Ram<'a>,
    incoming: bool,
    pidfile: Option<&'a Path>,
}

impl Machine<'_> {
    fn args(&self) -> Vec<String> {
        let meta = self.meta;
        let mut machine = "microvm".to_string();
        if matches!(self.ram, Ram::File { .. }) {
            machine.push_str(",memory-backend=mem0");
        }
        let mut a: Vec<String> = vec!["-M".into(), machine];
        a.extend(accel_args(meta.accel).iter().map(|s| s.to_string()));
        a.extend([
            "-m".to_string(),
            meta.memory_mb.to_string(),
            "-smp".into(),
            meta.vcpus.to_string(),
            "-nographic".into(),
            "-no-reboot".into(),
        ]);
        // A restore's guest kernel is in its memory already: without
        // `-kernel` QEMU keeps no copy of the image in its own memory (3.5
        // to 13 MiB a machine here). The device set is the same.
        if !self.incoming {
            a.extend([
                "-kernel".to_string(),
                meta.vmlinuz.display().to_string(),
                "-initrd".into(),
                self.initrd.display().to_string(),
                "-append".into(),
                self.cmdline.to_string(),
            ]);
        }
        if let Ram::File { path, private } = self.ram {
            let mut o = json!({
                "qom-type": "memory-backend-file",
                "id": "mem0",
                "size": (meta.memory_mb as u64) << 20,
                "mem-path": path,
                "share": !private,
            });
            if private {
                o["readonly"] = json!(true);
                o["rom"] = json!("off");
            }
            a.extend(["-object".to_string(), o.to_string()]);
        }
        // JSON -blockdev: file names need no escaping.
        for (i, l) in self.disk.iter().enumerate() {
            let mut b = json!({
                "driver": match l.format { DiskFormat::Raw => "raw", DiskFormat::Qcow2 => "qcow2" },
                "node-name": format!("d{i}"),
                "read-only": l.read_only,
                "file": {"driver": "file", "filename": l.path},
            });
            if i > 0 {
                // The chain comes from the manifest, not from the backing
                // names recorded in the images (which may have moved).
                b["backing"] = json!(format!("d{}", i - 1));
            }
            a.extend(["-blockdev".to_string(), b.to_string()]);
        }
        a.extend([
            "-device".to_string(),
            format!("virtio-blk-device,drive=d{}", self.disk.len() - 1),
            "-device".into(),
            "virtio-serial-device".into(),
            "-chardev".into(),
            format!(
                "socket,id=agent,path={},server=on,wait=off",
                opt(&self.dir.join("agent.sock"))
            ),
            "-device".into(),
            format!("virtserialport,chardev=agent,name={AGENT_PORT}"),
            "-qmp".into(),
            format!(
                "unix:{},server=on,wait=off",
                opt(&self.dir.join("qmp.sock"))
            ),
        ]);
        if meta.network {
            // User-mode NAT: guest 10.0.2.15, gateway 10.0.2.2 (= the host's
            // loopback), DNS forwarder 10.0.2.3.
            a.extend([
                "-netdev".to_string(),
                "user,id=n0".into(),
                "-device".into(),
                "virtio-net-device,netdev=n0".into(),
            ]);
        }
        if self.incoming {
            a.extend(["-incoming".to_string(), "defer".into()]);
        }
        if let Some(p) = self.pidfile {
            a.extend(["-pidfile".to_string(), p.display().to_string()]);
        }
        a
    }
}

/// Under TCG the guest calibrates its TSC against the PIT, which fails when
/// the host is busy ("tsc: Unable to calibrate against PIT"), and the boot
/// then hangs. The TCG guest TSC runs at the host's rate: pass it in.
fn kernel_cmdline(accel: Accel) -> String {
    let mut c = "console=ttyS0 panic=-1 edd=off".to_string();
    if accel == Accel::Tcg
        && let Some(khz) = host_tsc_khz()
    {
        c.push_str(&format!(" tsc_early_khz={khz} tsc=reliable no_timer_check"));
    }
    c
}

fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A file migration channel (QEMU 8.2+), so paths need no URI quoting.
fn file_channel(p: &Path) -> Value {
    json!([{"channel-type": "main", "addr": {"transport": "file", "filename": p, "offset": 0}}])
}

/// Migration capabilities and parameters for a snapshot or restore: the
/// stream is written to or read from a local file, so no bandwidth limit
/// (QEMU's default of 128 MiB/s is for networks); `x-ignore-shared` skips
/// the shared file-backed RAM (mapped memory). Both sides must agree.
fn set_migration(q: &mut Qmp, ignore_shared: bool) -> Result<(), VmError> {
    q.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "x-ignore-shared", "state": ignore_shared}]}),
    )?;
    q.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1u64 << 40}),
    )?;
    Ok(())
}

/// Waits for the outgoing migration to complete.
fn wait_migration(q: &mut Qmp, watch: &Watch, limit: Duration) -> Result<(), VmError> {
    let t = Instant::now();
    loop {
        watch.check()?;
        let m = q.migration()?;
        match &m.status {
            Some(MigrationStatus::Completed) => return Ok(()),
            Some(MigrationStatus::Failed | MigrationStatus::Cancelled) => {
                return Err(VmError::Snapshot(format!("migration failed: {}", m.why())));
            }
            // Not started yet, still going, or a state a newer QEMU added:
            // wait, bounded by `limit`.
            None | Some(_) => {}
        }
        if t.elapsed() > limit {
            return Err(VmError::Snapshot(format!(
                "migration did not complete within {} s (status {:?})",
                limit.as_secs(),
                m.status
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Cancels an outgoing migration and waits (up to 5 s) until it is over.
fn stop_migration(q: &mut Qmp) {
    let _ = q.execute("migrate_cancel", json!({}));
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        match q.migration() {
            Ok(m) if m.status.as_ref().is_some_and(MigrationStatus::in_progress) => {}
            // Over (or in a state not known to be going: nothing to wait for).
            _ => return,
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for an incoming migration to leave `inmigrate`; `Ok(true)` if
/// the VM is paused (loaded), `Ok(false)` if it already runs.
fn wait_incoming(q: &mut Qmp, watch: &Watch, deadline: Instant) -> Result<bool, VmError> {
    loop {
        watch.check()?;
        match q.status()? {
            RunState::Paused | RunState::Postmigrate => return Ok(true),
            RunState::Running => return Ok(false),
            RunState::Inmigrate | RunState::Prelaunch => {}
            // Any other state (an error, or one this driver does not know)
            // is not a loaded VM.
            other => {
                let m = q.migration().unwrap_or_default();
                return Err(VmError::Restore(format!(
                    "VM state {other:?} after incoming migration: {}",
                    m.why()
                )));
            }
        }
        if let Ok(m) = q.migration()
            && m.status == Some(MigrationStatus::Failed)
        {
            return Err(VmError::Restore(format!(
                "incoming migration failed: {}",
                m.why()
            )));
        }
        if Instant::now() > deadline {
            return Err(VmError::Restore(
                "incoming migration did not finish in time".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Empty overlays by (backing, format, size). A qcow2 header holds no id
/// or time, so every overlay of one backing and size is the same bytes:
/// `qemu-img` (30-100 ms here) runs once per snapshot per process, later
/// overlays are a write of about 200 KiB.
type OverlayCache =
    std::sync::Mutex<std::collections::HashMap<(PathBuf, &'static str, u64), Vec<u8>>>;

fn overlay_cache() -> &'static OverlayCache {
    static C: OnceLock<OverlayCache> = OnceLock::new();
    C.get_or_init(Default::default)
}

/// A qcow2 overlay over `backing` (not opened: `-u`), made by `qemu-img
/// create` once per backing and size (see [`OverlayCache`]).
fn create_overlay(
    overlay: &Path,
    backing: &Path,
    format: DiskFormat,
    size: u64,
) -> Result<(), VmError> {
    let fmt = match format {
        DiskFormat::Raw => "raw",
        DiskFormat::Qcow2 => "qcow2",
    };
    let key = (backing.to_path_buf(), fmt, size);
    let cached = overlay_cache()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
        .cloned();
    if let Some(bytes) = cached {
        use std::io::Write;
        let mut f = std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(overlay)
            .map_err(VmError::io(overlay.display().to_string()))?;
        return f
            .write_all(&bytes)
            .map_err(VmError::io(overlay.display().to_string()));
    }
    qemu_img_overlay(overlay, backing, fmt, size)?;
    if let Ok(bytes) = std::fs::read(overlay)
        && bytes.len() <= 4 << 20
    {
        let mut c = overlay_cache().lock().unwrap_or_else(|p| p.into_inner());
        if c.len() >= 256 {
            c.clear();
        }
        c.insert(key, bytes);
    }
    Ok(())
}

fn qemu_img_overlay(overlay: &Path, backing: &Path, fmt: &str, size: u64) -> Result<(), VmError> {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-u", "-F", fmt, "-b"])
        .arg(backing)
        .arg(overlay)
        .arg(size.to_string())
        .output()
        .map_err(VmError::io("qemu-img (install qemu-utils)"))?;
    if !out.status.success() {
        return Err(VmError::Restore(format!(
            "qemu-img create: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The restore layers of `snap`'s disk (read-only) plus a new overlay.
fn restore_layers(snap: &Snapshot, overlay: &Path) -> Result<Vec<Layer>, VmError> {
    let m = &snap.manifest;
    let top = m.disk.last().expect("validated: a disk");
    create_overlay(
        overlay,
        &snap.path(&top.file),
        top.format,
        m.disk[0].file.size,
    )?;
    let mut layers: Vec<Layer> = m
        .disk
        .iter()
        .map(|l| Layer {
            path: snap.path(&l.file),
            format: l.format,
            read_only: true,
        })
        .collect();
    layers.push(Layer {
        path: overlay.to_path_buf(),
        format: DiskFormat::Qcow2,
        read_only: false,
    });
    Ok(layers)
}

/// Removes a half-written snapshot directory unless disarmed.
pub(crate) struct DirGuard<'a>(pub &'a Path, pub bool);

impl Drop for DirGuard<'_> {
    fn drop(&mut self) {
        if !self.1 {
            // Read-only files go too: removal needs the directory writable,
            // which commits leave it.
            let _ = std::fs::remove_dir_all(self.0);
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl QemuVm {
    #[allow(clippy::too_many_arguments)]
    fn spawn(
        mut dir: VmDir,
        meta: VmMeta,
        cmdline: String,
        initrd: PathBuf,
        args: Vec<String>,
        launch: Launch,
        watch: &Watch,
    ) -> Result<QemuVm, VmError> {
        let child = ChildGuard(Some(process::spawn::spawn_qemu(
            &args,
            &dir.path().join("console.log"),
            launch,
        )?));
        let c = child.0.as_ref().expect("spawned");
        watch.register(c);
        dir.record(c.id())?;
        let nice = launch.nice;
        Ok(QemuVm {
            child,
            dir,
            agent: None,
            meta,
            cmdline,
            initrd,
            origin: None,
            memory_file: None,
            qemu: None,
            adopted: None,
            ready_ms: 0,
            phases: RestorePhases::default(),
            prepared: false,
            nice,
        })
    }

    /// Takes over a restored VM that an earlier process detached (a server
    /// that restarted): `handle`'s QEMU, restored from `origin`, with
    /// `agent` connected. The VM can then be snapshotted like one restored
    /// here. Its directory is reached through links in a directory of this
    /// value's own (removed on drop; the VM's stays).
    pub fn reattach(
        handle: &crate::sandbox::SandboxHandle,
        origin: Snapshot,
        agent: AgentClient,
    ) -> Result<QemuVm, VmError> {
        if !handle.alive() {
            return Err(VmError::Agent(format!(
                "{QEMU} (pid {}) is not running",
                handle.pid
            )));
        }
        let parent = handle.dir.parent().unwrap_or(&handle.dir);
        let dir = VmDir::temp(Some(parent), "ns-adopt-")?;
        for name in ["agent.sock", "qmp.sock", "disk.qcow2", "console.log"] {
            std::os::unix::fs::symlink(handle.dir.join(name), dir.path().join(name))
                .map_err(VmError::io(format!("link {name}")))?;
        }
        let m = &origin.manifest;
        Ok(QemuVm {
            child: ChildGuard(None),
            meta: origin.meta.vm.clone(),
            cmdline: m.device.kernel_cmdline.clone(),
            initrd: origin.path(&m.initramfs),
            memory_file: m.memory.ram.as_ref().map(|r| origin.path(r)),
            origin: Some(Box::new(origin)),
            dir,
            agent: Some(agent),
            qemu: None,
            adopted: Some(handle.pid),
            ready_ms: 0,
            phases: RestorePhases::default(),
            prepared: false,
            nice: 0,
        })
    }

    fn fail(&mut self, message: String) -> VmError {
        // Kill first so the console log is complete and no process is left.
        self.child.kill();
        VmError::VmCreate {
            message,
            console_tail: tail(&self.console(), 30),
        }
    }

    /// Kills QEMU and passes `e` on (cancellation and snapshot errors keep
    /// their kind; anything else becomes `vm_create` with the console tail).
    fn fail_with(&mut self, e: VmError) -> VmError {
        match e {
            VmError::Cancelled | VmError::Incompatible { .. } | VmError::Corrupt { .. } => {
                self.child.kill();
                e
            }
            e => self.fail(e.to_string()),
        }
    }

    fn exited(&mut self) -> Option<String> {
        let c = self.child.0.as_mut()?;
        match c.try_wait() {
            Ok(Some(st)) => Some(format!("{QEMU} exited ({st})")),
            _ => None,
        }
    }

    fn qmp(&mut self, limit: Duration, watch: &Watch) -> Result<Qmp, VmError> {
        let path = self.dir.path().join("qmp.sock");
        let child = &mut self.child;
        let adopted = self.adopted;
        Qmp::connect_checked(&path, limit, &mut || {
            watch.check()?;
            match child.0.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(st))) => Err(VmError::Agent(format!("{QEMU} exited ({st})"))),
                None if adopted.is_some_and(process::alive) => Ok(()),
                None => Err(VmError::Agent(format!("{QEMU} is not running"))),
                _ => Ok(()),
            }
        })
    }

    /// Connects the agent and waits for its first answer before `deadline`.
    fn attach_agent(&mut self, deadline: Instant, watch: &Watch) -> Result<(), VmError> {
        let sock = self.dir.path().join("agent.sock");
        let agent = loop {
            if watch.check().is_err() {
                self.child.kill();
                return Err(VmError::Cancelled);
            }
            if let Some(m) = self.exited() {
                return Err(self.fail(format!("{m} before the guest agent answered")));
            }
            if Instant::now() > deadline {
                return Err(self.fail("timed out waiting for the agent socket".into()));
            }
            if sock.exists() {
                match AgentClient::connect(&sock, Duration::from_millis(200)) {
                    Ok(a) => break a,
                    Err(_) => continue,
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let agent = agent;
        let left = deadline.saturating_duration_since(Instant::now());
        if let Err(e) = agent.ping(left) {
            if watch.check().is_err() {
                self.child.kill();
                return Err(VmError::Cancelled);
            }
            let m = self
                .exited()
                .map(|m| format!("{m} before the guest agent answered"))
                .unwrap_or_else(|| {
                    format!("guest agent did not answer within the boot limit ({e})")
                });
            return Err(self.fail(m));
        }
        self.agent = Some(agent);
        Ok(())
    }

    /// Boots a build VM. Its QEMU dies with the calling thread
    /// (`PR_SET_PDEATHSIG`): the VM must not outlive the thread that booted
    /// it (true of [`crate::template::build_snapshot`], which boots, builds
    /// and snapshots in one call). On cancel QEMU is killed and reaped and
    /// `Cancelled` returned.
    pub fn boot(
        vmm: &QemuVmm,
        spec: &BootSpec,
        cancel: &CancellationToken,
    ) -> Result<QemuVm, VmError> {
        let watch = Watch::new(cancel);
        let r = Self::boot_watched(vmm, spec, &watch);
        process::settle(r, watch)
    }

    pub(crate) fn boot_watched(
        vmm: &QemuVmm,
        spec: &BootSpec,
        watch: &Watch,
    ) -> Result<QemuVm, VmError> {
        let t0 = Instant::now();
        watch.check()?;
        let dir = VmDir::owned(vmm.run_dir.as_deref(), "ns-vm-")?;
        let initrd = dir.path().join("initrd.img");
        let mut config = spec.config.clone();
        config.network = spec.network;
        let cfg = serde_json::to_vec(&config).unwrap_or_default();
        initramfs::write_with_config(&vmm.base_initrd, &cfg, &initrd)?;
        let meta = VmMeta {
            vmlinuz: vmm.kernel.vmlinuz.clone(),
            kernel_version: vmm.kernel.version.clone(),
            memory_mb: spec.memory_mb,
            vcpus: spec.vcpus,
            accel: vmm.accel,
            network: spec.network,
            memory_mode: spec.memory_mode,
        };
        let disk = std::fs::canonicalize(&spec.disk)
            .map_err(VmError::io(spec.disk.display().to_string()))?;
        let memory_file = match spec.memory_mode {
            MemoryMode::Streamed => None,
            MemoryMode::Mapped => {
                let p = match &spec.memory_file {
                    Some(p) => {
                        let parent = p.parent().filter(|d| !d.as_os_str().is_empty());
                        let parent = std::fs::canonicalize(parent.unwrap_or(Path::new(".")))
                            .map_err(VmError::io(p.display().to_string()))?;
                        parent.join(p.file_name().unwrap_or_default())
                    }
                    None => dir.path().join("memory.ram"),
                };
                if p.exists() {
                    return Err(VmError::VmCreate {
                        message: format!("memory file {} exists already", p.display()),
                        console_tail: String::new(),
                    });
                }
                Some(p)
            }
        };
        let cmdline = kernel_cmdline(vmm.accel);
        let layers = [Layer {
            path: disk,
            format: DiskFormat::Raw,
            read_only: false,
        }];
        let args = Machine {
            meta: &meta,
            cmdline: &cmdline,
            dir: dir.path(),
            initrd: &initrd,
            disk: &layers,
            ram: match &memory_file {
                Some(p) => Ram::File {
                    path: p,
                    private: false,
                },
                None => Ram::Anonymous,
            },
            incoming: false,
            pidfile: None,
        }
        .args();
        let mut vm = QemuVm::spawn(dir, meta, cmdline, initrd, args, Launch::SCOPED_VM, watch)?;
        vm.memory_file = memory_file;
        vm.attach_agent(t0 + spec.boot_timeout, watch)?;
        vm.ready_ms = t0.elapsed().as_millis();
        Ok(vm)
    }

    /// Restores `snap` into a new QEMU: verifies the snapshot's files (once
    /// per file identity per process), a qcow2 overlay over its disk, its
    /// memory mapped copy-on-write (mapped) or read from the stream
    /// (streamed), device state loaded, `cont`, agent reconnected, guest
    /// clock set. On cancel QEMU is killed, its directory removed and
    /// `Cancelled` returned. ([`QemuVm::prepare`] then
    /// [`QemuVm::start_prepared`], in one call.)
    pub fn restore(
        snap: &Snapshot,
        spec: &RestoreSpec,
        cancel: &CancellationToken,
    ) -> Result<QemuVm, VmError> {
        let watch = Watch::new(cancel);
        let t0 = Instant::now();
        let deadline = t0 + spec.timeout;
        let r = Self::prepare_watched(snap, spec, &watch).and_then(|mut vm| {
            vm.start_watched(deadline, &watch, false)?;
            vm.ready_ms = t0.elapsed().as_millis();
            Ok(vm)
        });
        process::settle(r, watch)
    }

    /// The part of a restore that does not need the guest to run: the
    /// files verified, the overlay made, QEMU started (`-incoming defer`,
    /// the snapshot's device configuration and memory mapping), the device
    /// state loaded, and the agent socket connected. The VM stays paused
    /// until [`QemuVm::start_prepared`]: the guest has not run since the
    /// snapshot, so a prepared VM can wait (in a pool) for as long as
    /// needed and still start exactly where the snapshot left off. On
    /// cancel QEMU is killed, its directory removed and `Cancelled`
    /// returned.
    pub fn prepare(
        snap: &Snapshot,
        spec: &RestoreSpec,
        cancel: &CancellationToken,
    ) -> Result<QemuVm, VmError> {
        let watch = Watch::new(cancel);
        let r = Self::prepare_watched(snap, spec, &watch);
        process::settle(r, watch)
    }

    /// Starts a VM from [`QemuVm::prepare`] within `limit`: `cont`, then
    /// the guest's clock and RNG are set (both requests in one round trip;
    /// their answers are the agent's first). Kills QEMU on failure.
    pub fn start_prepared(
        &mut self,
        limit: Duration,
        cancel: &CancellationToken,
    ) -> Result<(), VmError> {
        let watch = Watch::new(cancel);
        if let Some(c) = self.child.0.as_ref() {
            watch.register(c);
        }
        let t0 = Instant::now();
        let r = self.start_watched(t0 + limit, &watch, false);
        if r.is_ok() {
            self.ready_ms = t0.elapsed().as_millis();
        }
        process::settle(r, watch)
    }

    /// Whether this VM is prepared and not started yet.
    pub fn is_prepared(&self) -> bool {
        self.prepared
    }

    /// Runs a prepared VM for a moment and pauses it again: `cont`, the
    /// guest's clock and RNG set, `/bin/sh -c true` through the agent,
    /// `stop`. Under TCG a fresh QEMU translates every guest code path it
    /// runs the first time (the guest's first answer and first command
    /// cost 150-250 ms each here); this moves that out of the create. The
    /// guest then is that moment (about the returned milliseconds) past
    /// the snapshot, with an RNG of its own. Stays prepared; kills QEMU on
    /// failure.
    pub fn warm_up(&mut self, limit: Duration, cancel: &CancellationToken) -> Result<u64, VmError> {
        if !self.prepared {
            return Err(VmError::Restore("warm_up: the VM is not prepared".into()));
        }
        let watch = Watch::new(cancel);
        if let Some(c) = self.child.0.as_ref() {
            watch.register(c);
        }
        let t0 = Instant::now();
        let deadline = t0 + limit;
        let r = (|| {
            self.start_watched(deadline, &watch, true)?;
            let left = deadline.saturating_duration_since(Instant::now());
            let ran = self
                .agent
                .as_ref()
                .map(|a| a.sh("true", left))
                .transpose()
                .and_then(|o| match o {
                    Some(o) if !o.success() => Err(VmError::Restore(format!(
                        "warm_up: `true` in the guest failed: {o:?}"
                    ))),
                    _ => Ok(()),
                });
            ran.map_err(|e| self.fail_with(e))?;
            let left = deadline.saturating_duration_since(Instant::now());
            let stop = self
                .qmp(left, &watch)
                .and_then(|mut q| q.execute("stop", json!({})).map(|_| ()));
            stop.map_err(|e| self.fail_with(e))?;
            self.prepared = true;
            Ok(t0.elapsed().as_millis() as u64)
        })();
        process::settle(r, watch)
    }

    fn prepare_watched(
        snap: &Snapshot,
        spec: &RestoreSpec,
        watch: &Watch,
    ) -> Result<QemuVm, VmError> {
        let t0 = Instant::now();
        let deadline = t0 + spec.timeout;
        let mut phases = RestorePhases::default();
        let ms = |t: Instant| t.elapsed().as_millis() as u64;
        watch.check()?;
        snap.verify()?;
        phases.verify = ms(t0);
        watch.check()?;
        let dir = VmDir::temp(spec.work_dir.as_deref(), "ns-sbx-")?;
        let t = Instant::now();
        let layers = restore_layers(snap, &dir.path().join("disk.qcow2"))?;
        phases.overlay = ms(t);
        let meta = snap.meta.vm.clone();
        let m = &snap.manifest;
        let ram_file = m.memory.ram.as_ref().map(|r| snap.path(r));
        let initrd = snap.path(&m.initramfs);
        let args = Machine {
            meta: &meta,
            cmdline: &m.device.kernel_cmdline,
            dir: dir.path(),
            initrd: &initrd,
            disk: &layers,
            ram: match &ram_file {
                Some(p) => Ram::File {
                    path: p,
                    private: true,
                },
                None => Ram::Anonymous,
            },
            incoming: true,
            pidfile: spec.pidfile.as_deref(),
        }
        .args();
        let t = Instant::now();
        // Restored VMs outlive this thread (handed on, or detached).
        let mut vm = QemuVm::spawn(
            dir,
            meta,
            m.device.kernel_cmdline.clone(),
            initrd,
            args,
            Launch::detached_vm(spec.nice),
            watch,
        )?;
        vm.origin = Some(Box::new(snap.clone()));
        vm.memory_file = ram_file;
        let r = vm.load_state(snap, deadline, watch, &mut phases, t);
        let paused = r.map_err(|e| vm.fail_with(e))?;
        // QEMU made the agent's socket before its QMP answered. The guest
        // reads what is sent now (the session's `hello`) once it runs.
        let sock = vm.dir.path().join("agent.sock");
        let left = deadline.saturating_duration_since(Instant::now());
        match AgentClient::connect(&sock, left.min(Duration::from_secs(5))) {
            Ok(a) => vm.agent = Some(a),
            Err(e) => return Err(vm.fail(format!("restore: the agent socket: {e}"))),
        }
        vm.prepared = paused;
        vm.phases = phases;
        Ok(vm)
    }

    /// `cont`, the clock and RNG; `warming`: a [`QemuVm::warm_up`], which
    /// keeps a prepared VM's niceness.
    fn start_watched(
        &mut self,
        deadline: Instant,
        watch: &Watch,
        warming: bool,
    ) -> Result<(), VmError> {
        let t = Instant::now();
        if self.nice != 0 && !warming {
            // A machine now: it runs at the priority of every other.
            let pid = crate::Vm::pid(self);
            process::spawn::renice(pid, 0).map_err(|e| {
                self.fail(format!(
                    "restore: setting QEMU (pid {pid}) back to niceness 0: {e}"
                ))
            })?;
            self.nice = 0;
        }
        if self.prepared {
            let left = deadline.saturating_duration_since(Instant::now());
            let cont = self
                .qmp(left, watch)
                .and_then(|mut q| q.execute("cont", json!({})).map(|_| ()));
            cont.map_err(|e| self.fail_with(e))?;
            self.prepared = false;
        }
        if self.agent.is_none() {
            self.attach_agent(deadline, watch)?;
        }
        self.sync_guest_clock(deadline, watch)?;
        self.phases.start = t.elapsed().as_millis() as u64;
        Ok(())
    }

    /// QEMU version check, then the device state (and streamed RAM) in;
    /// whether the VM is paused (not running) afterwards.
    fn load_state(
        &mut self,
        snap: &Snapshot,
        deadline: Instant,
        watch: &Watch,
        phases: &mut RestorePhases,
        spawned: Instant,
    ) -> Result<bool, VmError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut qmp = self.qmp(left, watch)?;
        let version = qmp.version()?;
        phases.spawn = spawned.elapsed().as_millis() as u64;
        let t = Instant::now();
        snap.manifest
            .check_qemu(&version)
            .map_err(|e| VmError::Incompatible {
                dir: snap.dir.display().to_string(),
                detail: e.to_string(),
            })?;
        self.qemu = Some(version);
        set_migration(&mut qmp, snap.manifest.memory.mode == MemoryMode::Mapped)?;
        qmp.execute(
            "migrate-incoming",
            json!({"channels": file_channel(&snap.path(&snap.manifest.memory.state))}),
        )?;
        let paused = wait_incoming(&mut qmp, watch, deadline)?;
        phases.load = t.elapsed().as_millis() as u64;
        Ok(paused)
    }

    /// Sends the host's wall clock and fresh entropy to a restored guest
    /// (its clock continues from the snapshot's time, and every clone of a
    /// snapshot starts with the same RNG state). The two requests go out
    /// together; their answers are also the agent's first sign of life.
    fn sync_guest_clock(&mut self, deadline: Instant, watch: &Watch) -> Result<(), VmError> {
        let Some(agent) = self.agent.as_ref() else {
            return Ok(());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let synced = agent.sync_after_restore(std::time::SystemTime::now(), left);
        if let Err(e) = synced {
            if watch.check().is_err() {
                self.child.kill();
                return Err(VmError::Cancelled);
            }
            let m = self
                .exited()
                .map(|m| format!("{m} before the guest agent answered"))
                .unwrap_or_else(|| format!("restore: setting the guest clock and RNG: {e}"));
            return Err(self.fail(m));
        }
        Ok(())
    }

    /// Drops the agent connection and connects again (what a host does
    /// after its own restart; the guest keeps serving across it).
    pub fn reconnect_agent(&mut self, limit: Duration) -> Result<(), VmError> {
        self.reconnect_agent_with(crate::agent::Limits::default(), limit)
            .map(|_| ())
    }

    /// [`QemuVm::reconnect_agent`] with other client limits; returns (a
    /// clone of) the VM's new client.
    pub fn reconnect_agent_with(
        &mut self,
        limits: crate::agent::Limits,
        limit: Duration,
    ) -> Result<AgentClient, VmError> {
        self.agent = None;
        let a = AgentClient::connect_with(&self.dir.path().join("agent.sock"), limit, limits)?;
        a.ping(limit)?;
        self.agent = Some(a.clone());
        Ok(a)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Releases QEMU and the VM directory from this handle's cleanup: the
    /// process keeps running and the directory stays (see [`crate::sandbox`]).
    pub(crate) fn release(self) -> (u32, PathBuf) {
        let QemuVm {
            mut child,
            dir,
            adopted,
            ..
        } = self;
        // Dropping a `Child` neither kills nor waits for it.
        let pid = child.0.take().map(|c| c.id()).or(adopted).unwrap_or(0);
        (pid, dir.keep())
    }

    pub fn meta(&self) -> &VmMeta {
        &self.meta
    }

    pub(crate) fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// The guest RAM file (mapped memory).
    pub fn memory_file(&self) -> Option<&Path> {
        self.memory_file.as_deref()
    }

    /// The snapshot a restored VM came from.
    pub fn origin(&self) -> Option<&Snapshot> {
        self.origin.as_deref()
    }

    /// QMP `query-status` (`running`, `paused`, `postmigrate`, …).
    pub fn status(&mut self) -> Result<RunState, VmError> {
        Qmp::connect(&self.dir.path().join("qmp.sock"), Duration::from_secs(10))?.status()
    }

    /// Pauses the guest (QMP `stop`); the agent connection stays open.
    pub fn pause(&mut self) -> Result<(), VmError> {
        Qmp::connect(&self.dir.path().join("qmp.sock"), Duration::from_secs(10))?
            .execute("stop", json!({}))
            .map(|_| ())
    }

    /// Continues a paused guest (QMP `cont`) and makes sure the agent answers.
    pub fn resume(&mut self, limit: Duration) -> Result<(), VmError> {
        Qmp::connect(&self.dir.path().join("qmp.sock"), Duration::from_secs(10))?
            .execute("cont", json!({}))?;
        let answered = self.agent.as_mut().is_some_and(|a| a.ping(limit).is_ok());
        if answered {
            Ok(())
        } else {
            self.reconnect_agent(limit)
        }
    }

    /// The build VM's snapshot: pause, write the device state (mapped: the
    /// RAM is already in its file) or device state + RAM (streamed) into
    /// `out`, quit QEMU, copy the kernel and initramfs in. Returns the
    /// QEMU version and how long the VM was paused until its state was
    /// written. The files are committed by the caller.
    pub(crate) fn snapshot_build(
        mut self,
        out: &Path,
        watch: &Watch,
    ) -> Result<(QemuVersion, Duration), VmError> {
        // Drop the agent connection first: the guest sees the host leave,
        // and a restored guest waits for the next host to connect.
        self.agent = None;
        let mapped = self.meta.memory_mode == MemoryMode::Mapped;
        let stream = out.join(if mapped { "device.state" } else { "memory.bin" });
        let mut qmp = self.qmp(Duration::from_secs(10), watch)?;
        let version = qmp.version()?;
        set_migration(&mut qmp, mapped)?;
        let t = Instant::now();
        qmp.execute("stop", json!({}))?;
        qmp.execute("migrate", json!({"channels": file_channel(&stream)}))?;
        wait_migration(&mut qmp, watch, Duration::from_secs(120))?;
        // The snapshot's content is fixed from here (a stopped guest does
        // not write its RAM); the rest is cleanup and commit.
        let paused = t.elapsed();
        let _ = qmp.execute("quit", json!({}));
        drop(qmp);
        // QEMU unmaps guest RAM as it exits: only then is `memory.ram` done.
        self.child.end(Duration::from_secs(5));
        std::fs::copy(&self.initrd, out.join("initrd.img")).map_err(VmError::io("copy initrd"))?;
        std::fs::copy(&self.meta.vmlinuz, out.join("vmlinuz"))
            .map_err(VmError::io(format!("copy {}", self.meta.vmlinuz.display())))?;
        Ok((version, paused))
    }

    /// Snapshots a restored VM into `out` (created; must not exist) and
    /// leaves the VM as `after` says. `out` stands alone: the parent's
    /// kernel, initramfs and disk layers are hard-linked in (copied across
    /// filesystems), and the VM's disk overlay is added as `disk.N.qcow2`
    /// (only what this VM wrote; its backing is the layer before it).
    ///
    /// Memory cannot be stored as the difference from the template here:
    /// with `share=off` the pages this VM changed exist only in its QEMU
    /// process, and QEMU can save device state without RAM only for shared
    /// file-backed RAM (`x-ignore-shared`; `xen-save-devices-state` skips
    /// the firmware RAM and its loader, `xen-load-devices-state`, aborts on
    /// QEMU 10). So the VM is paused just long enough to write a full
    /// migration stream and copy its overlay; then (mapped) a temporary
    /// QEMU loads that stream into a new shared `memory.ram` (pre-filled
    /// with a sparse copy of the parent's, which makes the load several
    /// times faster) and writes the device state: the result restores by
    /// mapping like a template. Costs are in `timings_ms` (`snapshot`: VM
    /// paused; `commit`: the rest) and `bench/README.md`.
    ///
    /// On cancel the temporary QEMU is killed, `out` removed, the VM left as
    /// `after` says (or paused, if cancelled while paused), and `Cancelled`
    /// returned.
    pub fn snapshot(
        &mut self,
        out: &Path,
        after: AfterSnapshot,
        cancel: &CancellationToken,
    ) -> Result<Snapshot, VmError> {
        let watch = Watch::new(cancel);
        let r = self.snapshot_watched(out, after, &watch);
        process::settle(r, watch)
    }

    fn snapshot_watched(
        &mut self,
        out: &Path,
        after: AfterSnapshot,
        watch: &Watch,
    ) -> Result<Snapshot, VmError> {
        let origin = self.origin.clone().ok_or_else(|| {
            VmError::Snapshot(
                "only a restored VM can be snapshotted this way (a build VM is snapshotted by template::build_snapshot)".into(),
            )
        })?;
        watch.check()?;
        std::fs::create_dir(out).map_err(VmError::io(out.display().to_string()))?;
        let out = std::fs::canonicalize(out).map_err(VmError::io(out.display().to_string()))?;
        let mut guard = DirGuard(&out, false);
        let om = &origin.manifest;
        let mapped = om.memory.mode == MemoryMode::Mapped;
        let mut qmp = self.qmp(Duration::from_secs(10), watch)?;
        let version = qmp.version()?;
        // The start command's state, from the guest while it runs (a paused
        // guest cannot answer: then the parent's record stands).
        let start = match (qmp.status()?, self.agent.as_mut()) {
            (RunState::Running, Some(a)) => a
                .info(Duration::from_secs(10))
                .ok()
                .map(|i| i["start"].clone()),
            _ => None,
        };
        // As for a build snapshot: the guest in the snapshot has seen the
        // host leave and waits for the next one.
        self.agent = None;
        let t0 = Instant::now();
        if qmp.status()? == RunState::Postmigrate {
            // Paused after an earlier snapshot: QEMU migrates only after the
            // VM ran again (it runs for the few ms between the two commands).
            qmp.execute("cont", json!({}))?;
        }
        qmp.execute("stop", json!({}))?;
        let stream = out.join(if mapped { "full.stream" } else { "memory.bin" });
        set_migration(&mut qmp, false)?;
        let migrated = qmp
            .execute("migrate", json!({"channels": file_channel(&stream)}))
            .and_then(|_| wait_migration(&mut qmp, watch, Duration::from_secs(300)));
        if migrated.is_err() {
            // Cancelled or failed: make sure no migration is still running
            // before the VM is resumed (a completed one would pause it).
            stop_migration(&mut qmp);
        }
        // The disk overlay as of the pause (QEMU flushed it at `stop`).
        let n = om.disk.len();
        let top = format!("disk.{n}.qcow2");
        let copied = migrated.and_then(|_| {
            std::fs::copy(self.dir.path().join("disk.qcow2"), out.join(&top))
                .map(|_| ())
                .map_err(VmError::io("copy the disk overlay"))
        });
        let snapshot_ms = t0.elapsed().as_millis() as u64;
        // Leave the VM as asked before the slow part (and on failure too).
        let then = match after {
            AfterSnapshot::Resume => qmp.execute("cont", json!({})).map(|_| ()),
            AfterSnapshot::Pause => Ok(()),
            AfterSnapshot::Stop => {
                let _ = qmp.execute("quit", json!({}));
                Ok(())
            }
        };
        drop(qmp);
        match after {
            AfterSnapshot::Resume => {
                then.and_then(|_| self.reconnect_agent(Duration::from_secs(30)))?
            }
            AfterSnapshot::Pause => {
                // Connected now, answering once resumed.
                self.agent = AgentClient::connect(
                    &self.dir.path().join("agent.sock"),
                    Duration::from_secs(5),
                )
                .ok();
            }
            AfterSnapshot::Stop => {
                self.child.end(Duration::from_secs(5));
                if let Some(pid) = self.adopted.take() {
                    // Not this process's child: wait for it to go.
                    let t = Instant::now();
                    while process::alive(pid) && t.elapsed() < Duration::from_secs(5) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        }
        copied?;

        let t1 = Instant::now();
        for f in [&om.kernel.file, &om.initramfs]
            .into_iter()
            .chain(om.disk.iter().map(|l| &l.file))
        {
            snapfs::link_or_copy(&origin.path(f), &out.join(&f.path))?;
        }
        let prev = &om.disk[n - 1];
        rebase(&out.join(&top), &prev.file.path, prev.format)?;
        let memory = if mapped {
            let ram = om
                .memory
                .ram
                .as_ref()
                .expect("validated: mapped has a RAM file");
            snapfs::copy_sparse(&origin.path(ram), &out.join("memory.ram"))
                .map_err(VmError::io("copy the RAM file"))?;
            self.rebuild_mapped(&origin, &out, &stream, watch)?;
            let _ = std::fs::remove_file(&stream);
            Memory {
                mode: MemoryMode::Mapped,
                ram: Some(snapfs::commit_file(&out, "memory.ram")?),
                state: snapfs::commit_file(&out, "device.state")?,
            }
        } else {
            Memory {
                mode: MemoryMode::Streamed,
                ram: None,
                state: snapfs::commit_file(&out, "memory.bin")?,
            }
        };
        let mut disk = om.disk.clone();
        disk.push(DiskLayer {
            format: DiskFormat::Qcow2,
            file: snapfs::commit_file(&out, &top)?,
        });
        let commit_ms = t1.elapsed().as_millis() as u64;
        let manifest = SnapshotManifest {
            created_unix_ms: now_ms(),
            qemu: version,
            disk,
            memory,
            parent: Some(Parent {
                manifest_sha256: origin.manifest_sha256.clone(),
            }),
            start: start.unwrap_or_else(|| om.start.clone()),
            timings_ms: crate::snapshot::Timings {
                snapshot: snapshot_ms,
                commit: commit_ms,
                ..Default::default()
            }
            .to_map(),
            ..om.clone()
        };
        snapfs::write_manifest(&out, &manifest)?;
        guard.1 = true;
        Snapshot::open(&out)
    }

    /// Loads the full migration stream `stream` of this VM into a temporary
    /// QEMU whose RAM is a shared mapping of `out/memory.ram`, and has it
    /// write `out/device.state` (device state only). The temporary QEMU
    /// never runs the guest.
    fn rebuild_mapped(
        &self,
        origin: &Snapshot,
        out: &Path,
        stream: &Path,
        watch: &Watch,
    ) -> Result<(), VmError> {
        let dir = VmDir::temp(None, "ns-fork-")?;
        let om = &origin.manifest;
        let n = om.disk.len();
        let mut layers: Vec<Layer> = om
            .disk
            .iter()
            .map(|l| Layer {
                path: out.join(&l.file.path),
                format: l.format,
                read_only: true,
            })
            .collect();
        layers.push(Layer {
            path: out.join(format!("disk.{n}.qcow2")),
            format: DiskFormat::Qcow2,
            read_only: true,
        });
        // A throwaway writable top, so the device configuration is exactly
        // the restored VM's (a read-only virtio-blk would differ).
        let scratch = dir.path().join("scratch.qcow2");
        let top = layers.last().expect("layers");
        create_overlay(&scratch, &top.path, DiskFormat::Qcow2, om.disk[0].file.size)?;
        layers.push(Layer {
            path: scratch,
            format: DiskFormat::Qcow2,
            read_only: false,
        });
        let ram = out.join("memory.ram");
        let initrd = out.join(&om.initramfs.path);
        let meta = VmMeta {
            vmlinuz: out.join(&om.kernel.file.path),
            ..self.meta.clone()
        };
        let args = Machine {
            meta: &meta,
            cmdline: &self.cmdline,
            dir: dir.path(),
            initrd: &initrd,
            disk: &layers,
            ram: Ram::File {
                path: &ram,
                private: false,
            },
            incoming: true,
            pidfile: None,
        }
        .args();
        // Lives within this call: dies with the thread, killed on return.
        let mut tmp = QemuVm::spawn(
            dir,
            meta,
            self.cmdline.clone(),
            initrd,
            args,
            Launch::SCOPED_VM,
            watch,
        )?;
        let deadline = Instant::now() + Duration::from_secs(300);
        let r = (|| {
            let mut q = tmp.qmp(Duration::from_secs(30), watch)?;
            set_migration(&mut q, false)?;
            q.execute(
                "migrate-incoming",
                json!({"channels": file_channel(stream)}),
            )?;
            if !wait_incoming(&mut q, watch, deadline)? {
                return Err(VmError::Snapshot(
                    "the temporary QEMU started the guest".into(),
                ));
            }
            set_migration(&mut q, true)?;
            q.execute(
                "migrate",
                json!({"channels": file_channel(&out.join("device.state"))}),
            )?;
            wait_migration(&mut q, watch, Duration::from_secs(120))?;
            let _ = q.execute("quit", json!({}));
            Ok(())
        })();
        match r {
            Ok(()) => {
                // Guest RAM is complete once QEMU has unmapped it.
                tmp.child.end(Duration::from_secs(5));
                Ok(())
            }
            Err(e) => {
                let tail = tail(&tmp.console(), 5);
                tmp.child.kill();
                Err(match e {
                    VmError::Cancelled => e,
                    e => VmError::Snapshot(format!("writing the memory file: {e} {tail}")),
                })
            }
        }
    }
}

/// Points a stored qcow2 layer's backing name at its sibling `backing` (a
/// relative name, so `qemu-img info` works wherever the directory is;
/// restores build the chain from the manifest anyway).
fn rebase(image: &Path, backing: &str, format: DiskFormat) -> Result<(), VmError> {
    let fmt = match format {
        DiskFormat::Raw => "raw",
        DiskFormat::Qcow2 => "qcow2",
    };
    let out = Command::new("qemu-img")
        .args([
            "rebase", "-q", "-u", "-f", "qcow2", "-F", fmt, "-b", backing,
        ])
        .arg(image)
        .output()
        .map_err(VmError::io("qemu-img (install qemu-utils)"))?;
    if !out.status.success() {
        return Err(VmError::Snapshot(format!(
            "qemu-img rebase: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

impl Vm for QemuVm {
    fn agent(&mut self) -> &mut AgentClient {
        self.agent
            .as_mut()
            .expect("agent attached after boot/restore")
    }

    fn snapshot(
        &mut self,
        out: &Path,
        after: AfterSnapshot,
        cancel: &CancellationToken,
    ) -> Result<Snapshot, VmError> {
        QemuVm::snapshot(self, out, after, cancel)
    }

    fn pid(&self) -> u32 {
        self.child
            .0
            .as_ref()
            .map(|c| c.id())
            .or(self.adopted)
            .unwrap_or(0)
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }
}

impl Vmm for QemuVmm {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn boot(&self, spec: &BootSpec, cancel: &CancellationToken) -> Result<Box<dyn Vm>, VmError> {
        Ok(Box::new(QemuVm::boot(self, spec, cancel)?))
    }

    fn restore(
        &self,
        snapshot: &Snapshot,
        spec: &RestoreSpec,
        cancel: &CancellationToken,
    ) -> Result<Box<dyn Vm>, VmError> {
        Ok(Box::new(QemuVm::restore(snapshot, spec, cancel)?))
    }
}
