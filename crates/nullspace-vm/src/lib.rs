//! nullspace microVMs: the guest kernel and initramfs, VMM drivers behind
//! [`Vmm`], the host side of the guest agent, readiness waiting per the
//! spec's probes, and memory+disk snapshots restored with a copy-on-write
//! disk per sandbox.
//!
//! A template build calls [`template::build_snapshot`]; a sandbox is
//! [`template::restore`]d from the snapshot directory it wrote.

pub mod agent;
pub mod cpio;
pub mod error;
pub mod init_binary;
pub mod initramfs;
pub mod kernel;
pub mod machine;
pub mod qemu;
pub mod qmp;
pub mod readiness;
pub mod rootfs;
pub mod sandbox;
pub mod template;

pub use agent::{
    AgentClient, ExecOutput, ExecRequest, Limits, ProcessOutput, Stream, WriteOptions,
};
pub use error::VmError;
pub use kernel::GuestKernel;
pub use qemu::{Accel, BootSpec, QemuVm, QemuVmm, RestoreSpec};
pub use readiness::{Probe, Readiness, ReadyReport};
pub use template::{GuestConfig, Snapshot, SnapshotMeta};

use std::path::Path;

/// A VMM driver. QEMU (microvm) is the one available on Debian 12;
/// Firecracker would be a second implementation (not packaged there).
pub trait Vmm: Send + Sync {
    fn name(&self) -> &'static str;
    /// Boots a fresh VM and waits for its agent (within `spec.boot_timeout`).
    fn boot(&self, spec: &BootSpec) -> Result<Box<dyn Vm>, VmError>;
    /// Restores `snapshot` with a copy-on-write disk in `spec.work_dir`.
    fn restore(&self, snapshot: &Snapshot, spec: &RestoreSpec) -> Result<Box<dyn Vm>, VmError>;
}

/// A running microVM. Dropping it kills the VMM process and removes its
/// sockets, overlay and temporary files.
pub trait Vm: Send {
    fn agent(&mut self) -> &mut AgentClient;
    /// Pauses the VM and writes memory + device state to `dir/memory.bin`;
    /// the disk it booted from is the snapshot's disk. The VM is gone after.
    fn snapshot(self: Box<Self>, dir: &Path) -> Result<(), VmError>;
    /// The VMM's process id (for leak checks).
    fn pid(&self) -> u32;
    /// Console (serial) output so far.
    fn console(&self) -> String;
}
