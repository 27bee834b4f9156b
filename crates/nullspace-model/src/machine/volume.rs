//! Volumes on the wire (SDK 1.0.3's `CreateVolumeRequest`, `VolumeInfo`,
//! `VolumeMountRequest`, `VolumeAttachment`, `VolumeReadFileResponse`;
//! the other volume file bodies are the machine files' ones).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CreateVolumeBody {
    /// Unique in the namespace: 1 to 63 of `[A-Za-z0-9._-]`, starting
    /// with a letter or digit.
    pub name: String,
    /// Capacity (default 1 GiB, 16 MiB to 64 GiB): the image is sparse.
    #[serde(default)]
    pub max_size_bytes: Option<u64>,
}

/// `status`: `available` (no machine has it) or `attached`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct VolumeInfo {
    pub id: String,
    pub name: String,
    /// RFC 3339.
    pub created_at: String,
    /// Space in use (the file system's superblock, or the guest's statfs).
    pub used_bytes: u64,
    /// Inodes in use.
    pub inode_count: u64,
    /// Machines it is attached to.
    pub mount_count: u64,
    pub max_size_bytes: u64,
    /// Not limited beyond the file system's inodes.
    pub max_file_count: Option<u64>,
    /// Read-write: 1 machine; read-only: any number (`null`).
    pub max_mounts: Option<u64>,
    pub last_reconciled_at: Option<String>,
    pub status: String,
    pub host_id: Option<String>,
}

/// A volume to mount: at create (`volumes: [...]`) and at run time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct VolumeMountBody {
    /// The volume's id or name.
    #[serde(rename = "ref")]
    pub reference: String,
    /// Absolute path in the guest (created).
    pub mount_path: String,
    #[serde(default)]
    pub read_only: bool,
    /// A directory of the volume to mount instead of its root.
    #[serde(default)]
    pub subpath: Option<String>,
}

/// `state`: `mounted`, `failed` (the guest lost the mount; remount), or
/// `paused` (its machine is paused: mounted again on resume).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct VolumeAttachment {
    pub id: String,
    pub volume_id: String,
    pub machine_id: String,
    pub mount_path: String,
    pub read_only: bool,
    pub state: String,
    pub subpath: Option<String>,
    pub last_error_code: Option<String>,
    pub last_error_message: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// `POST /v1/volumes/{id}/files/read` (the request is the machine
/// files' `PathBody`, without `user`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct VolumeReadReply {
    pub content: String,
    pub encoding: String,
    pub size: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_body_reads_the_sdk_shape() {
        let b: VolumeMountBody =
            serde_json::from_str(r#"{"ref":"vol_1","mount_path":"/data","read_only":false}"#)
                .unwrap();
        assert_eq!(b.reference, "vol_1");
        assert_eq!(b.subpath, None);
    }
}
