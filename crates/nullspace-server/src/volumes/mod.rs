//! Volumes (issue 17): an ext4 image per volume,
//! `DATA_DIR/volumes/<id>/volume.raw` (sparse, fixed capacity), owned by
//! a namespace (another namespace's volumes look like missing ones),
//! attached to machines through their spare disks
//! (`nullspace_vm::spares`) and mounted by the guest agent.
//!
//! Modes: one machine read-write (exclusive), or any number read-only
//! while nobody has it read-write. The store's row is the lock
//! (`nullspace_store::volumes`); QEMU's image lock is only a backstop.
//!
//! Lifecycle where the SDK is silent:
//! - pause/resume: attachments stay (state `paused`); the resume's restore
//!   gives each spare its image again, and the guest's mounts, in its
//!   memory, go on;
//! - fork and user snapshots: every volume is unmounted (synced) and its
//!   spare re-pointed at the placeholder before the snapshot, then
//!   attached and mounted again in the original; a snapshot (and a
//!   machine made from it) has no volumes;
//! - template builds never have volumes;
//! - a machine that ends releases its volumes; a volume that is attached
//!   cannot be deleted.
//!
//! One job per module: [`rules`] names, paths and limits; [`catalog`]
//! create, list, get, delete; [`attach`] attach, detach, health, remount
//! and the lifecycle hooks above; [`files`] `Volume.files` while no
//! machine writes it.

pub mod attach;
pub mod catalog;
pub mod files;
pub mod rules;

use crate::machines::MachineError;
use crate::state::Shared;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {0:?} not found")]
    NotFound(String),
    #[error("volume attachment {0:?} not found")]
    AttachmentNotFound(String),
    #[error("a volume named {0:?} exists already")]
    NameTaken(String),
    /// The request breaks a rule (one line naming the field).
    #[error("{0}")]
    Invalid(String),
    /// The lock refuses it: `holder` has it read-write, or `ro_count`
    /// machines have it read-only.
    #[error("volume {volume} is in exclusive use by {holder}")]
    InUse { volume: String, holder: String },
    #[error("volume {volume} is attached to {count} machine(s); detach it first")]
    Attached { volume: String, count: u64 },
    /// The machine cannot take (another) volume.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Machine(#[from] MachineError),
    /// The image or its tools failed.
    #[error("{0}")]
    Image(#[from] nullspace_vm::volume_image::ImageError),
    /// QMP or the guest failed to attach, mount or unmount.
    #[error("volume {volume}: {reason}")]
    Device { volume: String, reason: String },
    #[error("{0}")]
    Store(#[from] nullspace_store::StoreError),
}

pub type VolumeResult<T> = Result<T, VolumeError>;

impl From<VolumeError> for MachineError {
    /// For the volumes of a create (`volumes: [...]`).
    fn from(e: VolumeError) -> MachineError {
        match e {
            VolumeError::Machine(e) => e,
            e @ (VolumeError::InUse { .. } | VolumeError::Attached { .. }) => {
                MachineError::conflict("volume_busy", e.to_string())
            }
            e @ VolumeError::Conflict(_) => {
                MachineError::conflict("volume_conflict", e.to_string())
            }
            e @ (VolumeError::NotFound(_)
            | VolumeError::Invalid(_)
            | VolumeError::NameTaken(_)
            | VolumeError::AttachmentNotFound(_)) => MachineError::Invalid(e.to_string()),
            VolumeError::Store(e) => MachineError::Store(e),
            e => MachineError::Internal(e.to_string()),
        }
    }
}

/// `DATA_DIR/volumes/<id>`.
pub fn dir(state: &Shared, id: &str) -> PathBuf {
    state.machines.data_dir.join("volumes").join(id)
}

/// The volume's ext4 image.
pub fn image(state: &Shared, id: &str) -> PathBuf {
    dir(state, id).join("volume.raw")
}
