//! Error types. Every error renders as one line naming the layer (its
//! digest), the offending path where there is one, and the rule broken.

use std::io;

/// Why a single tar entry was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EntryRule {
    #[error("character device entries are not allowed")]
    CharDevice,
    #[error("block device entries are not allowed")]
    BlockDevice,
    #[error("FIFO entries are not allowed")]
    Fifo,
    #[error("sparse entries are not allowed")]
    Sparse,
    #[error("unknown tar entry type {0:?}")]
    UnknownType(char),
    #[error("PAX size {pax} disagrees with the ustar header size {ustar}")]
    PaxSizeMismatch { ustar: u64, pax: u64 },
    #[error("{kind} entry carries {size} data bytes (must be 0)")]
    HeaderOnlyWithData { kind: &'static str, size: u64 },
    #[error("extended header of {size} bytes exceeds the limit of {limit}")]
    ExtendedHeaderTooLarge { size: u64, limit: usize },
    #[error("malformed PAX record: {0}")]
    BadPax(String),
    #[error("two {0} headers describe the same entry")]
    DuplicateExtendedHeader(&'static str),
    #[error("empty path")]
    EmptyName,
    #[error("path contains a NUL byte")]
    NulByte,
    #[error("path is not valid UTF-8")]
    NonUtf8,
    #[error("path component of {0} bytes exceeds 255")]
    ComponentTooLong(usize),
    #[error("path of {len} bytes exceeds the limit of {limit}")]
    PathTooLong { len: usize, limit: usize },
    #[error("`..` escapes the root")]
    PathEscapes,
    #[error("entry would replace the root directory with a non-directory")]
    RootNotDir,
    #[error("whiteout names `.`, `..`, or the root")]
    BadWhiteout,
    #[error("hard link target {0:?} does not exist")]
    HardlinkMissing(String),
    #[error("hard link target {0:?} is a directory")]
    HardlinkToDir(String),
    #[error("hard link target {0:?} is invalid: {1}")]
    HardlinkTarget(String, Box<EntryRule>),
    #[error("invalid symlink target: {0}")]
    BadSymlinkTarget(&'static str),
    #[error("parent component {0:?} is not a directory")]
    ParentNotDir(String),
    #[error("too many levels of symbolic links while resolving the parent")]
    SymlinkLoop,
    #[error("numeric field {0} out of range")]
    NumberOutOfRange(&'static str),
    #[error("invalid numeric field: {0}")]
    BadNumber(String),
    #[error(
        "xattr {0:?} is outside the supported namespaces (user., security., trusted., system.posix_acl_*)"
    )]
    UnsupportedXattr(String),
    #[error(
        "`lost+found` at the root is reserved for the filesystem and must be an empty directory"
    )]
    ReservedLostFound,
    #[error("ext4 writer rejected the entry: {0}")]
    Ext4(String),
}

/// Errors of the layer decoder, the flattener, the writer and the cache.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// One entry broke a rule.
    #[error("layer {layer}: path {path:?}: {rule}")]
    Entry {
        layer: String,
        path: String,
        rule: EntryRule,
    },
    /// The layer blob is xz or bzip2.
    #[error("layer {layer}: unsupported compression {compression} (media type {media_type:?})")]
    UnsupportedCompression {
        layer: String,
        compression: &'static str,
        media_type: String,
    },
    /// Neither a known compression nor something that looks like a tar.
    #[error("layer {layer}: not a tar, gzip or zstd stream (media type {media_type:?})")]
    UnrecognizedFormat { layer: String, media_type: String },
    /// The tar framing itself is broken (bad checksum, truncation, ...).
    #[error("layer {layer}: corrupt tar at offset {offset}: {reason}")]
    CorruptTar {
        layer: String,
        offset: u64,
        reason: String,
    },
    /// A resource limit from [`crate::Limits`] was hit.
    #[error("layer {layer}: {what} exceeds the limit of {limit}")]
    Limit {
        layer: String,
        what: &'static str,
        limit: u64,
    },
    /// Reading or decompressing the layer failed.
    #[error("layer {layer}: {context}: {source}")]
    LayerIo {
        layer: String,
        context: &'static str,
        #[source]
        source: io::Error,
    },
    /// I/O outside a specific layer (output image, cache directory).
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The ext4 writer failed for a reason not tied to one entry.
    #[error("ext4 writer: {0}")]
    Ext4(String),
    /// A digest string is not `sha256:<64 hex>` or `sha512:<128 hex>`.
    #[error(
        "invalid digest {0:?}: expected sha256:<64 lowercase hex> or sha512:<128 lowercase hex>"
    )]
    InvalidDigest(String),
    /// A cache entry exists but is inconsistent.
    #[error("layer cache entry {digest}: {reason}")]
    CacheCorrupt { digest: String, reason: String },
    /// Invalid options passed by the caller.
    #[error("invalid options: {0}")]
    Options(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn entry(layer: &str, path: impl Into<String>, rule: EntryRule) -> Error {
        Error::Entry {
            layer: layer.to_owned(),
            path: path.into(),
            rule,
        }
    }
}

/// Lossy rendering of raw path bytes for error messages only.
pub(crate) fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
