//! nullspace-rootfs: OCI image layers → one ext4 root filesystem.
//!
//! # Pipeline
//!
//! 1. **Decode** ([`decode_layer`], one call per layer, independent so
//!    callers can run layers on parallel threads): the compressed blob is
//!    streamed, its compression sniffed by magic bytes (gzip, zstd, plain
//!    tar; xz and bzip2 are rejected; the media type is only used in
//!    messages — a mislabelled layer decodes by its magic), the
//!    uncompressed tar is written to a spool file while being hashed
//!    (the diff_id) and its headers are indexed on the fly into a
//!    [`LayerIndex`]. The spool file doubles as the [`LayerCache`] entry;
//!    [`index_tar_file`] re-indexes a cached spool by seeking over data.
//! 2. **Flatten** (inside [`build_rootfs`]): the layers' entry lists are
//!    applied, bottom first, to an in-memory tree.
//! 3. **Write**: the tree is declared to [`mkext4`] in a fixed order
//!    (pre-order DFS, names in byte order), sealed, and every surviving
//!    file is filled with positioned reads from its layer's spool, in
//!    declaration order (so the image is written at ascending offsets).
//!    Output goes to a temp file next to the destination and is renamed on
//!    success only.
//!
//! # API
//!
//! ```text
//! decode_layer(layer_name, compressed: impl Read, media_type, spool: &mut File, &Limits) -> Result<LayerIndex>
//! index_tar_file(layer_name, tar_path, diff_id, &Limits) -> Result<LayerIndex>
//! build_rootfs(&[SpooledLayer], &RootfsOptions, out: &Path) -> Result<RootfsSummary>
//! LayerCache::open(dir, max_bytes) / get(digest) / begin_insert(digest) -> CacheInsert
//!     CacheInsert { file } .commit(&LayerIndex, &cache) / LayerCache::evict(keep) / verify(digest) / stats()
//! parse_digest(digest) -> Result<nullspace_digest::Digest>   // validates before any path use
//! testutil::LayerBuilder                             // feature "testutil": craft (hostile) layers
//! ```
//!
//! A typical import: for each layer (in parallel), `cache.get(digest)` →
//! hit: [`index_tar_file`]; miss: [`LayerCache::begin_insert`] →
//! [`decode_layer`] into `insert.file` → [`CacheInsert::commit`]. Then
//! [`build_rootfs`] with the [`SpooledLayer`]s bottom first, then
//! [`LayerCache::evict`] keeping the image's layers.
//!
//! # Determinism
//!
//! The image is a pure function of the layer contents and
//! [`RootfsOptions`]: no clock, no RNG, no hash-ordered iteration. The
//! filesystem UUID and the htree hash seed are derived from
//! [`RootfsOptions::uuid_seed`] (callers pass the manifest digest);
//! timestamps of things the image does not describe (implicit parent
//! directories, mount points, the superblock) are [`RootfsOptions::epoch`].
//!
//! # Layer semantics (OCI image-spec)
//!
//! - Later entries replace earlier ones at the same path, whatever the
//!   types (a file replaces a directory subtree, a directory replaces a
//!   file or symlink). A directory entry over an existing directory keeps
//!   its children and takes the new entry's metadata (mode, owner, mtime,
//!   xattrs).
//! - Whiteouts: `.wh.NAME` deletes NAME, `.wh..wh..opq` empties its
//!   directory. A layer's whiteouts are applied to the state below it
//!   before its other entries, so they never delete the layer's own
//!   entries. Whiteout files never appear in the output. Other
//!   `.wh..wh.*` names (AUFS bookkeeping) are skipped, as Docker does.
//!   Whiteouts naming `.`/`..`/nothing, and paths that use a whiteout name
//!   as a parent directory, are rejected. Whiteouts of missing paths are
//!   no-ops.
//! - Metadata: permission bits including setuid/setgid/sticky, uid/gid
//!   (PAX values win, so ids above 2^21 work), mtime with PAX nanoseconds,
//!   xattrs from PAX `SCHILY.xattr.*` in the `user.`, `security.`,
//!   `trusted.` and `system.` namespaces (others are rejected: ext4 cannot
//!   store them). Missing parents are created as 0755 root:root
//!   directories stamped with the epoch. A `./` entry sets the root's
//!   metadata.
//! - Mount points: `dev`, `dev/pts`, `dev/shm`, `proc`, `sys` are always
//!   directories (an image's non-directory at those paths is replaced);
//!   `run` and `tmp` (1777) are created when absent but an image's own
//!   version (e.g. `run -> /var/run`) is kept.
//! - Hard links resolve their target in the current state (same or lower
//!   layer); the target must be a regular file or a symlink (ext4 allows
//!   both). Missing targets and directories are rejected.
//! - Character/block devices, FIFOs, GNU sparse files (type `S` or PAX
//!   `GNU.sparse.*`) and unknown types are rejected. Character device 0/0
//!   (the overlayfs whiteout form) is **rejected too**, not treated as a
//!   whiteout: OCI layers express deletions with `.wh.` files only, the
//!   product contract rejects device nodes, and guessing would make the
//!   same layer mean different things to different importers.
//! - `/lost+found` belongs to the filesystem: an empty directory of that
//!   name in the image is dropped, anything else there is an error.
//!
//! # Safety rules (layers are hostile input)
//!
//! - Paths are normalized lexically: leading `/` and `./` and `.`
//!   components are dropped, `a/../b` folds to `b`, and a `..` that would
//!   climb above the root is **rejected** (not clamped). Empty names, NUL
//!   bytes, non-UTF-8 names (ext4 names are stored as given, but mkext4
//!   takes `&str`), components over 255 bytes and paths over
//!   [`Limits::max_path_len`] are rejected.
//! - Symlinked parents are **resolved inside the rootfs, chroot-style**,
//!   like umoci's securejoin: when a parent component is a symlink in the
//!   current tree, its target is followed within the tree (absolute
//!   targets restart at the rootfs root, `..` stops at the root, at most 40
//!   links), so `lib/x86_64-linux-gnu/libc.so.6` lands in `usr/lib/...` on
//!   merged-/usr images and `../../../../etc` can never leave the tree. The
//!   host filesystem is never consulted. The **final** component of an
//!   entry is never followed: an entry at a path that currently holds a
//!   symlink replaces the symlink (so chmod/chown/writes never reach a
//!   symlink's target).
//! - An entry whose normalized path is the root (`.`, `/`, `./`) must be a
//!   directory; a symlink or file there is rejected.
//! - A PAX `size` that disagrees with the ustar size field is rejected,
//!   except for the legitimate >8 GiB form (ustar size 0, PAX size beyond
//!   the 11-digit octal range). Header-only types (directories, links)
//!   carrying data bytes are rejected, since parsers disagree on skipping
//!   them.
//! - Limits ([`Limits`]): total and per-layer uncompressed bytes (checked
//!   while decompressing), entry counts, path length, and extended header
//!   size (checked before the header is buffered).
//!
//! Errors are one line naming the layer, the path and the rule:
//! `layer sha256:ab12…: path "dev/null": character device entries are not allowed`.

mod build;
mod cache;
mod decode;
mod error;
pub mod ext4_read;
pub mod layer_write;
mod path;
mod tree;

#[cfg(feature = "testutil")]
pub mod testutil;

pub use build::{Headroom, RootfsOptions, RootfsSummary, SpooledLayer, build_rootfs};
pub use cache::{CacheInsert, CacheStats, CachedLayer, LayerCache, parse_digest};
pub use decode::{
    Compression, EntryKind, EntryMeta, EntryRec, LayerIndex, decode_layer, index_tar_file,
};
pub use error::{EntryRule, Error};

/// Input limits; every one is enforced while streaming, before the
/// resource is committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Sum of all layers' uncompressed sizes (default 64 GiB).
    pub max_total_bytes: u64,
    /// Entries per layer and across all layers (default 2,000,000).
    pub max_entries: u64,
    /// Bytes of an entry path or hard link target (default 4096).
    pub max_path_len: usize,
    /// Bytes of one PAX / GNU long-name header (default 1 MiB).
    pub max_pax_bytes: usize,
    /// Uncompressed bytes of one layer, enforced during decompression so
    /// a decompression bomb stops early (default 64 GiB).
    pub max_layer_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_total_bytes: 64 << 30,
            max_entries: 2_000_000,
            max_path_len: 4096,
            max_pax_bytes: 1 << 20,
            max_layer_bytes: 64 << 30,
        }
    }
}

/// Flattens decoded layers the way [`build_rootfs`] does (whiteouts,
/// opaque directories, hard links, mount points) without writing an image,
/// and returns every live path with its kind, sorted. Public for the fuzz
/// targets (`tar_layer`, `compression`), which check that no flattened path
/// escapes the root.
#[doc(hidden)]
pub fn flatten_paths(layers: &[(&str, &LayerIndex)]) -> Result<Vec<(String, char)>, Error> {
    let mut tree = tree::Tree::new(0);
    for (i, (name, index)) in layers.iter().enumerate() {
        tree.apply_layer(i as u32, name, index)?;
    }
    tree.ensure_mount_points();
    let names: Vec<&str> = layers.iter().map(|(n, _)| *n).collect();
    tree.take_lost_found(&names)?;
    Ok(build::walk(&tree)
        .into_iter()
        .map(|item| {
            let kind = match tree.nodes[item.id as usize].kind {
                tree::Kind::Dir(_) => 'd',
                tree::Kind::File { .. } => 'f',
                tree::Kind::Symlink(_) => 'l',
            };
            (item.path, kind)
        })
        .collect())
}
