//! Reading an ext4 root filesystem (a template's `disk.ext4`): every entry
//! with its metadata, file contents streamed or read with a bound, and
//! directory listings. The one reader the OCI export and the SBOM use.
//!
//! Built on mkext4's verification reader (already pinned for writing):
//! it exposes what an exact export needs and `ext4-view` does not (inode
//! numbers for hard links, link counts, device numbers, xattrs), checks
//! metadata checksums, and bounds what a hostile image can make it
//! allocate. What it refuses, this module refuses with one line:
//! block sizes other than 4 KiB, incompat features it does not know,
//! block-mapped or inline-data files.
//!
//! A disk taken from a running VM is still mounted in the guest: its
//! superblock says the journal needs recovery, and committed metadata may
//! live only in the journal. [`Ext4Image::open`] then replays the journal
//! on a private sparse copy (`e2fsck -E journal_only`) and reads that; the
//! template's own file is never written.
//!
//! Hostile images: a directory reached twice (a loop), names that are not
//! UTF-8 or contain `/`, entry counts and path lengths over [`ReadLimits`]
//! are errors, never hangs or unbounded memory.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

use mkext4::reader::{FileExtent, Fs};
use mkext4::spec::inode::FileType;

/// `s_feature_incompat` RECOVER: the journal holds transactions.
const INCOMPAT_RECOVER: u32 = 0x4;
/// `i_flags` INLINE_DATA (contents in the inode: not supported).
const INLINE_DATA_FL: u32 = 0x1000_0000;
/// `i_flags` EXTENTS.
const EXTENTS_FL: u32 = 0x8_0000;
const ROOT_INO: u32 = 2;
/// Symlinks followed while resolving one path (Linux's limit).
const MAX_SYMLINKS: usize = 40;

/// Why an image could not be read; one line naming the image, the path
/// where there is one, and the rule.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Ext4ReadError {
    #[error("ext4 image {image}: {context}: {source}")]
    Io {
        image: String,
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("ext4 image {image}: {why}")]
    Image { image: String, why: String },
    #[error("ext4 image {image}: path {path:?}: {why}")]
    Entry {
        image: String,
        path: String,
        why: String,
    },
    #[error("ext4 image {image}: path {path:?}: not found")]
    NotFound { image: String, path: String },
    #[error("ext4 image {image}: path {path:?}: {size} bytes exceed the limit of {limit}")]
    TooLarge {
        image: String,
        path: String,
        size: u64,
        limit: u64,
    },
    #[error("ext4 image {image}: {what} exceeds the limit of {limit}")]
    Limit {
        image: String,
        what: &'static str,
        limit: u64,
    },
}

/// Bounds on a walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadLimits {
    /// Entries in the whole tree (default 4,000,000).
    pub max_entries: u64,
    /// Bytes of one path (default 4096, PATH_MAX).
    pub max_path_len: usize,
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits {
            max_entries: 4_000_000,
            max_path_len: 4096,
        }
    }
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    Dir,
    /// A regular file (its first path in walk order).
    File {
        size: u64,
    },
    Symlink {
        target: String,
    },
    /// Another name of an earlier regular file or symlink (`target` is
    /// that entry's path).
    HardLink {
        target: String,
    },
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
    Socket,
}

/// One entry of the tree, as recorded in the filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Relative to the root, `/`-separated, no leading `/`; `""` is the
    /// root itself.
    pub path: String,
    pub kind: NodeKind,
    /// Permission bits (setuid, setgid, sticky included).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds and nanoseconds since the epoch.
    pub mtime: (i64, u32),
    /// Full names (`user.x`, `security.capability`, …), sorted; POSIX
    /// ACLs in the xattr (userspace) format.
    pub xattrs: BTreeMap<String, Vec<u8>>,
    pub inode: u32,
}

/// A directory entry as listed by [`Ext4Image::list_dir`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirItem {
    pub name: String,
    pub inode: u32,
    pub is_dir: bool,
    /// As the directory entry records it (not followed).
    pub is_symlink: bool,
}

/// An open ext4 image (read-only).
pub struct Ext4Image {
    name: String,
    fs: Fs<File>,
    /// The journal-replayed copy, removed on drop.
    _replayed: Option<tempfile::TempPath>,
    /// Whether the image needed a journal replay.
    pub replayed_journal: bool,
}

impl std::fmt::Debug for Ext4Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ext4Image")
            .field("name", &self.name)
            .field("replayed_journal", &self.replayed_journal)
            .finish_non_exhaustive()
    }
}

impl Ext4Image {
    /// Opens `path`. When its journal needs recovery, it is replayed on a
    /// sparse copy made in `scratch` (a directory on a file system with
    /// room for the image's used blocks).
    pub fn open(path: &Path, scratch: &Path) -> Result<Ext4Image, Ext4ReadError> {
        let name = path.display().to_string();
        let io_err = |context: &str, source: io::Error| Ext4ReadError::Io {
            image: name.clone(),
            context: context.to_owned(),
            source,
        };
        let file = File::open(path).map_err(|e| io_err("open", e))?;
        let mut sb = [0u8; 1024];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut sb, 1024)
            .map_err(|e| io_err("read the superblock", e))?;
        let incompat = u32::from_le_bytes([sb[0x60], sb[0x61], sb[0x62], sb[0x63]]);
        let (file, replayed) = if incompat & INCOMPAT_RECOVER != 0 {
            drop(file);
            let copy = replay_journal(path, scratch).map_err(|e| match e {
                Replay::Io(c, s) => io_err(&c, s),
                Replay::Tool(why) => Ext4ReadError::Image {
                    image: name.clone(),
                    why,
                },
            })?;
            let f = File::open(&copy).map_err(|e| io_err("open the replayed copy", e))?;
            (f, Some(copy))
        } else {
            (file, None)
        };
        let fs = Fs::open(file).map_err(|e| Ext4ReadError::Image {
            image: name.clone(),
            why: e.to_string(),
        })?;
        Ok(Ext4Image {
            name,
            fs,
            replayed_journal: replayed.is_some(),
            _replayed: replayed,
        })
    }

    fn image_err(&self, why: impl std::fmt::Display) -> Ext4ReadError {
        Ext4ReadError::Image {
            image: self.name.clone(),
            why: why.to_string(),
        }
    }

    fn entry_err(&self, path: &str, why: impl std::fmt::Display) -> Ext4ReadError {
        Ext4ReadError::Entry {
            image: self.name.clone(),
            path: path.to_owned(),
            why: why.to_string(),
        }
    }

    /// Every entry, depth first, names in byte order, the root first
    /// (`lost+found` at the root, the file system's own, is left out).
    /// A regular file or symlink with several names is a
    /// [`NodeKind::HardLink`] after its first one.
    pub fn walk(&self, limits: &ReadLimits) -> Result<Vec<Node>, Ext4ReadError> {
        let mut out = Vec::new();
        let mut seen_dirs = HashSet::new();
        let mut first_name: HashMap<u32, String> = HashMap::new();
        // (path, inode) to visit; children pushed in reverse byte order so
        // they pop in byte order.
        let mut stack = vec![(String::new(), ROOT_INO)];
        while let Some((path, ino)) = stack.pop() {
            if out.len() as u64 >= limits.max_entries {
                return Err(Ext4ReadError::Limit {
                    image: self.name.clone(),
                    what: "entry count",
                    limit: limits.max_entries,
                });
            }
            let node = self.node(&path, ino, &mut first_name)?;
            if node.kind == NodeKind::Dir {
                if !seen_dirs.insert(ino) {
                    return Err(self.entry_err(&path, "directory reached twice (a loop)"));
                }
                let mut children = self.children(&path, ino)?;
                if path.is_empty() {
                    children.retain(|c| c.name != "lost+found");
                }
                for c in children.into_iter().rev() {
                    let child = if path.is_empty() {
                        c.name
                    } else {
                        format!("{path}/{}", c.name)
                    };
                    if child.len() > limits.max_path_len {
                        return Err(self.entry_err(
                            &child,
                            format!("path exceeds {} bytes", limits.max_path_len),
                        ));
                    }
                    stack.push((child, c.inode));
                }
            }
            out.push(node);
        }
        Ok(out)
    }

    fn node(
        &self,
        path: &str,
        ino: u32,
        first_name: &mut HashMap<u32, String>,
    ) -> Result<Node, Ext4ReadError> {
        let inode = self.fs.inode(ino).map_err(|e| self.entry_err(path, e))?;
        if inode.flags & INLINE_DATA_FL != 0 {
            return Err(self.entry_err(path, "inline data is not supported"));
        }
        let ft = inode.file_type();
        let linkable = matches!(ft, FileType::Regular | FileType::Symlink);
        if linkable && inode.links_count > 1 {
            if let Some(target) = first_name.get(&ino) {
                return Ok(Node {
                    path: path.to_owned(),
                    kind: NodeKind::HardLink {
                        target: target.clone(),
                    },
                    ..self.meta(path, ino, &inode)?
                });
            }
            first_name.insert(ino, path.to_owned());
        }
        let kind = match ft {
            FileType::Dir => NodeKind::Dir,
            FileType::Regular => {
                if inode.size > 0 && inode.flags & EXTENTS_FL == 0 {
                    return Err(self.entry_err(path, "block-mapped files are not supported"));
                }
                NodeKind::File { size: inode.size }
            }
            FileType::Symlink => {
                let t = self
                    .fs
                    .symlink_target(ino)
                    .map_err(|e| self.entry_err(path, e))?;
                let target = String::from_utf8(t)
                    .map_err(|_| self.entry_err(path, "symlink target is not UTF-8"))?;
                if target.is_empty() || target.contains('\0') {
                    return Err(self.entry_err(path, "symlink target is empty or has a NUL"));
                }
                NodeKind::Symlink { target }
            }
            FileType::CharDev | FileType::BlockDev => {
                let (major, minor) = inode.dev_numbers().unwrap_or((0, 0));
                if ft == FileType::CharDev {
                    NodeKind::CharDevice { major, minor }
                } else {
                    NodeKind::BlockDevice { major, minor }
                }
            }
            FileType::Fifo => NodeKind::Fifo,
            FileType::Socket => NodeKind::Socket,
            FileType::Unknown => {
                return Err(self.entry_err(path, format!("unknown file type {:o}", inode.mode)));
            }
        };
        Ok(Node {
            kind,
            ..self.meta(path, ino, &inode)?
        })
    }

    fn meta(
        &self,
        path: &str,
        ino: u32,
        inode: &mkext4::spec::Inode,
    ) -> Result<Node, Ext4ReadError> {
        let mut xattrs = BTreeMap::new();
        for x in self.fs.xattrs(ino).map_err(|e| self.entry_err(path, e))? {
            let Some(full) = x.full_name() else {
                return Err(self.entry_err(path, format!("xattr namespace index {}", x.name_index)));
            };
            let full = String::from_utf8(full)
                .map_err(|_| self.entry_err(path, "xattr name is not UTF-8"))?;
            let value = if x.name_index == 2 || x.name_index == 3 {
                acl_to_xattr(&x.value).ok_or_else(|| self.entry_err(path, "malformed ACL"))?
            } else {
                x.value
            };
            xattrs.insert(full, value);
        }
        Ok(Node {
            path: path.to_owned(),
            kind: NodeKind::Dir,
            mode: u32::from(inode.mode & 0o7777),
            uid: inode.uid,
            gid: inode.gid,
            mtime: mkext4::spec::Inode::timestamp(inode.mtime, inode.mtime_extra),
            xattrs,
            inode: ino,
        })
    }

    /// A directory's entries without `.` and `..`, sorted by name bytes.
    fn children(&self, path: &str, ino: u32) -> Result<Vec<DirItem>, Ext4ReadError> {
        let mut out = Vec::new();
        let mut names = HashSet::new();
        for e in self.fs.read_dir(ino).map_err(|e| self.entry_err(path, e))? {
            if e.name == b"." || e.name == b".." {
                continue;
            }
            let name = String::from_utf8(e.name)
                .map_err(|_| self.entry_err(path, "a name in it is not UTF-8"))?;
            if name.is_empty() || name.contains('/') || name.contains('\0') {
                return Err(self.entry_err(path, format!("invalid name {name:?}")));
            }
            if !names.insert(name.clone()) {
                return Err(self.entry_err(path, format!("name {name:?} appears twice")));
            }
            out.push(DirItem {
                name,
                inode: e.inode,
                is_dir: e.file_type == 2,
                is_symlink: e.file_type == 7,
            });
        }
        out.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
        Ok(out)
    }

    /// The inode at `path` (absolute or relative to the root). Symlinks
    /// in the parents are followed inside the image, chroot-style; the
    /// last component is followed only when `follow` is set.
    pub fn resolve(&self, path: &str, follow: bool) -> Result<u32, Ext4ReadError> {
        let mut links = 0;
        let mut ino = ROOT_INO;
        // Parents of the current position (for `..`).
        let mut parents: Vec<u32> = Vec::new();
        let mut todo: Vec<String> = components(path).into_iter().rev().collect();
        while let Some(part) = todo.pop() {
            match part.as_str() {
                "." => continue,
                ".." => {
                    ino = parents.pop().unwrap_or(ROOT_INO);
                    continue;
                }
                _ => {}
            }
            let items = self.children(path, ino)?;
            let Some(item) = items.into_iter().find(|i| i.name == part) else {
                return Err(Ext4ReadError::NotFound {
                    image: self.name.clone(),
                    path: path.to_owned(),
                });
            };
            let inode = self
                .fs
                .inode(item.inode)
                .map_err(|e| self.entry_err(path, e))?;
            let last = todo.is_empty();
            if inode.file_type() == FileType::Symlink && (!last || follow) {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(self.entry_err(path, "too many levels of symbolic links"));
                }
                let t = self
                    .fs
                    .symlink_target(item.inode)
                    .map_err(|e| self.entry_err(path, e))?;
                let t = String::from_utf8_lossy(&t).into_owned();
                if t.starts_with('/') {
                    ino = ROOT_INO;
                    parents.clear();
                }
                todo.extend(components(&t).into_iter().rev());
                continue;
            }
            parents.push(ino);
            ino = item.inode;
        }
        Ok(ino)
    }

    /// Lists the directory at `path` (symlinks followed), sorted by name.
    pub fn list_dir(&self, path: &str) -> Result<Vec<DirItem>, Ext4ReadError> {
        let ino = self.resolve(path, true)?;
        let inode = self.fs.inode(ino).map_err(|e| self.entry_err(path, e))?;
        if inode.file_type() != FileType::Dir {
            return Err(self.entry_err(path, "not a directory"));
        }
        self.children(path, ino)
    }

    /// The regular file at `path` (symlinks followed) as [`Self::read_file`]
    /// reads it; `None` when nothing is there or it is not a regular file.
    pub fn read_if_file(&self, path: &str, limit: u64) -> Result<Option<Vec<u8>>, Ext4ReadError> {
        let ino = match self.resolve(path, true) {
            Ok(i) => i,
            Err(Ext4ReadError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let inode = self.fs.inode(ino).map_err(|e| self.entry_err(path, e))?;
        if inode.file_type() != FileType::Regular {
            return Ok(None);
        }
        self.read_file(path, limit).map(Some)
    }

    /// The directory at `path` (symlinks followed) as [`Self::list_dir`]
    /// lists it; `None` when nothing is there or it is not a directory.
    pub fn list_if_dir(&self, path: &str) -> Result<Option<Vec<DirItem>>, Ext4ReadError> {
        let ino = match self.resolve(path, true) {
            Ok(i) => i,
            Err(Ext4ReadError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let inode = self.fs.inode(ino).map_err(|e| self.entry_err(path, e))?;
        if inode.file_type() != FileType::Dir {
            return Ok(None);
        }
        self.children(path, ino).map(Some)
    }

    /// Whether `path` exists (symlinks followed).
    pub fn exists(&self, path: &str) -> Result<bool, Ext4ReadError> {
        match self.resolve(path, true) {
            Ok(_) => Ok(true),
            Err(Ext4ReadError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The whole regular file at `path` (symlinks followed), refused when
    /// it is larger than `limit` bytes.
    pub fn read_file(&self, path: &str, limit: u64) -> Result<Vec<u8>, Ext4ReadError> {
        let ino = self.resolve(path, true)?;
        let mut r = self.open_inode(path, ino)?;
        if r.size > limit {
            return Err(Ext4ReadError::TooLarge {
                image: self.name.clone(),
                path: path.to_owned(),
                size: r.size,
                limit,
            });
        }
        let mut buf = Vec::with_capacity(r.size as usize);
        r.read_to_end(&mut buf).map_err(|e| Ext4ReadError::Io {
            image: self.name.clone(),
            context: format!("read {path}"),
            source: e,
        })?;
        Ok(buf)
    }

    /// A reader of a regular file's contents by inode (as in [`Node`]).
    pub fn open_inode(&self, path: &str, ino: u32) -> Result<FileReader<'_>, Ext4ReadError> {
        let inode = self.fs.inode(ino).map_err(|e| self.entry_err(path, e))?;
        if inode.file_type() != FileType::Regular {
            return Err(self.entry_err(path, "not a regular file"));
        }
        if inode.flags & INLINE_DATA_FL != 0 || (inode.size > 0 && inode.flags & EXTENTS_FL == 0) {
            return Err(self.entry_err(path, "only extent-mapped files are supported"));
        }
        let bytes = self.fs.superblock().blocks_count.saturating_mul(4096);
        if inode.size > bytes {
            return Err(self.image_err(format!(
                "path {path:?}: size {} exceeds the file system",
                inode.size
            )));
        }
        let extents = self
            .fs
            .extents(ino, &inode)
            .map_err(|e| self.entry_err(path, e))?;
        Ok(FileReader {
            fs: &self.fs,
            size: inode.size,
            inode,
            extents,
            pos: 0,
        })
    }
}

/// Streams one file's contents (holes read as zeros).
pub struct FileReader<'a> {
    fs: &'a Fs<File>,
    inode: mkext4::spec::Inode,
    extents: Vec<FileExtent>,
    pos: u64,
    /// The file's size in bytes.
    pub size: u64,
}

impl Read for FileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let n = self
            .fs
            .read_file_at(&self.inode, &self.extents, self.pos, buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        self.pos += n as u64;
        Ok(n)
    }
}

fn components(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect()
}

/// ext4 stores POSIX ACLs in its own compact format (version 1: 4-byte
/// entries for tags without an id); the xattr interface, and tar, use
/// version 2 with an id in every entry. A value already in version 2 (as
/// some writers store it) passes unchanged.
fn acl_to_xattr(v: &[u8]) -> Option<Vec<u8>> {
    const ACL_UNDEFINED_ID: u32 = u32::MAX;
    let version = u32::from_le_bytes(v.get(..4)?.try_into().ok()?);
    if version == 2 {
        return Some(v.to_vec());
    }
    if version != 1 {
        return None;
    }
    let mut out = 2u32.to_le_bytes().to_vec();
    let mut rest = &v[4..];
    while !rest.is_empty() {
        let tag = u16::from_le_bytes(rest.get(..2)?.try_into().ok()?);
        let perm = u16::from_le_bytes(rest.get(2..4)?.try_into().ok()?);
        // ACL_USER (2) and ACL_GROUP (8) carry an id.
        let (id, len) = if tag == 2 || tag == 8 {
            (u32::from_le_bytes(rest.get(4..8)?.try_into().ok()?), 8)
        } else {
            (ACL_UNDEFINED_ID, 4)
        };
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
        rest = &rest[len..];
    }
    Some(out)
}

enum Replay {
    Io(String, io::Error),
    Tool(String),
}

/// Copies `image` sparsely into `scratch` and replays its journal there.
fn replay_journal(image: &Path, scratch: &Path) -> Result<tempfile::TempPath, Replay> {
    let tmp = tempfile::Builder::new()
        .prefix(".ext4-replay-")
        .tempfile_in(scratch)
        .map_err(|e| Replay::Io(format!("scratch file in {}", scratch.display()), e))?
        .into_temp_path();
    let copy: PathBuf = tmp.to_path_buf();
    // cp keeps the image sparse (and shares blocks where the file system
    // can), which std::fs::copy does not promise.
    let out = Command::new("cp")
        .args(["--sparse=always", "--reflink=auto", "--"])
        .arg(image)
        .arg(&copy)
        .output()
        .map_err(|e| Replay::Io("run cp".into(), e))?;
    if !out.status.success() {
        return Err(Replay::Tool(format!(
            "copy for journal replay failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let out = Command::new("e2fsck")
        .args(["-E", "journal_only", "-y"])
        .arg(&copy)
        .output()
        .map_err(|e| Replay::Io("run e2fsck".into(), e))?;
    // 0: nothing to do, 1: replayed (file system changed).
    if !matches!(out.status.code(), Some(0 | 1)) {
        return Err(Replay::Tool(format!(
            "journal replay (e2fsck -E journal_only) failed: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        )));
    }
    Ok(tmp)
}

#[cfg(test)]
mod tests {
    use super::acl_to_xattr;

    #[test]
    fn ext4_acls_become_xattr_acls() {
        // ext4 v1: USER_OBJ rw-, USER 1000 r--, GROUP_OBJ r--, MASK r--, OTHER ---.
        let mut v1 = 1u32.to_le_bytes().to_vec();
        v1.extend([1, 0, 6, 0]);
        v1.extend([2, 0, 4, 0, 0xe8, 3, 0, 0]);
        v1.extend([4, 0, 4, 0]);
        v1.extend([0x10, 0, 4, 0]);
        v1.extend([0x20, 0, 0, 0]);
        let x = acl_to_xattr(&v1).unwrap();
        assert_eq!(&x[..4], &2u32.to_le_bytes());
        assert_eq!(x.len(), 4 + 5 * 8);
        assert_eq!(&x[4..12], &[1, 0, 6, 0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(&x[12..20], &[2, 0, 4, 0, 0xe8, 3, 0, 0]);
        // Already in the xattr format: unchanged.
        assert_eq!(acl_to_xattr(&x).unwrap(), x);
        // Truncated or unknown versions are refused.
        assert!(acl_to_xattr(&v1[..v1.len() - 2]).is_none());
        assert!(acl_to_xattr(&[3, 0, 0, 0]).is_none());
        assert!(acl_to_xattr(&[1, 0]).is_none());
    }
}
