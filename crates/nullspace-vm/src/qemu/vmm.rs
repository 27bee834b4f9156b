//! The QEMU driver ([`QemuVmm`]) and what a VM is made from ([`BootSpec`],
//! [`RestoreSpec`]).

use super::QEMU;
use super::accel::detect_accel;
use super::child::VmDir;
use super::vm::QemuVm;
use crate::kernel::GuestKernel;
use crate::snapshot::Snapshot;
use crate::template::GuestConfig;
use crate::{Vm, VmError, Vmm, initramfs};
use nullspace_model::size::Ceiling;
use nullspace_model::snapshot::{Accel, MemoryMode};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The QEMU VMM: the guest kernel, the base initramfs, the accelerator,
/// and the run directory for build VMs' directories and pidfiles.
#[derive(Debug, Clone)]
pub struct QemuVmm {
    pub kernel: GuestKernel,
    pub base_initrd: PathBuf,
    pub accel: Accel,
    /// Build VMs (and the KVM probe) keep their directory here, each an
    /// owner directory (locked, QEMU recorded in it; see
    /// [`process::records`]); [`process::reap_stale`] ends what a dead
    /// process left. `None`: the system temp dir, nothing recorded.
    pub run_dir: Option<PathBuf>,
}

impl QemuVmm {
    /// Builds (or reuses from `cache_dir`) the initramfs for `kernel` with
    /// `init_bin` and picks the accelerator.
    pub fn new(kernel: GuestKernel, init_bin: &Path, cache_dir: &Path) -> Result<QemuVmm, VmError> {
        Self::build(kernel, init_bin, cache_dir, None)
    }

    /// Like [`QemuVmm::new`], with build VMs' directories (sockets, lock,
    /// QEMU's record) under `run_dir` (created). The path must leave
    /// room for QEMU's Unix sockets (108 bytes).
    pub fn with_run_dir(
        kernel: GuestKernel,
        init_bin: &Path,
        cache_dir: &Path,
        run_dir: &Path,
    ) -> Result<QemuVmm, VmError> {
        std::fs::create_dir_all(run_dir).map_err(VmError::io(run_dir.display().to_string()))?;
        let run_dir =
            std::fs::canonicalize(run_dir).map_err(VmError::io(run_dir.display().to_string()))?;
        if !VmDir::sockets_fit(&run_dir) {
            return Err(VmError::VmCreate {
                message: format!(
                    "run directory {}: path too long for QEMU's Unix sockets (108 bytes)",
                    run_dir.display()
                ),
                console_tail: String::new(),
            });
        }
        Self::build(kernel, init_bin, cache_dir, Some(run_dir))
    }

    pub(super) fn build(
        kernel: GuestKernel,
        init_bin: &Path,
        cache_dir: &Path,
        run_dir: Option<PathBuf>,
    ) -> Result<QemuVmm, VmError> {
        which(QEMU)?;
        let base_initrd = initramfs::build_base(&kernel, init_bin, cache_dir)?;
        let accel = detect_accel(&kernel, &base_initrd, run_dir.as_deref());
        Ok(QemuVmm {
            kernel,
            base_initrd,
            accel,
            run_dir,
        })
    }
}

/// QEMU's version as `qemu-system-x86_64 --version` prints it
/// (`major.minor.micro`): a node's label, since a snapshot's device state
/// loads only on the QEMU that wrote it. `None` when QEMU is missing or
/// prints something else.
pub fn qemu_version() -> Option<String> {
    let out = std::process::Command::new(QEMU)
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.split("version ").nth(1)?.split_whitespace().next()?;
    let parts: Vec<&str> = v.split('.').collect();
    (parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())))
    .then(|| v.to_string())
}

pub(super) fn which(bin: &str) -> Result<(), VmError> {
    if crate::process::on_path(bin) {
        Ok(())
    } else {
        Err(VmError::VmCreate {
            message: format!("{bin} not found (apt-get install qemu-system-x86)"),
            console_tail: String::new(),
        })
    }
}

#[derive(Debug, Clone)]
pub struct BootSpec {
    /// Raw ext4 disk the VM boots from read-write (`/dev/vda`).
    pub disk: PathBuf,
    pub config: GuestConfig,
    pub memory_mb: u32,
    pub vcpus: u32,
    /// From QEMU start to the agent's first answer; on expiry the VM is
    /// killed and `vm_create` returned.
    pub boot_timeout: Duration,
    /// QEMU user-mode networking (`-netdev user` + `virtio-net-device`);
    /// overrides `config.network`. Recorded in [`VmMeta::network`].
    pub network: bool,
    /// [`MemoryMode::Mapped`]: guest RAM is a shared mapping of
    /// `memory_file`, so that a snapshot's memory is that file.
    pub memory_mode: MemoryMode,
    /// Mapped: where guest RAM lives (must not exist; QEMU creates it).
    /// `None`: `memory.ram` in the VM's own directory.
    pub memory_file: Option<PathBuf>,
    /// Boot this large, then take the guest down to `vcpus` and
    /// `memory_mb` (which it must admit); `None`: exactly that size.
    pub ceiling: Option<Ceiling>,
}

impl BootSpec {
    /// 512 MiB, 2 vCPUs, 60 s boot limit, no network, mapped memory.
    pub fn new(disk: &Path, config: GuestConfig) -> BootSpec {
        BootSpec {
            disk: disk.to_path_buf(),
            config,
            memory_mb: 512,
            vcpus: 2,
            boot_timeout: Duration::from_secs(60),
            network: false,
            memory_mode: MemoryMode::Mapped,
            memory_file: None,
            ceiling: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RestoreSpec {
    /// Parent of the machine's private directory (overlay, sockets);
    /// `None` = the system temp dir.
    pub work_dir: Option<PathBuf>,
    pub timeout: Duration,
    /// QEMU's `-pidfile` (written by QEMU as it starts, so a process that
    /// dies while the restore runs leaves the pid behind for its sweep).
    pub pidfile: Option<PathBuf>,
    /// QEMU's niceness while it is prepared (a pooled VM yields the CPU to
    /// running machines); a start sets every thread back to 0, which needs
    /// the privilege to raise priority (`CAP_SYS_NICE`) when this is > 0.
    pub nice: i32,
    /// Volume images for the spare disks, by slot (`None`: the
    /// placeholder): a resumed machine's attachments.
    pub volumes: Vec<Option<super::spares::SpareImage>>,
    /// The machine's network namespace: a VM with a NIC joins its TAP
    /// (`None`: QEMU's user-mode network, restricted unless the snapshot
    /// was built with network).
    pub net: Option<crate::net::MachineNet>,
}

impl Default for RestoreSpec {
    fn default() -> Self {
        RestoreSpec {
            work_dir: None,
            timeout: Duration::from_secs(60),
            pidfile: None,
            nice: 0,
            volumes: Vec::new(),
            net: None,
        }
    }
}

impl Vmm for QemuVmm {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn boot(&self, spec: &BootSpec, cancel: &CancellationToken) -> Result<Box<dyn Vm>, VmError> {
        Ok(Box::new(QemuVm::boot(self, spec, cancel)?))
    }

    fn restore(
        &self,
        snapshot: &Snapshot,
        spec: &RestoreSpec,
        cancel: &CancellationToken,
    ) -> Result<Box<dyn Vm>, VmError> {
        Ok(Box::new(QemuVm::restore(snapshot, spec, cancel)?))
    }
}
