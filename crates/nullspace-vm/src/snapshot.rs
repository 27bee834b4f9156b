//! Snapshot directories on disk: opening and verifying them against their
//! manifest ([`nullspace_model::snapshot::SnapshotManifest`]), and the
//! commit helpers the writers use (fsync, read-only, sha256).
//!
//! A template snapshot directory (memory mode `mapped`, the default):
//!
//! | file | what |
//! |---|---|
//! | `snapshot.json` | the manifest; written last (its presence commits the snapshot) |
//! | `vmlinuz` | a copy of the guest kernel the VM booted |
//! | `initrd.img` | the exact initramfs the VM booted (with its config) |
//! | `disk.ext4` | the root disk as of the snapshot (raw) |
//! | `memory.ram` | guest RAM (raw, sparse), written by the build VM through a shared mapping |
//! | `device.state` | QEMU migration stream of device state only (`x-ignore-shared`) |
//!
//! In memory mode `streamed` (the earlier design, kept for comparison)
//! there is no `memory.ram` and `memory.bin` is the migration stream with
//! all of RAM. A snapshot of a restored VM (memory mode `delta`) holds the
//! disk layers and `memory.ram` of its parent (hard links: the RAM file is
//! the template's), `disk.N.qcow2`, the VM's own overlay, and a
//! `device.state` that carries the RAM pages differing from `memory.ram`.
//!
//! Every file is made read-only when committed. Verification hashes each
//! file once per file identity (device, inode, size, mtime, ctime) per
//! process; any write to a file changes its ctime, so a changed file is
//! hashed again and refused.

use crate::VmError;
use crate::template::GuestConfig;
use nullspace_model::size::Ceiling;
use nullspace_model::snapshot::{
    Accel, FileEntry, MANIFEST_FILE, ManifestError, MemoryMode, SnapshotManifest,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

pub use nullspace_model::snapshot::FORMAT_VERSION;

/// The VM shape a snapshot must be restored with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmMeta {
    /// The kernel to boot: the host's for a build VM, the snapshot's copy
    /// for a restore.
    pub vmlinuz: PathBuf,
    pub kernel_version: String,
    pub memory_mb: u32,
    pub vcpus: u32,
    pub accel: Accel,
    /// QEMU user-mode networking (`-netdev user` + `virtio-net-device`):
    /// a restore must recreate the same device set.
    #[serde(default)]
    pub network: bool,
    /// A `virtio-net-device` (every VM booted since egress policies; its
    /// build backend was user-mode, `restrict=on` unless `network`), so
    /// that a restore may give it any backend.
    #[serde(default)]
    pub nic: bool,
    #[serde(default)]
    pub memory_mode: MemoryMode,
    /// Spare disks for volumes (`qemu::spares`); 0 = none (an older
    /// template: no volumes until it is rebuilt).
    #[serde(default)]
    pub spare_disks: u32,
    /// QEMU's size when larger than the guest's (`memory_mb`, `vcpus`: what
    /// is online); see [`nullspace_model::size`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceiling: Option<Ceiling>,
}

impl VmMeta {
    /// Whether the VM has a NIC (older templates: only with `network`).
    pub fn has_nic(&self) -> bool {
        self.nic || self.network
    }

    /// QEMU's `-m` (the guest RAM file's size).
    pub fn qemu_memory_mb(&self) -> u32 {
        self.ceiling.map_or(self.memory_mb, |c| c.memory_mib)
    }

    /// QEMU's `-smp`.
    pub fn qemu_vcpus(&self) -> u32 {
        self.ceiling.map_or(self.vcpus, |c| c.vcpus)
    }
}

/// What callers read about a snapshot (derived from its manifest).
#[derive(Debug, Clone)]
pub struct SnapshotMeta {
    pub vm: VmMeta,
    /// The runtime defaults restored guests run with.
    pub config: GuestConfig,
    /// The start command's pid and start time in the guest (from `info`).
    pub start: serde_json::Value,
    /// Bytes of all disk layers.
    pub disk_bytes: u64,
    /// Disk space the memory takes: the allocated blocks of `memory.ram`
    /// plus the device state (mapped), or the migration stream (streamed).
    pub memory_bytes: u64,
    /// The migration stream's size.
    pub state_bytes: u64,
    pub timings_ms: Timings,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Timings {
    /// QEMU start to the agent's first answer.
    pub boot: u64,
    /// Agent up to readiness (includes the startup grace).
    pub ready: u64,
    /// The VM paused until the snapshot's content was written: `stop` +
    /// migrate (+ the disk overlay copied, for a snapshot of a restored VM).
    pub snapshot: u64,
    /// Build steps (native backend): agent up to the last step done.
    #[serde(default)]
    pub steps: u64,
    /// Everything after that: QEMU's exit, copies, fsync, sha256, the
    /// manifest (for a restored VM's snapshot: writing the memory file).
    #[serde(default)]
    pub commit: u64,
}

impl Timings {
    pub(crate) fn to_map(&self) -> std::collections::BTreeMap<String, u64> {
        [
            ("boot", self.boot),
            ("ready", self.ready),
            ("snapshot", self.snapshot),
            ("steps", self.steps),
            ("commit", self.commit),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn from_map(m: &std::collections::BTreeMap<String, u64>) -> Timings {
        let g = |k: &str| m.get(k).copied().unwrap_or(0);
        Timings {
            boot: g("boot"),
            ready: g("ready"),
            snapshot: g("snapshot"),
            steps: g("steps"),
            commit: g("commit"),
        }
    }
}

/// An opened snapshot directory.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Absolute (canonical) path of the directory.
    pub dir: PathBuf,
    pub meta: SnapshotMeta,
    pub manifest: SnapshotManifest,
    /// sha256 of `snapshot.json` as read.
    pub manifest_sha256: String,
}

pub const SNAPSHOT_FILE: &str = MANIFEST_FILE;

impl Snapshot {
    /// Reads and checks the manifest (format version, structure); the files
    /// are checked by [`Snapshot::verify`], which every restore runs.
    pub fn open(dir: &Path) -> Result<Snapshot, VmError> {
        let shown = dir.display().to_string();
        let dir = std::fs::canonicalize(dir).map_err(VmError::io(format!("snapshot {shown}")))?;
        let shown = dir.display().to_string();
        let p = dir.join(MANIFEST_FILE);
        let bytes = std::fs::read(&p).map_err(|e| VmError::Corrupt {
            dir: shown.clone(),
            file: MANIFEST_FILE.into(),
            detail: if e.kind() == std::io::ErrorKind::NotFound {
                "missing (not a snapshot directory, or the snapshot was never completed)".into()
            } else {
                e.to_string()
            },
        })?;
        let manifest = SnapshotManifest::from_json(&bytes).map_err(|e| match e {
            ManifestError::Legacy | ManifestError::Version { .. } | ManifestError::Qemu { .. } => {
                VmError::Incompatible {
                    dir: shown.clone(),
                    detail: e.to_string(),
                }
            }
            ManifestError::Json(_) | ManifestError::Invalid(_) => VmError::Corrupt {
                dir: shown.clone(),
                file: MANIFEST_FILE.into(),
                detail: e.to_string(),
            },
        })?;
        let config: GuestConfig =
            serde_json::from_value(manifest.guest.clone()).map_err(|e| VmError::Corrupt {
                dir: shown.clone(),
                file: MANIFEST_FILE.into(),
                detail: format!("guest config: {e}"),
            })?;
        let allocated = |e: &FileEntry| {
            std::fs::metadata(dir.join(&e.path))
                .map(|m| m.blocks() * 512)
                .unwrap_or(0)
        };
        let m = &manifest;
        // A delta's RAM file is the template's (linked): only its stream is
        // its own.
        let memory_bytes = match m.memory.mode {
            MemoryMode::Delta => 0,
            _ => m.memory.ram.as_ref().map(allocated).unwrap_or(0),
        } + m.memory.state.size;
        let meta = SnapshotMeta {
            vm: VmMeta {
                vmlinuz: dir.join(&m.kernel.file.path),
                kernel_version: m.kernel.version.clone(),
                memory_mb: m.device.memory_mib,
                vcpus: m.device.vcpus,
                accel: m.device.accel,
                network: m.device.network,
                nic: m.device.nic,
                memory_mode: m.memory.mode,
                spare_disks: m.device.spare_disks,
                ceiling: m.device.ceiling,
            },
            config,
            start: m.start.clone(),
            disk_bytes: m.disk.iter().map(|l| l.file.size).sum(),
            memory_bytes,
            state_bytes: m.memory.state.size,
            timings_ms: Timings::from_map(&m.timings_ms),
        };
        Ok(Snapshot {
            manifest_sha256: hex::encode(Sha256::digest(&bytes)),
            dir,
            meta,
            manifest,
        })
    }

    pub fn path(&self, f: &FileEntry) -> PathBuf {
        self.dir.join(&f.path)
    }

    /// The top disk layer (a template's `disk.ext4`).
    pub fn disk(&self) -> PathBuf {
        self.path(&self.manifest.disk.last().expect("validated: a disk").file)
    }

    /// Every file is present, a regular file, of the manifest's size and
    /// sha256 (hashed once per file identity per process).
    pub fn verify(&self) -> Result<(), VmError> {
        for (role, f) in self.manifest.files() {
            verify_file(&self.dir, role, f)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn identity(md: &std::fs::Metadata) -> Identity {
    Identity {
        dev: md.dev(),
        ino: md.ino(),
        size: md.len(),
        mtime: (md.mtime(), md.mtime_nsec()),
        ctime: (md.ctime(), md.ctime_nsec()),
    }
}

fn verified() -> &'static Mutex<HashMap<Identity, String>> {
    static V: OnceLock<Mutex<HashMap<Identity, String>>> = OnceLock::new();
    V.get_or_init(Default::default)
}

fn remember(md: &std::fs::Metadata, sha: &str) {
    verified()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(identity(md), sha.to_string());
}

/// Removes a snapshot directory. Its files may be hard links of another
/// snapshot's (a template's disk and RAM file); unlinking one changes that
/// inode's ctime, so each file's verification is carried over to the
/// identity the other links still have (read through an open descriptor
/// after the unlink), or the template's next restore would hash it again.
pub fn remove_dir(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let Ok(f) = std::fs::File::open(&p) else {
            continue;
        };
        let (Ok(before), true) = (f.metadata(), p.is_file()) else {
            continue;
        };
        if before.nlink() > 1
            && std::fs::remove_file(&p).is_ok()
            && let Ok(after) = f.metadata()
        {
            still_verified(&before, &after);
        }
    }
    std::fs::remove_dir_all(dir)
}

/// Whether two identities are the same file with no write between them (a
/// write moves the mtime; only the ctime may differ).
fn same_content(a: &Identity, b: &Identity) -> bool {
    (a.dev, a.ino, a.size, a.mtime) == (b.dev, b.ino, b.size, b.mtime)
}

/// Keeps the verification of a file whose ctime alone changed (same inode,
/// size and mtime: a hard link was made or removed).
fn still_verified(before: &std::fs::Metadata, after: &std::fs::Metadata) {
    let (b, a) = (identity(before), identity(after));
    if !same_content(&b, &a) {
        return;
    }
    let mut v = verified().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(sha) = v.get(&b).cloned() {
        v.insert(a, sha);
    }
}

fn verify_file(dir: &Path, role: &str, f: &FileEntry) -> Result<(), VmError> {
    let corrupt = |detail: String| VmError::Corrupt {
        dir: dir.display().to_string(),
        file: format!("{} ({role})", f.path),
        detail,
    };
    let p = dir.join(&f.path);
    let md = std::fs::symlink_metadata(&p).map_err(|e| {
        corrupt(if e.kind() == std::io::ErrorKind::NotFound {
            "missing".into()
        } else {
            e.to_string()
        })
    })?;
    if !md.is_file() {
        return Err(corrupt("not a regular file".into()));
    }
    if md.len() != f.size {
        return Err(corrupt(format!(
            "{} bytes, the manifest says {}: the file changed after the snapshot was taken; rebuild the template",
            md.len(),
            f.size
        )));
    }
    let id = identity(&md);
    if verified()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&id)
        .is_some_and(|s| *s == f.sha256)
    {
        return Ok(());
    }
    let got = sha256_file(&p).map_err(|e| corrupt(e.to_string()))?;
    if got != f.sha256 {
        return Err(corrupt(format!(
            "sha256 {got}, the manifest says {}: the file changed after the snapshot was taken; rebuild the template",
            f.sha256
        )));
    }
    // Cache only if the content cannot have changed while hashing: the same
    // inode, size and mtime (a hard link made meanwhile, by a snapshot of a
    // machine of this template, changes the ctime alone; dropping the result
    // then would make every later restore hash the file again).
    if let Ok(m) = std::fs::symlink_metadata(&p)
        && same_content(&identity(&m), &id)
    {
        remember(&m, &got);
    }
    Ok(())
}

// The sparse-file rules (extents, content hash) live in nullspace-digest.
pub(crate) use nullspace_digest::sparse::{data_extents, sha256_file};

/// Commits `dir/name`: read-only, fsynced, hashed; returns its entry.
pub(crate) fn commit_file(dir: &Path, name: &str) -> Result<FileEntry, VmError> {
    let p = dir.join(name);
    let ctx = || p.display().to_string();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o444))
        .map_err(VmError::io(ctx()))?;
    std::fs::File::open(&p)
        .and_then(|f| f.sync_all())
        .map_err(VmError::io(ctx()))?;
    let sha256 = sha256_file(&p).map_err(VmError::io(ctx()))?;
    let md = std::fs::symlink_metadata(&p).map_err(VmError::io(ctx()))?;
    remember(&md, &sha256);
    Ok(FileEntry {
        path: name.to_string(),
        size: md.len(),
        sha256,
    })
}

/// Writes the manifest last (tmp + fsync + rename + directory fsync): a
/// directory without `snapshot.json` is not a snapshot.
pub(crate) fn write_manifest(dir: &Path, m: &SnapshotManifest) -> Result<(), VmError> {
    let tmp = dir.join(format!("{MANIFEST_FILE}.tmp"));
    let ctx = || tmp.display().to_string();
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(VmError::io(ctx()))?;
        f.write_all(&m.to_json()).map_err(VmError::io(ctx()))?;
        f.sync_all().map_err(VmError::io(ctx()))?;
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o444))
        .map_err(VmError::io(ctx()))?;
    std::fs::rename(&tmp, dir.join(MANIFEST_FILE)).map_err(VmError::io(ctx()))?;
    fsync_dir(dir)
}

pub(crate) fn fsync_dir(dir: &Path) -> Result<(), VmError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(VmError::io(dir.display().to_string()))
}

/// Hard-links `src` to `dst` (an immutable snapshot file shared by several
/// snapshot directories); copies when they are on different filesystems.
pub(crate) fn link_or_copy(src: &Path, dst: &Path) -> Result<(), VmError> {
    let before = std::fs::symlink_metadata(src).ok();
    if std::fs::hard_link(src, dst).is_ok() {
        // A link changes the file's ctime, not its content: carry a
        // verification over, or the template's next restore would hash
        // its RAM and disk again.
        if let (Some(md), Ok(after)) = (before, std::fs::symlink_metadata(dst)) {
            still_verified(&md, &after);
        }
        return Ok(());
    }
    let ctx = || format!("copy {} to {}", src.display(), dst.display());
    copy_sparse(src, dst).map_err(VmError::io(ctx()))?;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o444))
        .map_err(VmError::io(ctx()))
}

/// Copies `src` to a new file `dst`, data extents only (holes stay holes:
/// a guest RAM file is mostly holes). `std::fs::copy` would write the
/// holes out as zeros on ext4, which has no reflinks.
pub(crate) fn copy_sparse(src: &Path, dst: &Path) -> std::io::Result<()> {
    let s = std::fs::File::open(src)?;
    let len = s.metadata()?.len();
    let d = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)?;
    d.set_len(len)?;
    let mut buf = vec![];
    for (start, end) in data_extents(&s, len)? {
        let mut off = start;
        while off < end {
            let (mut a, mut b) = (off, off);
            let want = (end - off) as usize;
            match rustix::fs::copy_file_range(&s, Some(&mut a), &d, Some(&mut b), want) {
                Ok(0) => break,
                Ok(n) => {
                    off += n as u64;
                    continue;
                }
                // No in-kernel copy (e.g. across filesystems): read and write.
                Err(_) => {}
            }
            buf.resize(1 << 20, 0);
            let want = want.min(buf.len());
            let got = s.read_at(&mut buf[..want], off)?;
            if got == 0 {
                break;
            }
            d.write_all_at(&buf[..got], off)?;
            off += got as u64;
        }
    }
    d.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cached(p: &Path) -> Option<String> {
        let md = std::fs::symlink_metadata(p).unwrap();
        verified().lock().unwrap().get(&identity(&md)).cloned()
    }

    #[test]
    fn links_made_and_removed_keep_a_files_verification_and_writes_do_not() {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("memory.ram");
        std::fs::write(&a, b"template memory").unwrap();
        remember(&std::fs::metadata(&a).unwrap(), "sha-a");
        let snap = t.path().join("snap");
        std::fs::create_dir(&snap).unwrap();
        link_or_copy(&a, &snap.join("memory.ram")).unwrap();
        std::fs::write(snap.join("device.state"), b"own").unwrap();
        assert_eq!(cached(&a).as_deref(), Some("sha-a"), "after a link");
        remove_dir(&snap).unwrap();
        assert!(!snap.exists());
        assert_eq!(cached(&a).as_deref(), Some("sha-a"), "after its removal");
        // A write (the mtime moves) is never carried over.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&a, b"tampered memory").unwrap();
        let before = std::fs::metadata(&a).unwrap();
        std::fs::create_dir(&snap).unwrap();
        link_or_copy(&a, &snap.join("memory.ram")).unwrap();
        let after = std::fs::metadata(&a).unwrap();
        still_verified(&before, &after);
        assert_eq!(cached(&a), None);
    }

    #[test]
    fn sparse_copy_keeps_holes_and_content() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(&[7u8; 8192], 40 << 20).unwrap();
        f.write_all_at(b"end", (64 << 20) - 3).unwrap();
        drop(f);
        let dst = t.path().join("dst");
        copy_sparse(&src, &dst).unwrap();
        assert_eq!(sha256_file(&src).unwrap(), sha256_file(&dst).unwrap());
        let md = std::fs::metadata(&dst).unwrap();
        assert_eq!(md.len(), 64 << 20);
        assert!(md.blocks() * 512 < 1 << 20, "holes kept: {}", md.blocks());
    }

    #[test]
    fn a_changed_file_is_hashed_again() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("f"), b"hello").unwrap();
        let e = commit_file(t.path(), "f").unwrap();
        verify_file(t.path(), "x", &e).unwrap();
        // Same size, same mtime: only the ctime tells it changed.
        let p = t.path().join("f");
        let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&p, b"jello").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let err = verify_file(t.path(), "x", &e).unwrap_err().to_string();
        assert!(err.contains("f (x): sha256"), "{err}");
    }
}
