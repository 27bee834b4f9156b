//! A volume's ext4 image on the host (`mkfs.ext4`) and its files while no
//! machine has it attached (`debugfs`, e2fsprogs, in a child process).
//!
//! Why `debugfs` and not a utility machine or a loop mount: the image was
//! written by a guest, so it is hostile input. A loop mount would have the
//! host kernel parse it (never). A utility machine (restore a small
//! template with the volume on a spare, then the agent's file operations)
//! is the safest parser but costs a restore (about a second under TCG, the
//! guest's memory) per call and needs a template with spare disks.
//! `debugfs` parses it in user space, in a short-lived child with a time
//! limit and an output cap, run only while the server's own lock says no
//! machine writes the image. It offers what `Volume.files` needs: read,
//! write, list, stat, mkdir, remove.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Most bytes of `debugfs` output read (a listing of a huge directory, a
/// large file): beyond it the call fails rather than grow.
pub const MAX_OUTPUT: usize = 64 << 20;
/// A `debugfs` call that takes longer is killed.
const CALL_LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("volume image {0}: {1}")]
    Tool(String, String),
    #[error("volume path {path:?}: {rule}")]
    BadPath { path: String, rule: &'static str },
    #[error("volume path {0}: not found")]
    NotFound(String),
    #[error("volume path {0}: is a directory")]
    IsADirectory(String),
    #[error("volume path {0}: directory not empty (remove its entries first)")]
    NotEmpty(String),
    #[error("volume path {0}: the volume is full (nothing was written)")]
    Full(String),
    #[error("volume path {0}: output over {MAX_OUTPUT} bytes")]
    TooLarge(String),
    #[error("volume image {0}: {1}")]
    Io(String, std::io::Error),
}

/// One entry, as `debugfs ls -p` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    /// Absolute in the volume.
    pub path: String,
    /// `st_mode` (type and permission bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
}

impl Entry {
    pub fn is_dir(&self) -> bool {
        self.mode & 0o170000 == 0o040000
    }
    pub fn is_symlink(&self) -> bool {
        self.mode & 0o170000 == 0o120000
    }
}

/// Blocks and inodes in use (the superblock's counts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub used_bytes: u64,
    pub inodes_used: u64,
}

/// Makes a sparse raw image of `size` bytes at `path` (must not exist)
/// with an empty ext4 whose root is world-writable and sticky (like
/// /tmp), so any guest user can use a fresh volume.
pub fn create(path: &Path, size: u64) -> Result<(), ImageError> {
    let shown = path.display().to_string();
    let f = std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| ImageError::Io(shown.clone(), e))?;
    f.set_len(size)
        .map_err(|e| ImageError::Io(shown.clone(), e))?;
    drop(f);
    tool(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096", "-m", "0", "-L", "nullspace-vol"])
            .arg(path),
        &shown,
    )?;
    debugfs(path, true, "sif / mode 041777")?;
    Ok(())
}

fn tool(cmd: &mut Command, shown: &str) -> Result<Vec<u8>, ImageError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ImageError::Io(format!("{shown} (install e2fsprogs)"), e))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(ImageError::Tool(
            shown.to_string(),
            err.lines()
                .last()
                .unwrap_or("failed")
                .chars()
                .take(300)
                .collect(),
        ));
    }
    Ok(out.stdout)
}

/// Runs one `debugfs` request; stdout (at most [`MAX_OUTPUT`]) and the
/// first line of stderr that is not its banner.
fn debugfs(img: &Path, write: bool, req: &str) -> Result<(Vec<u8>, String), ImageError> {
    let shown = img.display().to_string();
    let mut cmd = Command::new("debugfs");
    if write {
        cmd.arg("-w");
    }
    let mut child = cmd
        .arg("-R")
        .arg(req)
        .arg(img)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| ImageError::Io(format!("{shown}: debugfs (install e2fsprogs)"), e))?;
    let mut stderr = child.stderr.take();
    let err_thread = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(e) = stderr.as_mut() {
            let _ = e.take(64 << 10).read_to_end(&mut s);
        }
        s
    });
    let mut stdout = child.stdout.take();
    let out_thread = std::thread::spawn(move || {
        let mut out = Vec::new();
        let r = stdout
            .as_mut()
            .map(|o| o.take(MAX_OUTPUT as u64 + 1).read_to_end(&mut out));
        (out, r)
    });
    // A crafted image must not hold the call: killed at the time limit.
    // A huge answer stops at the cap: the reader then closes the pipe and
    // the child ends on its next write.
    let t0 = std::time::Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if t0.elapsed() < CALL_LIMIT => {
                std::thread::sleep(Duration::from_millis(5));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let (out, read) = out_thread.join().unwrap_or_default();
    let err = err_thread.join().unwrap_or_default();
    if out.len() > MAX_OUTPUT {
        return Err(ImageError::TooLarge(req.to_string()));
    }
    if let Some(Err(e)) = read {
        return Err(ImageError::Io(shown, e));
    }
    match status {
        Some(s) if s.success() => {}
        _ => {
            return Err(ImageError::Tool(
                shown,
                "debugfs failed or was killed (time limit)".to_string(),
            ));
        }
    }
    let err = String::from_utf8_lossy(&err);
    let msg = err
        .lines()
        .find(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
        .unwrap_or("")
        .to_string();
    Ok((out, msg))
}

/// A volume path as `debugfs` takes it: absolute, normalised, quoted. A
/// `"` or a control character cannot be expressed in its command
/// language, so such paths are refused.
pub fn clean(path: &str) -> Result<String, ImageError> {
    let bad = |rule| ImageError::BadPath {
        path: path.chars().take(200).collect(),
        rule,
    };
    if path.chars().any(|c| c == '"' || c.is_control()) {
        return Err(bad("no quotes or control characters"));
    }
    let mut parts = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(bad("no '..'")),
            c if c.len() > 255 => return Err(bad("a name is at most 255 bytes")),
            c => parts.push(c),
        }
    }
    let p = format!("/{}", parts.join("/"));
    if p.len() > 4096 {
        return Err(bad("at most 4096 bytes"));
    }
    Ok(p)
}

fn parent_and_name(p: &str) -> (&str, &str) {
    match p.rfind('/') {
        Some(0) => ("/", &p[1..]),
        Some(i) => (&p[..i], &p[i + 1..]),
        None => ("/", p),
    }
}

/// The entries of directory `dir` (without `.` and `..`).
pub fn list(img: &Path, dir: &str) -> Result<Vec<Entry>, ImageError> {
    let dir = clean(dir)?;
    match stat(img, &dir)? {
        Some(e) if e.is_dir() => {}
        Some(_) => {
            return Err(ImageError::BadPath {
                path: dir,
                rule: "not a directory",
            });
        }
        None => return Err(ImageError::NotFound(dir)),
    }
    let (out, _) = debugfs(img, false, &format!("ls -p \"{dir}\""))?;
    Ok(parse_ls(&dir, &out)
        .into_iter()
        .filter(|e| e.name != "." && e.name != "..")
        .collect())
}

/// `ls -p` lines: `/inode/mode/uid/gid/name/size/` (a name never has a
/// `/`; a line that does not parse, e.g. half of a name with a newline,
/// is skipped).
fn parse_ls(dir: &str, out: &[u8]) -> Vec<Entry> {
    let text = String::from_utf8_lossy(out);
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('/').collect();
            if f.len() != 8 || !f[0].is_empty() || !f[7].is_empty() {
                return None;
            }
            let name = f[5].to_string();
            let path = if dir == "/" {
                format!("/{name}")
            } else {
                format!("{dir}/{name}")
            };
            Some(Entry {
                mode: u32::from_str_radix(f[2], 8).ok()?,
                uid: f[3].parse().ok()?,
                gid: f[4].parse().ok()?,
                size: f[6].parse().unwrap_or(0),
                name,
                path,
            })
        })
        .collect()
}

/// The entry at `path` (its parent's listing), `None` when missing.
pub fn stat(img: &Path, path: &str) -> Result<Option<Entry>, ImageError> {
    let p = clean(path)?;
    if p == "/" {
        let (out, _) = debugfs(img, false, "ls -p /")?;
        return Ok(parse_ls("/", &out)
            .into_iter()
            .find(|e| e.name == ".")
            .map(|e| Entry {
                name: "/".into(),
                path: "/".into(),
                ..e
            }));
    }
    let (parent, name) = parent_and_name(&p);
    let (out, _) = debugfs(img, false, &format!("ls -p \"{parent}\""))?;
    Ok(parse_ls(parent, &out).into_iter().find(|e| e.name == name))
}

/// A regular file's bytes (at most [`MAX_OUTPUT`]).
pub fn read(img: &Path, path: &str) -> Result<Vec<u8>, ImageError> {
    let p = clean(path)?;
    match stat(img, &p)? {
        None => Err(ImageError::NotFound(p)),
        Some(e) if e.is_dir() => Err(ImageError::IsADirectory(p)),
        Some(e) if e.size > MAX_OUTPUT as u64 => Err(ImageError::TooLarge(p)),
        Some(_) => Ok(debugfs(img, false, &format!("cat \"{p}\""))?.0),
    }
}

/// Creates the directories of `path` that are missing.
pub fn make_dirs(img: &Path, path: &str) -> Result<bool, ImageError> {
    let p = clean(path)?;
    let mut cur = String::new();
    let mut created = false;
    for part in p.split('/').filter(|s| !s.is_empty()) {
        cur.push('/');
        cur.push_str(part);
        match stat(img, &cur)? {
            Some(e) if e.is_dir() => continue,
            Some(_) => {
                return Err(ImageError::BadPath {
                    path: cur,
                    rule: "a parent is not a directory",
                });
            }
            None => {
                let (_, err) = debugfs(img, true, &format!("mkdir \"{cur}\""))?;
                if !err.is_empty() {
                    return Err(ImageError::Tool(cur, err));
                }
                created = true;
            }
        }
    }
    Ok(created)
}

/// Writes `data` as the regular file `path` (replacing one), creating
/// its parent directories; mode 0644, owned by root.
pub fn write(img: &Path, path: &str, data: &[u8], spool: &Path) -> Result<Entry, ImageError> {
    let p = clean(path)?;
    if p == "/" {
        return Err(ImageError::IsADirectory(p));
    }
    let (parent, _) = parent_and_name(&p);
    make_dirs(img, parent)?;
    match stat(img, &p)? {
        Some(e) if e.is_dir() => return Err(ImageError::IsADirectory(p)),
        Some(_) => {
            debugfs(img, true, &format!("rm \"{p}\""))?;
        }
        None => {}
    }
    let mut tmp = tempfile::Builder::new()
        .prefix("volume-write-")
        .tempfile_in(spool)
        .map_err(|e| ImageError::Io(spool.display().to_string(), e))?;
    tmp.write_all(data)
        .and_then(|_| tmp.flush())
        .map_err(|e| ImageError::Io(spool.display().to_string(), e))?;
    let local: PathBuf = tmp.path().to_path_buf();
    let (_, err) = debugfs(img, true, &format!("write \"{}\" \"{p}\"", local.display()))?;
    if !err.is_empty() {
        // debugfs leaves the inode of a write it could not finish (a full
        // volume: "Could not allocate block"): no partial file stays.
        let _ = debugfs(img, true, &format!("rm \"{p}\""));
        return Err(if err.contains("Could not allocate") {
            ImageError::Full(p)
        } else {
            ImageError::Tool(p, err)
        });
    }
    debugfs(img, true, &format!("sif \"{p}\" mode 0100644"))?;
    stat(img, &p)?.ok_or(ImageError::NotFound(p))
}

/// Removes a file or an empty directory.
pub fn remove(img: &Path, path: &str) -> Result<(), ImageError> {
    let p = clean(path)?;
    if p == "/" {
        return Err(ImageError::BadPath {
            path: p,
            rule: "the volume's root cannot be removed",
        });
    }
    let e = stat(img, &p)?.ok_or_else(|| ImageError::NotFound(p.clone()))?;
    // debugfs's rmdir refuses a directory with entries: say so as the
    // caller's mistake, not the tool's failure.
    if e.is_dir() && !list(img, &p)?.is_empty() {
        return Err(ImageError::NotEmpty(p));
    }
    let req = if e.is_dir() {
        format!("rmdir \"{p}\"")
    } else {
        format!("rm \"{p}\"")
    };
    let (_, err) = debugfs(img, true, &req)?;
    if !err.is_empty() {
        return Err(ImageError::Tool(p, err));
    }
    Ok(())
}

/// Space and inodes in use, from the superblock (`dumpe2fs -h`).
pub fn usage(img: &Path) -> Result<Usage, ImageError> {
    let out = tool(
        Command::new("dumpe2fs").arg("-h").arg(img),
        &img.display().to_string(),
    )?;
    let text = String::from_utf8_lossy(&out);
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim_start_matches(':').trim().parse().ok())
            .unwrap_or(0)
    };
    let bs = field("Block size");
    Ok(Usage {
        used_bytes: field("Block count").saturating_sub(field("Free blocks")) * bs,
        inodes_used: field("Inode count").saturating_sub(field("Free inodes")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_cleaned_or_refused() {
        assert_eq!(clean("a//b/./c").unwrap(), "/a/b/c");
        assert_eq!(clean("/").unwrap(), "/");
        assert!(clean("/a/../b").is_err());
        assert!(clean("/a\"b").is_err());
        assert!(clean("/a\nb").is_err());
    }

    #[test]
    fn files_round_trip_through_debugfs() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("volume.raw");
        create(&img, 32 << 20).unwrap();
        assert_eq!(std::fs::metadata(&img).unwrap().len(), 32 << 20);
        let e = write(&img, "/docs/a b.txt", b"hello", d.path()).unwrap();
        assert_eq!((e.size, e.mode & 0o7777), (5, 0o644));
        assert_eq!(read(&img, "docs/a b.txt").unwrap(), b"hello");
        write(&img, "/docs/a b.txt", b"bye", d.path()).unwrap();
        assert_eq!(read(&img, "/docs/a b.txt").unwrap(), b"bye");
        let names: Vec<String> = list(&img, "/docs")
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["a b.txt"]);
        assert!(stat(&img, "/docs").unwrap().unwrap().is_dir());
        assert!(matches!(read(&img, "/nope"), Err(ImageError::NotFound(_))));
        assert!(matches!(
            read(&img, "/docs"),
            Err(ImageError::IsADirectory(_))
        ));
        assert_eq!(stat(&img, "/").unwrap().unwrap().mode, 0o41777);
        assert!(matches!(
            remove(&img, "/docs"),
            Err(ImageError::NotEmpty(_))
        ));
        assert!(matches!(remove(&img, "/"), Err(ImageError::BadPath { .. })));
        remove(&img, "/docs/a b.txt").unwrap();
        assert!(stat(&img, "/docs/a b.txt").unwrap().is_none());
        remove(&img, "/docs").unwrap();
        assert!(stat(&img, "/docs").unwrap().is_none());
        // More than the volume holds: refused, and nothing left of it.
        let big = vec![7u8; 40 << 20];
        assert!(matches!(
            write(&img, "/big.bin", &big, d.path()),
            Err(ImageError::Full(_))
        ));
        assert!(stat(&img, "/big.bin").unwrap().is_none());
        let u = usage(&img).unwrap();
        assert!(u.used_bytes > 0 && u.inodes_used >= 11, "{u:?}");
    }
}
