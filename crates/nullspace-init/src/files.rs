//! File operations for the host: `stat`, `list_dir`, chunked `read_file`
//! and `write_file`, `make_dir`, `remove`, `rename`, `chmod`; and what the
//! other file modules (`search`, `replace`) share: paths and identity.
//!
//! Each runs as a user (the request's, else the runtime default user): the
//! request thread switches its own effective uid, gid and groups (Linux
//! credentials are per thread at the syscall level), so the kernel checks
//! permissions and new files get that owner; the thread switches back to
//! root before it answers. No other thread is affected, and the request
//! thread starts no thread while switched (a new thread would inherit the
//! identity).
//!
//! Relative paths resolve against the runtime default workdir (else `/`).

use crate::agent::{Failure, Outcome, Resp};
use crate::procs::State;
use crate::users::{self, Names};
use nullspace_model::agent::{
    DEFAULT_MAX_ENTRIES, ErrorCode, Event, FileInfo, FileKind, LIST_BATCH, MAX_CHUNK, MAX_DEPTH,
    MAX_ENTRIES, NAME_MAX, PATH_MAX, WriteFileSpec,
};
use rustix::process::{Gid, Uid};
use std::fs::Metadata;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// The thread's identity switched to a user's until dropped.
pub(crate) struct AsUser {
    switched: bool,
}

impl AsUser {
    pub(crate) fn switch(state: &State, user: Option<&str>) -> Result<AsUser, Failure> {
        let default = state.defaults.lock().unwrap().user.clone();
        let spec = user
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .or(default.as_deref());
        let id = users::resolve(spec).map_err(Failure::bad)?;
        if id.uid == 0 && id.gid == 0 {
            return Ok(AsUser { switched: false });
        }
        let groups: Vec<Gid> = id.groups.iter().map(|g| Gid::from_raw(*g)).collect();
        let fail = |what: &str, e: rustix::io::Errno| {
            Failure::new(
                ErrorCode::Io,
                format!("switching to user {spec:?}: {what}: {e}"),
            )
        };
        let guard = AsUser { switched: true };
        // Effective ids only: the saved ids stay root, so the switch back is
        // allowed (and the permitted capabilities are kept).
        rustix::thread::set_thread_groups(&groups).map_err(|e| fail("setgroups", e))?;
        rustix::thread::set_thread_res_gid(None, Gid::from_raw(id.gid), None)
            .map_err(|e| fail("setresgid", e))?;
        rustix::thread::set_thread_res_uid(None, Uid::from_raw(id.uid), None)
            .map_err(|e| fail("setresuid", e))?;
        Ok(guard)
    }
}

impl Drop for AsUser {
    fn drop(&mut self) {
        if !self.switched {
            return;
        }
        let back = rustix::thread::set_thread_res_uid(None, Uid::ROOT, None)
            .and_then(|_| rustix::thread::set_thread_res_gid(None, Gid::ROOT, None))
            .and_then(|_| rustix::thread::set_thread_groups(&[]));
        if let Err(e) = back {
            // A thread that cannot become root again must not serve more.
            crate::log(&format!(
                "agent: switching a request thread back to root: {e}"
            ));
            std::process::abort();
        }
    }
}

/// The user a file op runs as, by the name it was given (the request's,
/// else the runtime default, else root).
fn user_name(state: &State, user: Option<&str>) -> String {
    match user.map(str::trim).filter(|u| !u.is_empty()) {
        Some(u) => u.to_string(),
        None => state
            .defaults
            .lock()
            .unwrap()
            .user
            .clone()
            .unwrap_or_else(|| "root".into()),
    }
}

/// A file op's failure that depends on who asked names the user (the
/// message names the path already): "…: Permission denied (as user app)".
pub fn naming_user(state: &State, user: Option<&str>, out: Outcome) -> Outcome {
    out.map_err(|mut f| {
        let about_files = matches!(
            f.code,
            ErrorCode::PermissionDenied
                | ErrorCode::NotFound
                | ErrorCode::AlreadyExists
                | ErrorCode::NotADirectory
                | ErrorCode::IsADirectory
                | ErrorCode::DirectoryNotEmpty
                | ErrorCode::FileTooLarge
        );
        if about_files {
            f.message = format!("{} (as user {})", f.message, user_name(state, user));
        }
        f
    })
}

/// `path` made absolute (against the default workdir) and normalised
/// lexically (`.`, `..`, repeated slashes), without resolving symlinks.
/// Refuses a NUL byte (`bad_request`) and a path or name over the kernel's
/// limits (`name_too_long`) before any system call sees them.
pub(crate) fn absolute(state: &State, path: &str) -> Result<PathBuf, Failure> {
    check_path(path)?;
    let base = if path.starts_with('/') {
        PathBuf::from("/")
    } else {
        PathBuf::from(
            state
                .defaults
                .lock()
                .unwrap()
                .workdir
                .clone()
                .unwrap_or_else(|| "/".into()),
        )
    };
    let mut out = PathBuf::from("/");
    for c in base.join(path).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    if out.as_os_str().len() > PATH_MAX {
        return Err(Failure::new(
            ErrorCode::NameTooLong,
            format!(
                "{}...: the path is longer than {PATH_MAX} bytes",
                crate::agent::clip(&display(&out), 64)
            ),
        ));
    }
    Ok(out)
}

/// The checks of a path as sent, before it is resolved.
fn check_path(path: &str) -> Result<(), Failure> {
    if path.is_empty() {
        return Err(Failure::bad("empty path"));
    }
    if path.contains('\0') {
        return Err(Failure::bad(format!(
            "{:?}: the path contains a NUL byte",
            crate::agent::clip(path, 256)
        )));
    }
    if path.len() > PATH_MAX {
        return Err(Failure::new(
            ErrorCode::NameTooLong,
            format!(
                "{}...: the path has {} bytes, more than {PATH_MAX}",
                crate::agent::clip(path, 64),
                path.len()
            ),
        ));
    }
    if let Some(long) = path.split('/').find(|n| n.len() > NAME_MAX) {
        return Err(Failure::new(
            ErrorCode::NameTooLong,
            format!(
                "{}...: a name of {} bytes in the path, more than {NAME_MAX}",
                crate::agent::clip(long, 64),
                long.len()
            ),
        ));
    }
    Ok(())
}

pub(crate) fn display(p: &Path) -> String {
    p.to_string_lossy().to_string()
}

/// `ls -l` mode string.
fn permissions(kind: char, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(kind);
    let bit = |m: u32, c: char| if mode & m != 0 { c } else { '-' };
    let special = |x: u32, sp: u32, set: char| match (mode & x != 0, mode & sp != 0) {
        (true, true) => set,
        (false, true) => set.to_ascii_uppercase(),
        (true, false) => 'x',
        (false, false) => '-',
    };
    s.push(bit(0o400, 'r'));
    s.push(bit(0o200, 'w'));
    s.push(special(0o100, 0o4000, 's'));
    s.push(bit(0o040, 'r'));
    s.push(bit(0o020, 'w'));
    s.push(special(0o010, 0o2000, 's'));
    s.push(bit(0o004, 'r'));
    s.push(bit(0o002, 'w'));
    s.push(special(0o001, 0o1000, 't'));
    s
}

fn type_char(md: &Metadata) -> char {
    use std::os::unix::fs::FileTypeExt;
    let t = md.file_type();
    if t.is_dir() {
        'd'
    } else if t.is_symlink() {
        'l'
    } else if t.is_fifo() {
        'p'
    } else if t.is_socket() {
        's'
    } else if t.is_char_device() {
        'c'
    } else if t.is_block_device() {
        'b'
    } else {
        '-'
    }
}

/// The SDK-shaped metadata of `path` (not following a final symlink for
/// `symlink_target`, following it for type, size and mode).
pub(crate) fn file_info(path: &Path, names: &Names) -> std::io::Result<FileInfo> {
    let lmd = std::fs::symlink_metadata(path)?;
    let (md, target) = if lmd.file_type().is_symlink() {
        let target = std::fs::read_link(path).ok().map(|t| display(&t));
        (std::fs::metadata(path).ok(), target)
    } else {
        (None, None)
    };
    let resolved = md.as_ref().unwrap_or(&lmd);
    let kind = if resolved.is_dir() {
        FileKind::Dir
    } else if resolved.is_file() {
        FileKind::File
    } else if resolved.file_type().is_symlink() {
        FileKind::Symlink
    } else {
        FileKind::Other
    };
    let mtime = std::time::UNIX_EPOCH
        + std::time::Duration::new(lmd.mtime().max(0) as u64, lmd.mtime_nsec().max(0) as u32);
    Ok(FileInfo {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "/".into()),
        path: display(path),
        is_dir: kind == FileKind::Dir,
        size: resolved.len(),
        kind,
        mode: format!("{:04o}", resolved.mode() & 0o7777),
        permissions: permissions(type_char(&lmd), resolved.mode()),
        owner: names.user(lmd.uid()),
        group: names.group(lmd.gid()),
        modified_time: humantime::format_rfc3339_seconds(mtime).to_string(),
        symlink_target: target,
    })
}

pub fn stat(state: &State, path: &str, user: Option<&str>) -> Outcome {
    let p = absolute(state, path)?;
    let names = Names::load();
    let _as = AsUser::switch(state, user)?;
    let info = file_info(&p, &names).map_err(|e| Failure::io(&display(&p), e))?;
    Ok(Event::File { info })
}

/// `list_dir`: depth-first, parents before children, names sorted, in
/// batches of `LIST_BATCH` entries (flow-controlled).
pub fn list_dir(
    state: &State,
    resp: &Resp,
    path: &str,
    depth: u32,
    user: Option<&str>,
    max_entries: Option<u32>,
) -> Outcome {
    let root = absolute(state, path)?;
    if depth == 0 || depth > MAX_DEPTH {
        return Err(Failure::bad(format!("depth must be 1..={MAX_DEPTH}")));
    }
    let max = max_entries.unwrap_or(DEFAULT_MAX_ENTRIES).min(MAX_ENTRIES) as usize;
    let names = Names::load();
    let _as = AsUser::switch(state, user)?;
    let md = std::fs::metadata(&root).map_err(|e| Failure::io(&display(&root), e))?;
    if !md.is_dir() {
        return Err(Failure::new(
            ErrorCode::NotADirectory,
            format!("{}: not a directory", display(&root)),
        ));
    }
    // The top directory must be readable; unreadable subdirectories are
    // listed but not entered.
    let top = std::fs::read_dir(&root).map_err(|e| Failure::io(&display(&root), e))?;
    let mut batch = Vec::with_capacity(LIST_BATCH);
    let mut count = 0usize;
    let mut truncated = false;
    // (directory iterator's sorted names, depth of its entries)
    let mut stack: Vec<(std::vec::IntoIter<PathBuf>, u32)> = vec![(sorted(top), 1)];
    while let Some((iter, d)) = stack.last_mut() {
        let d = *d;
        let Some(p) = iter.next() else {
            stack.pop();
            continue;
        };
        if count >= max {
            truncated = true;
            break;
        }
        let Ok(info) = file_info(&p, &names) else {
            continue; // gone meanwhile
        };
        let descend = d < depth && std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir());
        count += 1;
        batch.push(info);
        if batch.len() >= LIST_BATCH
            && !resp.send_stream(Event::Entries {
                entries: std::mem::take(&mut batch),
            })
        {
            return Err(Failure::new(ErrorCode::Cancelled, "host gone"));
        }
        if descend && let Ok(rd) = std::fs::read_dir(&p) {
            stack.push((sorted(rd), d + 1));
        }
    }
    if !batch.is_empty() && !resp.send_stream(Event::Entries { entries: batch }) {
        return Err(Failure::new(ErrorCode::Cancelled, "host gone"));
    }
    Ok(Event::ListEnd { truncated })
}

fn sorted(rd: std::fs::ReadDir) -> std::vec::IntoIter<PathBuf> {
    let mut v: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    v.sort();
    v.into_iter()
}

pub fn read(state: &State, path: &str, offset: u64, length: u64, user: Option<&str>) -> Outcome {
    let p = absolute(state, path)?;
    let want = (length as usize).min(MAX_CHUNK);
    let _as = AsUser::switch(state, user)?;
    let name = display(&p);
    let mut f = std::fs::File::open(&p).map_err(|e| Failure::io(&name, e))?;
    let md = f.metadata().map_err(|e| Failure::io(&name, e))?;
    if md.is_dir() {
        return Err(Failure::new(
            ErrorCode::IsADirectory,
            format!("{name}: is a directory"),
        ));
    }
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| Failure::io(&name, e))?;
    let mut data = Vec::with_capacity(want);
    (&mut f)
        .take(want as u64)
        .read_to_end(&mut data)
        .map_err(|e| Failure::io(&name, e))?;
    let size = md.len();
    Ok(Event::Data {
        eof: data.len() < want || offset + data.len() as u64 >= size,
        size,
        data,
    })
}

pub fn write(state: &State, spec: &WriteFileSpec) -> Outcome {
    let p = absolute(state, &spec.path)?;
    let name = display(&p);
    if spec.data.len() > MAX_CHUNK {
        return Err(Failure::bad(format!(
            "{name}: at most {MAX_CHUNK} bytes per write_file request"
        )));
    }
    let _as = AsUser::switch(state, spec.user.as_deref())?;
    if spec.parents
        && let Some(parent) = p.parent()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|e| Failure::io(&display(parent), e))?;
    }
    let mode = spec.mode.unwrap_or(0o644);
    let mut f = std::fs::File::options()
        .write(true)
        .create(true)
        .append(spec.offset.is_none() && !spec.truncate)
        .truncate(spec.truncate)
        .mode(mode)
        .open(&p)
        .map_err(|e| Failure::io(&name, e))?;
    if let Some(off) = spec.offset {
        f.seek(SeekFrom::Start(off))
            .map_err(|e| Failure::io(&name, e))?;
    }
    f.write_all(&spec.data).map_err(|e| Failure::io(&name, e))?;
    if spec.exact_mode {
        // The mode as given, not reduced by the umask (and also on an
        // existing file).
        f.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
            .map_err(|e| Failure::io(&format!("chmod {name}"), e))?;
    }
    Ok(Event::Written {
        bytes: spec.data.len() as u64,
    })
}

pub fn make_dir(
    state: &State,
    path: &str,
    mode: Option<u32>,
    parents: bool,
    user: Option<&str>,
) -> Outcome {
    let p = absolute(state, path)?;
    let name = display(&p);
    let _as = AsUser::switch(state, user)?;
    if let Ok(md) = std::fs::metadata(&p) {
        return if md.is_dir() {
            Ok(Event::Made { created: false })
        } else {
            Err(Failure::new(
                ErrorCode::AlreadyExists,
                format!("{name}: exists and is not a directory"),
            ))
        };
    }
    std::fs::DirBuilder::new()
        .recursive(parents)
        .mode(mode.unwrap_or(0o755))
        .create(&p)
        .map_err(|e| Failure::io(&name, e))?;
    Ok(Event::Made { created: true })
}

pub fn remove(state: &State, path: &str, recursive: bool, user: Option<&str>) -> Outcome {
    let p = absolute(state, path)?;
    let name = display(&p);
    if p == Path::new("/") {
        return Err(Failure::bad("refusing to remove /"));
    }
    let _as = AsUser::switch(state, user)?;
    let md = std::fs::symlink_metadata(&p).map_err(|e| Failure::io(&name, e))?;
    let r = if md.is_dir() {
        if recursive {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_dir(&p)
        }
    } else {
        std::fs::remove_file(&p)
    };
    r.map_err(|e| Failure::io(&name, e))?;
    Ok(Event::Ok)
}

pub fn rename(state: &State, from: &str, to: &str, user: Option<&str>) -> Outcome {
    let (a, b) = (absolute(state, from)?, absolute(state, to)?);
    let names = Names::load();
    let _as = AsUser::switch(state, user)?;
    std::fs::rename(&a, &b)
        .map_err(|e| Failure::io(&format!("rename {} to {}", display(&a), display(&b)), e))?;
    let info = file_info(&b, &names).map_err(|e| Failure::io(&display(&b), e))?;
    Ok(Event::File { info })
}

pub fn chmod(state: &State, path: &str, mode: u32, user: Option<&str>) -> Outcome {
    let p = absolute(state, path)?;
    if mode > 0o7777 {
        return Err(Failure::bad(format!(
            "mode {mode:o} is not a permission mode"
        )));
    }
    let _as = AsUser::switch(state, user)?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Failure::io(&format!("chmod {}", display(&p)), e))?;
    Ok(Event::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked_before_use() {
        assert!(check_path("/srv/a.txt").is_ok());
        let e = check_path("/tmp/a\0b").unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.contains("NUL"), "{}", e.message);
        let e = check_path(&format!("/tmp/{}", "n".repeat(NAME_MAX + 1))).unwrap_err();
        assert_eq!(e.code, ErrorCode::NameTooLong);
        assert!(e.message.contains("256 bytes"), "{}", e.message);
        assert!(check_path(&format!("/tmp/{}", "n".repeat(NAME_MAX))).is_ok());
        let deep = "/abc".repeat(PATH_MAX / 4 + 1);
        let e = check_path(&deep).unwrap_err();
        assert_eq!(e.code, ErrorCode::NameTooLong);
        assert!(check_path("").is_err());
    }

    #[test]
    fn permission_strings() {
        assert_eq!(permissions('-', 0o644), "-rw-r--r--");
        assert_eq!(permissions('d', 0o1777), "drwxrwxrwt");
        assert_eq!(permissions('-', 0o4755), "-rwsr-xr-x");
        assert_eq!(permissions('-', 0o2644), "-rw-r-Sr--");
    }
}
