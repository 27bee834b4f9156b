//! `replace`: a pattern replaced in a list of files as a user, each file
//! rewritten whole and atomically.
//!
//! Every file is checked before any changes (it exists, is a regular file
//! within the size limit, the user may read and write it, its result stays
//! within the limit), so a request with one bad file changes nothing. A
//! changed file is written to a temporary file in its directory, given the
//! original's owner and mode, synced and renamed over it: a reader sees the
//! old or the new content, never a mix. When that cannot keep what the file
//! was (it has other hard links, the user may not create files in its
//! directory or give the new file its owner), it is rewritten in place.

use crate::agent::{Failure, Outcome};
use crate::files::{AsUser, absolute, display};
use crate::pattern::TextPattern;
use crate::procs::State;
use nullspace_model::agent::{
    DEFAULT_MAX_FILE_BYTES, ErrorCode, Event, MAX_FILE_BYTES, MAX_REPLACE_FILES, MAX_REPLACEMENT,
    ReplaceResult, ReplaceSpec,
};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// One file of the request, as checked.
struct Target {
    /// Symlinks resolved: the file that is rewritten.
    path: PathBuf,
    /// As asked, for messages.
    asked: String,
}

/// What one file's content comes to.
enum Change {
    Binary,
    Unchanged,
    Replaced { data: Vec<u8>, count: u64 },
}

pub fn replace(state: &State, spec: &ReplaceSpec) -> Outcome {
    if spec.files.is_empty() || spec.files.len() > MAX_REPLACE_FILES {
        return Err(Failure::bad(format!(
            "replace takes 1..={MAX_REPLACE_FILES} files, not {}",
            spec.files.len()
        )));
    }
    if spec.replacement.len() > MAX_REPLACEMENT {
        return Err(Failure::bad(format!(
            "the replacement has {} bytes, more than {MAX_REPLACEMENT}",
            spec.replacement.len()
        )));
    }
    let pattern =
        TextPattern::new(&spec.pattern, spec.literal).map_err(|e| Failure::bad(e.to_string()))?;
    let asked: Vec<PathBuf> = spec
        .files
        .iter()
        .map(|f| absolute(state, f))
        .collect::<Result<_, _>>()?;
    let _as = AsUser::switch(state, spec.user.as_deref())?;
    let mut buf = Vec::new();
    // First pass: every file can be rewritten, or nothing is.
    let mut targets: Vec<Target> = Vec::with_capacity(asked.len());
    for p in &asked {
        let t = check(p)?;
        if targets.iter().any(|o| o.path == t.path) {
            continue; // the same file twice (or through a link)
        }
        if let Change::Replaced { data, .. } = change(&t, &pattern, &spec.replacement, &mut buf)?
            && data.len() as u64 > MAX_FILE_BYTES
        {
            return Err(Failure::new(
                ErrorCode::FileTooLarge,
                format!(
                    "{}: the result would have {} bytes, more than {MAX_FILE_BYTES}",
                    t.asked,
                    data.len()
                ),
            ));
        }
        targets.push(t);
    }
    let mut result = ReplaceResult::default();
    for t in &targets {
        match change(t, &pattern, &spec.replacement, &mut buf)? {
            Change::Binary => result.binary_files_skipped += 1,
            Change::Unchanged => result.files_skipped += 1,
            Change::Replaced { data, count } => {
                if !spec.dry_run {
                    write_back(&t.path, &data).map_err(|e| Failure::io(&t.asked, e))?;
                }
                result.replacements += count;
                result.files_modified += 1;
            }
        }
    }
    Ok(Event::Replaced(result))
}

/// A file the user may rewrite: a regular file within the size limit,
/// open for reading and writing.
fn check(asked: &Path) -> Result<Target, Failure> {
    let name = display(asked);
    let path = std::fs::canonicalize(asked).map_err(|e| Failure::io(&name, e))?;
    let md = std::fs::metadata(&path).map_err(|e| Failure::io(&name, e))?;
    if md.is_dir() {
        return Err(Failure::new(
            ErrorCode::IsADirectory,
            format!("{name}: is a directory"),
        ));
    }
    if !md.is_file() {
        return Err(Failure::bad(format!("{name}: not a regular file")));
    }
    if md.len() > DEFAULT_MAX_FILE_BYTES {
        return Err(Failure::new(
            ErrorCode::FileTooLarge,
            format!(
                "{name}: {} bytes, more than the {DEFAULT_MAX_FILE_BYTES} replace rewrites",
                md.len()
            ),
        ));
    }
    // Opening for writing (without truncating) is the kernel's own answer
    // to "may this user change it".
    std::fs::File::options()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| Failure::io(&name, e))?;
    Ok(Target { path, asked: name })
}

/// The file's content with the pattern replaced.
fn change(
    t: &Target,
    pattern: &TextPattern,
    replacement: &str,
    buf: &mut Vec<u8>,
) -> Result<Change, Failure> {
    let f = std::fs::File::open(&t.path).map_err(|e| Failure::io(&t.asked, e))?;
    buf.clear();
    f.take(DEFAULT_MAX_FILE_BYTES + 1)
        .read_to_end(buf)
        .map_err(|e| Failure::io(&t.asked, e))?;
    if buf.len() as u64 > DEFAULT_MAX_FILE_BYTES {
        return Err(Failure::new(
            ErrorCode::FileTooLarge,
            format!("{}: grew past {DEFAULT_MAX_FILE_BYTES} bytes", t.asked),
        ));
    }
    if buf.contains(&0) {
        return Ok(Change::Binary);
    }
    let (out, count) = pattern.replace_all(buf, replacement);
    if count == 0 || out[..] == buf[..] {
        return Ok(Change::Unchanged);
    }
    Ok(Change::Replaced {
        data: out.into_owned(),
        count,
    })
}

/// Replaces `path`'s content with `data`, atomically when it can keep the
/// file's owner, mode and links that way.
fn write_back(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let md = std::fs::metadata(path)?;
    if md.nlink() > 1 {
        return in_place(path, data);
    }
    match atomic(path, &md, data) {
        Ok(()) => Ok(()),
        Err(Fallback::InPlace) => in_place(path, data),
        Err(Fallback::Failed(e)) => Err(e),
    }
}

enum Fallback {
    /// The temporary file could not be made the original's: rewrite in place.
    InPlace,
    Failed(std::io::Error),
}

fn atomic(path: &Path, md: &std::fs::Metadata, data: &[u8]) -> Result<(), Fallback> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("/"));
    let tmp = dir.join(format!(
        ".ns-replace-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let mut f = match std::fs::File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(Fallback::InPlace);
        }
        Err(e) => return Err(Fallback::Failed(e)),
    };
    let done = (|| -> Result<(), Fallback> {
        let fail = Fallback::Failed;
        f.write_all(data).map_err(fail)?;
        // The owner first: a chown clears set-id bits the mode then restores.
        if let Err(e) = std::os::unix::fs::fchown(&f, Some(md.uid()), Some(md.gid())) {
            return Err(if e.kind() == std::io::ErrorKind::PermissionDenied {
                Fallback::InPlace
            } else {
                Fallback::Failed(e)
            });
        }
        f.set_permissions(std::fs::Permissions::from_mode(md.mode() & 0o7777))
            .map_err(fail)?;
        f.sync_all().map_err(fail)?;
        std::fs::rename(&tmp, path).map_err(fail)
    })();
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}

fn in_place(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::options()
        .write(true)
        .truncate(true)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ns-replace-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn write_back_keeps_mode_and_leaves_no_temporary() {
        let d = tmpdir("mode");
        let p = d.join("f.sh");
        std::fs::write(&p, "old").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o754)).unwrap();
        let ino = std::fs::metadata(&p).unwrap().ino();
        write_back(&p, b"new").unwrap();
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert_eq!(md.mode() & 0o7777, 0o754);
        assert_ne!(md.ino(), ino, "replaced by rename");
        let names: Vec<_> = std::fs::read_dir(&d).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "no temporary left");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn write_back_keeps_hard_links() {
        let d = tmpdir("links");
        let p = d.join("a");
        std::fs::write(&p, "old").unwrap();
        std::fs::hard_link(&p, d.join("b")).unwrap();
        write_back(&p, b"new").unwrap();
        assert_eq!(
            std::fs::read(d.join("b")).unwrap(),
            b"new",
            "rewritten in place"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn changes_skip_binary_and_unmatched_files() {
        let d = tmpdir("change");
        let mut buf = Vec::new();
        let pat = TextPattern::new("a+", false).unwrap();
        let t = |name: &str, body: &[u8]| {
            let p = d.join(name);
            std::fs::write(&p, body).unwrap();
            check(&p).unwrap()
        };
        let c = change(&t("bin", b"aa\0aa"), &pat, "b", &mut buf).unwrap();
        assert!(matches!(c, Change::Binary));
        let c = change(&t("none", b"xyz"), &pat, "b", &mut buf).unwrap();
        assert!(matches!(c, Change::Unchanged));
        let c = change(&t("same", b"a"), &pat, "a", &mut buf).unwrap();
        assert!(matches!(c, Change::Unchanged), "a no-op is not a change");
        match change(&t("yes", b"caat aa\n"), &pat, "b", &mut buf).unwrap() {
            Change::Replaced { data, count } => {
                assert_eq!((&data[..], count), (&b"cbt b\n"[..], 2));
            }
            _ => panic!("replaced"),
        }
        assert_eq!(
            check(&d).err().map(|f| f.code),
            Some(ErrorCode::IsADirectory)
        );
        assert_eq!(
            check(&d.join("missing")).err().map(|f| f.code),
            Some(ErrorCode::NotFound)
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
