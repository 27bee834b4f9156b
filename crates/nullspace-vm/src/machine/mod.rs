//! Machines: restored VMs that outlive the process that started them
//! (the word for a running VM throughout nullspace; [`MachineHandle`] in
//! `handle.rs` finds one again from another process).
//!
//! A machine lives in a directory of the caller's (e.g.
//! `DATA_DIR/machines/<id>`): QEMU's pid in `qemu.pid`, and the VM's own
//! directory from [`QemuVm::restore`] (`ns-sbx-*`: its qcow2 overlay, the
//! agent and QMP sockets, the console log). QEMU leads a process group of
//! its own (a signal to the server's group is not its own) and does not
//! die with the thread that restored it. A process that restarts finds it
//! again from its [`MachineHandle`] (pid, directory, sockets; the pid's
//! command line must name its agent socket) and takes it over with
//! [`reattach`], after which it is snapshotted like a VM restored here
//! ([`QemuVm::snapshot`]: fork, snapshot, pause).

mod handle;
pub use handle::{MachineHandle, socket_path_fits};

use crate::VmError;
use crate::agent::AgentClient;
use crate::qemu::spares::SpareImage;
use crate::qemu::{PreparedVm, QemuVm, RestoreSpec};
use crate::snapshot::Snapshot;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// In a machine directory: QEMU's pid.
pub const PID_FILE: &str = "qemu.pid";

/// Removes a machine directory and the network namespace it records
/// (its QEMU must have ended).
pub fn remove_dir(dir: &Path) -> std::io::Result<()> {
    crate::net::release_dir(dir)
}

/// How a machine is restored.
#[derive(Debug, Clone)]
pub struct MachineSpec {
    /// The machine's directory: created, must not exist yet.
    pub dir: PathBuf,
    /// From QEMU start to the agent's answer.
    pub timeout: Duration,
    /// QEMU's niceness while prepared (see [`RestoreSpec::nice`]).
    pub nice: i32,
    /// Machine networking through a namespace of its own (created here,
    /// everything denied until the caller applies the machine's policy);
    /// `None`: QEMU's user-mode network ([`RestoreSpec::net`]).
    pub net: Option<crate::net::HostNet>,
}

/// A machine restored (or taken over) by this process.
pub struct Restored {
    pub vm: QemuVm,
    /// What a later process needs to find it again.
    pub handle: MachineHandle,
    pub agent: AgentClient,
    /// QEMU start to the agent's first answer, in milliseconds.
    pub ready_ms: u64,
}

/// Restores `snap` as a machine in `spec.dir` (see [`QemuVm::restore`]:
/// verified files, an overlay, memory mapped copy-on-write, the guest's
/// clock and RNG set) and writes QEMU's pid beside it. On failure nothing
/// is left (QEMU killed, the directory removed).
pub fn restore(
    snap: &Snapshot,
    spec: &MachineSpec,
    cancel: &CancellationToken,
) -> Result<Restored, VmError> {
    restore_with(snap, spec, &[], cancel)
}

/// [`restore`] with volume images behind the spare disks, by slot (a
/// resumed machine's attachments: the guest's mounts are in its memory).
pub fn restore_with(
    snap: &Snapshot,
    spec: &MachineSpec,
    volumes: &[Option<SpareImage>],
    cancel: &CancellationToken,
) -> Result<Restored, VmError> {
    let t0 = Instant::now();
    let p = prepare_with(snap, spec, volumes, cancel)?;
    let left = spec.timeout.saturating_sub(t0.elapsed());
    let mut r = p.start(left.max(Duration::from_secs(1)), cancel)?;
    r.ready_ms = t0.elapsed().as_millis() as u64;
    Ok(r)
}

/// A machine made ready ahead of its create (a [`PreparedVm`]): its
/// QEMU runs in the machine directory (pidfile written), started with the
/// snapshot's device configuration, memory mapping and a disk overlay of
/// its own, loaded with the device state and paused; the agent socket is
/// connected. The guest has not run since the snapshot. [`Prepared::start`]
/// makes it a running machine; dropping it kills QEMU and removes the
/// directory.
pub struct Prepared {
    vm: Option<PreparedVm>,
    /// The machine directory.
    dir: PathBuf,
    handle: MachineHandle,
    /// QEMU start to paused and loaded, in milliseconds.
    pub prepare_ms: u64,
}

/// Prepares `snap` as a machine in `spec.dir` (created; must not exist):
/// everything of [`restore`] that does not need the guest to run. On
/// failure nothing is left.
pub fn prepare(
    snap: &Snapshot,
    spec: &MachineSpec,
    cancel: &CancellationToken,
) -> Result<Prepared, VmError> {
    prepare_with(snap, spec, &[], cancel)
}

/// [`prepare`] with volume images behind the spare disks ([`restore_with`]).
pub fn prepare_with(
    snap: &Snapshot,
    spec: &MachineSpec,
    volumes: &[Option<SpareImage>],
    cancel: &CancellationToken,
) -> Result<Prepared, VmError> {
    let t0 = Instant::now();
    std::fs::create_dir(&spec.dir).map_err(VmError::io(spec.dir.display().to_string()))?;
    let r = (|| {
        let dir = std::fs::canonicalize(&spec.dir)
            .map_err(VmError::io(spec.dir.display().to_string()))?;
        // The VM's own directory (`ns-sbx-` and 6 characters) goes in here.
        if !socket_path_fits(&dir.join("ns-sbx-XXXXXX").join("agent.sock")) {
            return Err(VmError::Restore(format!(
                "machine directory {}: too long for QEMU's Unix sockets (108 bytes)",
                dir.display()
            )));
        }
        let net = match &spec.net {
            Some(h) if snap.meta.vm.has_nic() => {
                let id = dir.file_name().unwrap_or_default().to_string_lossy();
                Some(
                    h.create(&id, &dir)
                        .map_err(|e| VmError::Restore(e.to_string()))?,
                )
            }
            _ => None,
        };
        let vm = QemuVm::prepare(
            snap,
            &RestoreSpec {
                work_dir: Some(dir.clone()),
                timeout: spec.timeout,
                pidfile: Some(dir.join(PID_FILE)),
                nice: spec.nice,
                volumes: volumes.to_vec(),
                net: net.clone(),
            },
            cancel,
        )?;
        // QEMU wrote its pidfile as it started (and removes it when it
        // exits); written again here in case it could not.
        let handle = MachineHandle::new(vm.pid(), vm.dir());
        std::fs::write(dir.join(PID_FILE), format!("{}\n", handle.pid))
            .map_err(VmError::io("machine pidfile"))?;
        Ok(Prepared {
            vm: Some(vm),
            dir,
            handle,
            prepare_ms: t0.elapsed().as_millis() as u64,
        })
    })();
    if r.is_err() {
        // A failed prepare killed its QEMU; its directory (and namespace)
        // goes too.
        let _ = remove_dir(&spec.dir);
    }
    r
}

impl Prepared {
    /// Starts the guest (`cont`, clock and RNG set) within `limit`. On
    /// failure QEMU is killed and the directory removed.
    pub fn start(
        mut self,
        limit: Duration,
        cancel: &CancellationToken,
    ) -> Result<Restored, VmError> {
        let t0 = Instant::now();
        let vm = self.vm.take().expect("a prepared VM");
        // On failure `start` killed QEMU; the directory goes on drop.
        let mut vm = vm.start(limit, cancel)?;
        let agent = crate::Vm::agent(&mut vm).clone();
        let handle = self.handle.clone();
        // Handed on: nothing of it is removed now.
        self.dir = PathBuf::new();
        Ok(Restored {
            vm,
            handle,
            agent,
            ready_ms: t0.elapsed().as_millis() as u64,
        })
    }

    /// QEMU's pid, directories and sockets.
    pub fn handle(&self) -> &MachineHandle {
        &self.handle
    }

    /// The machine directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// QEMU still runs (it could have been killed while it waited).
    pub fn alive(&self) -> bool {
        self.handle.alive()
    }

    /// See [`PreparedVm::warm_up`]: the guest runs for a moment (its first
    /// answer and a `true`) and is paused again; returns how long it ran.
    pub fn warm_up(&mut self, limit: Duration, cancel: &CancellationToken) -> Result<u64, VmError> {
        self.vm
            .as_mut()
            .expect("a prepared VM")
            .warm_up(limit, cancel)
    }

    /// QMP `query-status` (`paused` while it waits).
    pub fn status(&mut self) -> Result<crate::qmp::RunState, VmError> {
        self.vm.as_mut().expect("a prepared VM").status()
    }

    /// Where the preparation spent its time.
    pub fn phases(&self) -> crate::RestorePhases {
        self.vm.as_ref().map(PreparedVm::phases).unwrap_or_default()
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        // Dropping the VM kills and reaps QEMU and removes its directory.
        self.vm.take();
        if !self.dir.as_os_str().is_empty() {
            let _ = remove_dir(&self.dir);
        }
    }
}

/// Takes over the running machine `handle` (restored from `origin` by an
/// earlier process): its agent answers within `limit`.
pub fn reattach(
    handle: &MachineHandle,
    origin: Snapshot,
    limit: Duration,
) -> Result<Restored, VmError> {
    let agent = handle.agent(limit)?;
    let vm = QemuVm::reattach(handle, origin, agent.clone())?;
    Ok(Restored {
        vm,
        handle: handle.clone(),
        agent,
        ready_ms: 0,
    })
}

/// The pid in a machine directory's pidfile.
pub fn pidfile_pid(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The VM directory (`ns-sbx-*`) in a machine directory, if any.
pub fn vm_dir(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("ns-sbx-"))
        })
}

/// Bytes available to this user on the filesystem of `dir`.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}
