//! The QEMU command line of a VM: machine, accelerator, memory backend,
//! the `-blockdev` disk chain, the agent and QMP sockets, the kernel's.

use super::AGENT_PORT;
use super::accel::accel_args;
use crate::snapshot::VmMeta;
use nullspace_model::snapshot::Accel;
use nullspace_model::snapshot::DiskFormat;
use serde_json::json;
use std::path::{Path, PathBuf};

/// Guest RAM as QEMU should back it.
/// The guest RAM backend's id: QEMU names the RAM block after it in
/// migration streams.
pub(super) const RAM_ID: &str = "mem0";

pub(super) enum Ram<'a> {
    Anonymous,
    /// `private`: copy-on-write of a file opened read-only; else shared.
    File {
        path: &'a Path,
        private: bool,
    },
}

/// One disk layer for `-blockdev` (base first).
pub(super) struct Layer {
    pub(super) path: PathBuf,
    pub(super) format: DiskFormat,
    pub(super) read_only: bool,
}

/// QemuOpts values escape `,` by doubling it.
pub(super) fn opt(s: &Path) -> String {
    s.display().to_string().replace(',', ",,")
}

/// A VM's NIC (`virtio-net-device` on netdev `n0`) and its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Nic {
    /// None (templates built before every VM got one, without network).
    Absent,
    /// QEMU's user-mode NAT: guest 10.0.2.15, gateway 10.0.2.2 (= the
    /// host's loopback), DNS forwarder 10.0.2.3; `restrict`: no way out.
    User { restrict: bool },
    /// The TAP device `tap0` of the namespace QEMU starts in
    /// ([`crate::net`]). Its snapshot was taken with a user-mode netdev,
    /// whose own migration section (`slirp`) a restore must still accept:
    /// an unconnected, restricted user netdev takes it.
    Tap,
}

/// What a VM's QEMU command line is made of ([`CommandLine::args`]).
pub(super) struct CommandLine<'a> {
    pub(super) meta: &'a VmMeta,
    pub(super) cmdline: &'a str,
    /// Sockets (`agent.sock`, `qmp.sock`) go here.
    pub(super) dir: &'a Path,
    pub(super) initrd: &'a Path,
    pub(super) disk: &'a [Layer],
    pub(super) ram: Ram<'a>,
    pub(super) incoming: bool,
    pub(super) pidfile: Option<&'a Path>,
    /// The spare disks' `-blockdev`/`-device` arguments (`spares::args`).
    pub(super) spares: Vec<String>,
    pub(super) nic: Nic,
}

impl CommandLine<'_> {
    pub(super) fn args(&self) -> Vec<String> {
        let meta = self.meta;
        let mut machine = "microvm".to_string();
        if matches!(self.ram, Ram::File { .. }) {
            machine.push_str(",memory-backend=mem0");
        }
        let mut a: Vec<String> = vec!["-M".into(), machine];
        a.extend(accel_args(meta.accel).iter().map(|s| s.to_string()));
        a.extend([
            "-m".to_string(),
            meta.qemu_memory_mb().to_string(),
            "-smp".into(),
            meta.qemu_vcpus().to_string(),
            "-nographic".into(),
            "-no-reboot".into(),
        ]);
        // A restore's guest kernel is in its memory already: without
        // `-kernel` QEMU keeps no copy of the image in its own memory (3.5
        // to 13 MiB a machine here). The device set is the same.
        if !self.incoming {
            a.extend([
                "-kernel".to_string(),
                meta.vmlinuz.display().to_string(),
                "-initrd".into(),
                self.initrd.display().to_string(),
                "-append".into(),
                self.cmdline.to_string(),
            ]);
        }
        if let Ram::File { path, private } = self.ram {
            let mut o = json!({
                "qom-type": "memory-backend-file",
                "id": RAM_ID,
                "size": (meta.qemu_memory_mb() as u64) << 20,
                "mem-path": path,
                "share": !private,
            });
            if private {
                o["readonly"] = json!(true);
                o["rom"] = json!("off");
            }
            a.extend(["-object".to_string(), o.to_string()]);
        }
        // JSON -blockdev: file names need no escaping.
        for (i, l) in self.disk.iter().enumerate() {
            let mut b = json!({
                "driver": match l.format { DiskFormat::Raw => "raw", DiskFormat::Qcow2 => "qcow2" },
                "node-name": format!("d{i}"),
                "read-only": l.read_only,
                "file": {"driver": "file", "filename": l.path},
            });
            if i > 0 {
                // The chain comes from the manifest, not from the backing
                // names recorded in the images (which may have moved).
                b["backing"] = json!(format!("d{}", i - 1));
            }
            a.extend(["-blockdev".to_string(), b.to_string()]);
        }
        a.extend([
            "-device".to_string(),
            format!("virtio-blk-device,drive=d{}", self.disk.len() - 1),
        ]);
        // Spares right after the root disk: the device order is part of
        // the snapshot, and older snapshots (no spares) keep theirs.
        a.extend(self.spares.iter().cloned());
        a.extend([
            "-device".to_string(),
            "virtio-serial-device".into(),
            "-chardev".into(),
            format!(
                "socket,id=agent,path={},server=on,wait=off",
                opt(&self.dir.join("agent.sock"))
            ),
            "-device".into(),
            format!("virtserialport,chardev=agent,name={AGENT_PORT}"),
            "-qmp".into(),
            format!(
                "unix:{},server=on,wait=off",
                opt(&self.dir.join("qmp.sock"))
            ),
        ]);
        let netdev = match self.nic {
            Nic::Absent => None,
            Nic::User { restrict: false } => Some("user,id=n0".to_string()),
            Nic::User { restrict: true } => Some("user,id=n0,restrict=on".to_string()),
            Nic::Tap => {
                a.extend(["-netdev".to_string(), "user,id=slirp0,restrict=on".into()]);
                // `vnet_hdr=off`: with it on, the NIC's migration state
                // would require a backend with vnet headers, and snapshots
                // of the machine could no longer be loaded onto a user-mode
                // one (pause writes its memory through one).
                Some(format!(
                    "tap,id=n0,ifname={},script=no,downscript=no,vnet_hdr=off",
                    crate::net::rules::TAP
                ))
            }
        };
        if let Some(n) = netdev {
            a.extend([
                "-netdev".to_string(),
                n,
                "-device".into(),
                "virtio-net-device,netdev=n0".into(),
            ]);
        }
        if meta.ceiling.is_some() {
            // Holds the memory above the guest's size (`nullspace_model::size`).
            a.extend(["-device".to_string(), "virtio-balloon-device".into()]);
        }
        if self.incoming {
            a.extend(["-incoming".to_string(), "defer".into()]);
        }
        if let Some(p) = self.pidfile {
            a.extend(["-pidfile".to_string(), p.display().to_string()]);
        }
        a
    }
}

/// Under TCG the guest calibrates its TSC against the PIT, which fails when
/// the host is busy ("tsc: Unable to calibrate against PIT"), and the boot
/// then hangs. The TCG guest TSC runs at the host's rate: pass it in.
pub(super) fn kernel_cmdline(accel: Accel) -> String {
    let mut c = "console=ttyS0 panic=-1 edd=off".to_string();
    if accel == Accel::Tcg
        && let Some(khz) = host_tsc_khz()
    {
        c.push_str(&format!(" tsc_early_khz={khz} tsc=reliable no_timer_check"));
    }
    c
}

pub(super) fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}
