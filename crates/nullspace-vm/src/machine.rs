//! Machines: restored VMs that outlive the process that started them.
//!
//! A machine lives in a directory of the caller's (e.g.
//! `DATA_DIR/machines/<id>`): QEMU's pid in `qemu.pid`, and the VM's own
//! directory from [`QemuVm::restore`] (`ns-sbx-*`: its qcow2 overlay, the
//! agent and QMP sockets, the console log). QEMU leads a process group of
//! its own (a signal to the server's group is not its own) and does not
//! die with the thread that restored it. A process that restarts finds it
//! again from its [`SandboxHandle`] (pid, directory, sockets; the pid's
//! command line must name its agent socket) and takes it over with
//! [`reattach`], after which it is snapshotted like a VM restored here
//! ([`QemuVm::snapshot`]: fork, snapshot, pause).

use crate::VmError;
use crate::agent::AgentClient;
use crate::qemu::{QemuVm, RestoreSpec};
use crate::sandbox::{SandboxHandle, socket_path_fits};
use crate::snapshot::Snapshot;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// In a machine directory: QEMU's pid.
pub const PID_FILE: &str = "qemu.pid";

/// How a machine is restored.
#[derive(Debug, Clone)]
pub struct MachineSpec {
    /// The machine's directory: created, must not exist yet.
    pub dir: PathBuf,
    /// From QEMU start to the agent's answer.
    pub timeout: Duration,
}

/// A machine restored (or taken over) by this process.
pub struct Restored {
    pub vm: QemuVm,
    /// What a later process needs to find it again.
    pub handle: SandboxHandle,
    pub agent: AgentClient,
    /// QEMU start to the agent's first answer, in milliseconds.
    pub ready_ms: u64,
}

fn handle_of(vm: &QemuVm) -> SandboxHandle {
    let dir = vm.dir().to_path_buf();
    SandboxHandle {
        pid: crate::Vm::pid(vm),
        agent_socket: dir.join("agent.sock"),
        qmp_socket: dir.join("qmp.sock"),
        dir,
    }
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
        let mut vm = QemuVm::restore(
            snap,
            &RestoreSpec {
                work_dir: Some(dir.clone()),
                timeout: spec.timeout,
            },
            cancel,
        )?;
        let handle = handle_of(&vm);
        std::fs::write(dir.join(PID_FILE), format!("{}\n", handle.pid))
            .map_err(VmError::io("machine pidfile"))?;
        let agent = crate::Vm::agent(&mut vm).clone();
        Ok(Restored {
            vm,
            handle,
            agent,
            ready_ms: t0.elapsed().as_millis() as u64,
        })
    })();
    if r.is_err() {
        // A restore that failed killed its QEMU; its directory goes too.
        let _ = std::fs::remove_dir_all(&spec.dir);
    }
    r
}

/// Takes over the running machine `handle` (restored from `origin` by an
/// earlier process): its agent answers within `limit`.
pub fn reattach(
    handle: &SandboxHandle,
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
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}
