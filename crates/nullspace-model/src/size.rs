//! What sizes a VM can take after its snapshot: its [`Ceiling`].
//!
//! A `microvm` has neither ACPI CPU hotplug nor a memory-hotplug handler
//! (so no virtio-mem or DIMMs), so a VM is booted at its ceiling and sized
//! down in the guest:
//! - vCPUs above the size go offline (`/sys/devices/system/cpu/cpuN/online`);
//! - memory goes offline in whole blocks of a zone the kernel keeps
//!   movable ([`Ceiling::movable_mib`]): fast, guest-only, and the host
//!   never sees pages the guest does not touch;
//! - a virtio balloon holds what blocks cannot give: part of a block, and
//!   memory below 4 GiB outside the movable zone when the ceiling is above
//!   3 GiB (a microvm's RAM below 4 GiB is one zone, the rest another).
//!   Inflating is page by page (about 2.6 s per 1.5 GiB here under TCG, far
//!   slower into the build VM's file-backed memory), so it is the fallback.
//!
//! Growing onlines blocks and vCPUs and deflates the balloon. The guest's
//! `MemTotal` follows all three.

use serde::{Deserialize, Serialize};

/// The memory ceiling of a template that does not set one, unless its own
/// size is larger: the SDK's default create (512 MiB), so that it works on
/// every template. Not more by default because a snapshot of a machine
/// (pause, fork) scans the whole ceiling: measured here, a delta snapshot
/// of a machine that changed 10 MiB took 1.1 s at 512 MiB and 6.2 s at a
/// 2048 MiB ceiling, the offline memory included.
pub const DEFAULT_MAX_MEMORY_MIB: u32 = 512;

/// vCPUs a build gives a template's VM at least, unless the build sets it.
pub const DEFAULT_MAX_VCPUS: u32 = 4;

/// The smallest machine (the build's own lower bound).
pub const MIN_MEMORY_MIB: u32 = 128;

/// The guest's memory block size (x86-64 below 64 GiB of RAM).
pub const BLOCK_MIB: u32 = 128;

/// A VM booted larger than its size: QEMU has `vcpus` and `memory_mib`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Ceiling {
    pub vcpus: u32,
    pub memory_mib: u32,
}

/// A size a ceiling cannot give.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error(
        "vcpus={asked} is not possible: machines of this template have 1 to {max} vCPUs (its build's ceiling; rebuild with build_config max_vcpus for more)"
    )]
    Vcpus { asked: u32, max: u32 },
    #[error(
        "memory_mb={asked} is not possible: machines of this template have {MIN_MEMORY_MIB} to {max} MiB (its build's ceiling; rebuild with build_config max_memory_mib for more)"
    )]
    Memory { asked: u32, max: u32 },
    #[error(
        "vcpus={asked_vcpus} memory_mb={asked_memory} is not possible: machines of this template have exactly {vcpus} vCPUs and {memory_mib} MiB (it was built before sizes could vary); create them with vcpus={vcpus} memory_mb={memory_mib}, or rebuild it to allow other sizes"
    )]
    Fixed {
        vcpus: u32,
        memory_mib: u32,
        asked_vcpus: u32,
        asked_memory: u32,
    },
}

/// Whether a VM of `vcpus`/`memory_mib` under `ceiling` (`None`: a VM of
/// exactly its size) can be taken to `to`.
pub fn check(
    ceiling: Option<Ceiling>,
    (vcpus, memory_mib): (u32, u32),
    to: (u32, u32),
) -> Result<(), SizeError> {
    if to == (vcpus, memory_mib) {
        return Ok(());
    }
    match ceiling {
        Some(c) => c.admits(to.0, to.1),
        None => Err(SizeError::Fixed {
            vcpus,
            memory_mib,
            asked_vcpus: to.0,
            asked_memory: to.1,
        }),
    }
}

impl Ceiling {
    /// The ceiling a build plans for a VM of `vcpus` and `memory_mib`;
    /// `max_*` are the build's own, if set.
    pub fn plan(
        vcpus: u32,
        memory_mib: u32,
        max_vcpus: Option<u32>,
        max_memory_mib: Option<u32>,
    ) -> Ceiling {
        Ceiling {
            vcpus: max_vcpus.unwrap_or(DEFAULT_MAX_VCPUS).max(vcpus),
            memory_mib: max_memory_mib
                .unwrap_or(DEFAULT_MAX_MEMORY_MIB)
                .max(memory_mib),
        }
    }

    /// `movablecore=` for a VM of `memory_mib` under this ceiling: memory
    /// above a floor of whole blocks is kept movable, so that its blocks can
    /// go offline whatever the guest put there. The floor is one block
    /// below the VM's own size because the kernel's early allocations fill
    /// the top block, which then stays online (seen here: memmap, page
    /// tables and per-CPU areas top-down, and a reserved last page).
    pub fn movable_mib(&self, memory_mib: u32) -> u32 {
        let floor = (memory_mib / BLOCK_MIB * BLOCK_MIB)
            .saturating_sub(BLOCK_MIB)
            .max(BLOCK_MIB);
        self.memory_mib.saturating_sub(floor)
    }

    /// Whether a machine can have `vcpus` and `memory_mib`.
    pub fn admits(&self, vcpus: u32, memory_mib: u32) -> Result<(), SizeError> {
        if vcpus == 0 || vcpus > self.vcpus {
            return Err(SizeError::Vcpus {
                asked: vcpus,
                max: self.vcpus,
            });
        }
        if !(MIN_MEMORY_MIB..=self.memory_mib).contains(&memory_mib) {
            return Err(SizeError::Memory {
                asked: memory_mib,
                max: self.memory_mib,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_from_the_build_size() {
        assert_eq!(
            Ceiling::plan(2, 512, None, None),
            Ceiling {
                vcpus: 4,
                memory_mib: 512
            }
        );
        assert_eq!(Ceiling::plan(1, 256, None, None).memory_mib, 512);
        // A bigger template keeps its own size as the top.
        let c = Ceiling::plan(8, 4096, None, None);
        assert_eq!((c.vcpus, c.memory_mib), (8, 4096));
        // The build's own maxima, never below its size.
        let c = Ceiling::plan(2, 512, Some(6), Some(3000));
        assert_eq!((c.vcpus, c.memory_mib), (6, 3000));
        let c = Ceiling::plan(2, 1024, Some(1), Some(512));
        assert_eq!((c.vcpus, c.memory_mib), (2, 1024));
    }

    #[test]
    fn keeps_a_floor_one_block_below_the_size() {
        let c = Ceiling::plan(2, 512, None, Some(2048));
        assert_eq!(c.movable_mib(512), 2048 - 384);
        assert_eq!(c.movable_mib(1000), 2048 - 768);
        // Never below one block of kernel memory.
        assert_eq!(c.movable_mib(200), 2048 - 128);
        assert_eq!(c.movable_mib(128), 2048 - 128);
    }

    #[test]
    fn admits_sizes_within_it() {
        let c = Ceiling::plan(2, 1024, None, Some(2048));
        assert!(c.admits(1, 512).is_ok());
        assert!(c.admits(4, 2048).is_ok());
        assert!(c.admits(2, 600).is_ok());
        assert!(matches!(
            c.admits(5, 512),
            Err(SizeError::Vcpus { max: 4, .. })
        ));
        assert!(matches!(c.admits(0, 512), Err(SizeError::Vcpus { .. })));
        let e = c.admits(2, 4096).unwrap_err();
        assert!(e.to_string().contains("128 to 2048 MiB"), "{e}");
        assert!(c.admits(2, 64).is_err());
        // Without a ceiling only the size itself.
        assert!(check(None, (2, 512), (2, 512)).is_ok());
        let e = check(None, (2, 512), (4, 512)).unwrap_err();
        assert!(e.to_string().contains("exactly 2 vCPUs and 512 MiB"), "{e}");
        assert!(check(Some(c), (2, 1024), (4, 2048)).is_ok());
    }
}
