//! A VM's QEMU process (killed and reaped on drop) and its own directory.

use crate::VmError;
use crate::process::{OwnerLock, PidFile};
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
