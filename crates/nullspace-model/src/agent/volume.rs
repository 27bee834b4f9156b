//! Volumes in the guest (`mount`, `unmount`, `volume_health`): a volume is
//! an ext4 image the host put behind one of the VM's spare virtio-blk
//! devices. The guest finds the device by its serial ([`serial`]), mounts
//! it at a staging point of its own and binds the wanted directory (the
//! whole file system, or `subpath` of it) onto `mount_path`.

use serde::{Deserialize, Serialize};

/// The serial of spare device `slot` (`/sys/block/vdX/serial`): how the
/// guest tells the spares apart, whatever order its kernel probed them in.
pub fn serial(slot: u32) -> String {
    format!("nsvol{slot}")
}

/// Where the guest mounts spare `slot` before binding it onto
/// `mount_path`.
pub fn staging(slot: u32) -> String {
    format!("/run/nullspace/volumes/{slot}")
}

/// `mount`: the ext4 file system on spare `slot` at `mount_path` (created,
/// with its parents, as root). `read_only` mounts `ro,noload` (no journal
/// replay: the image may be another machine's too). `size_bytes` is the
/// capacity the host gave the device; the guest waits (a few seconds at
/// most) until its kernel sees it, since a capacity change arrives as an
/// interrupt after the host's `block_resize`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MountSpec {
    pub slot: u32,
    pub mount_path: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// A directory of the volume to mount instead of its root (relative,
    /// no `..`); created when missing on a read-write mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subpath: Option<String>,
    pub size_bytes: u64,
}

/// The `volume` reply of `mount` and `volume_health`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStatus {
    /// `mount_path` is a mount point of this slot's device.
    pub mounted: bool,
    /// statfs of `mount_path` while mounted (else 0).
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub inodes_used: u64,
}
