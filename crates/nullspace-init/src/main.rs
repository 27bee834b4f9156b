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
//! for the protocol).

mod agent;
mod b64;
mod net;
mod procs;
mod users;

use serde_json::Value;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::path::Path;
use std::time::{Duration, Instant};

/// Runtime defaults and boot settings the host put in the initramfs.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub hostname: String,
    pub env: BTreeMap<String, String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    pub start_cmd: Option<String>,
    pub agent_port: String,
    /// Probe mode (KVM check): print the marker and power off.
    pub probe_only: bool,
    /// Do not run `start_cmd` at boot: the host runs build steps first and
    /// then sends the agent's `start` op.
    pub defer_start: bool,
    /// A virtio-net device is attached (QEMU user-mode networking): load
    /// the net modules and configure `eth0` (see [`net::setup`]).
    pub network: bool,
}

impl Config {
    fn parse(v: &Value) -> Config {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let env = v
            .get("env")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        Config {
            hostname: s("hostname").unwrap_or_else(|| "nullspace".into()),
            env,
            user: s("user").filter(|u| !u.trim().is_empty()),
            workdir: s("workdir").filter(|u| !u.trim().is_empty()),
            start_cmd: s("start_cmd").filter(|u| !u.trim().is_empty()),
            agent_port: s("agent_port").unwrap_or_else(|| "nullspace.agent".into()),
            probe_only: v
                .get("probe_only")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            defer_start: v
                .get("defer_start")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            network: v.get("network").and_then(Value::as_bool).unwrap_or(false),
        }
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
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in path")
}

fn mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), String> {
    let (s, t, f, d) = (cstr(src), cstr(target), cstr(fstype), cstr(data));
    let r = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            if fstype.is_empty() {
                std::ptr::null()
            } else {
                f.as_ptr()
            },
            flags,
            if data.is_empty() {
                std::ptr::null()
            } else {
                d.as_ptr() as *const libc::c_void
            },
        )
    };
    if r != 0 {
        return Err(format!(
            "mount {src} on {target} ({fstype}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
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
    use std::os::fd::AsRawFd;
    let empty = cstr("");
    let r = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), empty.as_ptr(), 0) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(format!("insmod {path}: {e}"));
        }
    }
    Ok(())
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
    let _ = mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755");
    mount(
        "proc",
        "/proc",
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    )
    .unwrap_or_else(|e| fatal(&e));
    mount(
        "sysfs",
        "/sys",
        "sysfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    )
    .unwrap_or_else(|e| fatal(&e));

    let cfg = std::fs::read("/nullspace/config.json")
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .map(|v| Config::parse(&v))
        .unwrap_or_else(|| Config::parse(&Value::Null));

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
        unsafe {
            libc::sync();
            libc::reboot(libc::RB_POWER_OFF);
        }
        fatal("poweroff failed");
    }
    if !wait_for("/dev/vda", Duration::from_secs(20)) {
        fatal("/dev/vda did not appear (virtio_blk not loaded or no disk)");
    }
    mkdir_p("/newroot", 0o755);
    mount("/dev/vda", "/newroot", "ext4", 0, "").unwrap_or_else(|e| fatal(&e));
    for d in ["dev", "proc", "sys"] {
        let target = format!("/newroot/{d}");
        mkdir_p(&target, 0o755);
        mount(&format!("/{d}"), &target, "", libc::MS_MOVE, "").unwrap_or_else(|e| fatal(&e));
    }
    // switch_root: make /newroot the root of this very process. The initramfs
    // stays in memory (it is a few MB); nothing is re-executed, so the init
    // binary need not exist in the template rootfs.
    unsafe {
        let nr = cstr("/newroot");
        if libc::chdir(nr.as_ptr()) != 0 {
            fatal("chdir /newroot");
        }
    }
    mount(".", "/", "", libc::MS_MOVE, "").unwrap_or_else(|e| fatal(&e));
    unsafe {
        let dot = cstr(".");
        let root = cstr("/");
        if libc::chroot(dot.as_ptr()) != 0 || libc::chdir(root.as_ptr()) != 0 {
            fatal("chroot into the new root");
        }
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
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "mode=0620,ptmxmode=0666",
    ) {
        log(&e);
    }
    if let Err(e) = mount(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
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
        unsafe {
            let t = cstr("/tmp");
            libc::chmod(t.as_ptr(), 0o1777);
        }
    }
    unsafe {
        let h = cfg.hostname.as_bytes();
        libc::sethostname(h.as_ptr() as *const libc::c_char, h.len());
    }
    if let Err(e) = loopback_up() {
        log(&format!("lo up: {e}"));
    }
    if cfg.network
        && let Err(e) = net::setup()
    {
        log(&format!("network: {e}"));
    }
}

fn loopback_up() -> Result<(), String> {
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) != 0 {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            return Err(e.to_string());
        }
        ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        let r = libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr);
        let e = std::io::Error::last_os_error();
        libc::close(fd);
        if r != 0 {
            return Err(e.to_string());
        }
    }
    Ok(())
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
        std::fs::read("/nullspace/config.json")
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .map(|v| Config::parse(&v))
            .unwrap_or_else(|| Config::parse(&Value::Null))
    };
    stage2(&cfg);
    let state = procs::new_state(cfg.clone());
    procs::start_reaper(state.clone());
    if let Some(cmd) = cfg.start_cmd.as_ref().filter(|_| !cfg.defer_start) {
        match procs::start_command(&state, cmd) {
            Ok(pid) => log(&format!("start command running as pid {pid}")),
            Err(e) => log(&format!("start command failed to start: {e}")),
        }
    }
    log(&format!(
        "userspace ready in {} ms",
        boot.elapsed().as_millis()
    ));
    agent::serve(state);
}
