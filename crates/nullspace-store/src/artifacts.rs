//! A content-addressed artifact store: `DIR/sha256/<hex>`, written through a
//! temporary file and renamed, so a reader never sees a partial artifact.
//! Commits are durable: the file is fsynced before the rename and the
//! directory after it, so a crash never leaves a named but empty artifact.
//!
//! What the garbage collector may remove is decided by references and
//! leases, never by file age (containerd's rule):
//!
//! - Every commit and every lease happens under a shared lock on
//!   `DIR/collect.lock` ([`Artifacts::writing`]); the collector holds it
//!   exclusively ([`Artifacts::collecting`]) from its listing to its last
//!   removal, so nothing appears or is leased between its mark and sweep.
//! - A lease (`DIR/leases/<holder>/<resource>`) keeps an artifact or a
//!   snapshot for a holder (a running build) that no record references
//!   yet. The collector honours the leases of live holders and removes the
//!   rest: a holder that ended references what it keeps, or keeps nothing.
//! - A spool (`DIR/tmp/*`) is locked exclusively by its writer for as long
//!   as it is written; a spool nobody holds is a crash's leftover.
//!
//! The locks are `flock(2)` locks, so they hold across the processes that
//! share a data directory and vanish with a process that dies.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use nullspace_digest::{Digest, Hasher};

#[derive(Debug, Clone)]
pub struct Artifacts {
    root: PathBuf,
}

/// What a lease keeps: an artifact, or a snapshot directory by name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Leased {
    Artifact(Digest),
    Snapshot(String),
}

impl Leased {
    fn file_name(&self) -> String {
        match self {
            Leased::Artifact(d) => {
                let (alg, hex) = d.path_components();
                format!("{alg}-{hex}")
            }
            Leased::Snapshot(name) => format!("snapshot-{name}"),
        }
    }

    fn from_file_name(s: &str) -> Option<Leased> {
        if let Some(name) = s.strip_prefix("snapshot-") {
            return safe_name(name).then(|| Leased::Snapshot(name.to_string()));
        }
        let (alg, hex) = s.split_once('-')?;
        Digest::parse(&format!("{alg}:{hex}"))
            .ok()
            .map(Leased::Artifact)
    }
}

/// Holders and snapshot names become file names: one path component of
/// ids, never `.`/`..` or a separator.
fn safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

fn invalid(what: &str, name: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{what} {name:?}: not a plain id (letters, digits, `_`, `-`, `.`)"),
    )
}

impl Artifacts {
    pub fn open(root: &Path) -> io::Result<Artifacts> {
        fs::create_dir_all(root.join("sha256"))?;
        fs::create_dir_all(root.join("tmp"))?;
        fs::create_dir_all(root.join("leases"))?;
        Ok(Artifacts {
            root: root.to_path_buf(),
        })
    }

    pub fn path(&self, d: &Digest) -> PathBuf {
        let (alg, hex) = d.path_components();
        self.root.join(alg).join(hex)
    }

    pub fn contains(&self, d: &Digest) -> bool {
        self.path(d).is_file()
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn lock_file(&self) -> io::Result<fs::File> {
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join("collect.lock"))
    }

    /// The right to commit and lease (blocks while a collection runs).
    pub fn writing(&self) -> io::Result<Writing> {
        let lock = self.lock_file()?;
        lock.lock_shared()?;
        Ok(Writing {
            store: self.clone(),
            _lock: lock,
        })
    }

    /// The collector's exclusive hold (blocks until writers are done).
    pub fn collecting(&self) -> io::Result<Collecting> {
        let lock = self.lock_file()?;
        lock.lock()?;
        Ok(Collecting { _lock: lock })
    }

    /// A new spool in `tmp/`, held by this process until dropped (when it
    /// is removed) or committed. `hint` names it for a reader of `tmp/`.
    pub fn spool(&self, hint: &str) -> io::Result<Spool> {
        use rand::Rng as _;
        if !safe_name(hint) {
            return Err(invalid("spool", hint));
        }
        let n: u64 = rand::rng().random();
        let path = self.tmp_dir().join(format!("{hint}-{n:016x}"));
        let file = fs::OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)?;
        file.lock()?;
        Ok(Spool {
            path: Some(path),
            file,
        })
    }

    /// True when a live process holds the spool at `p` (see [`Self::spool`]).
    pub fn spool_in_use(p: &Path) -> bool {
        crate::inflight::is_held(p)
    }

    /// Every lease, by holder. Unreadable entries are skipped: a lease this
    /// version cannot parse keeps nothing.
    pub fn leases(&self) -> io::Result<BTreeMap<String, Vec<Leased>>> {
        let mut out = BTreeMap::new();
        for holder in fs::read_dir(self.root.join("leases"))? {
            let holder = holder?;
            let name = holder.file_name().to_string_lossy().into_owned();
            let mut kept = vec![];
            for e in fs::read_dir(holder.path())?.flatten() {
                if let Some(l) = Leased::from_file_name(&e.file_name().to_string_lossy()) {
                    kept.push(l);
                }
            }
            kept.sort();
            out.insert(name, kept);
        }
        Ok(out)
    }

    /// Ends every lease of `holder`.
    pub fn release(&self, holder: &str) -> io::Result<()> {
        if !safe_name(holder) {
            return Err(invalid("lease holder", holder));
        }
        match fs::remove_dir_all(self.root.join("leases").join(holder)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Makes `f` (at `from`) durable and names it `d`.
    fn commit(&self, f: &fs::File, from: &Path, d: &Digest) -> io::Result<()> {
        f.sync_all()?;
        let to = self.path(d);
        fs::rename(from, &to)?;
        fs::File::open(to.parent().unwrap_or(&self.root))?.sync_all()
    }
}

/// Held while committing and leasing; see the module docs.
#[derive(Debug)]
pub struct Writing {
    store: Artifacts,
    _lock: fs::File,
}

/// Held by the collector; see the module docs.
#[derive(Debug)]
pub struct Collecting {
    _lock: fs::File,
}

impl Writing {
    /// Stores the bytes `r` yields and returns their digest.
    pub fn put(&self, mut r: impl Read) -> io::Result<(Digest, u64)> {
        let mut spool = self.store.spool("put")?;
        let mut hasher = Hasher::new(nullspace_digest::Algorithm::Sha256);
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        {
            let mut w = io::BufWriter::with_capacity(1 << 20, &spool.file);
            loop {
                let k = r.read(&mut buf)?;
                if k == 0 {
                    break;
                }
                hasher.update(&buf[..k]);
                w.write_all(&buf[..k])?;
                n += k as u64;
            }
            w.flush()?;
        }
        let d = hasher.finish();
        self.commit_spool(&mut spool, &d)?;
        Ok((d, n))
    }

    /// Moves an existing file into the store (same filesystem), hashing it.
    pub fn adopt(&self, file: &Path) -> io::Result<(Digest, u64)> {
        let handle = fs::OpenOptions::new().read(true).write(true).open(file)?;
        let (d, n) = hash_file(&handle)?;
        self.store.commit(&handle, file, &d)?;
        Ok((d, n))
    }

    /// Names a spool `d`, which its writer has verified.
    pub fn commit_spool(&self, spool: &mut Spool, d: &Digest) -> io::Result<()> {
        let path = spool.path.as_ref().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "the spool was committed already",
            )
        })?;
        self.store.commit(&spool.file, path, d)?;
        spool.path = None;
        Ok(())
    }

    /// Leases `what` to `holder` until the holder ends. An artifact must
    /// exist (false when it does not: it was collected, store it again).
    pub fn lease(&self, holder: &str, what: &Leased) -> io::Result<bool> {
        if !safe_name(holder) {
            return Err(invalid("lease holder", holder));
        }
        match what {
            Leased::Artifact(d) if !self.store.contains(d) => return Ok(false),
            Leased::Snapshot(name) if !safe_name(name) => return Err(invalid("snapshot", name)),
            _ => {}
        }
        let dir = self.store.root.join("leases").join(holder);
        fs::create_dir_all(&dir)?;
        fs::write(dir.join(what.file_name()), b"")?;
        Ok(true)
    }
}

fn hash_file(f: &fs::File) -> io::Result<(Digest, u64)> {
    let mut hasher = Hasher::new(nullspace_digest::Algorithm::Sha256);
    let mut r = io::BufReader::with_capacity(1 << 20, f);
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            break;
        }
        hasher.update(&buf[..k]);
        n += k as u64;
    }
    Ok((hasher.finish(), n))
}

/// A temp file in `tmp/` locked by its writer; removed on drop unless
/// committed.
#[derive(Debug)]
pub struct Spool {
    path: Option<PathBuf>,
    pub file: fs::File,
}

impl Spool {
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Artifacts) {
        let d = tempfile::tempdir().unwrap();
        let a = Artifacts::open(d.path()).unwrap();
        (d, a)
    }

    #[test]
    fn a_put_is_content_addressed_and_leaves_no_spool() {
        let (_d, a) = store();
        let (dig, n) = a.writing().unwrap().put(&b"hello"[..]).unwrap();
        assert_eq!(n, 5);
        assert_eq!(dig, Digest::sha256_of(b"hello"));
        assert_eq!(fs::read(a.path(&dig)).unwrap(), b"hello");
        assert_eq!(fs::read_dir(a.tmp_dir()).unwrap().count(), 0);
    }

    #[test]
    fn leases_list_by_holder_and_release() {
        let (_d, a) = store();
        let w = a.writing().unwrap();
        let (dig, _) = w.put(&b"x"[..]).unwrap();
        assert!(w.lease("b_1", &Leased::Artifact(dig.clone())).unwrap());
        assert!(w.lease("b_1", &Leased::Snapshot("b_1.1".into())).unwrap());
        // A lease of what is gone says so: the holder stores it again.
        let missing = Digest::sha256_of(b"never stored");
        assert!(!w.lease("b_2", &Leased::Artifact(missing)).unwrap());
        let all = a.leases().unwrap();
        assert_eq!(
            all["b_1"],
            vec![Leased::Artifact(dig), Leased::Snapshot("b_1.1".into())]
        );
        assert!(!all.contains_key("b_2"));
        a.release("b_1").unwrap();
        assert!(a.leases().unwrap().is_empty());
        a.release("b_1").unwrap();
    }

    #[test]
    fn hostile_names_are_refused() {
        let (_d, a) = store();
        let w = a.writing().unwrap();
        for bad in ["", "..", "../x", "a/b", ".hidden", "a\0b"] {
            assert!(
                w.lease(bad, &Leased::Snapshot("s".into())).is_err(),
                "{bad:?}"
            );
            assert!(
                w.lease("h", &Leased::Snapshot(bad.into())).is_err(),
                "{bad:?}"
            );
            assert!(a.release(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_spool_is_in_use_until_dropped_and_then_gone() {
        let (_d, a) = store();
        let s = a.spool("upload").unwrap();
        let p = s.path().unwrap().to_path_buf();
        assert!(Artifacts::spool_in_use(&p));
        // A leftover of a dead writer: present, but nobody holds it.
        let leftover = a.tmp_dir().join("put-dead");
        fs::write(&leftover, b"x").unwrap();
        assert!(!Artifacts::spool_in_use(&leftover));
        drop(s);
        assert!(!p.exists());
    }

    #[test]
    fn the_collector_waits_for_writers() {
        let (_d, a) = store();
        let w = a.writing().unwrap();
        let a2 = a.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let _c = a2.collecting().unwrap();
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(300))
                .is_err(),
            "the collector ran while a writer held the store"
        );
        drop(w);
        rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        t.join().unwrap();
    }
}
