//! What the scanners read: a root filesystem seen through two operations
//! (bounded file read, directory listing), and that view of a host directory.
//!
//! The trait is kept this small so that a template's ext4 disk can be read
//! through it as easily as an unpacked directory.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// Why a root filesystem could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("reading {path} in the root filesystem: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} in the root filesystem is larger than the {limit}-byte limit")]
    TooLarge { path: String, limit: u64 },
    #[error("{path} in the root filesystem: more than 40 symbolic links to follow")]
    SymlinkLoop { path: String },
}

/// The kind of a directory entry, as its directory records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File,
    Symlink,
    Other,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub kind: EntryKind,
}

/// A root filesystem, addressed by paths relative to its root ("var/lib/dpkg/status").
/// Symbolic links are resolved inside the root, never outside it.
pub trait RootFs {
    /// The bytes of the regular file at `path`, `None` when nothing is there;
    /// `FsError::TooLarge` when it holds more than `limit` bytes.
    fn read(&self, path: &str, limit: u64) -> Result<Option<Vec<u8>>, FsError>;
    /// The entries of the directory at `path`, `None` when it is not a directory.
    fn list(&self, path: &str) -> Result<Option<Vec<Entry>>, FsError>;
}

/// A root filesystem unpacked in a host directory.
#[derive(Debug, Clone)]
pub struct HostDir {
    root: PathBuf,
}

impl HostDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `path` resolved as a chroot would: links followed relative to the
    /// root, `..` stopping at it. `None` when a component is missing.
    fn resolve(&self, path: &str) -> Result<Option<PathBuf>, FsError> {
        let io = |source| FsError::Io {
            path: path.to_owned(),
            source,
        };
        let mut pending: Vec<String> = split(path).into_iter().rev().collect();
        let mut parts: Vec<String> = Vec::new();
        let mut hops = 0;
        while let Some(part) = pending.pop() {
            if part == ".." {
                parts.pop();
                continue;
            }
            let mut host = self.root.clone();
            host.extend(&parts);
            host.push(&part);
            let meta = match std::fs::symlink_metadata(&host) {
                Ok(m) => m,
                Err(e) if is_absent(&e) => return Ok(None),
                Err(e) => return Err(io(e)),
            };
            if !meta.file_type().is_symlink() {
                parts.push(part);
                continue;
            }
            hops += 1;
            if hops > 40 {
                return Err(FsError::SymlinkLoop {
                    path: path.to_owned(),
                });
            }
            let target = std::fs::read_link(&host).map_err(io)?;
            if target.is_absolute() {
                parts.clear();
            }
            let target = target.to_string_lossy().into_owned();
            pending.extend(split(&target).into_iter().rev());
        }
        let mut host = self.root.clone();
        host.extend(&parts);
        Ok(Some(host))
    }
}

fn split(path: &str) -> Vec<String> {
    Path::new(path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            Component::ParentDir => Some("..".to_owned()),
            _ => None,
        })
        .collect()
}

fn is_absent(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
    )
}

impl RootFs for HostDir {
    fn read(&self, path: &str, limit: u64) -> Result<Option<Vec<u8>>, FsError> {
        let io = |source| FsError::Io {
            path: path.to_owned(),
            source,
        };
        let Some(host) = self.resolve(path)? else {
            return Ok(None);
        };
        let file = match std::fs::File::open(&host) {
            Ok(f) => f,
            Err(e) if is_absent(&e) => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        if !file.metadata().map_err(io)?.is_file() {
            return Ok(None);
        }
        // Read one byte past the limit to tell "exactly the limit" from "more".
        let mut bytes = Vec::new();
        file.take(limit.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if bytes.len() as u64 > limit {
            return Err(FsError::TooLarge {
                path: path.to_owned(),
                limit,
            });
        }
        Ok(Some(bytes))
    }

    fn list(&self, path: &str) -> Result<Option<Vec<Entry>>, FsError> {
        let io = |source| FsError::Io {
            path: path.to_owned(),
            source,
        };
        let Some(host) = self.resolve(path)? else {
            return Ok(None);
        };
        let dir = match std::fs::read_dir(&host) {
            Ok(d) => d,
            Err(e) if is_absent(&e) => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let mut entries = Vec::new();
        for entry in dir {
            let entry = entry.map_err(io)?;
            let t = entry.file_type().map_err(io)?;
            let kind = if t.is_dir() {
                EntryKind::Dir
            } else if t.is_file() {
                EntryKind::File
            } else if t.is_symlink() {
                EntryKind::Symlink
            } else {
                EntryKind::Other
            };
            entries.push(Entry {
                name: entry.file_name().to_string_lossy().into_owned(),
                kind,
            });
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Some(entries))
    }
}
