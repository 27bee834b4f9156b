//! A QEMU VM: booted, restored (prepared, then started), or taken over
//! after a restart; its agent, pause and resume.

use super::QEMU;
use super::args::{CommandLine, Layer, Ram, kernel_cmdline};
use super::child::{ChildGuard, VmDir, tail};
use super::migration::{file_channel, set_migration, wait_incoming};
use super::overlay::restore_layers;
use super::vmm::{BootSpec, QemuVmm, RestoreSpec};
use crate::agent::AgentClient;
use crate::process::{self, Launch, Watch};
use crate::qmp::{Qmp, RunState};
use crate::snapshot::{Snapshot, VmMeta};
use crate::{Vm, VmError, initramfs};
use nullspace_model::snapshot::DiskFormat;
use nullspace_model::snapshot::{MemoryMode, QemuVersion};
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

pub struct QemuVm {
    pub(super) child: ChildGuard,
    pub(super) dir: VmDir,
    pub(super) agent: Option<AgentClient>,
    pub(super) meta: VmMeta,
    pub(super) cmdline: String,
    /// The initramfs it booted.
    pub(super) initrd: PathBuf,
    /// A restored VM: the snapshot it came from (its disk overlay is
    /// `dir/disk.qcow2`).
    pub(super) origin: Option<Box<Snapshot>>,
    /// Mapped memory: the RAM file (a build VM's shared file; a restored
    /// VM's snapshot file, mapped privately).
    pub(super) memory_file: Option<PathBuf>,
    pub(super) qemu: Option<QemuVersion>,
    /// A VM another process started ([`QemuVm::reattach`]): its QEMU's pid
    /// (`child` is empty).
    pub(super) adopted: Option<u32>,
    /// Milliseconds from spawn to the agent's first answer.
    pub ready_ms: u128,
    /// A restore's parts (zero for a build VM).
    pub phases: RestorePhases,
    /// Loaded and paused by [`QemuVm::prepare`]; the guest has not run
    /// since the snapshot ([`QemuVm::start_prepared`] starts it).
    pub(super) prepared: bool,
    /// QEMU's niceness until it starts (a prepared VM's; 0 otherwise).
    pub(super) nice: i32,
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

    pub(super) fn fail(&mut self, message: String) -> VmError {
        // Kill first so the console log is complete and no process is left.
        self.child.kill();
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
                self.child.kill();
                e
            }
            e => self.fail(e.to_string()),
        }
    }

    pub(super) fn exited(&mut self) -> Option<String> {
        let c = self.child.0.as_mut()?;
        match c.try_wait() {
            Ok(Some(st)) => Some(format!("{QEMU} exited ({st})")),
            _ => None,
        }
    }

    pub(super) fn qmp(&mut self, limit: Duration, watch: &Watch) -> Result<Qmp, VmError> {
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
    pub(super) fn attach_agent(&mut self, deadline: Instant, watch: &Watch) -> Result<(), VmError> {
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

    pub(super) fn prepare_watched(
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
        let args = CommandLine {
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
    pub(super) fn start_watched(
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
    pub(super) fn load_state(
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
    pub(super) fn sync_guest_clock(
        &mut self,
        deadline: Instant,
        watch: &Watch,
    ) -> Result<(), VmError> {
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
