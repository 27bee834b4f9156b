//! `nullspace-init`: PID 1 of a nullspace microVM.
//!
//! Stage 1 runs from the initramfs the host builds (`nullspace_vm::initramfs`):
//! it mounts devtmpfs/proc/sys, loads the virtio modules listed in
//! `/nullspace/modules.list` (in that order), waits for `/dev/vda`, mounts it
//! (ext4) at `/newroot`, moves `/dev`, `/proc`, `/sys` into it and switches
//! root there (mount --move + chroot, like `switch_root`). The same process
//! carries on as PID 1 of the template rootfs: `/dev/pts`, `/dev/shm`,
//! hostname, `lo` up, `eth0` when the config has `network` (see `net.rs`),
//! the start command with the runtime defaults from
//! `/nullspace/config.json` (read before the switch; with `defer_start` the
//! host starts it later through the agent's `start` op), zombie reaping, and the
//! agent on the virtio-serial port named `nullspace.agent` (see `agent.rs`
//! for the protocol). An exported disk (`nullspace_vm::disk_export`) boots
//! the same way with `root_device` and `standalone` in its config: root on
//! a partition, and no agent.

mod agent;
mod exec;
mod files;
mod metrics;
mod net;
mod pattern;
mod procs;
mod pty;
mod replace;
mod resize;
mod search;
mod tunnel;
mod users;
mod volume;
mod watch;

use nullspace_model::guest::GuestConfig;
use rustix::mount::MountFlags;
use std::path::Path;
use std::time::{Duration, Instant};

/// Runtime defaults and boot settings the host put in the initramfs.
pub type Config = GuestConfig;

fn read_config() -> Config {
    match std::fs::read("/nullspace/config.json") {
        Ok(b) => match serde_json::from_slice::<Config>(&b) {
            Ok(c) => c.normalized(),
            Err(e) => {
                log(&format!("/nullspace/config.json: {e}; using defaults"));
                Config::default()
            }
        },
        Err(_) => Config::default(),
    }
}

pub fn log(msg: &str) {
    // /dev/console is the serial port: the host keeps it as the boot log.
    eprintln!("nullspace-init: {msg}");
}

fn fatal(msg: &str) -> ! {
    log(&format!("FATAL: {msg}"));
    // Make the failure visible to the host quickly: with `panic=-1` and
    // QEMU's `-no-reboot`, a reboot ends the VM process.
    rustix::fs::sync();
    let _ = rustix::system::reboot(rustix::system::RebootCommand::Restart);
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

fn mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: MountFlags,
    data: &str,
) -> Result<(), String> {
    let data = (!data.is_empty())
        .then(|| std::ffi::CString::new(data))
        .transpose()
        .map_err(|e| e.to_string())?;
    rustix::mount::mount(src, target, fstype, flags, data.as_deref())
        .map_err(|e| format!("mount {src} on {target} ({fstype}): {e}"))
}

fn mount_move(src: &str, target: &str) -> Result<(), String> {
    rustix::mount::mount_move(src, target).map_err(|e| format!("mount --move {src} {target}: {e}"))
}

fn mkdir_p(path: &str, mode: u32) {
    use std::os::unix::fs::DirBuilderExt;
    let _ = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path);
}

fn insmod(path: &str) -> Result<(), String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
    match rustix::system::finit_module(&f, c"", 0) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => Ok(()),
        Err(e) => Err(format!("insmod {path}: {e}")),
    }
}

fn wait_for(path: &str, limit: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if Path::new(path).exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Stage 1: from the initramfs to the template rootfs. Returns the config.
fn stage1() -> Config {
    mkdir_p("/dev", 0o755);
    mkdir_p("/proc", 0o555);
    mkdir_p("/sys", 0o555);
    let _ = mount(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MountFlags::NOSUID,
        "mode=0755",
    );
    let nsne = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    mount("proc", "/proc", "proc", nsne, "").unwrap_or_else(|e| fatal(&e));
    mount("sysfs", "/sys", "sysfs", nsne, "").unwrap_or_else(|e| fatal(&e));

    let cfg = read_config();
    let mut list = std::fs::read_to_string("/nullspace/modules.list").unwrap_or_default();
    if cfg.network {
        list.push_str(&std::fs::read_to_string("/nullspace/modules.net.list").unwrap_or_default());
    }
    for m in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Err(e) = insmod(&format!("/nullspace/modules/{m}")) {
            fatal(&e);
        }
    }
    if cfg.probe_only {
        // KVM probe: the host only wants to know that a guest runs.
        println!("NULLSPACE_PROBE_OK");
        log("NULLSPACE_PROBE_OK");
        rustix::fs::sync();
        let _ = rustix::system::reboot(rustix::system::RebootCommand::PowerOff);
        fatal("poweroff failed");
    }
    let root = cfg.root_device.as_deref().unwrap_or("/dev/vda");
    if !wait_for(root, Duration::from_secs(20)) {
        fatal(&format!(
            "{root} did not appear (virtio_blk not loaded or no disk)"
        ));
    }
    mkdir_p("/newroot", 0o755);
    mount(root, "/newroot", "ext4", MountFlags::empty(), "").unwrap_or_else(|e| fatal(&e));
    for d in ["dev", "proc", "sys"] {
        let target = format!("/newroot/{d}");
        mkdir_p(&target, 0o755);
        mount_move(&format!("/{d}"), &target).unwrap_or_else(|e| fatal(&e));
    }
    // switch_root: make /newroot the root of this very process. The initramfs
    // stays in memory (it is a few MB); nothing is re-executed, so the init
    // binary need not exist in the template rootfs.
    if let Err(e) = rustix::process::chdir("/newroot") {
        fatal(&format!("chdir /newroot: {e}"));
    }
    mount_move(".", "/").unwrap_or_else(|e| fatal(&e));
    if let Err(e) = rustix::process::chroot(".").and_then(|_| rustix::process::chdir("/")) {
        fatal(&format!("chroot into the new root: {e}"));
    }
    cfg
}

/// Stage 2: PID 1 inside the template rootfs.
fn stage2(cfg: &Config) {
    mkdir_p("/dev/pts", 0o755);
    mkdir_p("/dev/shm", 0o1777);
    if let Err(e) = mount(
        "devpts",
        "/dev/pts",
        "devpts",
        MountFlags::NOSUID | MountFlags::NOEXEC,
        "mode=0620,ptmxmode=0666",
    ) {
        log(&e);
    }
    if let Err(e) = mount(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV,
        "mode=1777",
    ) {
        log(&e);
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
    if !Path::new("/dev/ptmx").exists() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
    if !Path::new("/tmp").exists() {
        mkdir_p("/tmp", 0o1777);
        let _ = rustix::fs::chmod("/tmp", rustix::fs::Mode::from_raw_mode(0o1777));
    }
    if let Err(e) = rustix::system::sethostname(cfg.hostname.as_bytes()) {
        log(&format!("sethostname: {e}"));
    }
    if let Err(e) = net::interface_up("lo") {
        log(&format!("lo up: {e}"));
    }
    if cfg.network
        && let Err(e) = net::setup()
    {
        log(&format!("network: {e}"));
    }
}

fn main() {
    let pid = std::process::id();
    let in_initramfs = Path::new("/nullspace/modules.list").exists();
    if pid != 1 {
        eprintln!("nullspace-init must run as PID 1 of a nullspace microVM");
        std::process::exit(2);
    }
    let boot = Instant::now();
    let cfg = if in_initramfs {
        stage1()
    } else {
        // Booted straight into a rootfs (no initramfs): config from there.
        read_config()
    };
    stage2(&cfg);
    let state = procs::new_state(cfg.clone());
    procs::start_reaper(state.clone());
    if let Some(cmd) = cfg.start_cmd.clone().filter(|_| !cfg.defer_start) {
        match procs::start_command(&state, &cmd) {
            Ok(pid) => log(&format!("start command running as pid {pid}")),
            Err(e) => log(&format!("start command failed to start: {e}")),
        }
    }
    log(&format!(
        "userspace ready in {} ms",
        boot.elapsed().as_millis()
    ));
    if cfg.standalone {
        // An exported disk under plain QEMU: no host agent will connect;
        // the reaper thread keeps PID 1's only other duty.
        log("standalone: no agent");
        loop {
            std::thread::park();
        }
    }
    agent::serve(state);
}
