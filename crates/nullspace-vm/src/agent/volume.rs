//! Volumes in the guest (the protocol's `mount`, `unmount`,
//! `volume_health`): the host re-points a spare disk (`qemu::spares`),
//! then asks the guest to mount it.

use super::{AgentClient, unexpected};
use crate::VmError;
use nullspace_model::agent::{Event, MountSpec, Op, VolumeStatus};
use std::time::Duration;

impl AgentClient {
    /// Mounts spare `spec.slot` at `spec.mount_path` (the guest waits for
    /// the capacity the host set, then mounts and binds).
    pub fn mount_volume(&self, spec: MountSpec, limit: Duration) -> Result<VolumeStatus, VmError> {
        match self.call(Op::Mount(spec), limit)? {
            Event::Volume(s) => Ok(s),
            ev => Err(unexpected("mount", ev)),
        }
    }

    /// Syncs and unmounts what `mount_volume` put at `mount_path`.
    pub fn unmount_volume(
        &self,
        slot: u32,
        mount_path: &str,
        limit: Duration,
    ) -> Result<(), VmError> {
        let op = Op::Unmount {
            slot,
            mount_path: mount_path.to_string(),
        };
        match self.call(op, limit)? {
            Event::Ok => Ok(()),
            ev => Err(unexpected("unmount", ev)),
        }
    }

    /// Is the volume mounted, and how full is it.
    pub fn volume_health(
        &self,
        slot: u32,
        mount_path: &str,
        limit: Duration,
    ) -> Result<VolumeStatus, VmError> {
        let op = Op::VolumeHealth {
            slot,
            mount_path: mount_path.to_string(),
        };
        match self.call(op, limit)? {
            Event::Volume(s) => Ok(s),
            ev => Err(unexpected("volume_health", ev)),
        }
    }
}
