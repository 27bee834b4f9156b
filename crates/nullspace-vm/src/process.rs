//! QEMU process hygiene: spawning (optionally dying with the spawning
//! thread), an owner record and a QEMU pidfile in the VM's directory under
//! a run directory, cancellation that SIGKILLs through a pidfd, and
//! [`reap_stale`] for what a previous run left behind.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that spawned the child exits,
//! not the process. It is set only where the VM's whole life is one call on
//! one thread: the build VM (boot → steps → readiness → snapshot in
//! [`crate::template::build_snapshot`]), the temporary QEMU a snapshot of a
//! restored VM uses, and the KVM probe. It is not set on restored VMs, which
//! are handed to other threads or detached to outlive the process.

use crate::VmError;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub const QEMU: &str = "qemu-system-x86_64";
/// In a VM directory: who started the QEMU (`PID STARTTIME`).
pub const OWNER_FILE: &str = "owner";
/// In a VM directory: QEMU's `-pidfile`.
pub const PID_FILE: &str = "qemu.pid";

/// Spawns QEMU with `args`, stdout and stderr to `log`, at scheduling
/// niceness `nice` (0: the caller's).
pub(crate) fn spawn_qemu(
    args: &[String],
    log: &Path,
    die_with_thread: bool,
    nice: i32,
) -> Result<Child, VmError> {
    let out = std::fs::File::create(log).map_err(VmError::io("console log"))?;
    let err = out.try_clone().map_err(VmError::io("console log"))?;
    let mut cmd = Command::new(QEMU);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    if !die_with_thread {
        // A VM that outlives its spawner (a machine) leads a process group
        // of its own: a signal to the server's group is not its own.
        cmd.process_group(0);
    }
    if die_with_thread {
        // SAFETY: getpid is async-signal-safe; the closure only makes
        // the prctl and getppid syscalls between fork and exec.
        let parent = unsafe { libc::getpid() };
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before the prctl took effect.
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("parent exited before exec"));
                }
                Ok(())
            });
        }
    }
    if nice != 0 {
        // SAFETY: setpriority(2) on the calling (child) process only; a
        // raw syscall, no allocation between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setpriority(libc::PRIO_PROCESS, 0, nice) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.spawn().map_err(|e| VmError::VmCreate {
        message: format!("{QEMU}: {e}"),
        console_tail: String::new(),
    })
}

/// Sets the niceness of every thread of `pid` (Linux keeps it per thread,
/// and QEMU's vCPU threads inherited it from its main thread).
pub(crate) fn renice(pid: u32, nice: i32) -> std::io::Result<()> {
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        let Ok(tid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // SAFETY: setpriority(2) on one thread id of that process.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Whether this process may set a niceness back to 0 after raising it
/// (root; finer `CAP_SYS_NICE` checks are not made).
pub fn may_raise_priority() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `/proc/PID/stat` field 22 (start time in clock ticks since boot).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Running (not gone, not a zombie).
pub(crate) fn alive(pid: u32) -> bool {
    !matches!(proc_state(pid), None | Some('Z') | Some('X'))
}

/// Records this process as the owner of the VM directory `dir`.
pub(crate) fn write_owner(dir: &Path) -> Result<(), VmError> {
    let me = std::process::id();
    let st = start_time(me).unwrap_or(0);
    std::fs::write(dir.join(OWNER_FILE), format!("{me} {st}\n")).map_err(VmError::io("owner"))
}

fn owner_alive(dir: &Path) -> Option<bool> {
    let s = std::fs::read_to_string(dir.join(OWNER_FILE)).ok()?;
    let mut it = s.split_whitespace();
    let pid: u32 = it.next()?.parse().ok()?;
    let st: u64 = it.next()?.parse().ok()?;
    Some(alive(pid) && start_time(pid) == Some(st))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Ends the QEMU processes and removes the VM directories that an earlier
/// run left in `run_dir`: every `ns-*` directory whose owner process is gone
/// (a live owner, e.g. another server on the same data directory, keeps
/// its VMs). A pid from a directory's `qemu.pid` is killed only if its
/// `/proc/PID/cmdline` names that pidfile, so a reused pid is never hit.
/// Returns the pids it killed.
pub fn reap_stale(run_dir: &Path) -> Result<Vec<u32>, VmError> {
    let rd = match std::fs::read_dir(run_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(VmError::io(run_dir.display().to_string())(e)),
    };
    let mut killed = vec![];
    for e in rd.flatten() {
        let dir = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with("ns-") || !dir.is_dir() {
            continue;
        }
        match owner_alive(&dir) {
            Some(true) => continue,
            Some(false) => {}
            None => {
                // The owner is written right after the directory is made and
                // before QEMU starts: an unowned directory is either being set
                // up right now or was left by a crash in between.
                let young = std::fs::metadata(&dir)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_none_or(|age| age < Duration::from_secs(60));
                if young {
                    continue;
                }
            }
        }
        let pidfile = dir.join(PID_FILE);
        if let Some(pid) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if alive(pid) && contains(&cmdline, pidfile.as_os_str().as_encoded_bytes()) {
                // SAFETY: kill(2) of a pid whose command line names this
                // directory's pidfile: it is the QEMU that directory recorded.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
                let t = Instant::now();
                while alive(pid) && t.elapsed() < Duration::from_secs(5) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                killed.push(pid);
            }
        }
        std::fs::remove_dir_all(&dir).map_err(VmError::io(dir.display().to_string()))?;
    }
    Ok(killed)
}

/// A process handle that stays valid after the child is reaped (signals to
/// a reaped pidfd fail with ESRCH instead of hitting a reused pid).
struct PidFd(OwnedFd);

impl PidFd {
    fn open(pid: u32) -> Option<PidFd> {
        // SAFETY: pidfd_open(2) with flags 0; returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: the syscall returned a fresh fd that we own.
        Some(PidFd(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// Whether the signal reached a process (not one already reaped).
    fn kill(&self) -> bool {
        use std::os::fd::AsRawFd;
        // SAFETY: pidfd_send_signal(2) on our own pidfd, no siginfo.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            ) == 0
        }
    }
}

struct Shared {
    pidfds: Mutex<Vec<PidFd>>,
    done: AtomicBool,
    fired: AtomicBool,
}

/// Watches a cancellation token for the length of one operation (a build,
/// a restore): when it fires, every QEMU registered with [`Watch::register`]
/// gets SIGKILL at once (checked every 20 ms), which also ends any blocking
/// read on its agent or QMP socket. The operation itself then unwinds,
/// reaps its children and removes its directories.
pub(crate) struct Watch {
    token: CancellationToken,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watch {
    pub(crate) fn new(token: &CancellationToken) -> Watch {
        let shared = Arc::new(Shared {
            pidfds: Mutex::new(vec![]),
            done: AtomicBool::new(false),
            fired: AtomicBool::new(false),
        });
        let (s, t) = (shared.clone(), token.clone());
        let thread = std::thread::Builder::new()
            .name("ns-vm-cancel".into())
            .spawn(move || {
                while !s.done.load(Ordering::SeqCst) {
                    if t.is_cancelled() {
                        for p in s.pidfds.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                            if p.kill() {
                                s.fired.store(true, Ordering::SeqCst);
                            }
                        }
                    }
                    std::thread::park_timeout(Duration::from_millis(20));
                }
            })
            .ok();
        Watch {
            token: token.clone(),
            shared,
            thread,
        }
    }

    /// Kills `child` when the token fires (at once if it already has).
    pub(crate) fn register(&self, child: &Child) {
        if let Some(p) = PidFd::open(child.id()) {
            if self.token.is_cancelled() && p.kill() {
                self.shared.fired.store(true, Ordering::SeqCst);
            }
            self.shared
                .pidfds
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(p);
        }
    }

    pub(crate) fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// `Err(Cancelled)` once the token fired.
    pub(crate) fn check(&self) -> Result<(), VmError> {
        if self.token.is_cancelled() {
            Err(VmError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Stops watching; whether it killed a live process.
    pub(crate) fn finish(mut self) -> bool {
        self.stop();
        self.shared.fired.load(Ordering::SeqCst)
    }

    fn stop(&mut self) {
        self.shared.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sleeps `d` in steps of at most 50 ms; `Err(Cancelled)` when `token` fires.
pub fn sleep_cancellable(token: &CancellationToken, d: Duration) -> Result<(), VmError> {
    let end = Instant::now() + d;
    loop {
        if token.is_cancelled() {
            return Err(VmError::Cancelled);
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// The result of an operation run under a [`Watch`]: any error after the
/// token fired is [`VmError::Cancelled`] (the kill caused it); a success is
/// kept unless the watch killed a live process (then the value, e.g. a VM
/// whose QEMU it killed, is dropped and the result is `Cancelled`).
pub(crate) fn settle<T>(r: Result<T, VmError>, watch: Watch) -> Result<T, VmError> {
    let token = watch.token.clone();
    let fired = watch.finish();
    match r {
        Err(_) if token.is_cancelled() => Err(VmError::Cancelled),
        Ok(_) if fired => Err(VmError::Cancelled),
        r => r,
    }
}

/// Makes a VM directory (`prefix` + random) under `parent` (or the system
/// temp dir) and records this process as its owner.
pub(crate) fn vm_dir(parent: Option<&Path>, prefix: &str) -> Result<tempfile::TempDir, VmError> {
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
    write_owner(dir.path())?;
    Ok(dir)
}

/// Whether QEMU's Unix sockets fit under `dir` (`sun_path` is 108 bytes).
pub(crate) fn sockets_fit(dir: &Path) -> bool {
    dir.join("ns-vm-XXXXXX/agent.sock").as_os_str().len() < 108
}

pub(crate) fn pidfile(dir: &Path) -> PathBuf {
    dir.join(PID_FILE)
}
