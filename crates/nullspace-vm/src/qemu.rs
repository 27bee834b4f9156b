//! The QEMU driver: `qemu-system-x86_64 -M microvm`, TCG unless a probe
//! shows KVM guests really run (see docs/machine-facts: /dev/kvm exists on
//! these hosts but nested guests hang).

use crate::agent::AgentClient;
use crate::kernel::GuestKernel;
use crate::qmp::Qmp;
use crate::template::{GuestConfig, Snapshot, VmMeta};
use crate::{Vm, VmError, Vmm, initramfs};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const QEMU: &str = "qemu-system-x86_64";
pub const AGENT_PORT: &str = nullspace_model::guest::AGENT_PORT;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    fn args(self) -> [&'static str; 2] {
        match self {
            Accel::Kvm => ["-accel", "kvm"],
            // Single-threaded TCG: multi-threaded TCG hangs microvm boots
            // about 1 in 6 here.
            Accel::Tcg => ["-accel", "tcg,thread=single"],
        }
    }
}

static ACCEL: OnceLock<Accel> = OnceLock::new();

/// KVM only if a probe guest boots under it within 5 s; else TCG. Cached
/// per process; `NULLSPACE_VM_ACCEL=tcg|kvm` overrides.
pub fn detect_accel(kernel: &GuestKernel, base_initrd: &Path) -> Accel {
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
            match probe_kvm(kernel, base_initrd) {
                Ok(true) => Accel::Kvm,
                _ => Accel::Tcg,
            }
        }
    })
}

fn probe_kvm(kernel: &GuestKernel, base_initrd: &Path) -> Result<bool, VmError> {
    let dir = tempfile::Builder::new()
        .prefix("ns-kvmprobe-")
        .tempdir()
        .map_err(VmError::io("tempdir"))?;
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
    let mut child = ChildGuard(Some(
        Command::new(QEMU)
            .args([
                "-M",
                "microvm",
                "-accel",
                "kvm",
                "-m",
                "128",
                "-nographic",
                "-no-reboot",
                "-kernel",
            ])
            .arg(&kernel.vmlinuz)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", "console=ttyS0 panic=-1 edd=off quiet"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).map_err(VmError::io("console log"))?)
            .stderr(Stdio::null())
            .spawn()
            .map_err(VmError::io(QEMU))?,
    ));
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

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The QEMU VMM: the guest kernel, the base initramfs and the accelerator.
#[derive(Debug, Clone)]
pub struct QemuVmm {
    pub kernel: GuestKernel,
    pub base_initrd: PathBuf,
    pub accel: Accel,
}

impl QemuVmm {
    /// Builds (or reuses from `cache_dir`) the initramfs for `kernel` with
    /// `init_bin` and picks the accelerator.
    pub fn new(kernel: GuestKernel, init_bin: &Path, cache_dir: &Path) -> Result<QemuVmm, VmError> {
        which(QEMU)?;
        let base_initrd = initramfs::build_base(&kernel, init_bin, cache_dir)?;
        let accel = detect_accel(&kernel, &base_initrd);
        Ok(QemuVmm {
            kernel,
            base_initrd,
            accel,
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
}

#[derive(Debug, Clone)]
pub struct RestoreSpec {
    /// Parent of the sandbox's private directory (overlay, sockets);
    /// `None` = the system temp dir.
    pub work_dir: Option<PathBuf>,
    pub timeout: Duration,
}

impl Default for RestoreSpec {
    fn default() -> Self {
        RestoreSpec {
            work_dir: None,
            timeout: Duration::from_secs(60),
        }
    }
}

pub struct QemuVm {
    child: ChildGuard,
    dir: tempfile::TempDir,
    agent: Option<AgentClient>,
    meta: VmMeta,
    /// Milliseconds from spawn to the agent's first answer.
    pub ready_ms: u128,
}

pub(crate) fn machine_args(meta: &VmMeta, dir: &Path, initrd: &Path, drive: &str) -> Vec<String> {
    let mut a: Vec<String> = vec!["-M".into(), "microvm".into()];
    a.extend(meta.accel.args().iter().map(|s| s.to_string()));
    a.extend([
        "-m".to_string(),
        meta.memory_mb.to_string(),
        "-smp".into(),
        meta.vcpus.to_string(),
        "-nographic".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        meta.vmlinuz.display().to_string(),
        "-initrd".into(),
        initrd.display().to_string(),
        "-append".into(),
        kernel_cmdline(meta.accel),
        "-drive".into(),
        format!("id=rootfs,if=none,{drive}"),
        "-device".into(),
        "virtio-blk-device,drive=rootfs".into(),
        "-device".into(),
        "virtio-serial-device".into(),
        "-chardev".into(),
        format!(
            "socket,id=agent,path={},server=on,wait=off",
            dir.join("agent.sock").display()
        ),
        "-device".into(),
        format!("virtserialport,chardev=agent,name={AGENT_PORT}"),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", dir.join("qmp.sock").display()),
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
    a
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

impl QemuVm {
    fn spawn(dir: tempfile::TempDir, meta: VmMeta, args: Vec<String>) -> Result<QemuVm, VmError> {
        let log = std::fs::File::create(dir.path().join("console.log"))
            .map_err(VmError::io("console log"))?;
        let log2 = log.try_clone().map_err(VmError::io("console log"))?;
        let child = Command::new(QEMU)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| VmError::VmCreate {
                message: format!("{QEMU}: {e}"),
                console_tail: String::new(),
            })?;
        Ok(QemuVm {
            child: ChildGuard(Some(child)),
            dir,
            agent: None,
            meta,
            ready_ms: 0,
        })
    }

    fn fail(&mut self, message: String) -> VmError {
        // Kill first so the console log is complete and no process is left.
        if let Some(mut c) = self.child.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        VmError::VmCreate {
            message,
            console_tail: tail(&self.console(), 30),
        }
    }

    fn exited(&mut self) -> Option<String> {
        let c = self.child.0.as_mut()?;
        match c.try_wait() {
            Ok(Some(st)) => Some(format!(
                "{QEMU} exited ({st}) before the guest agent answered"
            )),
            _ => None,
        }
    }

    /// Connects the agent and waits for its first answer before `deadline`.
    fn attach_agent(&mut self, deadline: Instant) -> Result<(), VmError> {
        let sock = self.dir.path().join("agent.sock");
        let agent = loop {
            if let Some(m) = self.exited() {
                return Err(self.fail(m));
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
            let m = self.exited().unwrap_or_else(|| {
                format!("guest agent did not answer within the boot limit ({e})")
            });
            return Err(self.fail(m));
        }
        self.agent = Some(agent);
        Ok(())
    }

    pub fn boot(vmm: &QemuVmm, spec: &BootSpec) -> Result<QemuVm, VmError> {
        let t0 = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("ns-vm-")
            .tempdir()
            .map_err(VmError::io("tempdir"))?;
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
        };
        let disk = std::fs::canonicalize(&spec.disk)
            .map_err(VmError::io(spec.disk.display().to_string()))?;
        let args = machine_args(
            &meta,
            dir.path(),
            &initrd,
            &format!("file={},format=raw", disk.display()),
        );
        let mut vm = QemuVm::spawn(dir, meta, args)?;
        vm.attach_agent(t0 + spec.boot_timeout)?;
        vm.ready_ms = t0.elapsed().as_millis();
        Ok(vm)
    }

    pub fn restore(snap: &Snapshot, spec: &RestoreSpec) -> Result<QemuVm, VmError> {
        let t0 = Instant::now();
        let mut b = tempfile::Builder::new();
        b.prefix("ns-sbx-");
        let dir = match &spec.work_dir {
            Some(w) => b.tempdir_in(w),
            None => b.tempdir(),
        }
        .map_err(VmError::io("sandbox dir"))?;
        let overlay = dir.path().join("disk.qcow2");
        let base = std::fs::canonicalize(snap.disk())
            .map_err(VmError::io(snap.disk().display().to_string()))?;
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&base)
            .arg(&overlay)
            .output()
            .map_err(VmError::io("qemu-img (install qemu-utils)"))?;
        if !out.status.success() {
            return Err(VmError::Restore(format!(
                "qemu-img create: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let meta = snap.meta.vm.clone();
        let mut args = machine_args(
            &meta,
            dir.path(),
            &snap.dir.join("initrd.img"),
            &format!("file={},format=qcow2", overlay.display()),
        );
        let mem = snap.dir.join("memory.bin");
        args.push("-incoming".into());
        args.push(format!(
            "exec:cat '{}'",
            mem.display().to_string().replace('\'', "'\\''")
        ));
        let mut vm = QemuVm::spawn(dir, meta, args)?;
        let deadline = t0 + spec.timeout;
        let qmp_path = vm.dir.path().join("qmp.sock");
        let mut qmp =
            Qmp::connect(&qmp_path, spec.timeout).map_err(|e| vm.fail(format!("restore: {e}")))?;
        loop {
            let st = qmp.status().map_err(|e| vm.fail(format!("restore: {e}")))?;
            match st.as_str() {
                "paused" | "postmigrate" => {
                    qmp.execute("cont", json!({}))
                        .map_err(|e| vm.fail(format!("restore: {e}")))?;
                    break;
                }
                "running" => break,
                "inmigrate" | "prelaunch" => {}
                other => {
                    return Err(vm.fail(format!(
                        "restore: VM state {other:?} after incoming migration"
                    )));
                }
            }
            if Instant::now() > deadline {
                return Err(vm.fail("restore: incoming migration did not finish in time".into()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(qmp);
        vm.attach_agent(deadline)?;
        vm.sync_guest_clock(deadline)?;
        vm.ready_ms = t0.elapsed().as_millis();
        Ok(vm)
    }

    /// Sends the host's wall clock and fresh entropy to a restored guest
    /// (its clock continues from the snapshot's time, and every clone of a
    /// snapshot starts with the same RNG state).
    fn sync_guest_clock(&mut self, deadline: Instant) -> Result<(), VmError> {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        let Some(agent) = self.agent.as_mut() else {
            return Ok(());
        };
        let synced = agent
            .set_time(std::time::SystemTime::now(), left)
            .and_then(|_| agent.reseed(left));
        synced.map_err(|e| self.fail(format!("restore: setting the guest clock and RNG: {e}")))
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
        let QemuVm { mut child, dir, .. } = self;
        // Dropping a `Child` neither kills nor waits for it.
        let pid = child.0.take().map(|c| c.id()).unwrap_or(0);
        (pid, dir.keep())
    }

    pub fn meta(&self) -> &VmMeta {
        &self.meta
    }

    /// Pause, write memory + device state to `dir/memory.bin` (QMP
    /// `migrate` to `exec:cat`), copy the initrd, quit QEMU.
    pub fn snapshot_to(mut self, dir: &Path) -> Result<(), VmError> {
        // Drop the agent connection first: the guest sees the host leave,
        // and a restored guest waits for the next host to connect.
        self.agent = None;
        let mem = dir.join("memory.bin");
        let mut qmp = Qmp::connect(&self.dir.path().join("qmp.sock"), Duration::from_secs(10))?;
        qmp.execute("stop", json!({}))?;
        let uri = format!(
            "exec:cat > '{}'",
            mem.display().to_string().replace('\'', "'\\''")
        );
        qmp.execute("migrate", json!({"uri": uri}))?;
        let t = Instant::now();
        loop {
            let r = qmp.execute("query-migrate", json!({}))?;
            match r.get("status").and_then(|s| s.as_str()).unwrap_or("") {
                "completed" => break,
                "failed" | "cancelled" => {
                    return Err(VmError::Snapshot(format!("migration failed: {r}")));
                }
                _ => {}
            }
            if t.elapsed() > Duration::from_secs(120) {
                return Err(VmError::Snapshot(
                    "migration did not complete within 120 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = qmp.execute("quit", json!({}));
        if let Some(mut c) = self.child.0.take() {
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        std::fs::copy(self.dir.path().join("initrd.img"), dir.join("initrd.img"))
            .map_err(VmError::io("copy initrd"))?;
        Ok(())
    }
}

impl Vm for QemuVm {
    fn agent(&mut self) -> &mut AgentClient {
        self.agent
            .as_mut()
            .expect("agent attached after boot/restore")
    }

    fn snapshot(self: Box<Self>, dir: &Path) -> Result<(), VmError> {
        (*self).snapshot_to(dir)
    }

    fn pid(&self) -> u32 {
        self.child.0.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }
}

impl Vmm for QemuVmm {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn boot(&self, spec: &BootSpec) -> Result<Box<dyn Vm>, VmError> {
        Ok(Box::new(QemuVm::boot(self, spec)?))
    }

    fn restore(&self, snapshot: &Snapshot, spec: &RestoreSpec) -> Result<Box<dyn Vm>, VmError> {
        Ok(Box::new(QemuVm::restore(snapshot, spec)?))
    }
}
