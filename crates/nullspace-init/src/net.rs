//! Guest networking with QEMU user-mode NAT (`-netdev user`): `eth0` gets
//! the static defaults of QEMU's built-in DHCP server (no DHCP client in
//! the guest): 10.0.2.15/24, default route via 10.0.2.2 (which is also the
//! host's loopback), DNS forwarder 10.0.2.3.
//!
//! `/etc/resolv.conf`: written (`nameserver 10.0.2.3`) only when the rootfs
//! has none, an empty one, one without a `nameserver` line, or a symlink
//! that does not resolve (e.g. to systemd-resolved's stub). Container images
//! usually ship none (the runtime bind-mounts it); an image's own non-empty
//! resolv.conf is kept. The written file stays in the template (and its
//! snapshot), which keeps the network device.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

pub const IFACE: &str = "eth0";
const ADDR: [u8; 4] = [10, 0, 2, 15];
const MASK: [u8; 4] = [255, 255, 255, 0];
const GATEWAY: [u8; 4] = [10, 0, 2, 2];
const DNS: &str = "10.0.2.3";

/// An AF_INET `sockaddr` (port 0): `sa_data` is the port, then the address.
fn sockaddr(ip: [u8; 4]) -> libc::sockaddr {
    let mut sa_data = [0 as libc::c_char; 14];
    for (d, b) in sa_data[2..6].iter_mut().zip(ip) {
        *d = b as libc::c_char;
    }
    libc::sockaddr {
        sa_family: libc::AF_INET as libc::sa_family_t,
        sa_data,
    }
}

/// A socket for interface ioctls; closed on drop.
fn ioctl_socket() -> Result<OwnedFd, String> {
    rustix::net::socket_with(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::DGRAM,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket: {e}"))
}

/// The interface and routing ioctls (`SIOCSIFADDR`, `SIOCADDRT` …) have no
/// safe wrapper in rustix or nix (netlink crates would, with a protocol
/// stack for three calls): this is the one `unsafe` of this module.
fn ioctl<T>(fd: &OwnedFd, req: libc::c_ulong, arg: &mut T, what: &str) -> Result<(), String> {
    // SAFETY: `fd` is an open socket and `arg` the live struct (ifreq or
    // rtentry) that `req` expects; the kernel writes within it only.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("{what}: {e}"));
    }
    Ok(())
}

/// A `struct ifreq` for `name` carrying `value` (a union written whole, so
/// no field is read back).
fn ifreq(name: &str, value: libc::__c_anonymous_ifr_ifru) -> libc::ifreq {
    let mut ifr_name = [0 as libc::c_char; libc::IFNAMSIZ];
    for (d, b) in ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = b as libc::c_char;
    }
    libc::ifreq {
        ifr_name,
        ifr_ifru: value,
    }
}

/// Sets `IFF_UP | IFF_RUNNING` on `name`, keeping its other flags (read
/// from sysfs, `0x…`, rather than out of an ioctl's union).
pub fn interface_up(name: &str) -> Result<(), String> {
    let p = format!("/sys/class/net/{name}/flags");
    let raw = std::fs::read_to_string(&p).map_err(|e| format!("{p}: {e}"))?;
    let hex = raw.trim();
    let flags = u32::from_str_radix(hex.trim_start_matches("0x"), 16)
        .map_err(|e| format!("{p}: {hex:?}: {e}"))?;
    let flags = (flags | (libc::IFF_UP | libc::IFF_RUNNING) as u32) as libc::c_short;
    let fd = ioctl_socket()?;
    let mut ifr = ifreq(name, libc::__c_anonymous_ifr_ifru { ifru_flags: flags });
    ioctl(&fd, libc::SIOCSIFFLAGS, &mut ifr, "SIOCSIFFLAGS")
}

/// Waits for `eth0`, configures it and the default route, and DNS.
pub fn setup() -> Result<(), String> {
    let t = Instant::now();
    let sys = format!("/sys/class/net/{IFACE}");
    while !Path::new(&sys).exists() {
        if t.elapsed() > Duration::from_secs(10) {
            return Err(format!("{IFACE} did not appear (virtio_net not loaded?)"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let fd = ioctl_socket()?;
    let addr = libc::__c_anonymous_ifr_ifru {
        ifru_addr: sockaddr(ADDR),
    };
    ioctl(
        &fd,
        libc::SIOCSIFADDR,
        &mut ifreq(IFACE, addr),
        "SIOCSIFADDR",
    )?;
    let mask = libc::__c_anonymous_ifr_ifru {
        ifru_netmask: sockaddr(MASK),
    };
    ioctl(
        &fd,
        libc::SIOCSIFNETMASK,
        &mut ifreq(IFACE, mask),
        "SIOCSIFNETMASK",
    )?;
    interface_up(IFACE)?;
    let dev = std::ffi::CString::new(IFACE).expect("no NUL");
    let mut rt = libc::rtentry {
        rt_pad1: 0,
        rt_dst: sockaddr([0, 0, 0, 0]),
        rt_gateway: sockaddr(GATEWAY),
        rt_genmask: sockaddr([0, 0, 0, 0]),
        rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_tos: 0,
        rt_class: 0,
        // Its length depends on the pointer width.
        rt_pad4: Default::default(),
        rt_metric: 0,
        rt_dev: dev.as_ptr() as *mut libc::c_char,
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    match ioctl(
        &fd,
        libc::SIOCADDRT,
        &mut rt,
        "SIOCADDRT default via 10.0.2.2",
    ) {
        Err(e) if !e.contains("File exists") => return Err(e),
        _ => {}
    }
    resolv_conf()?;
    crate::log(&format!(
        "{IFACE} up: 10.0.2.15/24 via 10.0.2.2 in {} ms",
        t.elapsed().as_millis()
    ));
    Ok(())
}

/// Forgets the link-layer addresses of the gateway and the resolver: a
/// restored machine's NIC may lead to another backend than its
/// snapshot's (a TAP in the machine's namespace instead of QEMU's user
/// network), whose MAC the guest must ask for again rather than wait for
/// its stale entry to time out. No entry is not an error.
pub fn forget_neighbours() {
    if !Path::new(&format!("/sys/class/net/{IFACE}")).exists() {
        return;
    }
    let Ok(fd) = ioctl_socket() else {
        return;
    };
    let mut dev = [0 as libc::c_char; 16];
    for (d, b) in dev.iter_mut().zip(IFACE.bytes()) {
        *d = b as libc::c_char;
    }
    let dns: std::net::Ipv4Addr = DNS.parse().expect("an address");
    for ip in [GATEWAY, dns.octets()] {
        let mut req = libc::arpreq {
            arp_pa: sockaddr(ip),
            arp_ha: sockaddr([0; 4]),
            arp_flags: 0,
            arp_netmask: sockaddr([0; 4]),
            arp_dev: dev,
        };
        let _ = ioctl(&fd, libc::SIOCDARP, &mut req, "SIOCDARP");
    }
}

fn resolv_conf() -> Result<(), String> {
    let p = Path::new("/etc/resolv.conf");
    let usable = std::fs::read_to_string(p)
        .map(|s| s.lines().any(|l| l.trim_start().starts_with("nameserver")))
        .unwrap_or(false);
    if usable {
        return Ok(());
    }
    // A dangling symlink (or an unreadable file): replace it.
    if std::fs::symlink_metadata(p).is_ok() && std::fs::metadata(p).is_err() {
        let _ = std::fs::remove_file(p);
    }
    let _ = std::fs::create_dir_all("/etc");
    std::fs::write(p, format!("nameserver {DNS}\n")).map_err(|e| format!("/etc/resolv.conf: {e}"))
}
