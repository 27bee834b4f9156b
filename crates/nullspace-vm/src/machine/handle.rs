//! A machine's handle, valid across processes: a restored [`QemuVm`] is
//! [`detach`](QemuVm::detach)ed into a [`MachineHandle`]
//! (QEMU's pid and its directory: overlay, agent and QMP sockets, console
//! log), which can be saved, reattached to from another process with
//! [`MachineHandle::agent`], and ended with [`MachineHandle::kill`].

use crate::VmError;
use crate::agent::AgentClient;
use crate::process;
use crate::qemu::QemuVm;
use crate::qmp::Qmp;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A running QEMU that no Rust value owns: nothing kills it or removes its
/// directory until [`MachineHandle::kill`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineHandle {
    pub pid: u32,
    /// QEMU's private directory: `disk.qcow2`, `agent.sock`, `qmp.sock`,
    /// `console.log`.
    pub dir: PathBuf,
    pub agent_socket: PathBuf,
    pub qmp_socket: PathBuf,
}

impl QemuVm {
    /// Leaves QEMU running and its directory in place after this value is
    /// gone (the agent connection is closed; the guest waits for the next).
    pub fn detach(self) -> MachineHandle {
        let (pid, dir) = self.release();
        MachineHandle::new(pid, dir)
    }
}

impl MachineHandle {
    /// The handle of QEMU `pid` running in the VM directory `dir` (its
    /// sockets are `dir/agent.sock` and `dir/qmp.sock`).
    pub fn new(pid: u32, dir: impl Into<PathBuf>) -> MachineHandle {
        let dir = dir.into();
        MachineHandle {
            pid,
            agent_socket: dir.join("agent.sock"),
            qmp_socket: dir.join("qmp.sock"),
            dir,
        }
    }

    /// QEMU is running: the pid exists, is not a zombie, and its command
    /// line names this machine's agent socket (so a reused pid is not taken
    /// for it).
    pub fn alive(&self) -> bool {
        process::procfs::runs_naming(self.pid, self.agent_socket.as_os_str().as_encoded_bytes())
    }

    /// Connects to the guest agent and waits for its answer within `limit`.
    pub fn agent(&self, limit: Duration) -> Result<AgentClient, VmError> {
        if !self.alive() {
            return Err(VmError::Agent(format!(
                "the machine's QEMU (pid {}) is not running",
                self.pid
            )));
        }
        let a = AgentClient::connect(&self.agent_socket, limit)?;
        a.ping(limit)?;
        Ok(a)
    }

    /// Console (serial) output so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }

    /// Ends QEMU (QMP `quit`, then SIGKILL after `grace`) and removes its
    /// directory. Succeeds when QEMU was already gone.
    pub fn kill(&self, grace: Duration) -> Result<(), VmError> {
        if self.alive() {
            if let Ok(mut q) = Qmp::connect(&self.qmp_socket, grace.min(Duration::from_secs(2))) {
                let _ = q.execute("quit", json!({}));
            }
            let t = Instant::now();
            while self.alive() && t.elapsed() < grace {
                std::thread::sleep(Duration::from_millis(20));
            }
            // Only while its command line names this machine's agent socket
            // (a reused pid is never hit).
            let needle = self.agent_socket.as_os_str().as_encoded_bytes();
            process::signal::kill_naming(self.pid, needle, Duration::from_secs(10));
            if self.alive() {
                return Err(VmError::Agent(format!(
                    "QEMU (pid {}) did not exit after SIGKILL",
                    self.pid
                )));
            }
        }
        // The pid's zombie (if its parent is this process) is reaped here.
        process::reap_child(self.pid);
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(VmError::io(self.dir.display().to_string())(e)),
        }
    }
}

/// Whether `path` fits a Unix socket address (`sun_path`, 108 bytes with
/// the terminating NUL).
pub fn socket_path_fits(path: &Path) -> bool {
    path.as_os_str().len() < 108
}
