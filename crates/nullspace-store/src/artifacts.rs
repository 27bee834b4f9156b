//! A content-addressed artifact store: `DIR/sha256/<hex>`, written through a
//! temporary file and renamed, so a reader never sees a partial artifact.
//! Commits are durable: the file is fsynced before the rename and the
//! directory after it, so a crash never leaves a named but empty artifact.
//! A commit also sets the file's mtime to now: the garbage collector spares
//! young files, so an artifact a running build just stored (and does not yet
//! reference from a manifest) is never collected.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use nullspace_digest::{Digest, Hasher};

#[derive(Debug, Clone)]
pub struct Artifacts {
    root: PathBuf,
}

impl Artifacts {
    pub fn open(root: &Path) -> io::Result<Artifacts> {
        fs::create_dir_all(root.join("sha256"))?;
        fs::create_dir_all(root.join("tmp"))?;
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

    /// Stores the bytes `r` yields and returns their digest.
    pub fn put(&self, mut r: impl Read) -> io::Result<(Digest, u64)> {
        let tmp = tempfile_in(&self.root.join("tmp"))?;
        let mut hasher = Hasher::new(nullspace_digest::Algorithm::Sha256);
        let mut f = io::BufWriter::with_capacity(1 << 20, fs::File::create(&tmp.0)?);
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = r.read(&mut buf)?;
            if k == 0 {
                break;
            }
            hasher.update(&buf[..k]);
            f.write_all(&buf[..k])?;
            n += k as u64;
        }
        let f = f.into_inner().map_err(|e| e.into_error())?;
        let d = hasher.finish();
        self.commit(&f, &tmp.0, &d)?;
        Ok((d, n))
    }

    /// Moves an existing file into the store (same filesystem), hashing it.
    pub fn adopt(&self, file: &Path) -> io::Result<(Digest, u64)> {
        let mut hasher = Hasher::new(nullspace_digest::Algorithm::Sha256);
        let handle = fs::OpenOptions::new().read(true).write(true).open(file)?;
        let mut f = io::BufReader::with_capacity(1 << 20, &handle);
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = f.read(&mut buf)?;
            if k == 0 {
                break;
            }
            hasher.update(&buf[..k]);
            n += k as u64;
        }
        let d = hasher.finish();
        self.commit(&handle, file, &d)?;
        Ok((d, n))
    }

    /// Makes `f` (at `from`) durable and names it `d`.
    fn commit(&self, f: &fs::File, from: &Path, d: &Digest) -> io::Result<()> {
        f.set_modified(std::time::SystemTime::now())?;
        f.sync_all()?;
        let to = self.path(d);
        fs::rename(from, &to)?;
        fs::File::open(to.parent().unwrap_or(&self.root))?.sync_all()
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }
}

/// A temp path removed on drop unless renamed away.
struct TempPath(PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn tempfile_in(dir: &Path) -> io::Result<TempPath> {
    use rand::Rng as _;
    let n: u64 = rand::rng().random();
    Ok(TempPath(dir.join(format!("put-{n:016x}"))))
}
