//! A VM's QEMU process ([`Qemu`]: a child killed and reaped on drop, or one
//! taken over by pid) and its own directory ([`VmDir`]).

use super::QEMU;
use crate::VmError;
use crate::process::{OwnerLock, PidFile, Watch};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

/// Kills and reaps the child on drop.
pub(super) struct ChildGuard(pub(super) Option<Child>);

impl ChildGuard {
    pub(super) fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits up to `grace` for the child to exit on its own, then kills it.
    pub(super) fn end(&mut self, grace: Duration) {
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

/// A VM's QEMU process.
pub(super) enum Qemu {
    /// A child of this process: killed and reaped on drop.
    Child(ChildGuard),
    /// Another process's QEMU, taken over by pid after a restart
    /// ([`super::QemuVm::reattach`]): not killed on drop (its machine
    /// outlives this value).
    Adopted(u32),
    /// Ended (QEMU quit after a snapshot).
    Ended,
}

impl Qemu {
    /// Its pid (0 once ended).
    pub(super) fn pid(&self) -> u32 {
        match self {
            Qemu::Child(g) => g.0.as_ref().map_or(0, |c| c.id()),
            Qemu::Adopted(pid) => *pid,
            Qemu::Ended => 0,
        }
    }

    /// Kills a child (at once); an adopted QEMU is left alone.
    pub(super) fn kill(&mut self) {
        if let Qemu::Child(g) = self {
            g.kill();
        }
    }

    /// Waits up to `grace` for QEMU to exit on its own (a child is killed
    /// after it); then it is [`Qemu::Ended`].
    pub(super) fn end(&mut self, grace: Duration) {
        match self {
            Qemu::Child(g) => g.end(grace),
            Qemu::Adopted(pid) => {
                let t = Instant::now();
                while crate::process::alive(*pid) && t.elapsed() < grace {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            Qemu::Ended => {}
        }
        *self = Qemu::Ended;
    }

    /// How a child exited, once it has.
    pub(super) fn exited(&mut self) -> Option<String> {
        let Qemu::Child(ChildGuard(Some(c))) = self else {
            return None;
        };
        match c.try_wait() {
            Ok(Some(st)) => Some(format!("{QEMU} exited ({st})")),
            _ => None,
        }
    }

    /// `Ok` while QEMU runs.
    pub(super) fn check_running(&mut self) -> Result<(), VmError> {
        if let Some(m) = self.exited() {
            return Err(VmError::Agent(m));
        }
        let running = match self {
            Qemu::Child(g) => g.0.is_some(),
            Qemu::Adopted(pid) => crate::process::alive(*pid),
            Qemu::Ended => false,
        };
        if running {
            Ok(())
        } else {
            Err(VmError::Agent(format!("{QEMU} is not running")))
        }
    }

    /// Kills a child when `watch`'s token fires.
    pub(super) fn register(&self, watch: &Watch) {
        if let Qemu::Child(ChildGuard(Some(c))) = self {
            watch.register(c);
        }
    }

    /// Lets QEMU run on after this value is gone; its pid.
    pub(super) fn release(self) -> u32 {
        match self {
            // Dropping a `Child` neither kills nor waits for it.
            Qemu::Child(mut g) => g.0.take().map_or(0, |c| c.id()),
            Qemu::Adopted(pid) => pid,
            Qemu::Ended => 0,
        }
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
    pub(super) fn record(&mut self, pid: u32) -> Result<(), VmError> {
        if let Some(l) = &self.lock {
            self.record = Some(l.pids.record(pid)?);
        }
        Ok(())
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Leaves the directory in place; its path.
    pub(super) fn keep(self) -> PathBuf {
        let VmDir { record, lock, dir } = self;
        drop((record, lock));
        dir.keep()
    }

    /// Whether QEMU's Unix sockets fit under `parent` (`sun_path` is 108
    /// bytes).
    pub(super) fn sockets_fit(parent: &Path) -> bool {
        parent.join("ns-vm-XXXXXX/agent.sock").as_os_str().len() < 108
    }
}

pub(super) fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sleeper() -> Child {
        Command::new("sleep").arg("30").spawn().unwrap()
    }

    #[test]
    fn a_child_ends_and_then_is_not_running() {
        let mut q = Qemu::Child(ChildGuard(Some(sleeper())));
        let pid = q.pid();
        assert!(pid > 0);
        assert!(q.check_running().is_ok());
        q.end(Duration::ZERO);
        assert!(matches!(q, Qemu::Ended));
        assert_eq!(q.pid(), 0);
        assert!(q.check_running().is_err());
        assert!(!crate::process::alive(pid), "ending killed and reaped it");
    }

    #[test]
    fn an_exited_child_is_reported_as_exited() {
        let c = Command::new("true").spawn().unwrap();
        let mut q = Qemu::Child(ChildGuard(Some(c)));
        let t = Instant::now();
        while q.exited().is_none() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let e = q.check_running().unwrap_err().to_string();
        assert!(e.contains("exited"), "{e}");
    }

    #[test]
    fn an_adopted_qemu_is_never_killed_by_this_value() {
        let mut c = sleeper();
        let mut q = Qemu::Adopted(c.id());
        assert!(q.check_running().is_ok());
        q.kill();
        assert!(c.try_wait().unwrap().is_none(), "kill hit an adopted pid");
        drop(Qemu::Adopted(c.id()));
        assert!(c.try_wait().unwrap().is_none(), "drop hit an adopted pid");
        assert_eq!(q.release(), c.id());
        c.kill().unwrap();
        c.wait().unwrap();
    }

    #[test]
    fn a_released_child_runs_on() {
        let q = Qemu::Child(ChildGuard(Some(sleeper())));
        let pid = q.release();
        assert!(crate::process::alive(pid), "released child was killed");
        crate::process::procfs::wait_exec(pid);
        assert!(crate::process::signal::kill_naming(
            pid,
            b"30",
            Duration::from_secs(5)
        ));
        assert!(!crate::process::alive(pid));
    }
}
