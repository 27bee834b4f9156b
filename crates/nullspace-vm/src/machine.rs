//! Machines: restored VMs that outlive the process that started them.
//!
//! A machine lives in a directory of its own (chosen by the caller, e.g.
//! `DATA_DIR/machines/<id>`): its qcow2 disk overlay, QEMU's `-pidfile`,
//! the agent and QMP sockets and the console log. QEMU runs in a process
//! group of its own, so a signal to the server's group (a terminal's
//! Ctrl-C) does not reach it; a server that restarts finds it again from
//! [`SandboxHandle`] (pid, directory, sockets), which [`SandboxHandle::alive`]
//! checks against the pid's command line.
//!
//! A running machine can be snapshotted ([`snapshot`]): memory and device
//! state are written while the guest is stopped, the disk overlay is copied
//! (the machine goes on: fork, snapshot) or moved (QEMU ends: pause). The
//! snapshot's disk is a qcow2 layered on the disk the machine was restored
//! from, so restoring it ([`restore`]) needs that snapshot's files too.

use crate::VmError;
use crate::agent::AgentClient;
use crate::qemu::{QEMU, machine_args};
use crate::qmp::Qmp;
use crate::sandbox::{SandboxHandle, socket_path_fits};
use crate::template::{SNAPSHOT_FILE, Snapshot, SnapshotMeta, Timings};
use serde_json::json;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// In a machine directory: QEMU's pidfile.
pub const PID_FILE: &str = "qemu.pid";
/// In a machine directory: its copy-on-write disk.
pub const OVERLAY: &str = "disk.qcow2";

/// How a machine is restored.
#[derive(Debug, Clone)]
pub struct MachineSpec {
    /// The machine's directory: created, must not exist yet.
    pub dir: PathBuf,
    /// When the snapshot has a network device: `false` restricts QEMU's
    /// user-mode network to the guest itself (`restrict=on`: no host, no
    /// outside), so `internet_access: false` holds without changing the
    /// device set the snapshot needs.
    pub internet: bool,
    /// From QEMU start to the agent's answer.
    pub timeout: Duration,
}

/// A restored machine: its handle (what a later process needs to find it
/// again) and the agent connection.
pub struct Restored {
    pub handle: SandboxHandle,
    pub agent: AgentClient,
    /// QEMU start to the agent's first answer, in milliseconds.
    pub ready_ms: u64,
}

/// The disk a snapshot's machines are layered on: `(path, qemu-img format)`.
pub fn snapshot_disk(snap: &Snapshot) -> (PathBuf, &'static str) {
    let q = snap.dir.join(OVERLAY);
    if q.exists() {
        (q, "qcow2")
    } else {
        (snap.disk(), "raw")
    }
}

fn quote(p: &Path) -> String {
    p.display().to_string().replace('\'', "'\\''")
}

/// Kills and reaps a QEMU this process started (best effort) and removes
/// the machine directory: what a failed restore leaves is nothing.
fn abandon(child: &mut std::process::Child, dir: &Path) {
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(dir);
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Restores `snap` as a machine in `spec.dir`: a qcow2 overlay over the
/// snapshot's disk, QEMU with `-incoming`, `cont`, the agent connected and
/// the guest's wall clock set. On failure nothing is left (QEMU killed, the
/// directory removed).
pub fn restore(snap: &Snapshot, spec: &MachineSpec) -> Result<Restored, VmError> {
    let t0 = Instant::now();
    let dir = &spec.dir;
    std::fs::create_dir(dir).map_err(VmError::io(dir.display().to_string()))?;
    let dir = std::fs::canonicalize(dir).map_err(VmError::io(dir.display().to_string()))?;
    if !socket_path_fits(&dir.join("agent.sock")) {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(VmError::Restore(format!(
            "machine directory {}: too long for QEMU's Unix sockets (108 bytes)",
            dir.display()
        )));
    }
    let result = (|| {
        let (base, fmt) = snapshot_disk(snap);
        let base = std::fs::canonicalize(&base).map_err(VmError::io(base.display().to_string()))?;
        let overlay = dir.join(OVERLAY);
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", fmt, "-b"])
            .arg(&base)
            .arg(&overlay)
            .output()
            .map_err(VmError::io("qemu-img (install qemu-utils)"))?;
        if !out.status.success() {
            return Err(VmError::Restore(format!(
                "qemu-img create: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let meta = &snap.meta.vm;
        let mut args = machine_args(
            meta,
            &dir,
            &snap.dir.join("initrd.img"),
            &format!("file={},format=qcow2", overlay.display()),
        );
        if meta.network && !spec.internet {
            for a in args.iter_mut() {
                if a == "user,id=n0" {
                    a.push_str(",restrict=on");
                }
            }
        }
        args.push("-pidfile".into());
        args.push(dir.join(PID_FILE).display().to_string());
        args.push("-incoming".into());
        args.push(format!(
            "exec:cat '{}'",
            quote(&snap.dir.join("memory.bin"))
        ));
        Ok(args)
    })();
    let args = match result {
        Ok(a) => a,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
    };
    let log = std::fs::File::create(dir.join("console.log")).map_err(VmError::io("console log"))?;
    let log2 = log.try_clone().map_err(VmError::io("console log"))?;
    let mut child = match Command::new(QEMU)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        // Its own process group: the server's signals are not its own.
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(VmError::Restore(format!("{QEMU}: {e}")));
        }
    };
    let handle = SandboxHandle {
        pid: child.id(),
        agent_socket: dir.join("agent.sock"),
        qmp_socket: dir.join("qmp.sock"),
        dir: dir.clone(),
    };
    let deadline = t0 + spec.timeout;
    let fail = |child: &mut std::process::Child, m: String| {
        let console = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
        abandon(child, &dir);
        VmError::Restore(format!("{m}{}", {
            let t = tail(&console, 5);
            if t.is_empty() {
                String::new()
            } else {
                format!(" (QEMU: {})", t.replace('\n', " | "))
            }
        }))
    };
    let mut qmp = match Qmp::connect(&handle.qmp_socket, spec.timeout) {
        Ok(q) => q,
        Err(e) => return Err(fail(&mut child, format!("{e}"))),
    };
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(fail(
                &mut child,
                format!("{QEMU} exited ({st}) while restoring"),
            ));
        }
        let st = match qmp.status() {
            Ok(s) => s,
            Err(e) => return Err(fail(&mut child, format!("{e}"))),
        };
        match st.as_str() {
            "paused" | "postmigrate" => {
                if let Err(e) = qmp.execute("cont", json!({})) {
                    return Err(fail(&mut child, format!("{e}")));
                }
                break;
            }
            "running" => break,
            "inmigrate" | "prelaunch" => {}
            other => {
                return Err(fail(
                    &mut child,
                    format!("VM state {other:?} after the incoming migration"),
                ));
            }
        }
        if Instant::now() > deadline {
            return Err(fail(
                &mut child,
                "the incoming migration did not finish in time".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(qmp);
    let left = deadline.saturating_duration_since(Instant::now());
    let agent = match AgentClient::connect(&handle.agent_socket, left)
        .and_then(|a| a.ping(left.max(Duration::from_secs(1))).map(|_| a))
    {
        Ok(a) => a,
        Err(e) => return Err(fail(&mut child, format!("guest agent: {e}"))),
    };
    // The guest's clock continues from the snapshot's time, and machines
    // restored from one snapshot must not share their RNG state.
    let synced = agent
        .set_time(std::time::SystemTime::now(), Duration::from_secs(10))
        .and_then(|_| agent.reseed(Duration::from_secs(10)));
    if let Err(e) = synced {
        return Err(fail(
            &mut child,
            format!("setting the guest clock and RNG: {e}"),
        ));
    }
    // Dropping a `Child` neither kills nor waits for it: QEMU stays.
    drop(child);
    Ok(Restored {
        handle,
        agent,
        ready_ms: t0.elapsed().as_millis() as u64,
    })
}

/// What [`snapshot`] leaves of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Running again (fork, snapshot).
    Resume,
    /// QEMU ended and its disk moved into the snapshot (pause); the
    /// machine directory is removed.
    Stop,
}

/// Snapshots the running machine `h`, restored from `base`, into `out`
/// (created; must not exist): `memory.bin`, `disk.qcow2` (layered on
/// `base`'s disk), `initrd.img` and `snapshot.json`. On failure `out` is
/// removed; with [`After::Resume`] the machine runs on.
pub fn snapshot(
    h: &SandboxHandle,
    base: &Snapshot,
    out: &Path,
    after: After,
) -> Result<SnapshotMeta, VmError> {
    let t0 = Instant::now();
    // A full disk shows up as a broken migration pipe: say what it is.
    let overlay = std::fs::metadata(h.dir.join(OVERLAY))
        .map(|m| m.len())
        .unwrap_or(0);
    let need = ((base.meta.vm.memory_mb as u64) << 20) + overlay;
    if let Some(free) = out.parent().and_then(free_bytes)
        && free < need
    {
        return Err(VmError::Snapshot(format!(
            "not enough free space in {} for a snapshot: up to {} MiB needed (memory and disk), {} MiB free",
            out.parent().unwrap_or(out).display(),
            need >> 20,
            free >> 20
        )));
    }
    std::fs::create_dir(out).map_err(VmError::io(out.display().to_string()))?;
    let result = snapshot_inner(h, base, out, after, t0);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(out);
    }
    result
}

fn snapshot_inner(
    h: &SandboxHandle,
    base: &Snapshot,
    out: &Path,
    after: After,
    t0: Instant,
) -> Result<SnapshotMeta, VmError> {
    if !h.alive() {
        return Err(VmError::Snapshot(format!(
            "the machine's QEMU (pid {}) is not running",
            h.pid
        )));
    }
    let mut qmp = Qmp::connect(&h.qmp_socket, Duration::from_secs(10))?;
    qmp.execute("stop", json!({}))?;
    // From here on a failure must leave a resumable machine running.
    let r = (|| -> Result<(), VmError> {
        let uri = format!("exec:cat > '{}'", quote(&out.join("memory.bin")));
        qmp.execute("migrate", json!({"uri": uri}))?;
        let t = Instant::now();
        loop {
            let r = qmp.execute("query-migrate", json!({}))?;
            match r.get("status").and_then(|s| s.as_str()).unwrap_or("") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    return Err(VmError::Snapshot(format!("migration failed: {r}")));
                }
                _ => {}
            }
            if t.elapsed() > Duration::from_secs(300) {
                let _ = qmp.execute("migrate_cancel", json!({}));
                return Err(VmError::Snapshot(
                    "migration did not complete within 300 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    })();
    if let Err(e) = r {
        let _ = qmp.execute("cont", json!({}));
        return Err(e);
    }
    let overlay = h.dir.join(OVERLAY);
    let disk = out.join(OVERLAY);
    match after {
        After::Resume => {
            // The guest is stopped and the migration inactivated the disk
            // (everything flushed): the overlay file is consistent now.
            let copied =
                std::fs::copy(&overlay, &disk).map_err(VmError::io("copying the disk overlay"));
            let cont = qmp.execute("cont", json!({}));
            copied?;
            cont?;
        }
        After::Stop => {
            let _ = qmp.execute("quit", json!({}));
            drop(qmp);
            let t = Instant::now();
            while h.alive() && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(10));
            }
            if h.alive() {
                // SAFETY: kill(2) on the pid `alive` just matched to this
                // machine's QEMU by its command line.
                unsafe {
                    libc::kill(h.pid as libc::pid_t, libc::SIGKILL);
                }
            }
            std::fs::rename(&overlay, &disk).map_err(VmError::io("moving the disk overlay"))?;
        }
    }
    // Restores boot nothing: the initramfs is only kept for the device set.
    let initrd = base.dir.join("initrd.img");
    if std::fs::hard_link(&initrd, out.join("initrd.img")).is_err() {
        std::fs::copy(&initrd, out.join("initrd.img"))
            .map_err(VmError::io("copying the initramfs"))?;
    }
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let meta = SnapshotMeta {
        vm: base.meta.vm.clone(),
        config: base.meta.config.clone(),
        start: base.meta.start.clone(),
        disk_bytes: size(&disk),
        memory_bytes: size(&out.join("memory.bin")),
        timings_ms: Timings {
            snapshot: t0.elapsed().as_millis() as u64,
            ..Default::default()
        },
    };
    let json = serde_json::to_vec_pretty(&meta).unwrap_or_default();
    std::fs::write(out.join(SNAPSHOT_FILE), json).map_err(VmError::io("snapshot.json"))?;
    if after == After::Stop {
        let _ = h.kill(Duration::from_secs(1));
    }
    Ok(meta)
}

/// Bytes available to this user on the filesystem of `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// The pid in a machine directory's QEMU pidfile.
pub fn pidfile_pid(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}
