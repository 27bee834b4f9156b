//! nullspace microVMs: the guest kernel and initramfs, VMM drivers behind
//! [`Vmm`], the host side of the guest agent, readiness waiting per the
//! spec's probes, and memory+disk snapshots restored with a copy-on-write
//! disk per machine.
//!
//! A template build calls [`template::build_snapshot`]; a machine is
//! [`template::restore`]d from the snapshot directory it wrote (see
//! [`snapshot`] for its files and manifest), and a restored VM can be
//! snapshotted again ([`QemuVm::snapshot`]). Every call that runs a VM
//! takes a [`CancellationToken`]: on cancel its QEMU processes are killed
//! and reaped and its directories removed before it returns
//! [`VmError::Cancelled`].

pub mod agent;
pub mod cpio;
pub mod disk_export;
pub mod error;
pub mod init_binary;
pub mod initramfs;
pub mod kernel;
pub mod machine;
pub mod net;
pub mod pool;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod readiness;
pub mod rootfs;
pub mod snapshot;
pub mod template;
pub mod volume_image;

pub use agent::{
    AgentClient, ExecOutput, ExecRequest, Limits, ProcessOutput, Stream, WatchEnd, WriteOptions,
};
pub use error::VmError;
pub use kernel::GuestKernel;
pub use process::reap_stale;
pub use qemu::spares;
pub use qemu::{
    Accel, AfterSnapshot, BootSpec, MemoryMode, PreparedVm, QemuVm, QemuVmm, RestorePhases,
    RestoreSpec, qemu_version,
};
pub use readiness::{Probe, Readiness, ReadyReport};
pub use snapshot::{Snapshot, SnapshotMeta};
pub use template::GuestConfig;
pub use tokio_util::sync::CancellationToken;

use std::path::Path;

/// A VMM driver. QEMU (microvm) is the one available on Debian 12;
/// Firecracker would be a second implementation (not packaged there).
pub trait Vmm: Send + Sync {
    fn name(&self) -> &'static str;
    /// Boots a fresh VM and waits for its agent (within `spec.boot_timeout`).
    fn boot(&self, spec: &BootSpec, cancel: &CancellationToken) -> Result<Box<dyn Vm>, VmError>;
    /// Restores `snapshot` with a copy-on-write disk in `spec.work_dir`.
    fn restore(
        &self,
        snapshot: &Snapshot,
        spec: &RestoreSpec,
        cancel: &CancellationToken,
    ) -> Result<Box<dyn Vm>, VmError>;
}

/// A running microVM. Dropping it kills the VMM process and removes its
/// sockets, overlay and temporary files.
pub trait Vm: Send {
    fn agent(&mut self) -> &mut AgentClient;
    /// Snapshots a restored VM into the new directory `out` and leaves it
    /// as `after` says (see [`QemuVm::snapshot`]).
    fn snapshot(
        &mut self,
        out: &Path,
        after: AfterSnapshot,
        cancel: &CancellationToken,
    ) -> Result<Snapshot, VmError>;
    /// The VMM's process id (for leak checks).
    fn pid(&self) -> u32;
    /// Console (serial) output so far.
    fn console(&self) -> String;
}
