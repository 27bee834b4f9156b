//! How a child process starts ([`Launch`]) and how a running one is
//! reniced.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that spawned the child exits,
//! not the process: it is only for children whose whole life is one call
//! on one thread (a build VM, the KVM
//! probe, a build engine's command). VMs handed to other threads or meant
//! to outlive the process (restored and pooled VMs) do not get it.

use super::QEMU;
use crate::VmError;
use rustix::process::{Pid, Signal};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// What a child gets between fork and exec.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Launch {
    /// Leads a process group of its own (a signal to the spawner's group
    /// is not its own; its orphans can be found by group).
    pub own_group: bool,
    /// SIGKILL when the spawning thread exits.
    pub die_with_thread: bool,
    /// A child subreaper: processes it orphans stay its descendants
    /// (instead of moving to PID 1), so [`super::kill_tree`] finds them.
    pub subreaper: bool,
    /// Scheduling niceness (0: the spawner's).
    pub nice: i32,
    /// A network namespace to start in (an open `/run/netns/…` file; the
    /// caller keeps it open until the spawn returned).
    pub netns: Option<RawFd>,
}

impl Launch {
    /// A build engine's command: its own group, dies with the thread that
    /// waits for it, keeps its orphans.
    pub const BUILD_CHILD: Launch = Launch {
        own_group: true,
        die_with_thread: true,
        subreaper: true,
        nice: 0,
        netns: None,
    };
    /// A QEMU that lives within one call on one thread.
    pub const SCOPED_VM: Launch = Launch {
        own_group: false,
        die_with_thread: true,
        subreaper: false,
        nice: 0,
        netns: None,
    };

    /// A QEMU that outlives its spawning thread (a restored VM), at `nice`.
    pub fn detached_vm(nice: i32) -> Launch {
        Launch {
            own_group: true,
            die_with_thread: false,
            subreaper: false,
            nice,
            netns: None,
        }
    }

    /// Sets `cmd` up to start as described.
    pub fn apply(self, cmd: &mut Command) {
        if self.own_group {
            cmd.process_group(0);
        }
        if let Some(fd) = self.netns {
            // SAFETY: the caller keeps `fd` open until the spawn returned.
            enter_netns(cmd, unsafe { BorrowedFd::borrow_raw(fd) });
        }
        if !(self.die_with_thread || self.subreaper || self.nice != 0) {
            return;
        }
        let parent = rustix::process::getpid();
        let Launch {
            die_with_thread,
            subreaper,
            nice,
            ..
        } = self;
        // SAFETY: the closure runs between fork and exec and only makes raw
        // system calls through rustix (prctl, getppid, getpid, setpriority):
        // async-signal-safe, no allocation, no locks.
        unsafe {
            cmd.pre_exec(move || {
                if die_with_thread {
                    rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
                    // The spawner may have gone before the prctl took effect.
                    if rustix::process::getppid() != Some(parent) {
                        return Err(std::io::Error::other("parent exited before exec"));
                    }
                }
                if subreaper {
                    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))?;
                }
                if nice != 0 {
                    rustix::process::setpriority_process(None, nice)?;
                }
                Ok(())
            });
        }
    }
}

/// Makes `cmd` start in the network namespace `ns` (it must stay open
/// until the spawn returned).
pub fn enter_netns(cmd: &mut Command, ns: impl AsFd) {
    let fd = ns.as_fd().as_raw_fd();
    // SAFETY: between fork and exec: one setns(2) through rustix (no
    // allocation, no locks) on a descriptor the parent keeps open.
    unsafe {
        cmd.pre_exec(move || {
            rustix::thread::move_into_link_name_space(
                BorrowedFd::borrow_raw(fd),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )?;
            Ok(())
        });
    }
}

/// Prepares a build engine's command ([`Launch::BUILD_CHILD`]).
pub fn prepare(cmd: &mut Command) {
    Launch::BUILD_CHILD.apply(cmd);
}

/// Spawns QEMU with `args` as `launch` says, stdout and stderr to `log`.
pub(crate) fn spawn_qemu(args: &[String], log: &Path, launch: Launch) -> Result<Child, VmError> {
    let out = std::fs::File::create(log).map_err(VmError::io("console log"))?;
    let err = out.try_clone().map_err(VmError::io("console log"))?;
    let mut cmd = Command::new(QEMU);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    launch.apply(&mut cmd);
    cmd.spawn().map_err(|e| VmError::VmCreate {
        message: format!("{QEMU}: {e}"),
        console_tail: String::new(),
    })
}

/// Sets the niceness of every thread of `pid` (Linux keeps it per thread,
/// and QEMU's vCPU threads inherited it from its main thread).
pub(crate) fn renice(pid: u32, nice: i32) -> std::io::Result<()> {
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        let Some(tid) = e
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
            .and_then(Pid::from_raw)
        else {
            continue;
        };
        match rustix::process::setpriority_process(Some(tid), nice) {
            // A thread that ended meanwhile has no priority to set.
            Ok(()) | Err(rustix::io::Errno::SRCH) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Whether this process may set a niceness back to 0 after raising it
/// (root; finer `CAP_SYS_NICE` checks are not made).
pub fn may_raise_priority() -> bool {
    rustix::process::geteuid().is_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_launch_sets_group_and_niceness() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        Launch::detached_vm(7).apply(&mut cmd);
        let mut c = cmd.spawn().unwrap();
        let pid = Pid::from_raw(c.id() as i32).unwrap();
        let group = rustix::process::getpgid(Some(pid)).unwrap();
        let nice = rustix::process::getpriority_process(Some(pid)).unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
        assert_eq!(group, pid, "not the leader of its own group");
        assert_eq!(nice, 7);
    }

    #[test]
    fn a_scoped_child_dies_with_its_thread() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut cmd = Command::new("sleep");
            cmd.arg("30");
            Launch::SCOPED_VM.apply(&mut cmd);
            let c = cmd.spawn().unwrap();
            tx.send(c.id()).unwrap();
            // The thread ends with its child still running (not waited).
            std::mem::forget(c);
        })
        .join()
        .unwrap();
        let pid = rx.recv().unwrap();
        let t = std::time::Instant::now();
        while super::super::alive(pid) && t.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        super::super::reap_child(pid);
        assert!(!super::super::alive(pid), "pid {pid} outlived its thread");
    }
}
