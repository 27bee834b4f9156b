//! Machine networking with an egress policy: each machine's QEMU runs in
//! a network namespace of its own, its NIC joined to a TAP device there;
//! the namespace reaches the host through a veth pair and is masqueraded
//! twice (in the namespace, and by the host towards its uplink). The
//! policy is an nftables table in the namespace ([`rules`]), outside the
//! guest, checked on every packet; a change is one `nft` transaction.
//!
//! Why this and not a user-mode network with a policy: slirp and passt
//! have no per-destination filter, and a filter in a user-mode stack is
//! ours to get right for every protocol; the kernel's is not. Measured on
//! this host (docs/research/egress-volumes): a rule change takes 21-26 ms
//! and stops an established stream within 50 ms; a namespace costs about
//! 0.3 MiB of kernel memory and no process.
//!
//! Every machine has the same guest address (10.0.2.15, the snapshot's),
//! so each needs its own layer-2 segment: one namespace each. The TAP
//! takes the addresses and MAC of QEMU's user-mode gateway (10.0.2.2,
//! 52:55:0a:00:02:02), which the guest knew when its snapshot was taken.
//!
//! The commands are iproute2's `ip` (batched: three processes per
//! machine) and `nft`; netlink by hand would save their forks (a few ms
//! each) at the cost of a protocol stack of our own.
//!
//! A namespace is named `nsm-<tag>-<machine id>`, `<tag>` from the
//! server's data directory, so that servers sharing a host never sweep
//! each other's; its name is kept in the machine directory ([`NETNS_FILE`])
//! and it goes with the directory ([`release_dir`]).

pub mod rules;

use nullspace_model::machine::egress::Egress;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// In a machine directory: the name of its network namespace.
pub const NETNS_FILE: &str = "netns";
const NETNS_DIR: &str = "/run/netns";
/// QEMU user-mode networking's gateway MAC (`52:55:` + 10.0.2.2).
const GATEWAY_MAC: &str = "52:55:0a:00:02:02";
/// veth pairs: /30s of [`rules::VETH_NET`].
const SLOTS: u32 = 1 << (32 - rules::VETH_NET.1 - 2);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("machine networking needs {0}")]
    Unavailable(String),
    #[error("{what}: {detail}")]
    Command { what: String, detail: String },
    #[error("network namespace {name}: {detail}")]
    Namespace { name: String, detail: String },
}

/// Runs `program args` with `input` on stdin, inside `netns` if given.
fn run(
    what: &str,
    program: &str,
    args: &[&str],
    input: &str,
    netns: Option<&OwnedFd>,
) -> Result<(), NetError> {
    let err = |detail: String| NetError::Command {
        what: what.to_string(),
        detail,
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(fd) = netns {
        crate::process::enter_netns(&mut cmd, fd);
    }
    let mut child = cmd.spawn().map_err(|e| err(format!("{program}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| err(format!("{program} stdin: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| err(format!("{program}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        let msg = String::from_utf8_lossy(&out.stderr);
        Err(err(msg
            .trim()
            .lines()
            .take(4)
            .collect::<Vec<_>>()
            .join("; ")))
    }
}

/// The host side, set up once per server: checked, forwarding on, the
/// host table loaded.
#[derive(Debug, Clone)]
pub struct HostNet {
    tag: String,
    /// Where the guest's DNS queries go (`None`: no resolution).
    resolver: Option<Ipv4Addr>,
}

impl HostNet {
    /// Checks that this process can make namespaces (root, `ip`, `nft`,
    /// `/dev/net/tun`), turns IPv4 forwarding on and loads the host
    /// table. `owner` names the server (its data directory) in namespace
    /// names; `resolver` is the guests' DNS server (default: the host's
    /// first non-loopback `nameserver`).
    pub fn init(owner: &Path, resolver: Option<Ipv4Addr>) -> Result<HostNet, NetError> {
        if !rustix::process::geteuid().is_root() {
            return Err(NetError::Unavailable(
                "root (CAP_NET_ADMIN, CAP_SYS_ADMIN)".into(),
            ));
        }
        for bin in ["ip", "nft"] {
            if !crate::process::on_path(bin) {
                return Err(NetError::Unavailable(format!(
                    "{bin} (apt-get install iproute2 nftables)"
                )));
            }
        }
        if !Path::new("/dev/net/tun").exists() {
            return Err(NetError::Unavailable("/dev/net/tun".into()));
        }
        std::fs::create_dir_all(NETNS_DIR).map_err(|e| NetError::Namespace {
            name: NETNS_DIR.into(),
            detail: e.to_string(),
        })?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .map_err(|e| NetError::Unavailable(format!("net.ipv4.ip_forward=1 ({e})")))?;
        run(
            "host table",
            "nft",
            &["-f", "-"],
            &rules::host_table(),
            None,
        )?;
        Ok(HostNet {
            tag: owner_tag(owner),
            resolver: resolver.or_else(host_resolver),
        })
    }

    pub fn resolver(&self) -> Option<Ipv4Addr> {
        self.resolver
    }

    fn name(&self, machine: &str) -> String {
        format!("nsm-{}-{machine}", self.tag)
    }

    /// Makes machine `id`'s namespace with everything denied, and records
    /// its name in `dir` (the machine directory). On failure nothing is
    /// left.
    pub fn create(&self, id: &str, dir: &Path) -> Result<MachineNet, NetError> {
        let name = self.name(id);
        let ns = MachineNet {
            path: Path::new(NETNS_DIR).join(&name),
            name,
            resolver: self.resolver,
        };
        if ns.path.exists() {
            // A leftover of a crash under the same id.
            ns.release();
        }
        let r = (|| {
            run("ip netns add", "ip", &["netns", "add", &ns.name], "", None)?;
            ns.link()?;
            ns.forwarding()?;
            ns.apply(&Egress::deny_all())?;
            std::fs::write(dir.join(NETNS_FILE), &ns.name).map_err(|e| NetError::Namespace {
                name: ns.name.clone(),
                detail: format!("{}: {e}", dir.display()),
            })
        })();
        match r {
            Ok(()) => Ok(ns),
            Err(e) => {
                ns.release();
                Err(e)
            }
        }
    }

    /// Deletes this server's namespaces whose machine `keep` does not
    /// name (what a crash left); returns their names.
    pub fn sweep(&self, keep: impl Fn(&str) -> bool) -> Vec<String> {
        sweep_tag(&self.tag, keep)
    }
}

/// `<tag>` of the namespace names of the server whose data directory is
/// `owner`: the same directory, however it is spelt, gives the same tag,
/// also once it is removed (a test's data directory often goes before its
/// server: then its nearest existing ancestor is resolved).
fn owner_tag(owner: &Path) -> String {
    use sha2::Digest;
    let mut rest = vec![];
    let mut at = owner;
    let p = loop {
        let here = if at.as_os_str().is_empty() {
            Path::new(".")
        } else {
            at
        };
        if let Ok(p) = std::fs::canonicalize(here) {
            break rest.iter().rev().fold(p, |p, c| p.join(c));
        }
        match (at.parent(), at.file_name()) {
            (Some(up), Some(name)) => {
                rest.push(name);
                at = up;
            }
            _ => break owner.to_path_buf(),
        }
    };
    hex::encode(&sha2::Sha256::digest(p.as_os_str().as_encoded_bytes())[..4])
}

/// Deletes the namespaces of tag `tag` whose machine id `keep` refuses;
/// returns their names.
fn sweep_tag(tag: &str, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let prefix = format!("nsm-{tag}-");
    let Ok(rd) = std::fs::read_dir(NETNS_DIR) else {
        return vec![];
    };
    let mut gone = vec![];
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(id) = name.strip_prefix(&prefix) else {
            continue;
        };
        if !keep(id) {
            release_name(&name);
            gone.push(name);
        }
    }
    gone
}

/// Deletes every namespace of the server whose data directory is `owner`
/// (a server gone for good, e.g. a test's, with machines it never ended);
/// returns their names. Needs no [`HostNet`]: nothing is set up.
pub fn release_owner(owner: &Path) -> Vec<String> {
    sweep_tag(&owner_tag(owner), |_| false)
}

/// The first `nameserver` of the host's resolv.conf that a namespace can
/// reach (not loopback).
fn host_resolver() -> Option<Ipv4Addr> {
    let s = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    s.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .find(|a| !a.is_loopback())
}

/// A machine's network namespace.
#[derive(Debug, Clone)]
pub struct MachineNet {
    name: String,
    path: PathBuf,
    resolver: Option<Ipv4Addr>,
}

impl MachineNet {
    /// The namespace recorded in machine directory `dir`, if any.
    pub fn of_dir(dir: &Path, resolver: Option<Ipv4Addr>) -> Option<MachineNet> {
        let name = std::fs::read_to_string(dir.join(NETNS_FILE)).ok()?;
        let name = name.trim().to_string();
        // Only names this module makes (no path tricks from a bad file).
        if !name.starts_with("nsm-") || name.contains('/') || name.contains("..") {
            return None;
        }
        Some(MachineNet {
            path: Path::new(NETNS_DIR).join(&name),
            name,
            resolver,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace, for `setns` (QEMU is started in it).
    pub fn open(&self) -> Result<OwnedFd, NetError> {
        rustix::fs::open(
            &self.path,
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| NetError::Namespace {
            name: self.name.clone(),
            detail: e.to_string(),
        })
    }

    /// The veth pair (host end `nsv<slot>`, a free slot found by trying:
    /// the kernel refuses a name in use, which makes the choice atomic
    /// between servers on one host) and the TAP.
    fn link(&self) -> Result<(), NetError> {
        let (base, _) = rules::VETH_NET;
        let base = u32::from(base);
        let start = rand::random::<u32>() % SLOTS;
        for k in 0..64 {
            let slot = (start + k * 7919) % SLOTS;
            let host_if = format!("{}{slot}", rules::HOST_PREFIX);
            let host_ip = Ipv4Addr::from(base + slot * 4 + 1);
            let ns_ip = Ipv4Addr::from(base + slot * 4 + 2);
            let up = format!(
                "link add {host_if} type veth peer name {} netns {}\naddr add {host_ip}/30 dev {host_if}\nlink set {host_if} up\n",
                rules::UPLINK,
                self.name
            );
            match run("veth", "ip", &["-batch", "-"], &up, None) {
                Ok(()) => {}
                Err(NetError::Command { detail, .. })
                    if detail.contains("File exists") || detail.contains("Address already") =>
                {
                    let _ = run("veth", "ip", &["link", "del", &host_if], "", None);
                    continue;
                }
                Err(e) => return Err(e),
            }
            let tap = rules::TAP;
            let inner = format!(
                "link set lo up\naddr add {ns_ip}/30 dev {up}\nlink set {up} up\nroute add default via {host_ip}\n\
tuntap add {tap} mode tap\nlink set {tap} address {GATEWAY_MAC}\naddr add 10.0.2.2/24 dev {tap}\n\
addr add {}/32 dev {tap}\nlink set {tap} up\n",
                rules::GUEST_DNS,
                up = rules::UPLINK,
            );
            return run(
                "namespace links",
                "ip",
                &["-n", &self.name, "-batch", "-"],
                &inner,
                None,
            );
        }
        Err(NetError::Namespace {
            name: self.name.clone(),
            detail: "no free veth slot after 64 tries".into(),
        })
    }

    /// `net.ipv4.ip_forward=1` in the namespace: written from a thread
    /// moved into it (sysctls under /proc/sys/net are the opener's
    /// namespace's), so no process is started for it.
    fn forwarding(&self) -> Result<(), NetError> {
        let fd = self.open()?;
        let name = self.name.clone();
        std::thread::spawn(move || {
            rustix::thread::move_into_link_name_space(
                fd.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .map_err(|e| e.to_string())?;
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|e| e.to_string())
        })
        .join()
        .map_err(|_| "the thread panicked".to_string())
        .and_then(|r| r)
        .map_err(|detail| NetError::Namespace { name, detail })
    }

    /// Replaces the namespace's egress table with `e` (one transaction:
    /// effective for the next packet, established connections included).
    pub fn apply(&self, e: &Egress) -> Result<(), NetError> {
        let fd = self.open()?;
        run(
            &format!("egress of {}", self.name),
            "nft",
            &["-f", "-"],
            &rules::machine_table(e, self.resolver),
            Some(&fd),
        )
    }

    /// Deletes the namespace (the kernel frees it, and its veth pair and
    /// TAP, once QEMU no longer holds it).
    pub fn release(&self) {
        release_name(&self.name);
    }
}

fn release_name(name: &str) {
    let _ = run("ip netns del", "ip", &["netns", "del", name], "", None);
}

/// Removes a machine directory, and the namespace it records first.
pub fn release_dir(dir: &Path) -> std::io::Result<()> {
    if let Some(ns) = MachineNet::of_dir(dir, None) {
        ns.release();
    }
    std::fs::remove_dir_all(dir)
}
