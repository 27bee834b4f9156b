//! One record format over a run directory (`DATA_DIR/run`), and one
//! [`reap_stale`] for it.
//!
//! Every directory under the run root is an *owner directory*: a server's
//! (`own_<id>`, [`OWNER_PREFIX`]) or a VM's own (`ns-*`, [`VM_PREFIX`]: a
//! build VM's sockets, initramfs and console, held by the process that
//! booted it). Its owner holds the `lock` file in it (`flock`) for its
//! whole life (the file's text is the owner's pid, for people), and records each child it must not leave behind as
//! `<pid>.json` ([`ProcessRecord`]: start time and command line). A dead
//! owner's lock is free: [`reap_stale`] then ends every recorded process
//! that is still the same process, and removes the directory.

use super::ProcessError;
use super::procfs::ProcessRecord;
use super::signal::{kill_group, kill_tree};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A server's owner directory: `own_<id>`.
pub const OWNER_PREFIX: &str = "own_";
/// A VM's owner directory: `ns-vm-*`, `ns-kvmprobe-*`.
pub const VM_PREFIX: &str = "ns-";
/// In an owner directory: the file its owner holds locked.
pub const LOCK_FILE: &str = "lock";

/// A directory without a lock this young is being set up right now.
const SETUP_GRACE: Duration = Duration::from_secs(60);

fn dir_err(path: &Path) -> impl FnOnce(io::Error) -> ProcessError + '_ {
    move |source| ProcessError::Dir {
        path: path.to_path_buf(),
        source,
    }
}

/// Where one owner records its children.
#[derive(Debug, Clone)]
pub struct PidDir {
    dir: PathBuf,
}

/// A recorded process; the pidfile goes when this is dropped (after the
/// process was waited for).
#[derive(Debug)]
pub struct PidFile {
    path: Option<PathBuf>,
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = fs::remove_file(p);
        }
    }
}

impl PidDir {
    pub fn new(dir: impl Into<PathBuf>) -> PidDir {
        PidDir { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Records a just-started child (after `spawn` returned: it has
    /// exec'd its program).
    pub fn record(&self, pid: u32) -> Result<PidFile, ProcessError> {
        // A wrapper may still be inside a second execve, with an empty
        // command line: wait (briefly) for the program it became.
        let deadline = Instant::now() + Duration::from_millis(500);
        let rec = loop {
            let rec = ProcessRecord::of(pid).ok_or(ProcessError::Gone { pid })?;
            if !rec.cmdline.is_empty() || Instant::now() > deadline {
                break rec;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        fs::create_dir_all(&self.dir).map_err(dir_err(&self.dir))?;
        let path = self.dir.join(format!("{pid}.json"));
        let tmp = self.dir.join(format!(".{pid}.json.tmp"));
        let bytes = serde_json::to_vec(&rec).map_err(io::Error::other);
        bytes
            .and_then(|b| fs::write(&tmp, b))
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|source| ProcessError::Pidfile {
                path: path.clone(),
                source,
            })?;
        Ok(PidFile { path: Some(path) })
    }

    /// Every process recorded here, running or not.
    pub fn recorded(&self) -> Vec<ProcessRecord> {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return vec![];
        };
        rd.flatten()
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.ends_with(".json") && !n.starts_with('.')
            })
            .filter_map(|e| serde_json::from_slice::<ProcessRecord>(&fs::read(e.path()).ok()?).ok())
            .collect()
    }

    /// The processes recorded here that still run.
    pub fn running(&self) -> Vec<ProcessRecord> {
        self.recorded()
            .into_iter()
            .filter(ProcessRecord::is_running)
            .collect()
    }
}

/// The lock an owner holds on its directory for its life.
#[derive(Debug)]
pub struct OwnerLock {
    _file: fs::File,
    pub pids: PidDir,
}

impl OwnerLock {
    /// Creates `run_root/<owner>/` and locks it for this process's life.
    pub fn acquire(run_root: &Path, owner: &str) -> Result<OwnerLock, ProcessError> {
        let dir = run_root.join(owner);
        fs::create_dir_all(&dir).map_err(dir_err(&dir))?;
        OwnerLock::within(&dir)
    }

    /// Locks the existing directory `dir`. The lock file is locked under a
    /// temporary name and then renamed into place, so a `lock` that exists
    /// is always held by someone while its owner lives.
    pub fn within(dir: &Path) -> Result<OwnerLock, ProcessError> {
        let lock = dir.join(LOCK_FILE);
        if let Ok(f) = fs::File::options().read(true).write(true).open(&lock) {
            return match f.try_lock() {
                Ok(()) => Ok(OwnerLock {
                    _file: f,
                    pids: PidDir::new(dir),
                }),
                Err(fs::TryLockError::WouldBlock) => Err(ProcessError::Locked {
                    path: dir.to_path_buf(),
                }),
                Err(fs::TryLockError::Error(e)) => Err(dir_err(dir)(e)),
            };
        }
        let tmp = dir.join(format!(".{LOCK_FILE}.{}", std::process::id()));
        let mut file = fs::File::create(&tmp).map_err(dir_err(dir))?;
        file.try_lock().map_err(|e| match e {
            fs::TryLockError::Error(e) => dir_err(dir)(e),
            fs::TryLockError::WouldBlock => ProcessError::Locked {
                path: dir.to_path_buf(),
            },
        })?;
        // For people and tests: who holds it (the flock is what counts).
        writeln!(file, "{}", std::process::id()).map_err(dir_err(dir))?;
        fs::rename(&tmp, &lock).map_err(dir_err(dir))?;
        Ok(OwnerLock {
            _file: file,
            pids: PidDir::new(dir),
        })
    }

    /// Removes the directory (at a clean exit, when every child is gone).
    pub fn release(self) {
        let _ = fs::remove_dir_all(self.pids.path());
    }
}

/// What [`reap_stale`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reaped {
    /// Servers found dead (their `own_*` directory was unlocked).
    pub dead_owners: Vec<String>,
    /// VM directories (`ns-*`) whose owner was found dead.
    pub dead_vm_dirs: Vec<String>,
    /// Processes of theirs that still ran and were killed.
    pub killed: Vec<ProcessRecord>,
}

/// Ends what dead owners left under `run_root` (see the module docs);
/// waits up to `wait` for the killed processes to be gone. Live owners'
/// directories (locked) are never touched, nor is anything not named like
/// an owner directory.
pub fn reap_stale(run_root: &Path, wait: Duration) -> Result<Reaped, ProcessError> {
    let mut out = Reaped::default();
    let rd = match fs::read_dir(run_root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(dir_err(run_root)(e)),
    };
    for e in rd.flatten() {
        let dir = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let server = name.starts_with(OWNER_PREFIX);
        if !dir.is_dir() || !(server || name.starts_with(VM_PREFIX)) {
            continue;
        }
        let Ok(lock) = fs::File::options()
            .read(true)
            .write(true)
            .open(dir.join(LOCK_FILE))
        else {
            // No lock file: a directory being set up right now (left alone
            // for a while), or one a crash left half made or half removed.
            let stale = fs::metadata(&dir)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > SETUP_GRACE);
            if stale && !dir.join(LOCK_FILE).exists() {
                let _ = fs::remove_dir_all(&dir);
            }
            continue;
        };
        if lock.try_lock().is_err() {
            continue; // a live owner
        }
        let pids = PidDir::new(&dir);
        let mut killed = vec![];
        for rec in pids.running() {
            kill_tree(rec.pid);
            killed.push(rec);
        }
        // A recorded process that died with its owner may have left
        // children behind, reparented away from it but still in the process
        // group it led (build children lead one). Its group id cannot have
        // been reused while any member lives.
        for rec in pids.recorded() {
            if ProcessRecord::of(rec.pid).is_none() {
                kill_group(rec.pid);
            }
        }
        let deadline = Instant::now() + wait;
        while killed.iter().any(ProcessRecord::is_running) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        out.killed.extend(killed);
        if server {
            out.dead_owners.push(name);
        } else {
            out.dead_vm_dirs.push(name);
        }
        let _ = fs::remove_dir_all(&dir);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn age(dir: &Path, secs: u64) {
        fs::File::open(dir)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - Duration::from_secs(secs))
            .unwrap();
    }

    #[test]
    fn reap_stale_kills_only_dead_owners_processes() {
        let root = tempfile::tempdir().unwrap();
        // A live owner: its lock is held, its process must survive.
        let live = OwnerLock::acquire(root.path(), "own_live").unwrap();
        let mut keep = Command::new("sleep").arg("60").spawn().unwrap();
        let _keep_file = live.pids.record(keep.id()).unwrap();
        // A live VM directory, locked by this process too.
        let vm_live = root.path().join("ns-vm-live");
        fs::create_dir(&vm_live).unwrap();
        let vm_lock = OwnerLock::within(&vm_live).unwrap();
        let mut vm_keep = Command::new("sleep").arg("63").spawn().unwrap();
        let _vm_file = vm_lock.pids.record(vm_keep.id()).unwrap();
        // A dead owner: its directory and pidfile are there, its lock free.
        let dead = root.path().join("own_dead");
        drop(OwnerLock::acquire(root.path(), "own_dead").unwrap());
        let mut stale = Command::new("sleep").arg("61").spawn().unwrap();
        std::mem::forget(PidDir::new(&dead).record(stale.id()).unwrap());
        // A dead build VM's directory, the same format.
        let vm_dead = root.path().join("ns-vm-dead");
        fs::create_dir(&vm_dead).unwrap();
        drop(OwnerLock::within(&vm_dead).unwrap());
        let mut stale_vm = Command::new("sleep").arg("64").spawn().unwrap();
        std::mem::forget(PidDir::new(&vm_dead).record(stale_vm.id()).unwrap());
        // A pidfile whose pid now runs something else is left alone.
        let mut other = Command::new("sleep").arg("62").spawn().unwrap();
        let mut fake = ProcessRecord::of(other.id()).unwrap();
        fake.cmdline = vec!["buildah".into(), "build".into()];
        fs::write(
            dead.join(format!("{}.json", other.id())),
            serde_json::to_vec(&fake).unwrap(),
        )
        .unwrap();
        // Without a lock: young (being set up) stays, old goes; a name
        // that is not an owner directory's is never touched.
        let young = root.path().join("ns-vm-young");
        fs::create_dir(&young).unwrap();
        let old = root.path().join("ns-vm-old");
        fs::create_dir(&old).unwrap();
        age(&old, 3600);
        let foreign = root.path().join("operator-notes");
        fs::create_dir(&foreign).unwrap();
        age(&foreign, 3600);

        let r = reap_stale(root.path(), Duration::from_secs(5)).unwrap();
        assert_eq!(r.dead_owners, ["own_dead"]);
        assert_eq!(r.dead_vm_dirs, ["ns-vm-dead"]);
        let mut killed: Vec<u32> = r.killed.iter().map(|k| k.pid).collect();
        killed.sort();
        let mut want = vec![stale.id(), stale_vm.id()];
        want.sort();
        assert_eq!(killed, want);
        for c in [&mut stale, &mut stale_vm] {
            let t = Instant::now();
            while c.try_wait().unwrap().is_none() && t.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(c.try_wait().unwrap().is_some(), "a stale process runs on");
        }
        for c in [&mut keep, &mut vm_keep] {
            assert!(
                c.try_wait().unwrap().is_none(),
                "a live owner's child was killed"
            );
        }
        assert!(
            other.try_wait().unwrap().is_none(),
            "a reused pid was killed"
        );
        assert!(!dead.exists() && !vm_dead.exists() && !old.exists());
        assert!(live.pids.path().exists() && vm_live.exists() && young.exists());
        assert!(foreign.exists());
        for c in [&mut keep, &mut vm_keep, &mut other] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    #[test]
    fn a_locked_directory_cannot_be_taken_twice() {
        let root = tempfile::tempdir().unwrap();
        let a = OwnerLock::acquire(root.path(), "own_a").unwrap();
        let e = OwnerLock::acquire(root.path(), "own_a").unwrap_err();
        assert!(matches!(e, ProcessError::Locked { .. }), "{e}");
        assert!(e.to_string().contains("own_a"), "{e}");
        a.release();
        assert!(!root.path().join("own_a").exists());
    }
}
