//! A template snapshot as a bootable disk for plain QEMU (no nullspace):
//!
//! ```text
//! MBR (syslinux mbr.bin + partition table)
//! p1  FAT16, 64 MiB, active: syslinux (ldlinux.sys), syslinux.cfg,
//!     the snapshot's kernel, its initramfs + one more cpio (below)
//! p2  Linux: the snapshot's disk.ext4, as is
//! ```
//!
//! The appended cpio (the kernel unpacks concatenated archives, later
//! files replacing earlier ones) adds the PCI virtio modules a `pc`
//! machine needs (nullspace's own VMs are `microvm`, virtio-mmio), the
//! module lists naming them, and a `config.json` with the template's
//! runtime settings, `root_device` = the second partition and
//! `standalone` (init runs the start command and waits for no agent).
//!
//! Nothing is mounted: the FAT is made by `mkfs.vfat` on a file and
//! filled by `mcopy`, and `syslinux --install` writes its loader through
//! mtools. The disk is written to a temporary sibling of the output and
//! renamed into place (qcow2 by `qemu-img convert`).
//!
//! Boot it with `qemu-system-x86_64 -m 512 -drive file=DISK,if=virtio
//! -nic user,model=virtio-net-pci,hostfwd=tcp::8080-:8080 -nographic`.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use nullspace_model::guest::GuestConfig;
use nullspace_model::snapshot::DiskFormat;

use crate::cpio::CpioWriter;
use crate::initramfs::modules_in_order;
use crate::{GuestKernel, Snapshot};

/// The modules a `pc` machine's virtio disk and NIC need, beside the
/// snapshot initramfs's virtio-mmio ones.
const DISK_MODULES: &[&str] = &["virtio", "virtio_ring", "virtio_pci", "virtio_blk"];
const DISK_NET_MODULES: &[&str] = &["virtio_net"];
/// syslinux's MBR boot code (Debian's `syslinux-common`).
pub const MBR_BIN: &str = "/usr/lib/syslinux/mbr/mbr.bin";
const SECTOR: u64 = 512;
/// The boot partition starts at 1 MiB and is 64 MiB (a kernel and an
/// initramfs of a few MiB each).
const BOOT_START: u64 = 2048;
const BOOT_SECTORS: u64 = 64 * 2048;
/// The root device as the guest sees it (`-drive …,if=virtio`).
pub const ROOT_DEVICE: &str = "/dev/vda2";

/// Why a disk could not be made (each names the object and the rule).
#[derive(Debug, thiserror::Error)]
pub enum DiskExportError {
    #[error("snapshot {dir}: {source}")]
    Snapshot {
        dir: String,
        #[source]
        source: crate::VmError,
    },
    #[error(
        "snapshot {dir} has {layers} disk layers: only a template snapshot (one raw disk) can be exported"
    )]
    NotATemplate { dir: String, layers: usize },
    #[error(
        "snapshot {dir} booted kernel {snapshot}, this server has {host}: the PCI modules must match (rebuild the template)"
    )]
    KernelMismatch {
        dir: String,
        snapshot: String,
        host: String,
    },
    #[error("{program} failed ({status}): {stderr}")]
    Tool {
        program: &'static str,
        status: String,
        stderr: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DiskExportError {
    let what = what.into();
    move |source| DiskExportError::Io { what, source }
}

/// What to export and where.
pub struct DiskExport<'a> {
    pub snapshot_dir: &'a Path,
    /// The guest kernel whose modules are added (the snapshot's version).
    pub kernel: &'a GuestKernel,
    /// The template's runtime settings (env, user, workdir, start command).
    pub config: GuestConfig,
    pub format: DiskFormat,
    pub output: &'a Path,
}

/// Writes the disk (see the module docs); returns its size in bytes.
pub fn export(x: &DiskExport<'_>) -> Result<u64, DiskExportError> {
    let shown = x.snapshot_dir.display().to_string();
    let snap = Snapshot::open(x.snapshot_dir).map_err(|source| DiskExportError::Snapshot {
        dir: shown.clone(),
        source,
    })?;
    let m = &snap.manifest;
    if m.disk.len() != 1 || m.disk[0].format != DiskFormat::Raw {
        return Err(DiskExportError::NotATemplate {
            dir: shown,
            layers: m.disk.len(),
        });
    }
    if m.kernel.version != x.kernel.version {
        return Err(DiskExportError::KernelMismatch {
            dir: shown,
            snapshot: m.kernel.version.clone(),
            host: x.kernel.version.clone(),
        });
    }
    let parent = x.output.parent().unwrap_or(Path::new("."));
    let work = tempfile::Builder::new()
        .prefix(".disk-export-")
        .tempdir_in(parent)
        .map_err(io(format!("a work directory in {}", parent.display())))?;

    let initrd = work.path().join("initrd");
    write_initrd(&snap.path(&m.initramfs), x, &initrd)?;
    let boot = work.path().join("boot.img");
    make_boot_fat(&boot, &snap.path(&m.kernel.file), &initrd, work.path())?;

    let raw = work.path().join("disk.raw");
    let root = snap.disk();
    assemble(&raw, &boot, &root)?;
    let size = match x.format {
        DiskFormat::Raw => {
            std::fs::rename(&raw, x.output)
                .map_err(io(format!("renaming into {}", x.output.display())))?;
            std::fs::metadata(x.output)
                .map_err(io(x.output.display().to_string()))?
                .len()
        }
        DiskFormat::Qcow2 => {
            let q = work.path().join("disk.qcow2");
            tool(
                "qemu-img",
                Command::new("qemu-img")
                    .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
                    .arg(&raw)
                    .arg(&q),
            )?;
            std::fs::rename(&q, x.output)
                .map_err(io(format!("renaming into {}", x.output.display())))?;
            std::fs::metadata(x.output)
                .map_err(io(x.output.display().to_string()))?
                .len()
        }
    };
    Ok(size)
}

/// The snapshot's initramfs plus the cpio that makes it boot on a `pc`
/// machine from a partition, standalone.
fn write_initrd(base: &Path, x: &DiskExport<'_>, out: &Path) -> Result<(), DiskExportError> {
    let vm = |source| DiskExportError::Snapshot {
        dir: x.snapshot_dir.display().to_string(),
        source,
    };
    let mods = modules_in_order(x.kernel, DISK_MODULES).map_err(vm)?;
    let net: Vec<_> = modules_in_order(x.kernel, DISK_NET_MODULES)
        .map_err(vm)?
        .into_iter()
        .filter(|(n, _)| !mods.iter().any(|(m, _)| m == n))
        .collect();
    let mut cfg = x.config.clone();
    cfg.root_device = Some(ROOT_DEVICE.into());
    cfg.standalone = true;
    cfg.network = true;
    cfg.defer_start = false;
    cfg.probe_only = false;
    let config = serde_json::to_vec(&cfg).map_err(|e| DiskExportError::Io {
        what: "the guest config".into(),
        source: std::io::Error::other(e),
    })?;
    let mut w = CpioWriter::new(Vec::new());
    let list = |ms: &[(String, Vec<u8>)]| {
        ms.iter()
            .map(|(n, _)| format!("{n}.ko\n"))
            .collect::<String>()
    };
    (|| -> std::io::Result<()> {
        for (n, data) in mods.iter().chain(&net) {
            w.file(&format!("nullspace/modules/{n}.ko"), 0o644, data)?;
        }
        w.file("nullspace/modules.list", 0o644, list(&mods).as_bytes())?;
        w.file("nullspace/modules.net.list", 0o644, list(&net).as_bytes())?;
        w.file("nullspace/config.json", 0o644, &config)?;
        Ok(())
    })()
    .map_err(io("the disk's initramfs cpio"))?;
    let extra = w.finish().map_err(io("the disk's initramfs cpio"))?;
    let mut bytes = std::fs::read(base).map_err(io(base.display().to_string()))?;
    bytes.extend(extra);
    std::fs::write(out, bytes).map_err(io(out.display().to_string()))
}

/// The FAT boot partition, made and filled without a mount.
fn make_boot_fat(
    out: &Path,
    kernel: &Path,
    initrd: &Path,
    work: &Path,
) -> Result<(), DiskExportError> {
    // Hidden sectors = the partition's start, so the volume boot record
    // finds itself on the disk.
    tool(
        "mkfs.vfat",
        Command::new("mkfs.vfat")
            .args(["-C", "-F", "16", "-n", "NSBOOT", "-h"])
            .arg(BOOT_START.to_string())
            .arg(out)
            .arg((BOOT_SECTORS * SECTOR / 1024).to_string()),
    )?;
    let cfg = work.join("syslinux.cfg");
    // The serial console last: it is /dev/console, where init logs.
    std::fs::write(
        &cfg,
        "DEFAULT nullspace\nPROMPT 0\nTIMEOUT 0\nLABEL nullspace\n  KERNEL /vmlinuz\n  INITRD /initrd\n  APPEND console=tty0 console=ttyS0 panic=-1\n",
    )
    .map_err(io(cfg.display().to_string()))?;
    for (src, name) in [
        (kernel, "vmlinuz"),
        (initrd, "initrd"),
        (cfg.as_path(), "syslinux.cfg"),
    ] {
        tool(
            "mcopy",
            Command::new("mcopy")
                .arg("-i")
                .arg(out)
                .arg(src)
                .arg(format!("::{name}"))
                .env("MTOOLS_SKIP_CHECK", "1"),
        )?;
    }
    tool(
        "syslinux",
        Command::new("syslinux").arg("--install").arg(out),
    )
}

/// MBR + boot partition + root partition in one raw file.
fn assemble(out: &Path, boot: &Path, root: &Path) -> Result<(), DiskExportError> {
    let root_len = std::fs::metadata(root)
        .map_err(io(root.display().to_string()))?
        .len();
    let root_start = BOOT_START + BOOT_SECTORS;
    let root_sectors = root_len.div_ceil(SECTOR);
    let total = (root_start + root_sectors) * SECTOR;
    let mbr = mbr(
        &std::fs::read(MBR_BIN)
            .map_err(io(format!("{MBR_BIN} (apt-get install syslinux-common)")))?,
        root_start,
        root_sectors,
    )?;
    let mut f = File::create(out).map_err(io(out.display().to_string()))?;
    f.set_len(total).map_err(io(out.display().to_string()))?;
    f.write_all(&mbr).map_err(io(out.display().to_string()))?;
    for (src, at) in [(boot, BOOT_START), (root, root_start)] {
        f.seek(SeekFrom::Start(at * SECTOR))
            .map_err(io(out.display().to_string()))?;
        let mut r = File::open(src).map_err(io(src.display().to_string()))?;
        std::io::copy(&mut r, &mut f)
            .map_err(io(format!("copying {} into the disk", src.display())))?;
    }
    f.sync_all().map_err(io(out.display().to_string()))
}

/// Sector 0: boot code, a fixed disk signature (the output is the same for
/// the same inputs), two primary partitions, 0x55AA.
fn mbr(code: &[u8], root_start: u64, root_sectors: u64) -> Result<[u8; 512], DiskExportError> {
    if code.len() > 440 {
        return Err(DiskExportError::Io {
            what: MBR_BIN.into(),
            source: std::io::Error::other(format!("{} bytes, at most 440", code.len())),
        });
    }
    let lba = |v: u64, what: &str| {
        u32::try_from(v).map_err(|_| DiskExportError::Io {
            what: format!("the {what} partition"),
            source: std::io::Error::other("beyond 2 TiB: an MBR cannot address it"),
        })
    };
    let mut s = [0u8; 512];
    s[..code.len()].copy_from_slice(code);
    s[440..444].copy_from_slice(&0x4e53_4449u32.to_le_bytes());
    let entry = |s: &mut [u8; 512], i: usize, active: bool, kind: u8, start: u32, len: u32| {
        let e = &mut s[446 + 16 * i..446 + 16 * (i + 1)];
        e[0] = if active { 0x80 } else { 0 };
        // CHS fields at their "use LBA" maximum.
        e[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
        e[4] = kind;
        e[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
        e[8..12].copy_from_slice(&start.to_le_bytes());
        e[12..16].copy_from_slice(&len.to_le_bytes());
    };
    // 0x0e: FAT16 with LBA; 0x83: Linux.
    entry(
        &mut s,
        0,
        true,
        0x0e,
        BOOT_START as u32,
        BOOT_SECTORS as u32,
    );
    entry(
        &mut s,
        1,
        false,
        0x83,
        lba(root_start, "root")?,
        lba(root_sectors, "root")?,
    );
    s[510] = 0x55;
    s[511] = 0xaa;
    Ok(s)
}

fn tool(program: &'static str, cmd: &mut Command) -> Result<(), DiskExportError> {
    let out = cmd.output().map_err(io(format!("running {program}")))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(DiskExportError::Tool {
        program,
        status: out.status.to_string(),
        stderr: stderr
            .lines()
            .last()
            .unwrap_or_default()
            .chars()
            .take(300)
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_table() {
        let s = mbr(&[0xeb; 440], 133_120, 1000).unwrap();
        assert_eq!(&s[510..], &[0x55, 0xaa]);
        assert_eq!(s[446], 0x80);
        assert_eq!(s[446 + 4], 0x0e);
        assert_eq!(u32::from_le_bytes(s[454..458].try_into().unwrap()), 2048);
        assert_eq!(s[462 + 4], 0x83);
        assert_eq!(u32::from_le_bytes(s[470..474].try_into().unwrap()), 133_120);
        assert_eq!(u32::from_le_bytes(s[474..478].try_into().unwrap()), 1000);
        assert!(mbr(&[0; 441], 1, 1).is_err());
        assert!(mbr(&[0; 440], 1 << 33, 1).is_err());
    }
}
