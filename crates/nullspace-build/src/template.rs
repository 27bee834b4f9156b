//! `template.json`: what an import produced, next to `rootfs.ext4`.

use nullspace_oci::config::{OciMetadata, RuntimeDefaults};
use nullspace_oci::report::ImageReport;
use serde::Serialize;

pub const ROOTFS_FILE: &str = "rootfs.ext4";
pub const TEMPLATE_FILE: &str = "template.json";

#[derive(Debug, Clone, Serialize)]
pub struct RootfsReport {
    /// File name inside the template directory.
    pub file: String,
    pub size_bytes: u64,
    /// Inodes in use (including ext4's reserved ones).
    pub inodes: u64,
    pub inodes_total: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub data_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CacheReport {
    pub enabled: bool,
    /// Layers taken from the cache: neither fetched nor decompressed.
    pub layers_reused: usize,
    /// Layers fetched and decompressed by this import.
    pub layers_fetched: usize,
    /// Compressed bytes fetched.
    pub bytes_fetched: u64,
    /// Digests of the layers taken from the cache.
    pub reused: Vec<nullspace_oci::Digest>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TemplateMeta {
    pub image: ImageReport,
    pub runtime: RuntimeDefaults,
    pub oci: OciMetadata,
    pub rootfs: RootfsReport,
    pub cache: CacheReport,
}
