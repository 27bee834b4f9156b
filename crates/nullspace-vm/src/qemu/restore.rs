//! The one restore path: [`QemuVm::prepare`] restores a snapshot into a
//! paused QEMU (a [`PreparedVm`]), and [`PreparedVm::start`] makes it a
//! running [`QemuVm`]. [`QemuVm::restore`] is both in one call; every
//! other way into a restored VM (the machine module, the pool, the `Vmm`
//! trait, `template::restore`) goes through these two.
//!
//! States and their transitions, checked by the types:
//!
//! ```text
//! Snapshot ──prepare──▶ PreparedVm ──start──▶ QemuVm (running)
//!                         │    ▲
//!                         └────┘ warm_up (runs a moment, paused again)
//! ```

use super::args::{CommandLine, Nic, Ram};
use super::child::VmDir;
use super::migration::incoming;
use super::overlay::restore_layers;
use super::vm::{Origin, QemuVm, RestorePhases};
use super::vmm::RestoreSpec;
use crate::agent::AgentClient;
use crate::process::{self, Launch, Watch};
use crate::qmp::RunState;
use crate::snapshot::Snapshot;
use crate::{Vm, VmError};
use nullspace_model::snapshot::MemoryMode;
use serde_json::json;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A restored VM that has not run: its QEMU started with the snapshot's
/// device configuration and memory mapping and a disk overlay of its own,
/// the device state loaded, paused, the agent socket connected (the
/// session's `hello` sent, read by the guest once it runs). The guest has
/// not run since the snapshot (unless [`PreparedVm::warm_up`]), so it can
/// wait (in a pool) as long as needed. Dropping it kills QEMU and removes
/// its directory.
///
/// A prepared VM is not a running one: it has no agent to call and cannot
/// be snapshotted until started,
///
/// ```compile_fail
/// fn call(mut p: nullspace_vm::qemu::PreparedVm) {
///     let _ = nullspace_vm::Vm::agent(&mut p);
/// }
/// ```
///
/// and a started one cannot go back to being prepared (or be warmed up):
///
/// ```compile_fail
/// fn warm(mut vm: nullspace_vm::QemuVm, c: &nullspace_vm::CancellationToken) {
///     let _ = vm.warm_up(std::time::Duration::from_secs(1), c);
/// }
/// ```
pub struct PreparedVm {
    vm: QemuVm,
    /// QEMU's niceness until it starts.
    nice: i32,
}

impl QemuVm {
    /// Restores `snap` into a new QEMU and starts it ([`QemuVm::prepare`]
    /// then [`PreparedVm::start`], under one deadline and one watch). On
    /// cancel QEMU is killed, its directory removed and `Cancelled`
    /// returned.
    pub fn restore(
        snap: &Snapshot,
        spec: &RestoreSpec,
        cancel: &CancellationToken,
    ) -> Result<QemuVm, VmError> {
        let watch = Watch::new(cancel);
        let t0 = Instant::now();
        let deadline = t0 + spec.timeout;
        let r = prepare_watched(snap, spec, &watch).and_then(|p| {
            let mut vm = p.start_watched(deadline, &watch)?;
            vm.ready_ms = t0.elapsed().as_millis();
            Ok(vm)
        });
        process::settle(r, watch)
    }

    /// The restore: the snapshot's files verified (once per file identity
    /// per process), a qcow2 overlay over its disk, QEMU started
    /// (`-incoming defer`, the snapshot's device configuration, its memory
    /// mapped copy-on-write or read from the stream), its version checked
    /// against the manifest, the device state loaded, the agent socket
    /// connected. On cancel QEMU is killed, its directory removed and
    /// `Cancelled` returned.
    pub fn prepare(
        snap: &Snapshot,
        spec: &RestoreSpec,
        cancel: &CancellationToken,
    ) -> Result<PreparedVm, VmError> {
        let watch = Watch::new(cancel);
        let r = prepare_watched(snap, spec, &watch);
        process::settle(r, watch)
    }
}

fn prepare_watched(
    snap: &Snapshot,
    spec: &RestoreSpec,
    watch: &Watch,
) -> Result<PreparedVm, VmError> {
    let t0 = Instant::now();
    let deadline = t0 + spec.timeout;
    let mut phases = RestorePhases::default();
    let ms = |t: Instant| t.elapsed().as_millis() as u64;
    watch.check()?;
    snap.verify()?;
    phases.verify = ms(t0);
    watch.check()?;
    // `ns-sbx-`: from when machines were called sandboxes; kept, since a
    // server takes over machines whose directories an older one made.
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
        spares: super::spares::args(&meta, dir.path(), &spec.volumes)?,
        nic: match (meta.has_nic(), &spec.net) {
            (false, _) => Nic::Absent,
            (true, Some(_)) => Nic::Tap,
            (true, None) => Nic::User {
                restrict: !meta.network,
            },
        },
    }
    .args();
    let netns = match (&spec.net, meta.has_nic()) {
        (Some(n), true) => Some(n.open().map_err(|e| VmError::Restore(e.to_string()))?),
        _ => None,
    };
    let t = Instant::now();
    // Restored VMs outlive this thread (handed on, or detached).
    let mut vm = QemuVm::spawn(
        dir,
        meta,
        m.device.kernel_cmdline.clone(),
        initrd,
        args,
        Origin::Restored(Box::new(snap.clone())),
        Launch {
            netns: netns.as_ref().map(|f| f.as_raw_fd()),
            ..Launch::detached_vm(spec.nice)
        },
        watch,
    )?;
    let r = load_state(&mut vm, snap, deadline, watch, &mut phases, t);
    let paused = r.map_err(|e| vm.fail_with(e))?;
    if !paused {
        // QEMU keeps a loaded VM paused when the snapshot's source was
        // stopped (every snapshot here is); were it running, pause it, so
        // that a prepared VM is always a paused one.
        let left = deadline.saturating_duration_since(Instant::now());
        let stop = vm
            .qmp(left, watch)
            .and_then(|mut q| q.execute("stop", json!({})).map(|_| ()));
        stop.map_err(|e| vm.fail_with(e))?;
    }
    // QEMU made the agent's socket before its QMP answered. The guest
    // reads what is sent now (the session's `hello`) once it runs.
    let sock = vm.dir.path().join("agent.sock");
    let left = deadline.saturating_duration_since(Instant::now());
    match AgentClient::connect(&sock, left.min(Duration::from_secs(5))) {
        Ok(a) => vm.agent = Some(a),
        Err(e) => return Err(vm.fail(format!("restore: the agent socket: {e}"))),
    }
    vm.phases = phases;
    Ok(PreparedVm {
        vm,
        nice: spec.nice,
    })
}

/// QEMU version check, then the device state (and streamed RAM) in;
/// whether the VM is paused (not running) afterwards.
fn load_state(
    vm: &mut QemuVm,
    snap: &Snapshot,
    deadline: Instant,
    watch: &Watch,
    phases: &mut RestorePhases,
    spawned: Instant,
) -> Result<bool, VmError> {
    let left = deadline.saturating_duration_since(Instant::now());
    let mut qmp = vm.qmp(left, watch)?;
    let version = qmp.version()?;
    phases.spawn = spawned.elapsed().as_millis() as u64;
    let t = Instant::now();
    snap.manifest
        .check_qemu(&version)
        .map_err(|e| VmError::Incompatible {
            dir: snap.dir.display().to_string(),
            detail: e.to_string(),
        })?;
    // Only a mapped snapshot's stream leaves the RAM out; a delta's carries
    // the pages that differ from the (private) mapping it lands on.
    let ignore_shared = snap.manifest.memory.mode == MemoryMode::Mapped;
    let state = snap.path(&snap.manifest.memory.state);
    let paused = incoming(&mut qmp, &state, ignore_shared, watch, deadline)?;
    phases.load = t.elapsed().as_millis() as u64;
    Ok(paused)
}

impl PreparedVm {
    /// Starts the guest within `limit`: its niceness back to 0, `cont`,
    /// then the guest's clock and RNG set (both requests in one round trip;
    /// their answers are the agent's first). Kills QEMU on failure.
    pub fn start(self, limit: Duration, cancel: &CancellationToken) -> Result<QemuVm, VmError> {
        let watch = Watch::new(cancel);
        self.vm.qemu.register(&watch);
        let t0 = Instant::now();
        let r = self.start_watched(t0 + limit, &watch).map(|mut vm| {
            vm.ready_ms = t0.elapsed().as_millis();
            vm
        });
        process::settle(r, watch)
    }

    fn start_watched(mut self, deadline: Instant, watch: &Watch) -> Result<QemuVm, VmError> {
        if self.nice != 0 {
            // A machine now: it runs at the priority of every other.
            let pid = self.vm.pid();
            process::spawn::renice(pid, 0).map_err(|e| {
                self.vm.fail(format!(
                    "restore: setting QEMU (pid {pid}) back to niceness 0: {e}"
                ))
            })?;
            self.nice = 0;
        }
        run(&mut self.vm, deadline, watch)?;
        Ok(self.into_vm())
    }

    /// Runs the VM for a moment and pauses it again: `cont`, the guest's
    /// clock and RNG set, `/bin/sh -c true` through the agent, `stop`.
    /// Under TCG a fresh QEMU translates every guest code path it runs the
    /// first time (the guest's first answer and first command cost 150-250
    /// ms each here); this moves that out of the create. The guest then is
    /// that moment (about the returned milliseconds) past the snapshot,
    /// with an RNG of its own. Stays prepared (and niced); kills QEMU on
    /// failure.
    pub fn warm_up(&mut self, limit: Duration, cancel: &CancellationToken) -> Result<u64, VmError> {
        let watch = Watch::new(cancel);
        self.vm.qemu.register(&watch);
        let t0 = Instant::now();
        let deadline = t0 + limit;
        let vm = &mut self.vm;
        let r = (|| {
            run(vm, deadline, &watch)?;
            let left = deadline.saturating_duration_since(Instant::now());
            let ran = vm
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
            ran.map_err(|e| vm.fail_with(e))?;
            let left = deadline.saturating_duration_since(Instant::now());
            let stop = vm
                .qmp(left, &watch)
                .and_then(|mut q| q.execute("stop", json!({})).map(|_| ()));
            stop.map_err(|e| vm.fail_with(e))?;
            Ok(t0.elapsed().as_millis() as u64)
        })();
        process::settle(r, watch)
    }

    /// QMP `query-status` (`paused` while it waits).
    pub fn status(&mut self) -> Result<RunState, VmError> {
        self.vm.status()
    }

    /// Where the preparation spent its time.
    pub fn phases(&self) -> RestorePhases {
        self.vm.phases
    }

    pub fn pid(&self) -> u32 {
        self.vm.pid()
    }

    /// The VM's own directory (overlay, sockets, console log).
    pub fn dir(&self) -> &Path {
        self.vm.dir()
    }

    fn into_vm(self) -> QemuVm {
        self.vm
    }
}

/// `cont` of a paused VM, then its clock and RNG (its agent's first
/// answers); the time goes to `phases.start`.
fn run(vm: &mut QemuVm, deadline: Instant, watch: &Watch) -> Result<(), VmError> {
    let t = Instant::now();
    let left = deadline.saturating_duration_since(Instant::now());
    let cont = vm
        .qmp(left, watch)
        .and_then(|mut q| q.execute("cont", json!({})).map(|_| ()));
    cont.map_err(|e| vm.fail_with(e))?;
    if vm.agent.is_none() {
        vm.attach_agent(deadline, watch)?;
    }
    sync_guest_clock(vm, deadline, watch)?;
    vm.phases.start = t.elapsed().as_millis() as u64;
    Ok(())
}

/// Sends the host's wall clock and fresh entropy to a restored guest (its
/// clock continues from the snapshot's time, and every clone of a snapshot
/// starts with the same RNG state). The two requests go out together;
/// their answers are also the agent's first sign of life.
fn sync_guest_clock(vm: &mut QemuVm, deadline: Instant, watch: &Watch) -> Result<(), VmError> {
    let Some(agent) = vm.agent.as_ref() else {
        return Ok(());
    };
    let left = deadline.saturating_duration_since(Instant::now());
    let synced = agent.sync_after_restore(std::time::SystemTime::now(), left);
    if let Err(e) = synced {
        if watch.check().is_err() {
            vm.qemu.kill();
            return Err(VmError::Cancelled);
        }
        let m = vm
            .exited()
            .map(|m| format!("{m} before the guest agent answered"))
            .unwrap_or_else(|| format!("restore: setting the guest clock and RNG: {e}"));
        return Err(vm.fail(m));
    }
    Ok(())
}
