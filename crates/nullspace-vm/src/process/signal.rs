//! Signals that cannot hit a reused pid: through a pidfd (valid after the
//! child is reaped, when a signal fails instead of reaching another
//! process), or to a pid checked against what it must be running. Tree
//! kills for children that fork, and reaping.

use super::procfs::{self, tree};
use rustix::process::{Pid, PidfdFlags, Signal, WaitOptions};
use std::collections::BTreeSet;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

/// A handle on one process that stays valid after it is reaped.
#[derive(Debug)]
pub struct PidFd(OwnedFd);

impl PidFd {
    /// `None` when the process is already gone.
    pub fn open(pid: u32) -> Option<PidFd> {
        let pid = Pid::from_raw(i32::try_from(pid).ok()?)?;
        rustix::process::pidfd_open(pid, PidfdFlags::empty())
            .ok()
            .map(PidFd)
    }

    /// SIGKILL; whether it reached a process (not one already reaped).
    pub fn kill(&self) -> bool {
        rustix::process::pidfd_send_signal(&self.0, Signal::KILL).is_ok()
    }
}

fn signal(pid: u32, sig: Signal) {
    if let Some(p) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// SIGKILLs `pid` if it runs with `needle` in its command line (so a
/// reused pid is never hit), then waits up to `wait` for it to go (reaping
/// it if it is this process's child). Whether it was killed.
pub fn kill_naming(pid: u32, needle: &[u8], wait: Duration) -> bool {
    if !procfs::runs_naming(pid, needle) {
        return false;
    }
    // Through a pidfd: the check above and the signal name one process.
    let Some(fd) = PidFd::open(pid) else {
        return false;
    };
    if !procfs::runs_naming(pid, needle) || !fd.kill() {
        return false;
    }
    let t = Instant::now();
    loop {
        reap_child(pid);
        if !procfs::alive(pid) || t.elapsed() >= wait {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Stops `root` and its descendants until no new one appears, then kills
/// them all. Returns how many processes were killed. The caller still reaps
/// `root` if it is its child.
pub fn kill_tree(root: u32) -> usize {
    let mut stopped = BTreeSet::new();
    // A stopped process cannot fork; a few rounds catch those that forked
    // between the walk and the stop.
    for _ in 0..20 {
        let fresh: Vec<u32> = tree(root)
            .into_iter()
            .filter(|p| !stopped.contains(p))
            .collect();
        if fresh.is_empty() {
            break;
        }
        for p in fresh {
            signal(p, Signal::STOP);
            stopped.insert(p);
        }
    }
    // Descendants first: the root (a subreaper) adopts any orphan until the
    // end, so nothing reparents to PID 1 while it is being killed.
    for p in stopped.iter().rev().filter(|p| **p != root) {
        signal(*p, Signal::KILL);
    }
    signal(root, Signal::KILL);
    stopped.len()
}

/// SIGKILLs the process group `leader` led (members left after it died).
pub(crate) fn kill_group(leader: u32) {
    if let Some(g) = i32::try_from(leader).ok().and_then(Pid::from_raw) {
        let _ = rustix::process::kill_process_group(g, Signal::KILL);
    }
}

/// Reaps `pid` if it is an exited child of this process (no-op otherwise).
pub fn reap_child(pid: u32) {
    if let Some(p) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = rustix::process::waitpid(Some(p), WaitOptions::NOHANG);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::Launch;
    use std::process::Command;

    #[test]
    fn kill_tree_ends_grandchildren_that_left_the_process_group() {
        // sh starts a grandchild in a new session (setsid), which killpg on
        // the child's group would miss; the tree walk does not.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "setsid sleep 60 & sleep 60 & wait"]);
        Launch::BUILD_CHILD.apply(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while tree(child.id()).len() < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let members = tree(child.id());
        assert_eq!(members.len(), 3, "{members:?}");
        let records: Vec<_> = members
            .iter()
            .filter_map(|p| procfs::ProcessRecord::of(*p))
            .collect();
        let t = Instant::now();
        assert_eq!(kill_tree(child.id()), 3);
        child.wait().unwrap();
        while records.iter().any(|r| r.is_running()) && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            !records.iter().any(|r| r.is_running()),
            "still running after 2 s: {records:?}"
        );
    }

    #[test]
    fn kill_naming_spares_a_pid_running_something_else() {
        let mut c = Command::new("sleep").arg("31").spawn().unwrap();
        procfs::wait_exec(c.id());
        assert!(!kill_naming(c.id(), b"/no/such/qemu.sock", Duration::ZERO));
        assert!(
            c.try_wait().unwrap().is_none(),
            "an unrelated pid was killed"
        );
        assert!(kill_naming(c.id(), b"31", Duration::from_secs(5)));
        assert!(!procfs::alive(c.id()));
        let _ = c.wait();
    }

    #[test]
    fn a_pidfd_does_not_signal_a_reaped_child() {
        let mut c = Command::new("sleep").arg("30").spawn().unwrap();
        let fd = PidFd::open(c.id()).unwrap();
        assert!(fd.kill());
        c.wait().unwrap();
        assert!(!fd.kill(), "a signal reached a reaped pid");
    }
}
