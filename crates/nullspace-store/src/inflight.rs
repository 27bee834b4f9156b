//! Work in flight, told apart from a crash's leftover without looking at
//! file ages: the process doing the work holds an exclusive `flock` on a
//! marker file, and the lock vanishes with the process. A collector in any
//! process that shares the data directory asks [`is_held`].

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// A held marker at `path`; dropping it releases the lock and removes the
/// file.
#[derive(Debug)]
pub struct InFlight {
    path: PathBuf,
    _file: fs::File,
}

impl InFlight {
    pub fn hold(path: &Path) -> io::Result<InFlight> {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        file.try_lock().map_err(|e| match e {
            fs::TryLockError::WouldBlock => io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{}: held by another process", path.display()),
            ),
            fs::TryLockError::Error(e) => e,
        })?;
        Ok(InFlight {
            path: path.to_path_buf(),
            _file: file,
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// True when a live process holds an exclusive lock on the file at `p`
/// (an [`InFlight`] marker, or a spool its writer locked).
pub fn is_held(p: &Path) -> bool {
    let Ok(f) = fs::File::open(p) else {
        return false;
    };
    matches!(f.try_lock_shared(), Err(fs::TryLockError::WouldBlock))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_until_dropped_then_gone() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("snap_1.taking");
        let m = InFlight::hold(&p).unwrap();
        assert!(is_held(&p));
        assert!(InFlight::hold(&p).is_err(), "held twice");
        drop(m);
        assert!(!p.exists());
        // A leftover of a dead process: the file is there, the lock is not.
        fs::write(&p, b"").unwrap();
        assert!(!is_held(&p));
    }
}
