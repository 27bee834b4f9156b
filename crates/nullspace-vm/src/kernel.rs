//! The guest kernel: Debian's `linux-image-cloud-amd64` on the host.

use crate::VmError;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq)]
pub struct GuestKernel {
    /// `uname -r` of the guest, e.g. `6.1.0-56-cloud-amd64`.
    pub version: String,
    pub vmlinuz: PathBuf,
    pub modules_dir: PathBuf,
}

/// Modules the initramfs loads (virtio-mmio block + serial).
pub const GUEST_MODULES: &[&str] = &[
    "virtio",
    "virtio_ring",
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    // Machines smaller than their template's ceiling (`nullspace_model::size`).
    "virtio_balloon",
];

/// Modules for guest networking (`virtio-net-device`), loaded by init only
/// when the config asks for the network (dependencies resolved from
/// `.modinfo`: `net_failover`, `failover`).
pub const NET_MODULES: &[&str] = &["virtio_net"];

impl GuestKernel {
    /// The newest `/boot/vmlinuz-*-cloud-amd64` with its `/lib/modules`
    /// (`NULLSPACE_GUEST_KERNEL` may name a vmlinuz explicitly).
    pub fn find() -> Result<GuestKernel, VmError> {
        if let Ok(p) = std::env::var("NULLSPACE_GUEST_KERNEL") {
            return Self::from_vmlinuz(Path::new(&p));
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
            .map_err(VmError::io("/boot"))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let n = p
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .to_string();
                n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64")
            })
            .collect();
        found.sort_by_key(|a| version_key(a));
        let best = found.pop().ok_or_else(|| {
            VmError::Kernel(
                "no /boot/vmlinuz-*-cloud-amd64 (apt-get install linux-image-cloud-amd64)".into(),
            )
        })?;
        Self::from_vmlinuz(&best)
    }

    pub fn from_vmlinuz(p: &Path) -> Result<GuestKernel, VmError> {
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let version = name
            .strip_prefix("vmlinuz-")
            .ok_or_else(|| VmError::Kernel(format!("{}: not a vmlinuz-VERSION file", p.display())))?
            .to_string();
        let modules_dir = PathBuf::from("/lib/modules").join(&version);
        if !p.is_file() {
            return Err(VmError::Kernel(format!("{}: missing", p.display())));
        }
        if !modules_dir.is_dir() {
            return Err(VmError::Kernel(format!(
                "{}: missing",
                modules_dir.display()
            )));
        }
        Ok(GuestKernel {
            version,
            vmlinuz: p.to_path_buf(),
            modules_dir,
        })
    }
}

fn version_key(p: &Path) -> Vec<u64> {
    p.to_string_lossy()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect()
}
