//! Directory uploads: the SDK's tar archive, read from the spool as a
//! stream and created in the guest entry by entry, contained under the
//! destination.
//!
//! Entry rules (each refusal names the entry): no `..`, no absolute path,
//! no NUL, UTF-8, components of at most 255 bytes and paths of at most
//! 4096; regular files, directories and symbolic links only; a link's
//! target relative and inside the destination. Symbolic links are created
//! after every file and directory, so no entry is ever written through one
//! (a link cannot redirect a later entry out of the destination).
//!
//! PAX and GNU long-name extensions are read here (the `tar` crate's raw
//! mode), each at most [`EXTENSION_MAX`] bytes: the crate would read them
//! into memory whole.
//!
//! The archive is unpacked into a hidden sibling of the destination, then
//! renamed into place (new destination, `replace`), or its entries are
//! moved into the existing directory (`merge`); a failure removes the
//! sibling. Later passes re-read the archive's headers from the spool
//! (seeking over contents) rather than remembering entries: memory stays
//! constant whatever the entry count.

use std::io::Read;

use super::publish::{
    EntryKind, GuestFiles, Published, copy_in, guest_err, make_parents, parent, reader,
    remove_made, sibling,
};
use super::{CHUNK, Conflict, Job, Reason, UploadError};

/// Largest PAX header or GNU long name/link accepted.
pub const EXTENSION_MAX: usize = 64 << 10;
/// Most entries in one archive.
pub const ENTRIES_MAX: u64 = 1 << 20;
const PATH_MAX: usize = 4096;
const NAME_MAX: usize = 255;

/// What a checked entry creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum What {
    Dir,
    File { size: u64 },
    Symlink { target: String },
}

/// A checked entry: its path relative to the destination (`""`: the
/// destination itself), what it is, its permission bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub rel: String,
    pub what: What,
    pub mode: u32,
}

fn refuse(entry: &[u8], rule: impl Into<String>, reason: Reason) -> UploadError {
    UploadError::Entry {
        entry: String::from_utf8_lossy(entry).chars().take(300).collect(),
        rule: rule.into(),
        reason,
    }
}

/// The entry's path, normalized and relative, or the rule it breaks.
pub fn entry_path(raw: &[u8]) -> Result<String, String> {
    if raw.contains(&0) {
        return Err("contains NUL".into());
    }
    let s = std::str::from_utf8(raw).map_err(|_| "is not UTF-8".to_string())?;
    if s.len() > PATH_MAX {
        return Err(format!("is longer than {PATH_MAX} bytes"));
    }
    if s.starts_with('/') {
        return Err("is an absolute path".into());
    }
    let mut parts = Vec::new();
    for c in s.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err("contains '..'".into()),
            c if c.len() > NAME_MAX => {
                return Err(format!("has a component longer than {NAME_MAX} bytes"));
            }
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

/// Whether a link at `rel` with `target` stays inside the destination,
/// resolving `..` lexically from the link's directory.
pub fn link_target(rel: &str, target: &[u8]) -> Result<String, String> {
    if target.is_empty() {
        return Err("is a symbolic link with an empty target".into());
    }
    if target.contains(&0) {
        return Err("is a symbolic link whose target contains NUL".into());
    }
    let t = std::str::from_utf8(target)
        .map_err(|_| "is a symbolic link whose target is not UTF-8".to_string())?;
    if t.len() > PATH_MAX {
        return Err(format!(
            "is a symbolic link whose target is longer than {PATH_MAX} bytes"
        ));
    }
    if t.starts_with('/') {
        return Err(format!("is a symbolic link to the absolute path {t:?}"));
    }
    let mut depth = parent(rel).map_or(0, |p| p.split('/').count());
    for c in t.split('/') {
        match c {
            "" | "." => {}
            ".." if depth == 0 => {
                return Err(format!(
                    "is a symbolic link to {t:?}, outside the destination"
                ));
            }
            ".." => depth -= 1,
            _ => depth += 1,
        }
    }
    Ok(t.to_string())
}

/// Reads an extension entry's data, at most [`EXTENSION_MAX`] bytes.
fn extension(e: &mut tar::Entry<'_, impl Read>, name: &[u8]) -> Result<Vec<u8>, UploadError> {
    let size = e.size();
    if size > EXTENSION_MAX as u64 {
        return Err(refuse(
            name,
            format!("has a {size}-byte name extension, more than {EXTENSION_MAX}"),
            Reason::DirectoryExtractUnsupportedEntry,
        ));
    }
    let mut v = Vec::with_capacity(size as usize);
    e.read_to_end(&mut v).map_err(bad_archive)?;
    Ok(v)
}

fn bad_archive(e: std::io::Error) -> UploadError {
    UploadError::Invalid(format!(
        "the directory upload is not a valid tar archive: {e}"
    ))
}

/// Calls `f` with each checked entry of the archive and a reader of its
/// contents, in archive order.
pub fn walk<R: Read + std::io::Seek>(
    src: R,
    mut f: impl FnMut(&Entry, &mut dyn Read) -> Result<(), UploadError>,
) -> Result<(), UploadError> {
    let mut ar = tar::Archive::new(src);
    let entries = ar.entries_with_seek().map_err(bad_archive)?.raw(true);
    let (mut long_name, mut long_link, mut pax_path, mut pax_link, mut pax_size) = (
        None::<Vec<u8>>,
        None::<Vec<u8>>,
        None::<Vec<u8>>,
        None::<Vec<u8>>,
        None::<u64>,
    );
    let mut count = 0u64;
    for e in entries {
        let mut e = e.map_err(bad_archive)?;
        let header_name = e.header().path_bytes().into_owned();
        let ty = e.header().entry_type();
        use tar::EntryType as T;
        match ty {
            T::XHeader => {
                if pax_path.is_some() || pax_link.is_some() || pax_size.is_some() {
                    return Err(refuse(
                        &header_name,
                        "is a second PAX header for one entry",
                        Reason::DirectoryExtractUnsupportedEntry,
                    ));
                }
                let data = extension(&mut e, &header_name)?;
                for x in tar::PaxExtensions::new(&data) {
                    let x = x.map_err(bad_archive)?;
                    match x.key_bytes() {
                        b"path" => pax_path = Some(x.value_bytes().to_vec()),
                        b"linkpath" => pax_link = Some(x.value_bytes().to_vec()),
                        b"size" => {
                            pax_size = Some(
                                x.value().ok().and_then(|v| v.parse().ok()).ok_or_else(|| {
                                    refuse(
                                        &header_name,
                                        "has a PAX size that is not a number",
                                        Reason::DirectoryExtractUnsupportedEntry,
                                    )
                                })?,
                            )
                        }
                        _ => {}
                    }
                }
                continue;
            }
            T::XGlobalHeader => {
                extension(&mut e, &header_name)?;
                continue;
            }
            T::GNULongName | T::GNULongLink => {
                let mut data = extension(&mut e, &header_name)?;
                while data.last() == Some(&0) {
                    data.pop();
                }
                let slot = if ty == T::GNULongName {
                    &mut long_name
                } else {
                    &mut long_link
                };
                if slot.replace(data).is_some() {
                    return Err(refuse(
                        &header_name,
                        "is a second GNU long name for one entry",
                        Reason::DirectoryExtractUnsupportedEntry,
                    ));
                }
                continue;
            }
            _ => {}
        }
        count += 1;
        if count > ENTRIES_MAX {
            return Err(UploadError::Invalid(format!(
                "the directory upload has more than {ENTRIES_MAX} entries"
            )));
        }
        let name = pax_path.take().or(long_name.take()).unwrap_or(header_name);
        let link = pax_link
            .take()
            .or(long_link.take())
            .or_else(|| e.header().link_name_bytes().map(|l| l.into_owned()));
        let size = e.size();
        if let Some(s) = pax_size.take()
            && s != size
        {
            return Err(refuse(
                &name,
                format!(
                    "has a PAX size ({s}) other than its header's ({size}); entries over 8 GiB are not supported"
                ),
                Reason::DirectoryExtractUnsupportedEntry,
            ));
        }
        let rel =
            entry_path(&name).map_err(|r| refuse(&name, r, Reason::DirectoryExtractInvalidPath))?;
        let mode = e.header().mode().map_err(bad_archive)? & 0o1777;
        let what = match ty {
            T::Directory => What::Dir,
            T::Regular | T::Continuous => What::File { size },
            T::Symlink => {
                let target = link_target(&rel, link.as_deref().unwrap_or_default())
                    .map_err(|r| refuse(&name, r, Reason::DirectoryExtractInvalidSymlink))?;
                What::Symlink { target }
            }
            T::Link => {
                return Err(refuse(
                    &name,
                    "is a hard link; directory uploads take files, directories and symbolic links",
                    Reason::DirectoryExtractUnsupportedEntry,
                ));
            }
            other => {
                return Err(refuse(
                    &name,
                    format!(
                        "is a {other:?} entry; directory uploads take files, directories and symbolic links"
                    ),
                    Reason::DirectoryExtractUnsupportedEntry,
                ));
            }
        };
        if rel.is_empty() && what != What::Dir {
            return Err(refuse(
                &name,
                "names the destination itself",
                Reason::DirectoryExtractInvalidPath,
            ));
        }
        f(&Entry { rel, what, mode }, &mut e)?;
    }
    Ok(())
}

fn join(base: &str, rel: &str) -> String {
    if rel.is_empty() {
        base.to_string()
    } else {
        format!("{base}/{rel}")
    }
}

/// Creates the entries under `root` (files and directories, then links).
fn unpack(job: &Job, g: &dyn GuestFiles, root: &str) -> Result<Published, UploadError> {
    let mut out = Published { bytes: 0, files: 0 };
    let mut buf = vec![0u8; CHUNK];
    // The last directory known to exist (saves a mkdir per file).
    let mut made = String::new();
    walk(reader(job), |e, data| {
        let path = join(root, &e.rel);
        match &e.what {
            What::Dir => {
                g.make_dir(&path, 0o700, true)
                    .map_err(guest_err("mkdir", &path))?;
                made = path;
            }
            What::File { size } => {
                if let Some(p) = parent(&path)
                    && p != made
                {
                    g.make_dir(p, 0o700, true).map_err(guest_err("mkdir", p))?;
                    made = p.to_string();
                }
                copy_in(g, data, &path, *size, 0o600, &mut buf)?;
                g.chmod(&path, e.mode).map_err(guest_err("chmod", &path))?;
                out.bytes += size;
                out.files += 1;
            }
            What::Symlink { .. } => {}
        }
        Ok(())
    })?;
    walk(reader(job), |e, _| {
        if let What::Symlink { target } = &e.what {
            let path = join(root, &e.rel);
            if let Some(p) = parent(&e.rel) {
                real_dirs(g, root, p, &e.rel)?;
                let p = join(root, p);
                g.make_dir(&p, 0o700, true)
                    .map_err(guest_err("mkdir", &p))?;
            }
            if g.kind(&path).map_err(guest_err("stat", &path))?.is_some() {
                return Err(refuse(
                    e.rel.as_bytes(),
                    "is a symbolic link over a name the archive already holds",
                    Reason::DirectoryExtractInvalidSymlink,
                ));
            }
            g.symlink(target, &path)
                .map_err(guest_err("symlink", &path))?;
            out.files += 1;
        }
        Ok(())
    })?;
    Ok(out)
}

/// Refuses a link whose directory `rel_dir` (under `root`) passes through
/// a symbolic link made earlier: checked top-down before anything is made
/// there, so nothing is ever created through a link.
fn real_dirs(
    g: &dyn GuestFiles,
    root: &str,
    rel_dir: &str,
    entry: &str,
) -> Result<(), UploadError> {
    let mut at = root.to_string();
    for c in rel_dir.split('/') {
        at.push('/');
        at.push_str(c);
        match g.kind(&at).map_err(guest_err("stat", &at))? {
            Some(EntryKind::Dir) => {}
            // The rest is missing: made as plain directories.
            None => return Ok(()),
            Some(_) => {
                return Err(refuse(
                    entry.as_bytes(),
                    format!(
                        "lies under {:?}, which is not a directory",
                        &at[root.len() + 1..]
                    ),
                    Reason::DirectoryExtractInvalidSymlink,
                ));
            }
        }
    }
    Ok(())
}

/// Gives the archive's directories their modes under `root` (last: a
/// read-only directory is filled first).
fn dir_modes(job: &Job, g: &dyn GuestFiles, root: &str) -> Result<(), UploadError> {
    walk(reader(job), |e, _| {
        if e.what == What::Dir && !e.rel.is_empty() {
            let path = join(root, &e.rel);
            g.chmod(&path, e.mode).map_err(guest_err("chmod", &path))?;
        }
        Ok(())
    })
}

/// Moves the unpacked entries from `staging` into the existing `dest`.
fn merge(job: &Job, g: &dyn GuestFiles, staging: &str, dest: &str) -> Result<(), UploadError> {
    walk(reader(job), |e, _| {
        if e.rel.is_empty() {
            return Ok(());
        }
        let to = join(dest, &e.rel);
        if e.what == What::Dir {
            return g
                .make_dir(&to, 0o700, true)
                .map_err(guest_err("mkdir", &to));
        }
        if let Some(p) = parent(&to) {
            g.make_dir(p, 0o700, true).map_err(guest_err("mkdir", p))?;
        }
        let from = join(staging, &e.rel);
        match g.rename(&from, &to) {
            // A name the archive holds twice: moved with its first entry.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r.map_err(guest_err("rename", &from)),
        }
    })
}

/// Unpacks the archive of `job` at its destination.
pub(super) fn publish_dir(job: &Job, g: &dyn GuestFiles) -> Result<Published, UploadError> {
    let dest = &job.target;
    let existing = g.kind(dest).map_err(guest_err("stat", dest))?;
    match (existing, job.conflict) {
        (None, _) => {}
        (Some(_), Conflict::Error) => {
            return Err(UploadError::TargetConflict {
                path: dest.clone(),
                why: "already exists (conflict policy error)",
            });
        }
        (Some(k), Conflict::Merge) if k != EntryKind::Dir => {
            return Err(UploadError::TargetConflict {
                path: dest.clone(),
                why: "exists and is not a directory to merge into",
            });
        }
        _ => {}
    }
    let made = match parent(dest) {
        Some(p) => make_parents(g, p)?,
        None => Vec::new(),
    };
    let staging = sibling(dest, "upload", &job.id);
    if let Err(e) = g.make_dir(&staging, 0o755, false) {
        remove_made(g, &made);
        return Err(guest_err("mkdir", &staging)(e));
    }
    let placed = (|| {
        let out = unpack(job, g, &staging)?;
        match (existing, job.conflict) {
            (None, _) => {
                dir_modes(job, g, &staging)?;
                g.rename(&staging, dest)
                    .map_err(guest_err("rename", &staging))?;
            }
            (Some(_), Conflict::Replace) => {
                dir_modes(job, g, &staging)?;
                let old = sibling(dest, "replaced", &job.id);
                g.rename(dest, &old).map_err(guest_err("rename", dest))?;
                if let Err(e) = g.rename(&staging, dest) {
                    let _ = g.rename(&old, dest);
                    return Err(guest_err("rename", &staging)(e));
                }
                let _ = g.remove(&old, true);
            }
            _ => {
                merge(job, g, &staging, dest)?;
                dir_modes(job, g, dest)?;
                let _ = g.remove(&staging, true);
            }
        }
        Ok(out)
    })();
    if placed.is_err() {
        let _ = g.remove(&staging, true);
        remove_made(g, &made);
    }
    placed
}
