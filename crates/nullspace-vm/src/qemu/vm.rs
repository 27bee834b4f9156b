//! A QEMU VM: booted, restored (prepared, then started), or taken over
//! after a restart; its agent, pause and resume.

use super::QEMU;
use super::args::{CommandLine, Layer, Nic, Ram, kernel_cmdline};
use super::child::{ChildGuard, Qemu, VmDir, tail};
use super::vmm::{BootSpec, QemuVmm};
use crate::agent::AgentClient;
use crate::process::{self, Launch, Watch};
use crate::qmp::{Qmp, RunState};
use crate::snapshot::{Snapshot, VmMeta};
use crate::{Vm, VmError, initramfs};
use nullspace_model::snapshot::DiskFormat;
use nullspace_model::snapshot::MemoryMode;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

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

/// A running VM: booted (a build VM), started from a [`PreparedVm`], or
/// taken over after a restart ([`QemuVm::reattach`]). Dropping it kills a
/// QEMU this process started and removes its directory.
///
/// [`PreparedVm`]: super::PreparedVm
pub struct QemuVm {
    pub(super) qemu: Qemu,
    pub(super) dir: VmDir,
    /// `None` after a snapshot that left it paused or stopped, until the
    /// agent answers again.
    pub(super) agent: Option<AgentClient>,
    pub(super) meta: VmMeta,
    pub(super) cmdline: String,
    /// The initramfs it booted.
    pub(super) initrd: PathBuf,
    pub(super) origin: Origin,
    /// Milliseconds from spawn to the agent's first answer.
    pub ready_ms: u128,
    /// A restore's parts (zero for a build VM).
    pub phases: RestorePhases,
    /// What the balloon was last asked to leave the guest (bytes of QEMU's
    /// memory), until it has.
    pub(super) balloon_target: Option<u64>,
}

/// Where a VM came from, which decides how it is snapshotted.
pub(super) enum Origin {
    /// Booted from a disk (a build VM; `template::build_snapshot` snapshots
    /// it). Mapped memory: its RAM is a shared mapping of this file.
    Booted { memory_file: Option<PathBuf> },
    /// Restored from this snapshot (its disk overlay is `dir/disk.qcow2`);
    /// [`QemuVm::snapshot`] snapshots it.
    Restored(Box<Snapshot>),
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

impl QemuVm {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn spawn(
        mut dir: VmDir,
        meta: VmMeta,
        cmdline: String,
        initrd: PathBuf,
        args: Vec<String>,
        origin: Origin,
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
        Ok(QemuVm {
            qemu: Qemu::Child(child),
            dir,
            agent: None,
            meta,
            cmdline,
            initrd,
            origin,
            ready_ms: 0,
            phases: RestorePhases::default(),
            balloon_target: None,
        })
    }

    /// Takes over a restored VM that an earlier process detached (a server
    /// that restarted): `handle`'s QEMU, restored from `origin`, with
    /// `agent` connected. The VM can then be snapshotted like one restored
    /// here. Its directory is reached through links in a directory of this
    /// value's own (removed on drop; the VM's stays).
    pub fn reattach(
        handle: &crate::machine::MachineHandle,
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
            qemu: Qemu::Adopted(handle.pid),
            meta: origin.meta.vm.clone(),
            cmdline: m.device.kernel_cmdline.clone(),
            initrd: origin.path(&m.initramfs),
            origin: Origin::Restored(Box::new(origin)),
            dir,
            agent: Some(agent),
            ready_ms: 0,
            phases: RestorePhases::default(),
            balloon_target: None,
        })
    }

    pub(super) fn fail(&mut self, message: String) -> VmError {
        // Kill first so the console log is complete and no process is left.
        self.qemu.kill();
        VmError::VmCreate {
            message,
            console_tail: tail(&self.console(), 30),
        }
    }

    /// Kills QEMU and passes `e` on (cancellation and snapshot errors keep
    /// their kind; anything else becomes `vm_create` with the console tail).
    pub(super) fn fail_with(&mut self, e: VmError) -> VmError {
        match e {
            VmError::Cancelled | VmError::Incompatible { .. } | VmError::Corrupt { .. } => {
                self.qemu.kill();
                e
            }
            e => self.fail(e.to_string()),
        }
    }

    pub(super) fn exited(&mut self) -> Option<String> {
        self.qemu.exited()
    }

    pub(super) fn qmp(&mut self, limit: Duration, watch: &Watch) -> Result<Qmp, VmError> {
        let path = self.dir.path().join("qmp.sock");
        let qemu = &mut self.qemu;
        Qmp::connect_checked(&path, limit, &mut || {
            watch.check()?;
            qemu.check_running()
        })
    }

    /// Connects the agent and waits for its first answer before `deadline`.
    pub(super) fn attach_agent(&mut self, deadline: Instant, watch: &Watch) -> Result<(), VmError> {
        let sock = self.dir.path().join("agent.sock");
        let agent = loop {
            if watch.check().is_err() {
                self.qemu.kill();
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
                self.qemu.kill();
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
        // Every VM has a NIC (a restore decides where it leads).
        config.network = true;
        let cfg = serde_json::to_vec(&config).unwrap_or_default();
        initramfs::write_with_config(&vmm.base_initrd, &cfg, &initrd)?;
        let meta = VmMeta {
            vmlinuz: vmm.kernel.vmlinuz.clone(),
            kernel_version: vmm.kernel.version.clone(),
            memory_mb: spec.memory_mb,
            vcpus: spec.vcpus,
            accel: vmm.accel,
            network: spec.network,
            nic: true,
            memory_mode: spec.memory_mode,
            spare_disks: super::spares::SPARE_DISKS,
            ceiling: spec.ceiling,
        };
        if let Some(c) = spec.ceiling {
            c.admits(spec.vcpus, spec.memory_mb)
                .map_err(|e| VmError::VmCreate {
                    message: format!("build VM size: {e}"),
                    console_tail: String::new(),
                })?;
        }
        let disk = std::fs::canonicalize(&spec.disk)
            .map_err(VmError::io(spec.disk.display().to_string()))?;
        let memory_file = match spec.memory_mode {
            MemoryMode::Streamed => None,
            MemoryMode::Delta => {
                return Err(VmError::VmCreate {
                    message: "memory mode delta is for snapshots of restored VMs: a build VM's memory is mapped or streamed".into(),
                    console_tail: String::new(),
                });
            }
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
        let mut cmdline = kernel_cmdline(vmm.accel);
        if let Some(c) = spec.ceiling {
            // `nokaslr`: the kernel image stays low, out of the movable
            // blocks (clones of one snapshot share one layout anyway).
            cmdline.push_str(&format!(
                " nokaslr movablecore={}M",
                c.movable_mib(spec.memory_mb)
            ));
        }
        let layers = [Layer {
            path: disk,
            format: DiskFormat::Raw,
            read_only: false,
        }];
        let args = CommandLine {
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
            spares: super::spares::args(&meta, dir.path(), &[])?,
            nic: Nic::User {
                restrict: !spec.network,
            },
        }
        .args();
        let origin = Origin::Booted {
            memory_file: memory_file.clone(),
        };
        let mut vm = QemuVm::spawn(
            dir,
            meta,
            cmdline,
            initrd,
            args,
            origin,
            Launch::SCOPED_VM,
            watch,
        )?;
        vm.attach_agent(t0 + spec.boot_timeout, watch)?;
        if spec.ceiling.is_some() {
            // The guest booted with everything online. Memory blocks go
            // offline in a fraction of a second; a balloon for what they
            // leave over (none for ceilings below 3 GiB) inflates while the
            // build goes on, and the snapshot waits for it
            // ([`QemuVm::settle_balloon`]).
            vm.meta.vcpus = vm.meta.qemu_vcpus();
            vm.meta.memory_mb = vm.meta.qemu_memory_mb();
            vm.resize_begin(spec.vcpus, spec.memory_mb, Duration::from_secs(60))?;
        }
        vm.ready_ms = t0.elapsed().as_millis();
        Ok(vm)
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
    /// process keeps running and the directory stays (see [`crate::machine::MachineHandle`]).
    pub(crate) fn release(self) -> (u32, PathBuf) {
        let QemuVm { qemu, dir, .. } = self;
        (qemu.release(), dir.keep())
    }

    /// Takes the guest to `vcpus` and `memory_mb`, within its ceiling
    /// ([`nullspace_model::size`]): the guest takes vCPUs and memory blocks
    /// on or offline, then the balloon holds what the blocks leave over;
    /// waits until the guest has exactly that size, within `limit`. A VM
    /// without a ceiling has exactly its size.
    pub fn resize(&mut self, vcpus: u32, memory_mb: u32, limit: Duration) -> Result<(), VmError> {
        self.resize_begin(vcpus, memory_mb, limit)?;
        self.settle_balloon(limit)
    }

    /// [`QemuVm::resize`] without waiting for the balloon.
    fn resize_begin(&mut self, vcpus: u32, memory_mb: u32, limit: Duration) -> Result<(), VmError> {
        let now = (self.meta.vcpus, self.meta.memory_mb);
        nullspace_model::size::check(self.meta.ceiling, now, (vcpus, memory_mb))
            .map_err(|e| VmError::Size(e.to_string()))?;
        let Some(c) = self.meta.ceiling.filter(|_| (vcpus, memory_mb) != now) else {
            return Ok(());
        };
        let (v, online) = crate::Vm::agent(self).resize(vcpus, memory_mb, limit)?;
        self.meta.vcpus = v;
        if v != vcpus {
            return Err(VmError::Size(format!(
                "the guest has {v} vCPUs online of the {vcpus} asked for"
            )));
        }
        let online = online.min(c.memory_mib);
        if online < memory_mb {
            return Err(VmError::Size(format!(
                "the guest brought only {online} MiB online of the {memory_mb} asked for"
            )));
        }
        // QMP's `balloon` value is the memory the guest keeps of QEMU's.
        let keep = c.memory_mib - (online - memory_mb);
        self.qmp_now()?
            .execute("balloon", json!({ "value": (keep as u64) << 20 }))?;
        self.balloon_target = Some((keep as u64) << 20);
        self.meta.memory_mb = memory_mb;
        Ok(())
    }

    /// Records the size a previous process left a taken-over VM at (its
    /// origin snapshot says only the size it was restored with).
    pub fn assume_size(&mut self, vcpus: u32, memory_mb: u32) {
        self.meta.vcpus = vcpus;
        self.meta.memory_mb = memory_mb;
    }

    fn qmp_now(&self) -> Result<Qmp, VmError> {
        Qmp::connect(&self.dir.path().join("qmp.sock"), Duration::from_secs(10))
    }

    /// Waits until the balloon holds what it was last asked to, within
    /// `limit`. A snapshot must not hold a balloon half way: its restores
    /// would go on inflating.
    pub fn settle_balloon(&mut self, limit: Duration) -> Result<(), VmError> {
        let Some(target) = self.balloon_target else {
            return Ok(());
        };
        let deadline = Instant::now() + limit;
        let mut qmp = self.qmp_now()?;
        loop {
            let actual = qmp.execute("query-balloon", json!({}))?["actual"]
                .as_u64()
                .unwrap_or(0);
            if actual == target {
                self.balloon_target = None;
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(VmError::Size(format!(
                    "the balloon reached {} MiB of QEMU's memory left to the guest, not {}, within {limit:?} (memory in use cannot be taken back)",
                    actual >> 20,
                    target >> 20
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn meta(&self) -> &VmMeta {
        &self.meta
    }

    pub(crate) fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// The guest RAM file (mapped memory).
    pub fn memory_file(&self) -> Option<PathBuf> {
        match &self.origin {
            Origin::Booted { memory_file } => memory_file.clone(),
            Origin::Restored(snap) => snap.manifest.memory.ram.as_ref().map(|r| snap.path(r)),
        }
    }

    /// The snapshot a restored VM came from.
    pub fn origin(&self) -> Option<&Snapshot> {
        match &self.origin {
            Origin::Booted { .. } => None,
            Origin::Restored(snap) => Some(snap),
        }
    }

    /// QMP `query-status` (`running`, `paused`, `postmigrate`, …).
    pub fn status(&mut self) -> Result<RunState, VmError> {
        self.qmp_now()?.status()
    }

    /// Pauses the guest (QMP `stop`); the agent connection stays open.
    pub fn pause(&mut self) -> Result<(), VmError> {
        self.qmp_now()?.execute("stop", json!({})).map(|_| ())
    }

    /// Continues a paused guest (QMP `cont`) and makes sure the agent answers.
    pub fn resume(&mut self, limit: Duration) -> Result<(), VmError> {
        self.qmp_now()?.execute("cont", json!({}))?;
        let answered = self.agent.as_mut().is_some_and(|a| a.ping(limit).is_ok());
        if answered {
            Ok(())
        } else {
            self.reconnect_agent(limit)
        }
    }
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
        self.qemu.pid()
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }
}
