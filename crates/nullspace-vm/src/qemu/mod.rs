//! The QEMU driver: `qemu-system-x86_64 -M microvm`, TCG unless a probe
//! shows KVM guests really run (see docs/machine-facts: /dev/kvm exists on
//! these hosts but nested guests hang).
//!
//! Guest memory ([`MemoryMode::Mapped`], the default): a build VM's RAM is
//! `memory-backend-file,share=on` on the snapshot's `memory.ram`, so the
//! guest writes its memory straight into that file; the snapshot enables
//! `x-ignore-shared` and the migration stream carries device state only.
//! A restore maps the same file `share=off,readonly=on,rom=off`: a private
//! copy-on-write mapping of a file opened read-only, so the template file
//! can never be written, untouched pages are never read, and clean pages
//! are shared through the page cache by every VM of the template.
//! (QEMU 9+ also has the `mapped-ram` capability, which writes RAM pages
//! at fixed offsets of the migration file; but its restore reads every
//! page into the new VM's own memory, so it saves neither restore time nor
//! memory. `x-ignore-shared` with a file-backed RAM is what allows mapping.)
//!
//! A snapshot of a restored VM is [`MemoryMode::Delta`]: the template's
//! `memory.ram` plus a stream of only the pages that differ from it
//! ([`delta`]).
//!
//! [`MemoryMode::Streamed`] is the earlier design (all RAM in the migration
//! stream, read back by every restore), kept so benchmarks can compare.
//!
//! One job per module: [`vmm`] the driver and the specs a VM is made from,
//! [`vm`] a running VM, [`restore`] the one restore path (prepare, then
//! start), [`snapshot`] taking snapshots of one, [`delta`] the memory
//! delta filter,
//! [`args`] the QEMU command line, [`spares`] the spare disks volumes use, [`overlay`] disk overlays (and their
//! cache) and layer rebasing with `qemu-img`, [`migration`] the QMP
//! migration helpers, [`accel`] the KVM probe, [`child`] a VM's QEMU
//! process and directory.

mod accel;
mod args;
mod child;
mod delta;
mod migration;
mod overlay;
mod restore;
mod snapshot;
pub mod spares;
mod vm;
mod vmm;

pub use crate::process::QEMU;
pub use accel::detect_accel;
pub use nullspace_model::snapshot::{Accel, MemoryMode, QemuVersion};
pub use restore::PreparedVm;
pub(crate) use snapshot::DirGuard;
pub use vm::{AfterSnapshot, QemuVm, RestorePhases};
pub use vmm::{BootSpec, QemuVmm, RestoreSpec, qemu_version};

pub const AGENT_PORT: &str = nullspace_model::guest::AGENT_PORT;
