//! The child processes of a build, kept accountable:
//!
//! - [`prepare`] starts each one in a process group of its own, with
//!   `PR_SET_PDEATHSIG` (it is killed when the thread that started it dies:
//!   safe here because that thread waits for it, so they end together), and
//!   as a child subreaper (processes it orphans stay its descendants instead
//!   of moving to PID 1, so [`kill_tree`] still finds them).
//! - [`PidDir::record`] writes a pidfile (`<pid>.json`: start time and
//!   command line) while the process runs, under `DATA_DIR/run/<owner>/`.
//!   The owner holds `lock` in that directory (flock) for its whole life.
//!   [`reap_stale`] at start-up finds directories whose lock is free (their
//!   server died, perhaps by SIGKILL), ends every recorded process that is
//!   still the same process (start time and command line match), and
//!   removes the directory.
//! - [`kill_tree`] stops a process and all its descendants (so none can fork
//!   while they are looked up), then kills them all.
//!
//! Linux only (`/proc`); written by hand because no crate does the stop-walk-
//! kill of an unconfined process tree (cgroups would need a delegated
//! hierarchy this server cannot assume).

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

/// Owner directories under the run root are named with this prefix (other
/// entries there, e.g. the build VM's `ns-*` directories, belong to others).
pub const OWNER_PREFIX: &str = "own_";

/// Prepares `cmd` as described in the module docs.
pub fn prepare(cmd: &mut Command) {
    cmd.process_group(0);
    // SAFETY: the closure runs between fork and exec and only makes two
    // prctl syscalls (async-signal-safe, no allocation, no locks).
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
            rustix::process::set_child_subreaper(rustix::process::getpid().into())?;
            Ok(())
        });
    }
}

/// `(ppid, state, start_time)` of a live process, from `/proc/PID/stat`.
fn stat(pid: u32) -> Option<(u32, char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain anything.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let ppid = fields.get(1)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((ppid, state, start))
}

fn all_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `root` and every live (non-zombie) descendant of it.
pub fn tree(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    let mut alive = BTreeSet::new();
    for pid in all_pids() {
        if let Some((ppid, state, _)) = stat(pid) {
            children.entry(ppid).or_default().push(pid);
            if state != 'Z' && state != 'X' {
                alive.insert(pid);
            }
        }
    }
    let mut out = vec![];
    let mut stack = vec![root];
    let mut seen = BTreeSet::new();
    while let Some(p) = stack.pop() {
        if !seen.insert(p) {
            continue;
        }
        if alive.contains(&p) {
            out.push(p);
        }
        stack.extend(children.get(&p).into_iter().flatten().copied());
    }
    out
}

fn signal(pid: u32, sig: Signal) {
    if let Some(p) = Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, sig);
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

/// What a pidfile records: enough to tell the process from a later one
/// that reuses its pid.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessRecord {
    pub pid: u32,
    /// Clock ticks after boot (`/proc/PID/stat` field 22).
    pub start_time: u64,
    pub cmdline: Vec<String>,
}

impl ProcessRecord {
    /// The record of a running process, or `None` when it is gone.
    pub fn of(pid: u32) -> Option<ProcessRecord> {
        let (_, state, start_time) = stat(pid)?;
        if state == 'Z' {
            return None;
        }
        let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = raw
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        Some(ProcessRecord {
            pid,
            start_time,
            cmdline,
        })
    }

    /// Whether the process this record describes still runs: same pid,
    /// same start time, and the same command line, or the tail of it (a
    /// wrapper such as `unshare --net -- buildah …` that exec'd its program
    /// after it was recorded).
    pub fn is_running(&self) -> bool {
        ProcessRecord::of(self.pid).is_some_and(|now| {
            now.start_time == self.start_time
                && !now.cmdline.is_empty()
                && self.cmdline.ends_with(&now.cmdline)
        })
    }
}

/// Where one server process records its children: `RUN_ROOT/<owner>/`.
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

    /// Records a just-started child. Failing to record is not fatal to the
    /// build (the process is still killed with its thread and on cancel),
    /// so the error is returned for the caller to log.
    pub fn record(&self, pid: u32) -> io::Result<PidFile> {
        // Right after spawn the child may still be inside execve, with an
        // empty command line: wait (briefly) for the program it became.
        let deadline = Instant::now() + Duration::from_millis(500);
        let rec = loop {
            let rec = ProcessRecord::of(pid).ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("process {pid} is gone"))
            })?;
            if !rec.cmdline.is_empty() || Instant::now() > deadline {
                break rec;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        fs::create_dir_all(&self.dir)?;
        let path = self.dir.join(format!("{pid}.json"));
        let tmp = self.dir.join(format!(".{pid}.json.tmp"));
        fs::write(&tmp, serde_json::to_vec(&rec).map_err(io::Error::other)?)?;
        fs::rename(&tmp, &path)?;
        Ok(PidFile { path: Some(path) })
    }

    /// Every process recorded here, running or not.
    pub fn recorded(&self) -> Vec<ProcessRecord> {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return vec![];
        };
        rd.flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
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

/// The lock a live server holds on its run directory.
#[derive(Debug)]
pub struct OwnerLock {
    _file: fs::File,
    pub pids: PidDir,
}

impl OwnerLock {
    /// Creates `run_root/<owner>/` and locks it for this process's life.
    pub fn acquire(run_root: &Path, owner: &str) -> io::Result<OwnerLock> {
        let dir = run_root.join(owner);
        fs::create_dir_all(&dir)?;
        let file = fs::File::create(dir.join("lock"))?;
        file.try_lock().map_err(|e| match e {
            fs::TryLockError::Error(e) => e,
            fs::TryLockError::WouldBlock => io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} is locked by another process", dir.display()),
            ),
        })?;
        Ok(OwnerLock {
            _file: file,
            pids: PidDir::new(dir),
        })
    }

    /// Removes the run directory (at a clean exit, when every child is gone).
    pub fn release(self) {
        let _ = fs::remove_dir_all(self.pids.path());
    }
}

/// What [`reap_stale`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reaped {
    /// Owners found dead (their run directory was unlocked).
    pub dead_owners: Vec<String>,
    /// Processes of theirs that still ran and were killed.
    pub killed: Vec<ProcessRecord>,
}

/// Ends what dead servers left behind under `run_root` (see the module
/// docs); waits up to `wait` for the killed processes to be gone. Live
/// servers' directories (locked) are never touched.
pub fn reap_stale(run_root: &Path, wait: Duration) -> io::Result<Reaped> {
    let mut out = Reaped::default();
    let rd = match fs::read_dir(run_root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in rd.flatten() {
        let dir = e.path();
        if !dir.is_dir() || !e.file_name().to_string_lossy().starts_with(OWNER_PREFIX) {
            continue;
        }
        let Ok(lock) = fs::File::options()
            .read(true)
            .write(true)
            .open(dir.join("lock"))
        else {
            // No lock file: a directory half removed, or one a server is
            // creating right now (left alone for a minute).
            let stale = fs::metadata(&dir)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(60));
            if stale && !dir.join("lock").exists() {
                let _ = fs::remove_dir_all(&dir);
            }
            continue;
        };
        if lock.try_lock().is_err() {
            continue; // a live server
        }
        let pids = PidDir::new(&dir);
        for rec in pids.running() {
            kill_tree(rec.pid);
            out.killed.push(rec);
        }
        // A recorded process that died with its server may have left
        // children behind, reparented away from it but still in the process
        // group it led (we made each child a group leader). Its group id
        // cannot have been reused while any member lives.
        for rec in pids.recorded() {
            let leader_gone = ProcessRecord::of(rec.pid).is_none();
            if leader_gone && let Some(g) = Pid::from_raw(rec.pid as i32) {
                let _ = rustix::process::kill_process_group(g, Signal::KILL);
            }
        }
        let deadline = Instant::now() + wait;
        while out.killed.iter().any(ProcessRecord::is_running) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        out.dead_owners
            .push(e.file_name().to_string_lossy().into_owned());
        let _ = fs::remove_dir_all(&dir);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_tree_ends_grandchildren_that_left_the_process_group() {
        // sh starts a grandchild in a new session (setsid), which killpg on
        // the child's group would miss; the tree walk does not.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "setsid sleep 60 & sleep 60 & wait"]);
        prepare(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while tree(child.id()).len() < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let members = tree(child.id());
        assert_eq!(members.len(), 3, "{members:?}");
        let records: Vec<_> = members
            .iter()
            .filter_map(|p| ProcessRecord::of(*p))
            .collect();
        let t = Instant::now();
        assert_eq!(kill_tree(child.id()), 3);
        child.wait().unwrap();
        while records.iter().any(ProcessRecord::is_running) && t.elapsed() < Duration::from_secs(2)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            !records.iter().any(ProcessRecord::is_running),
            "still running after 2 s: {records:?}"
        );
    }

    #[test]
    fn reap_stale_kills_only_dead_owners_processes() {
        let root = tempfile::tempdir().unwrap();
        // A live owner: its lock is held, its process must survive.
        let live = OwnerLock::acquire(root.path(), "own_live").unwrap();
        let mut keep = Command::new("sleep").arg("60").spawn().unwrap();
        let _keep_file = live.pids.record(keep.id()).unwrap();
        // A dead owner: its directory and pidfile are there, its lock free.
        let dead = root.path().join("own_dead");
        let pids = PidDir::new(&dead);
        fs::create_dir_all(&dead).unwrap();
        fs::File::create(dead.join("lock")).unwrap();
        let mut stale = Command::new("sleep").arg("61").spawn().unwrap();
        std::mem::forget(pids.record(stale.id()).unwrap());
        // A pidfile whose pid now runs something else is left alone.
        let mut other = Command::new("sleep").arg("62").spawn().unwrap();
        let mut fake = ProcessRecord::of(other.id()).unwrap();
        fake.cmdline = vec!["buildah".into(), "build".into()];
        fs::write(
            dead.join(format!("{}.json", other.id())),
            serde_json::to_vec(&fake).unwrap(),
        )
        .unwrap();

        // Not an owner directory (the build VM's): never touched.
        let vm_dir = root.path().join("ns-vm1");
        fs::create_dir_all(&vm_dir).unwrap();
        fs::File::open(&vm_dir)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
            .unwrap();

        let r = reap_stale(root.path(), Duration::from_secs(5)).unwrap();
        assert_eq!(r.dead_owners, ["own_dead"]);
        assert!(
            vm_dir.exists(),
            "another component's run directory was removed"
        );
        assert_eq!(
            r.killed.iter().map(|k| k.pid).collect::<Vec<_>>(),
            [stale.id()]
        );
        assert!(
            stale.try_wait().unwrap().is_some() || {
                std::thread::sleep(Duration::from_millis(200));
                stale.try_wait().unwrap().is_some()
            }
        );
        assert!(
            keep.try_wait().unwrap().is_none(),
            "a live owner's child was killed"
        );
        assert!(
            other.try_wait().unwrap().is_none(),
            "a reused pid was killed"
        );
        assert!(!dead.exists() && live.pids.path().exists());
        for c in [&mut keep, &mut other] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
