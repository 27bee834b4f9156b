//! Phase C: size the image, declare the flattened tree to mkext4, and
//! stream file data out of the layer spool files.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use mkext4::sink::FileSink;
use mkext4::{FsBuilder, InodeCount, InodeHandle, Options};
use sha2::{Digest, Sha256};

use crate::Limits;
use crate::decode::LayerIndex;
use crate::error::{EntryRule, Error};
use crate::tree::{Kind, Meta, NodeId, ROOT, Tree};

const BS: u64 = 4096;
const MIB: u64 = 1 << 20;

/// A decoded layer ready to be applied: its spool file and its index.
#[derive(Debug, Clone)]
pub struct SpooledLayer {
    /// Name used in errors (normally the compressed layer digest).
    pub name: String,
    /// The uncompressed tar the index's offsets refer to.
    pub tar_path: PathBuf,
    /// The entry index from [`crate::decode_layer`] or
    /// [`crate::index_tar_file`].
    pub index: LayerIndex,
}

/// Free space added on top of the content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headroom {
    /// Percentage of the content size.
    pub percent: u32,
    /// Fixed bytes added on top.
    pub fixed_bytes: u64,
}

impl Default for Headroom {
    fn default() -> Self {
        Headroom {
            percent: 20,
            fixed_bytes: 64 * MIB,
        }
    }
}

/// Options for [`build_rootfs`]. The default is epoch 0, an all-zero
/// seed, 20% + 64 MiB headroom, no minimum size and no reserved blocks.
#[derive(Debug, Clone, Default)]
pub struct RootfsOptions {
    /// Minimum image size (the `--disk-mb` floor). Rounded up to 4096.
    pub min_size_bytes: Option<u64>,
    /// Free space on top of the content.
    pub headroom: Headroom,
    /// Seed for the filesystem UUID and the htree hash seed; callers pass
    /// the manifest digest bytes, so the same image always yields the
    /// same filesystem identity.
    pub uuid_seed: [u8; 32],
    /// Timestamp for the superblock and for directories the image did not
    /// describe (implicit parents, mount points). Must fit in a u32.
    pub epoch: i64,
    /// Input limits.
    pub limits: Limits,
    /// Root-reserved blocks percentage. Default 0: the headroom is meant
    /// for whatever user the sandbox runs as.
    pub reserved_percent: u8,
    /// Optional ext4 volume label (at most 16 bytes).
    pub label: Option<String>,
}

/// What [`build_rootfs`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsSummary {
    /// Image length in bytes.
    pub size_bytes: u64,
    /// Inode numbers in use (including the 11 reserved/special inodes).
    pub inodes_used: u64,
    /// Inodes the filesystem has in total.
    pub inodes_total: u64,
    /// Regular file inodes.
    pub files: u64,
    /// Directories, including the root.
    pub dirs: u64,
    /// Symlink inodes.
    pub symlinks: u64,
    /// Extra names for already-declared inodes.
    pub hardlinks: u64,
    /// File content bytes written.
    pub data_bytes: u64,
}

/// Flatten `layers` (bottom first) and write an ext4 image to `out`.
///
/// The image goes to `OUT.tmp-<pid>-<n>` next to `out` and is renamed on
/// success; on error the temp file is removed. The output is a pure
/// function of the layers' indexes and data and of `opts`.
pub fn build_rootfs(
    layers: &[SpooledLayer],
    opts: &RootfsOptions,
    out: &Path,
) -> Result<RootfsSummary, Error> {
    if opts.epoch < 0 || opts.epoch > i64::from(u32::MAX) {
        return Err(Error::Options(format!(
            "epoch {} outside 0..=u32::MAX",
            opts.epoch
        )));
    }
    let names: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();

    // Total limits across layers.
    let mut total_bytes: u64 = 0;
    let mut total_entries: u64 = 0;
    for l in layers {
        total_bytes = total_bytes.saturating_add(l.index.uncompressed_size);
        total_entries = total_entries.saturating_add(l.index.entries.len() as u64);
        if total_bytes > opts.limits.max_total_bytes {
            return Err(Error::Limit {
                layer: l.name.clone(),
                what: "total uncompressed size of all layers",
                limit: opts.limits.max_total_bytes,
            });
        }
        if total_entries > opts.limits.max_entries {
            return Err(Error::Limit {
                layer: l.name.clone(),
                what: "total entry count of all layers",
                limit: opts.limits.max_entries,
            });
        }
    }

    // Phase B.
    let mut tree = Tree::new(opts.epoch);
    for (i, l) in layers.iter().enumerate() {
        tree.apply_layer(i as u32, &l.name, &l.index)?;
    }
    tree.ensure_mount_points();
    tree.take_lost_found(&names)?;

    // Open spool files and check that every surviving file's data range
    // lies inside its spool (the index and the file must match).
    let spools: Vec<File> = layers
        .iter()
        .map(|l| {
            let f = File::open(&l.tar_path).map_err(|e| Error::LayerIo {
                layer: l.name.clone(),
                context: "opening spooled layer",
                source: e,
            })?;
            let len = f
                .metadata()
                .map_err(|e| Error::LayerIo {
                    layer: l.name.clone(),
                    context: "stat of spooled layer",
                    source: e,
                })?
                .len();
            if len < l.index.uncompressed_size {
                return Err(Error::CorruptTar {
                    layer: l.name.clone(),
                    offset: len,
                    reason: format!(
                        "spool file shorter than the indexed {} bytes",
                        l.index.uncompressed_size
                    ),
                });
            }
            Ok(f)
        })
        .collect::<Result<_, Error>>()?;

    let order = walk(&tree);
    let stats = measure(&tree, &order, layers)?;
    let (size_bytes, inode_count) = plan_size(&stats, opts)?;

    // Filesystem identity from the seed.
    let uuid_hash = Sha256::new()
        .chain_update(b"nullspace-rootfs fs-uuid v1\0")
        .chain_update(opts.uuid_seed)
        .finalize();
    let mut fs_uuid = [0u8; 16];
    fs_uuid.copy_from_slice(&uuid_hash[..16]);
    fs_uuid[6] = (fs_uuid[6] & 0x0f) | 0x40; // RFC 4122 v4 shape
    fs_uuid[8] = (fs_uuid[8] & 0x3f) | 0x80;
    let seed_hash = Sha256::new()
        .chain_update(b"nullspace-rootfs htree-seed v1\0")
        .chain_update(opts.uuid_seed)
        .finalize();
    let mut hash_seed = [0u32; 4];
    for (i, w) in hash_seed.iter_mut().enumerate() {
        *w = u32::from_le_bytes([
            seed_hash[i * 4],
            seed_hash[i * 4 + 1],
            seed_hash[i * 4 + 2],
            seed_hash[i * 4 + 3],
        ]);
    }

    let mut o = Options::new(size_bytes, fs_uuid, opts.epoch);
    o.hash_seed = hash_seed;
    o.inodes = InodeCount::Exact(inode_count);
    o.reserved_percent = opts.reserved_percent;
    o.label = opts.label.clone();
    let mut b = FsBuilder::new(o).map_err(|e| Error::Options(e.to_string()))?;

    // Declare in walk order (pre-order DFS, children by name).
    let mut handles: Vec<Option<InodeHandle>> = vec![None; tree.nodes.len()];
    handles[ROOT as usize] = Some(mkext4::ROOT);
    let mut fills: Vec<(InodeHandle, u32, u64, u64)> = Vec::new();
    let mut summary = RootfsSummary {
        size_bytes,
        inodes_used: 11,
        inodes_total: 0,
        files: 0,
        dirs: 1,
        symlinks: 0,
        hardlinks: 0,
        data_bytes: 0,
    };
    let root = &tree.nodes[ROOT as usize];
    let ext4_err = |layer: u32, path: &str, e: mkext4::Error| {
        Error::entry(
            names.get(layer as usize).copied().unwrap_or("?"),
            path,
            EntryRule::Ext4(e.to_string()),
        )
    };
    b.set_meta(mkext4::ROOT, to_meta(&root.meta))
        .map_err(|e| ext4_err(root.layer, "", e))?;
    for (k, v) in &root.meta.xattrs {
        b.set_xattr(mkext4::ROOT, k, v)
            .map_err(|e| ext4_err(root.layer, "", e))?;
    }
    for item in &order {
        let node = &tree.nodes[item.id as usize];
        let parent = handles[item.parent as usize]
            .ok_or_else(|| Error::Ext4("parent declared after child".into()))?;
        let name = item.path.rsplit('/').next().unwrap_or(&item.path);
        let err = |e| ext4_err(node.layer, &item.path, e);
        if let Some(h) = handles[item.id as usize] {
            b.hardlink(parent, name, h).map_err(err)?;
            summary.hardlinks += 1;
            continue;
        }
        let meta = to_meta(&node.meta);
        let h = match &node.kind {
            Kind::Dir(_) => {
                summary.dirs += 1;
                b.mkdir(parent, name, meta).map_err(err)?
            }
            Kind::File { offset, size } => {
                summary.files += 1;
                let h = b.file(parent, name, meta, *size).map_err(err)?;
                if *size > 0 {
                    fills.push((h, node.layer, *offset, *size));
                }
                h
            }
            Kind::Symlink(target) => {
                summary.symlinks += 1;
                b.symlink(parent, name, target, meta).map_err(err)?
            }
        };
        for (k, v) in &node.meta.xattrs {
            b.set_xattr(h, k, v).map_err(err)?;
        }
        summary.inodes_used += 1;
        handles[item.id as usize] = Some(h);
    }
    // mkext4 rounds the inode count up to whole inode-table blocks per group.
    let groups = (size_bytes / BS).div_ceil(32768);
    summary.inodes_total = u64::from(inode_count)
        .div_ceil(groups)
        .next_multiple_of(16)
        .clamp(16, 32768)
        * groups;
    drop(tree);

    let layout = b.seal().map_err(|e| Error::Ext4(format!("seal: {e}")))?;

    // Phase C: write to a temp file next to `out`, rename on success.
    let file_name = out
        .file_name()
        .ok_or_else(|| Error::Options(format!("output path {} has no file name", out.display())))?;
    // Removed on drop unless persisted: no partial image survives an error
    // (or a panic).
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let temp = tempfile::Builder::new()
        .prefix(&format!("{}.tmp-", file_name.to_string_lossy()))
        .tempfile_in(dir)
        .map_err(|e| Error::io(format!("creating a temporary file in {}", dir.display()), e))?;
    let tmp = temp.path().to_path_buf();
    let mut sink = FileSink::create(&tmp, layout.image_len())
        .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
    {
        let mut w = layout.writer(&mut sink).map_err(|e| write_err(&tmp, e))?;
        for &(h, layer, offset, size) in &fills {
            let mut r = SpoolReader {
                file: &spools[layer as usize],
                pos: offset,
                end: offset + size,
            };
            w.fill(h, &mut r).map_err(|e| Error::LayerIo {
                layer: names[layer as usize].to_owned(),
                context: "copying file data from the spool",
                source: io::Error::other(e.to_string()),
            })?;
        }
        let s = w.finish().map_err(|e| write_err(&tmp, e))?;
        summary.data_bytes = s.data_bytes;
    }
    drop(sink);
    temp.persist(out).map_err(|e| {
        Error::io(
            format!("renaming {} to {}", tmp.display(), out.display()),
            e.error,
        )
    })?;
    Ok(summary)
}

fn write_err(tmp: &Path, e: mkext4::Error) -> Error {
    match e {
        mkext4::Error::Io(io) => Error::io(format!("writing {}", tmp.display()), io),
        other => Error::Ext4(other.to_string()),
    }
}

/// ext4 stores seconds in [-2^31, 2^34 - 2^31) with 30-bit nanoseconds.
fn to_meta(m: &Meta) -> mkext4::Meta {
    let secs = m
        .mtime
        .0
        .clamp(-(1i64 << 31), (1i64 << 34) - (1i64 << 31) - 1);
    let nsec = m.mtime.1.min(999_999_999);
    mkext4::Meta::new((m.mode & 0o7777) as u16, m.uid, m.gid, (secs, nsec))
}

/// Reads `[pos, end)` of a spool file with positioned reads (no shared
/// file offset; mkext4 asks for up to 4 MiB per call).
struct SpoolReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for SpoolReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (self.end - self.pos).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "spool file truncated",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// One step of the declaration order.
pub(crate) struct Item {
    pub id: NodeId,
    pub parent: NodeId,
    pub path: String,
}

/// Pre-order DFS from the root, children in byte order. This order is the
/// declaration order (inode numbers, dirent order, data placement), so it
/// depends only on the tree, never on hashing or timing.
pub(crate) fn walk(tree: &Tree) -> Vec<Item> {
    let mut out = Vec::new();
    let mut stack: Vec<Item> = Vec::new();
    let push_children = |stack: &mut Vec<Item>, dir: NodeId, prefix: &str| {
        if let Kind::Dir(children) = &tree.nodes[dir as usize].kind {
            for (name, &id) in children.iter().rev() {
                let path = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}/{name}")
                };
                stack.push(Item {
                    id,
                    parent: dir,
                    path,
                });
            }
        }
    };
    push_children(&mut stack, ROOT, "");
    while let Some(item) = stack.pop() {
        // A directory reachable twice is impossible (no dir hard links),
        // so descending is always safe.
        if matches!(tree.nodes[item.id as usize].kind, Kind::Dir(_)) {
            push_children(&mut stack, item.id, &item.path);
        }
        out.push(item);
    }
    out
}

/// Content measurements for sizing.
pub(crate) struct Stats {
    /// Blocks needed for data, directories, extent trees, xattr blocks,
    /// slow symlinks, lost+found.
    pub content_blocks: u64,
    /// Inodes the namespace uses (including reserved ones).
    pub inodes: u64,
}

fn measure(tree: &Tree, order: &[Item], layers: &[SpooledLayer]) -> Result<Stats, Error> {
    let mut seen = vec![false; tree.nodes.len()];
    let mut blocks: u64 = 4; // lost+found
    let mut inodes: u64 = 11;
    let dir_bytes = |node: &crate::tree::Node, is_root: bool| -> u64 {
        let Kind::Dir(children) = &node.kind else {
            return 0;
        };
        let mut bytes: u64 = children
            .keys()
            .map(|n| (8 + n.len() as u64).next_multiple_of(4))
            .sum();
        if is_root {
            bytes += 20; // lost+found
        }
        if bytes < 4072 {
            2
        } else {
            // htree: leaves at 100% fill lose at most one max-size record
            // each; plus root, index nodes and an extent tree block.
            let leaves = bytes.div_ceil(4084 - 264) + 1;
            leaves + 2 + leaves.div_ceil(500) + 1
        }
    };
    blocks += dir_bytes(&tree.nodes[ROOT as usize], true);
    if !tree.nodes[ROOT as usize].meta.xattrs.is_empty() {
        blocks += 1;
    }
    for item in order {
        if std::mem::replace(&mut seen[item.id as usize], true) {
            continue;
        }
        inodes += 1;
        let node = &tree.nodes[item.id as usize];
        if !node.meta.xattrs.is_empty() {
            blocks += 1;
        }
        match &node.kind {
            Kind::Dir(_) => blocks += dir_bytes(node, false),
            Kind::File { offset, size } => {
                let layer = &layers[node.layer as usize];
                if offset
                    .checked_add(*size)
                    .is_none_or(|end| end > layer.index.uncompressed_size)
                {
                    return Err(Error::CorruptTar {
                        layer: layer.name.clone(),
                        offset: *offset,
                        reason: format!("data of {:?} lies outside the layer stream", item.path),
                    });
                }
                let b = size.div_ceil(BS);
                blocks += b;
                // Extents split at 32768 blocks and around metadata runs.
                let ext = b.div_ceil(32768) * 2 + 2;
                if ext > 4 {
                    blocks += ext.div_ceil(340) + 1;
                }
            }
            Kind::Symlink(t) => {
                if t.len() >= 60 {
                    blocks += 1;
                }
            }
        }
    }
    Ok(Stats {
        content_blocks: blocks,
        inodes,
    })
}

fn journal_blocks(blocks: u64) -> u64 {
    match blocks {
        0..32768 => 1024,
        32768..262144 => 4096,
        262144..524288 => 8192,
        524288..4194304 => 16384,
        4194304..8388608 => 32768,
        8388608..16777216 => 65536,
        16777216..33554432 => 131072,
        _ => 262144,
    }
}

/// Mirror of mkext4's geometry overhead (`s_overhead_clusters`).
fn overhead(blocks: u64, inodes: u64) -> u64 {
    let groups = blocks.div_ceil(32768);
    let ipg = inodes
        .div_ceil(groups)
        .next_multiple_of(16)
        .clamp(16, 32768);
    let gdt = (groups * 32).div_ceil(BS);
    let is_power = |mut n: u64, b: u64| {
        while n.is_multiple_of(b) {
            n /= b;
        }
        n == 1
    };
    let backups = (1..groups)
        .filter(|&g| g == 1 || is_power(g, 3) || is_power(g, 5) || is_power(g, 7))
        .count() as u64;
    1 + gdt + backups * (1 + gdt) + 2 * groups + groups * ipg / 16 + journal_blocks(blocks)
}

/// Image size and inode count: content + headroom + filesystem overhead,
/// at least `min_size_bytes`; inodes = used + 25% + 8192, or mke2fs's
/// one-per-16-KiB ratio if that is more.
fn plan_size(stats: &Stats, opts: &RootfsOptions) -> Result<(u64, u32), Error> {
    let content = stats.content_blocks;
    let headroom = content.saturating_mul(u64::from(opts.headroom.percent)) / 100
        + opts.headroom.fixed_bytes.div_ceil(BS);
    let min_blocks = opts.min_size_bytes.unwrap_or(0).div_ceil(BS).max(8192);
    let mut blocks = (content + headroom).max(min_blocks);
    let mut inodes = 0;
    for _ in 0..16 {
        inodes = (stats.inodes + stats.inodes / 4 + 8192).max(blocks / 4);
        // At most one inode per block (ipg <= blocks per group).
        let need = (content + headroom + overhead(blocks, inodes)).max(inodes);
        // Slack for flex-group placement and extent splits.
        let need = (need + need / 100 + 256).max(min_blocks);
        if need <= blocks {
            break;
        }
        blocks = need;
    }
    if blocks >= u64::from(u32::MAX) {
        return Err(Error::Options(format!(
            "image of {} blocks exceeds the ext4 layout limit",
            blocks
        )));
    }
    let inodes = u32::try_from(inodes.min(blocks)).unwrap_or(u32::MAX);
    Ok((blocks * BS, inodes))
}
