//! Completing an upload: the spooled bytes verified against the whole
//! sha256, then written into the guest under a temporary sibling name and
//! renamed into place, so a failure leaves nothing behind: the temporary
//! is removed, and so are the parent directories created on the way (when
//! still empty: another upload may have filled them meanwhile).
//!
//! The guest is reached through [`GuestFiles`], the few file operations the
//! agent offers, as the session's user; calls are blocking (run on a
//! blocking thread).

use std::io::Read;

use sha2::{Digest as _, Sha256};

use super::spool::PartsReader;
use super::{CHUNK, Conflict, Job, Kind, UploadError};

/// What a path is in the guest (not following a final symlink).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// The guest file operations a completion needs, all as one user. Paths
/// are the guest's (absolute, or relative to its working directory).
pub trait GuestFiles {
    /// Writes `data` at `offset`; at offset 0 the file is created (with
    /// `mode`, reduced by the umask) or truncated first.
    fn write_at(&self, path: &str, offset: u64, data: &[u8], mode: u32) -> std::io::Result<()>;
    /// `mkdir` (with `parents`: `-p`); an existing directory is fine.
    fn make_dir(&self, path: &str, mode: u32, parents: bool) -> std::io::Result<()>;
    /// Sets exactly `mode`.
    fn chmod(&self, path: &str, mode: u32) -> std::io::Result<()>;
    /// Creates `path` as a symbolic link to `target`.
    fn symlink(&self, target: &str, path: &str) -> std::io::Result<()>;
    /// `rename(2)`: replaces a file (or an empty directory) at `to`.
    fn rename(&self, from: &str, to: &str) -> std::io::Result<()>;
    fn remove(&self, path: &str, recursive: bool) -> std::io::Result<()>;
    /// What `path` is, `None` when missing.
    fn kind(&self, path: &str) -> std::io::Result<Option<EntryKind>>;
}

/// What a completion put into the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// File content bytes written.
    pub bytes: u64,
    /// Files and symlinks created.
    pub files: u64,
}

pub(super) fn guest_err(
    op: &'static str,
    path: &str,
) -> impl FnOnce(std::io::Error) -> UploadError {
    let path = path.to_string();
    move |source| UploadError::Guest { op, path, source }
}

/// `<parent>/.<name>.nullspace-<tag>-<id>`: a sibling of `target` (same
/// file system, so the final rename is atomic), hidden, at most 255 bytes.
pub(super) fn sibling(target: &str, tag: &str, id: &str) -> String {
    let (parent, name) = match target.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, target),
    };
    let mut keep = name.len().min(120);
    while !name.is_char_boundary(keep) {
        keep -= 1;
    }
    let leaf = format!(".{}.nullspace-{tag}-{id}", &name[..keep]);
    match parent {
        Some(p) => format!("{p}/{leaf}"),
        None => leaf,
    }
}

/// The directory holding `path`, when it names one.
pub(super) fn parent(path: &str) -> Option<&str> {
    match path.rsplit_once('/') {
        Some(("", _)) | None => None,
        Some((p, _)) => Some(p),
    }
}

/// Creates the missing directories of `dir` one at a time (shallowest
/// first) and returns those it made, so a failure can take them back with
/// [`remove_made`]. On an error the ones made so far are removed.
pub(super) fn make_parents(g: &dyn GuestFiles, dir: &str) -> Result<Vec<String>, UploadError> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if g.kind(d).map_err(guest_err("stat", d))?.is_some() {
            break;
        }
        missing.push(d.to_string());
        cur = parent(d);
    }
    let mut made = Vec::with_capacity(missing.len());
    for d in missing.into_iter().rev() {
        if let Err(e) = g.make_dir(&d, 0o755, false) {
            remove_made(g, &made);
            return Err(guest_err("mkdir", &d)(e));
        }
        made.push(d);
    }
    Ok(made)
}

/// Removes the directories [`make_parents`] made, deepest first; one that
/// is no longer empty stays (with everything above it).
pub(super) fn remove_made(g: &dyn GuestFiles, made: &[String]) {
    for d in made.iter().rev() {
        if g.remove(d, false).is_err() {
            return;
        }
    }
}

pub(super) fn reader(job: &Job) -> PartsReader {
    PartsReader::new(job.parts.clone())
}

/// Hashes the spooled bytes and compares with the expected digest.
fn verify(job: &Job) -> Result<(), UploadError> {
    let Some(expected) = &job.expected_sha256 else {
        return Ok(());
    };
    let mut r = reader(job);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = r.read(&mut buf).map_err(|source| UploadError::Spool {
            path: job.parts.first().map(|p| p.0.clone()).unwrap_or_default(),
            source,
        })?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let actual = hex::encode(h.finalize());
    if &actual != expected {
        return Err(UploadError::WholeChecksum {
            id: job.id.clone(),
            expected: expected.clone(),
            actual,
        });
    }
    Ok(())
}

/// Copies `size` bytes of `src` into the guest file `path`, in chunks.
pub(super) fn copy_in(
    g: &dyn GuestFiles,
    src: &mut dyn Read,
    path: &str,
    size: u64,
    mode: u32,
    buf: &mut [u8],
) -> Result<(), UploadError> {
    let mut off = 0u64;
    loop {
        let want = (size - off).min(buf.len() as u64) as usize;
        let mut n = 0;
        while n < want {
            let k = src
                .read(&mut buf[n..want])
                .map_err(|e| UploadError::Invalid(format!("reading the upload for {path}: {e}")))?;
            if k == 0 {
                return Err(UploadError::Invalid(format!(
                    "the upload for {path} ended after {} of {size} bytes",
                    off + n as u64
                )));
            }
            n += k;
        }
        if n > 0 || off == 0 {
            g.write_at(path, off, &buf[..n], mode)
                .map_err(guest_err("write", path))?;
        }
        off += n as u64;
        if off >= size {
            return Ok(());
        }
    }
}

/// Verifies and publishes `job` into the guest.
pub fn publish(job: &Job, g: &dyn GuestFiles) -> Result<Published, UploadError> {
    verify(job)?;
    match job.kind {
        Kind::File => publish_file(job, g),
        Kind::DirectoryTar => super::archive::publish_dir(job, g),
    }
}

fn publish_file(job: &Job, g: &dyn GuestFiles) -> Result<Published, UploadError> {
    let target = &job.target;
    match g.kind(target).map_err(guest_err("stat", target))? {
        Some(_) if job.conflict == Conflict::Error => {
            return Err(UploadError::TargetConflict {
                path: target.clone(),
                why: "already exists (conflict policy error)",
            });
        }
        Some(EntryKind::Dir) => {
            return Err(UploadError::TargetConflict {
                path: target.clone(),
                why: "is a directory; a file upload does not replace one",
            });
        }
        _ => {}
    }
    let made = match parent(target) {
        Some(p) => make_parents(g, p)?,
        None => Vec::new(),
    };
    let tmp = sibling(target, "upload", &job.id);
    let size: u64 = job.parts.iter().map(|p| p.1).sum();
    let mut buf = vec![0u8; CHUNK];
    let r = copy_in(g, &mut reader(job), &tmp, size, 0o644, &mut buf)
        .and_then(|()| g.rename(&tmp, target).map_err(guest_err("rename", &tmp)));
    if r.is_err() {
        let _ = g.remove(&tmp, false);
        remove_made(g, &made);
    }
    r.map(|()| Published {
        bytes: size,
        files: 1,
    })
}
