//! A directory of spooled (uncompressed) layers keyed by the compressed
//! layer digest:
//!
//! ```text
//! DIR/layers/sha256/<hex>.tar    uncompressed tar (the spool file)
//! DIR/layers/sha256/<hex>.json   {"digest", "diff_id", "size"}
//! ```
//!
//! Inserts are atomic (temp file + rename; the `.json` is renamed last, so
//! an entry without it is incomplete and ignored). Recency is the `.tar`
//! file's mtime, bumped on every hit, because atime is unreliable under
//! `relatime`/`noatime`. Eviction removes least-recently-used entries
//! until the total is under `max_bytes`.
//!
//! Entries in use are leased: a hit or an insert holds a shared `flock` on
//! the `.tar` ([`LayerLease`]) until the caller drops it, and eviction
//! removes an entry only under an exclusive lock it gets without waiting,
//! so one import's eviction never removes a layer another import (in this
//! process or any other sharing the directory) is still reading.

use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::decode::LayerIndex;
use crate::error::Error;

/// Validates `algo:hex` before it is ever used in a path (see
/// [`nullspace_digest::Digest`]).
pub fn parse_digest(digest: &str) -> Result<nullspace_digest::Digest, Error> {
    nullspace_digest::Digest::parse(digest).map_err(|_| Error::InvalidDigest(digest.to_owned()))
}

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    digest: String,
    diff_id: String,
    size: u64,
}

/// A shared lock on a cache entry: eviction leaves the entry alone while
/// any clone of this lives.
#[derive(Debug, Clone)]
pub struct LayerLease(#[allow(dead_code)] Arc<LeaseInner>);

#[derive(Debug)]
struct LeaseInner {
    _file: File,
    /// A private spool (another import committed the same layer first),
    /// removed with the last clone of the lease.
    scratch: Option<PathBuf>,
}

impl Drop for LeaseInner {
    fn drop(&mut self) {
        if let Some(p) = self.scratch.take() {
            let _ = fs::remove_file(p);
        }
    }
}

impl LayerLease {
    fn of(file: File) -> LayerLease {
        LayerLease(Arc::new(LeaseInner {
            _file: file,
            scratch: None,
        }))
    }
}

/// A cache hit (or a committed insert), leased until dropped.
#[derive(Debug, Clone)]
pub struct CachedLayer {
    /// The spooled uncompressed tar.
    pub tar_path: PathBuf,
    /// Its diff_id as recorded at insert time.
    pub diff_id: String,
    /// Its length.
    pub size: u64,
    pub lease: LayerLease,
}

/// Whether `f` is still the file at `path` (not unlinked or replaced).
fn same_file(f: &File, path: &Path) -> bool {
    match (f.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Counters since the cache was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// `get` calls that found a complete entry.
    pub hits: u64,
    /// `get` calls that did not.
    pub misses: u64,
    /// Committed inserts.
    pub inserts: u64,
    /// Entries removed by eviction.
    pub evictions: u64,
    /// Bytes removed by eviction.
    pub evicted_bytes: u64,
}

/// Dir-based layer cache; see the module docs for the layout.
#[derive(Debug)]
pub struct LayerCache {
    root: PathBuf,
    max_bytes: u64,
    stats: Mutex<CacheStats>,
}

static TMP: AtomicU64 = AtomicU64::new(0);

impl LayerCache {
    /// Open (creating directories as needed) a cache at `dir` holding at
    /// most `max_bytes` of spooled tars after [`LayerCache::evict`].
    pub fn open(dir: &Path, max_bytes: u64) -> Result<LayerCache, Error> {
        for algo in ["sha256", "sha512"] {
            let d = dir.join("layers").join(algo);
            fs::create_dir_all(&d)
                .map_err(|e| Error::io(format!("creating {}", d.display()), e))?;
        }
        Ok(LayerCache {
            root: dir.to_owned(),
            max_bytes,
            stats: Mutex::new(CacheStats::default()),
        })
    }

    fn paths(&self, digest: &str) -> Result<(PathBuf, PathBuf), Error> {
        let d = parse_digest(digest)?;
        let (algorithm, hex) = d.path_components();
        let base = self.root.join("layers").join(algorithm);
        Ok((
            base.join(format!("{hex}.tar")),
            base.join(format!("{hex}.json")),
        ))
    }

    fn bump(&self, f: impl FnOnce(&mut CacheStats)) {
        if let Ok(mut s) = self.stats.lock() {
            f(&mut s);
        }
    }

    /// Look up a layer by its compressed digest. A hit refreshes the
    /// entry's recency and is leased (see the module docs). Entries whose
    /// tar is missing or has the wrong size count as misses (and are
    /// removed, unless someone holds them).
    pub fn get(&self, digest: &str) -> Result<Option<CachedLayer>, Error> {
        let (tar, json) = self.paths(digest)?;
        let hit = (|| {
            let rec: Record = serde_json::from_slice(&fs::read(&json).ok()?).ok()?;
            let f = File::options().read(true).append(true).open(&tar).ok()?;
            // Waits only while an eviction is removing this very entry.
            f.lock_shared().ok()?;
            // Evicted between the open and the lock: a miss.
            if !same_file(&f, &tar) || !json.exists() {
                return None;
            }
            let len = f.metadata().ok()?.len();
            (rec.digest == digest && len == rec.size && parse_digest(&rec.diff_id).is_ok())
                .then_some((rec, f))
        })();
        match hit {
            Some((rec, f)) => {
                // Best effort: a failed touch only affects eviction order.
                let _ = f.set_modified(SystemTime::now());
                self.bump(|s| s.hits += 1);
                Ok(Some(CachedLayer {
                    tar_path: tar,
                    diff_id: rec.diff_id,
                    size: rec.size,
                    lease: LayerLease::of(f),
                }))
            }
            None => {
                if json.exists()
                    && let Ok(f) = File::open(&tar)
                    && f.try_lock().is_ok()
                {
                    let _ = fs::remove_file(&json);
                    let _ = fs::remove_file(&tar);
                }
                self.bump(|s| s.misses += 1);
                Ok(None)
            }
        }
    }

    /// Whether a complete entry for `digest` is there, without leasing it,
    /// refreshing its recency or removing a broken one: a look for a
    /// dry-run, which must not change what the cache would do next.
    pub fn holds(&self, digest: &str) -> Result<bool, Error> {
        let (tar, json) = self.paths(digest)?;
        let Some(rec) = fs::read(&json)
            .ok()
            .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
        else {
            return Ok(false);
        };
        Ok(rec.digest == digest
            && parse_digest(&rec.diff_id).is_ok()
            && fs::metadata(&tar).is_ok_and(|m| m.len() == rec.size))
    }

    /// Start inserting `digest`: returns a temp file to pass to
    /// [`crate::decode_layer`] as the spool. Commit it with
    /// [`CacheInsert::commit`]; dropping it uncommitted deletes the temp.
    pub fn begin_insert(&self, digest: &str) -> Result<CacheInsert, Error> {
        let (tar, json) = self.paths(digest)?;
        let tmp = tar.with_extension(format!(
            "tar.tmp-{}-{}",
            std::process::id(),
            TMP.fetch_add(1, Ordering::Relaxed)
        ));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
        // The lease starts now: the lock moves with the inode at the rename.
        file.lock_shared()
            .map_err(|e| Error::io(format!("locking {}", tmp.display()), e))?;
        Ok(CacheInsert {
            file,
            tmp: Some(tmp),
            tar,
            json,
            digest: digest.to_owned(),
        })
    }

    /// Re-hash a cached tar and compare with its recorded diff_id.
    pub fn verify(&self, digest: &str) -> Result<bool, Error> {
        let Some(hit) = self.get(digest)? else {
            return Ok(false);
        };
        let f = File::open(&hit.tar_path)
            .map_err(|e| Error::io(format!("opening {}", hit.tar_path.display()), e))?;
        let mut r = BufReader::with_capacity(1 << 20, f);
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = r
                .read(&mut buf)
                .map_err(|e| Error::io(format!("reading {}", hit.tar_path.display()), e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(format!("sha256:{}", hex::encode(h.finalize())) == hit.diff_id)
    }

    /// Evict least-recently-used entries (never those in `keep`, e.g. the
    /// layers of the image being built, nor leased ones) until the cached
    /// tars total at most `max_bytes`, or nothing more may go. Also removes
    /// incomplete entries. Ties in recency break by digest, so the order is
    /// stable.
    pub fn evict(&self, keep: &[&str]) -> Result<u64, Error> {
        let mut entries: Vec<(SystemTime, String, u64, PathBuf, PathBuf)> = Vec::new();
        for algo in ["sha256", "sha512"] {
            let dir = self.root.join("layers").join(algo);
            let rd = fs::read_dir(&dir)
                .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
            for de in rd.flatten() {
                let name = de.file_name().to_string_lossy().into_owned();
                let Some(hex) = name.strip_suffix(".tar") else {
                    continue;
                };
                let digest = format!("{algo}:{hex}");
                if parse_digest(&digest).is_err() {
                    continue;
                }
                let tar = de.path();
                let json = tar.with_extension("json");
                let Ok(md) = de.metadata() else { continue };
                if !json.exists() {
                    // Incomplete: a crash between the renames, or an insert
                    // committing right now (it holds its lease).
                    if let Ok(f) = File::open(&tar)
                        && f.try_lock().is_ok()
                        && same_file(&f, &tar)
                        && !json.exists()
                    {
                        let _ = fs::remove_file(&tar);
                    }
                    continue;
                }
                let mtime = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                entries.push((mtime, digest, md.len(), tar, json));
            }
        }
        let mut total: u64 = entries.iter().map(|e| e.2).sum();
        entries.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        let mut freed = 0;
        for (_, digest, len, tar, json) in entries {
            if total <= self.max_bytes {
                break;
            }
            if keep.contains(&digest.as_str()) {
                continue;
            }
            // Leased (in use by an import): skip it, whatever its age.
            let Ok(f) = File::open(&tar) else { continue };
            if f.try_lock().is_err() || !same_file(&f, &tar) {
                continue;
            }
            // json first: a half-removed entry then reads as a miss.
            let _ = fs::remove_file(&json);
            fs::remove_file(&tar)
                .map_err(|e| Error::io(format!("removing {}", tar.display()), e))?;
            drop(f);
            total -= len;
            freed += len;
            self.bump(|s| {
                s.evictions += 1;
                s.evicted_bytes += len;
            });
        }
        Ok(freed)
    }

    /// Counters since open.
    pub fn stats(&self) -> CacheStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }
}

/// An in-progress insert; see [`LayerCache::begin_insert`].
#[derive(Debug)]
pub struct CacheInsert {
    /// The spool file to write the uncompressed layer into.
    pub file: File,
    tmp: Option<PathBuf>,
    tar: PathBuf,
    json: PathBuf,
    digest: String,
}

impl CacheInsert {
    /// Publish the spooled tar under its digest. Returns the entry, leased
    /// (by this insert's lock) until the caller drops it.
    pub fn commit(mut self, index: &LayerIndex, cache: &LayerCache) -> Result<CachedLayer, Error> {
        let tmp = self.tmp.take().ok_or_else(|| Error::CacheCorrupt {
            digest: self.digest.clone(),
            reason: "insert already committed".into(),
        })?;
        let len = self
            .file
            .metadata()
            .map_err(|e| Error::io(format!("stat {}", tmp.display()), e))?
            .len();
        if len != index.uncompressed_size {
            let _ = fs::remove_file(&tmp);
            return Err(Error::CacheCorrupt {
                digest: self.digest.clone(),
                reason: format!(
                    "spool holds {len} bytes, index says {}",
                    index.uncompressed_size
                ),
            });
        }
        // Never replace a committed tar (another import may be reading
        // it under its lease): if one appeared meanwhile, this insert's
        // spool (the same bytes) is used privately and removed after.
        match rustix::fs::renameat_with(
            rustix::fs::CWD,
            &tmp,
            rustix::fs::CWD,
            &self.tar,
            rustix::fs::RenameFlags::NOREPLACE,
        ) {
            Ok(()) => {}
            Err(rustix::io::Errno::EXIST) => {
                let file = self
                    .file
                    .try_clone()
                    .map_err(|e| Error::io(format!("leasing {}", tmp.display()), e))?;
                return Ok(CachedLayer {
                    tar_path: tmp.clone(),
                    diff_id: index.diff_id.clone(),
                    size: len,
                    lease: LayerLease(Arc::new(LeaseInner {
                        _file: file,
                        scratch: Some(tmp),
                    })),
                });
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(Error::io(format!("renaming {}", tmp.display()), e.into()));
            }
        }
        let rec = Record {
            digest: self.digest.clone(),
            diff_id: index.diff_id.clone(),
            size: len,
        };
        let json_tmp = self.json.with_extension(format!(
            "json.tmp-{}-{}",
            std::process::id(),
            TMP.fetch_add(1, Ordering::Relaxed)
        ));
        let body =
            serde_json::to_vec(&rec).map_err(|e| Error::io("encoding cache record", e.into()))?;
        fs::write(&json_tmp, body)
            .map_err(|e| Error::io(format!("writing {}", json_tmp.display()), e))?;
        fs::rename(&json_tmp, &self.json)
            .map_err(|e| Error::io(format!("renaming {}", json_tmp.display()), e))?;
        cache.bump(|s| s.inserts += 1);
        let file = self
            .file
            .try_clone()
            .map_err(|e| Error::io(format!("leasing {}", self.tar.display()), e))?;
        Ok(CachedLayer {
            tar_path: self.tar.clone(),
            diff_id: index.diff_id.clone(),
            size: len,
            lease: LayerLease::of(file),
        })
    }
}

impl Drop for CacheInsert {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insert(cache: &LayerCache, digest: &str, data: &[u8]) -> CachedLayer {
        use std::io::Write as _;
        let mut ins = cache.begin_insert(digest).unwrap();
        ins.file.write_all(data).unwrap();
        let index = LayerIndex {
            diff_id: format!("sha256:{}", hex::encode(Sha256::digest(data))),
            uncompressed_size: data.len() as u64,
            compression: crate::decode::Compression::None,
            entries: vec![],
        };
        ins.commit(&index, cache).unwrap()
    }

    #[test]
    fn eviction_spares_leased_entries() {
        let dir = tempfile::tempdir().unwrap();
        // Two handles on one directory, as two imports have; a 1-byte bound.
        let a = LayerCache::open(dir.path(), 1).unwrap();
        let b = LayerCache::open(dir.path(), 1).unwrap();
        let d1 = format!("sha256:{}", "1".repeat(64));
        let d2 = format!("sha256:{}", "2".repeat(64));
        let inserted = insert(&a, &d1, b"layer one");
        // b's eviction (keeping only its own layer) must not take a's.
        let hit = insert(&b, &d2, b"layer two");
        b.evict(&[&d2]).unwrap();
        assert!(inserted.tar_path.exists(), "a leased insert was evicted");
        drop(inserted);
        // A hit is a lease too.
        let again = a.get(&d1).unwrap().expect("still cached");
        b.evict(&[&d2]).unwrap();
        assert!(again.tar_path.exists(), "a leased hit was evicted");
        drop(again);
        drop(hit);
        a.evict(&[]).unwrap();
        assert!(a.get(&d1).unwrap().is_none() && a.get(&d2).unwrap().is_none());
        assert_eq!(b.stats().evictions + a.stats().evictions, 2);
    }

    #[test]
    fn holds_is_a_look_only() {
        let dir = tempfile::tempdir().unwrap();
        let c = LayerCache::open(dir.path(), u64::MAX).unwrap();
        let d = format!("sha256:{}", "3".repeat(64));
        assert!(!c.holds(&d).unwrap());
        let tar = insert(&c, &d, b"layer three").tar_path;
        let before = fs::metadata(&tar).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(c.holds(&d).unwrap());
        // No recency bump, no stats: nothing the next import sees changed.
        assert_eq!(fs::metadata(&tar).unwrap().modified().unwrap(), before);
        assert_eq!((c.stats().hits, c.stats().misses), (0, 0));
        // A truncated spool is not held (and is left for `get` to clean).
        fs::write(&tar, b"short").unwrap();
        assert!(!c.holds(&d).unwrap());
        assert!(tar.exists());
        assert!(c.holds("sha256:../x").is_err());
    }

    #[test]
    fn digest_validation() {
        let ok = format!("sha256:{}", "a".repeat(64));
        assert!(parse_digest(&ok).is_ok());
        assert!(parse_digest(&format!("sha512:{}", "0".repeat(128))).is_ok());
        for bad in [
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            format!("sha256:../../{}", "a".repeat(58)),
            format!("md5:{}", "a".repeat(32)),
            format!("sha512:{}", "a".repeat(64)),
            "sha256".to_owned(),
            String::new(),
        ] {
            assert!(parse_digest(&bad).is_err(), "{bad}");
        }
    }
}
