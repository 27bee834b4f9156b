//! A deterministic OCI layer from an ext4 tree ([`crate::ext4_read`]): the
//! tar, compressed, with its digest and diff_id computed while written.
//!
//! The bytes are a pure function of the tree and [`LayerOptions`]: entries
//! in the walk's order (depth first, names in byte order), every mtime set
//! to [`LayerOptions::epoch`], numeric owners only (no user or group
//! names), modes, xattrs (PAX `SCHILY.xattr.*`, sorted) and device numbers
//! as recorded, a second name of a file as a hard link, no tar end padding
//! beyond the two zero blocks. gzip's header carries no name and mtime 0;
//! zstd runs single-threaded without a content size. The compression
//! crates are pinned exactly (workspace `Cargo.toml`) because their output
//! is part of the digest.

use std::fs::File;
use std::io::{self, Write};

use sha2::{Digest as _, Sha256};

use crate::ext4_read::{Ext4Image, Ext4ReadError, Node, NodeKind, ReadLimits};

/// How a layer is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LayerCompression {
    #[default]
    Gzip,
    Zstd,
}

impl LayerCompression {
    /// The OCI media type of a layer compressed this way.
    pub fn media_type(self) -> &'static str {
        match self {
            LayerCompression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            LayerCompression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// What the layer is made with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LayerOptions {
    pub compression: LayerCompression,
    /// Every entry's mtime (seconds since the epoch; default 0).
    pub epoch: u64,
    pub limits: ReadLimits,
}

/// A written layer blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBlob {
    /// sha256 of the compressed bytes, lowercase hex.
    pub digest_hex: String,
    /// sha256 of the uncompressed tar, lowercase hex.
    pub diff_id_hex: String,
    /// Compressed size in bytes.
    pub size: u64,
    pub media_type: &'static str,
    pub entries: u64,
}

/// Why a layer could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LayerWriteError {
    #[error(transparent)]
    Read(#[from] Ext4ReadError),
    #[error("layer: path {path:?}: {context}: {source}")]
    Entry {
        path: String,
        context: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("layer: {context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Counts and hashes what passes through.
struct Hashing<W> {
    inner: W,
    sha: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn hashing<W>(inner: W) -> Hashing<W> {
    Hashing {
        inner,
        sha: Sha256::new(),
        bytes: 0,
    }
}

enum Compressor<W: Write> {
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::Encoder<'static, W>),
}

impl<W: Write> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressor::Gzip(w) => w.write(buf),
            Compressor::Zstd(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compressor::Gzip(w) => w.flush(),
            Compressor::Zstd(w) => w.flush(),
        }
    }
}

impl<W: Write> Compressor<W> {
    fn new(c: LayerCompression, w: W) -> io::Result<Compressor<W>> {
        Ok(match c {
            LayerCompression::Gzip => Compressor::Gzip(
                flate2::GzBuilder::new()
                    .mtime(0)
                    // "unknown": the host's OS must not change the bytes.
                    .operating_system(255)
                    .write(w, flate2::Compression::default()),
            ),
            LayerCompression::Zstd => {
                let mut e = zstd::Encoder::new(w, 3)?;
                e.include_contentsize(false)?;
                e.include_checksum(false)?;
                Compressor::Zstd(e)
            }
        })
    }
    fn finish(self) -> io::Result<W> {
        match self {
            Compressor::Gzip(w) => w.finish(),
            Compressor::Zstd(w) => w.finish(),
        }
    }
}

/// Writes the tree of `image` as one layer into `out` (which the caller
/// places and renames). `nodes` is `image.walk(..)`'s result.
pub fn write_layer(
    image: &Ext4Image,
    nodes: &[Node],
    opts: &LayerOptions,
    out: File,
) -> Result<LayerBlob, LayerWriteError> {
    let io_err = |context| move |source| LayerWriteError::Io { context, source };
    let compressed = hashing(io::BufWriter::with_capacity(1 << 20, out));
    let comp = Compressor::new(opts.compression, compressed).map_err(io_err("compressor"))?;
    let mut tar = tar::Builder::new(hashing(comp));
    let mut entries = 0u64;
    for node in nodes {
        // The root's own entry: tools disagree on `./`; the importer makes
        // the root 0755 root:root as every image's is.
        if node.path.is_empty() {
            continue;
        }
        append(&mut tar, image, node, opts.epoch)?;
        entries += 1;
    }
    let tar_stream = tar.into_inner().map_err(io_err("finish the tar"))?;
    let diff_id_hex = hex::encode(tar_stream.sha.finalize());
    let mut compressed = tar_stream
        .inner
        .finish()
        .map_err(io_err("finish compression"))?;
    compressed.flush().map_err(io_err("write the layer"))?;
    let file = compressed
        .inner
        .into_inner()
        .map_err(|e| LayerWriteError::Io {
            context: "write the layer",
            source: e.into_error(),
        })?;
    file.sync_all().map_err(io_err("sync the layer"))?;
    Ok(LayerBlob {
        digest_hex: hex::encode(compressed.sha.finalize()),
        diff_id_hex,
        size: compressed.bytes,
        media_type: opts.compression.media_type(),
        entries,
    })
}

/// ustar's numeric fields hold 7 octal digits (ids) and 11 (size).
const USTAR_ID_MAX: u32 = 0o7777777;
const USTAR_SIZE_MAX: u64 = 0o77777777777;

fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    image: &Ext4Image,
    node: &Node,
    epoch: u64,
) -> Result<(), LayerWriteError> {
    let path = node.path.as_str();
    let err = |context| {
        move |source| LayerWriteError::Entry {
            path: path.to_owned(),
            context,
            source,
        }
    };
    let mut h = tar::Header::new_ustar();
    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    let (kind, size, link) = match &node.kind {
        NodeKind::Dir => (tar::EntryType::Directory, 0, None),
        NodeKind::File { size } => (tar::EntryType::Regular, *size, None),
        NodeKind::Symlink { target } => (tar::EntryType::Symlink, 0, Some(target.as_str())),
        NodeKind::HardLink { target } => (tar::EntryType::Link, 0, Some(target.as_str())),
        NodeKind::CharDevice { .. } => (tar::EntryType::Char, 0, None),
        NodeKind::BlockDevice { .. } => (tar::EntryType::Block, 0, None),
        NodeKind::Fifo => (tar::EntryType::Fifo, 0, None),
        NodeKind::Socket => {
            // tar has no socket type; a socket is a running program's.
            return Ok(());
        }
    };
    h.set_entry_type(kind);
    h.set_mode(node.mode);
    h.set_mtime(epoch);
    if node.uid <= USTAR_ID_MAX {
        h.set_uid(u64::from(node.uid));
    } else {
        pax.push(("uid".into(), node.uid.to_string().into_bytes()));
    }
    if node.gid <= USTAR_ID_MAX {
        h.set_gid(u64::from(node.gid));
    } else {
        pax.push(("gid".into(), node.gid.to_string().into_bytes()));
    }
    if size <= USTAR_SIZE_MAX {
        h.set_size(size);
    } else {
        pax.push(("size".into(), size.to_string().into_bytes()));
    }
    if let NodeKind::CharDevice { major, minor } | NodeKind::BlockDevice { major, minor } =
        node.kind
    {
        h.set_device_major(major).map_err(err("device major"))?;
        h.set_device_minor(minor).map_err(err("device minor"))?;
    }
    let name = if kind == tar::EntryType::Directory {
        format!("{path}/")
    } else {
        path.to_owned()
    };
    // Long names go in PAX records; the ustar fields then hold a stable
    // placeholder that PAX readers ignore.
    if h.set_path(&name).is_err() {
        pax.push(("path".into(), name.clone().into_bytes()));
        h.set_path("@PaxPath").map_err(err("path"))?;
    }
    if let Some(link) = link
        && (link.len() > 100 || h.set_link_name(link).is_err())
    {
        pax.push(("linkpath".into(), link.as_bytes().to_vec()));
        h.set_link_name("@PaxLink").map_err(err("link name"))?;
    }
    for (k, v) in &node.xattrs {
        pax.push((format!("SCHILY.xattr.{k}"), v.clone()));
    }
    if !pax.is_empty() {
        tar.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
            .map_err(err("PAX header"))?;
    }
    h.set_cksum();
    if kind == tar::EntryType::Regular {
        let r = image.open_inode(path, node.inode)?;
        tar.append(&h, r).map_err(err("file contents"))?;
    } else {
        tar.append(&h, io::empty()).map_err(err("header"))?;
    }
    Ok(())
}
