//! Disk layers made with `qemu-img`: a restored VM's overlay (cached per
//! backing and size) and rebasing a stored layer.

use super::args::Layer;
use crate::VmError;
use crate::snapshot::Snapshot;
use nullspace_model::snapshot::DiskFormat;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Empty overlays by (backing, format, size). A qcow2 header holds no id
/// or time, so every overlay of one backing and size is the same bytes:
/// `qemu-img` (30-100 ms here) runs once per snapshot per process, later
/// overlays are a write of about 200 KiB. Pause and fork snapshots are
/// new backings each time and are deleted with their machine: a miss
/// first drops the entries whose backing is gone (the hour-long soak saw
/// this cache hold ~200 KiB per deleted snapshot, 50 MiB an hour), and at
/// most [`OVERLAY_CACHE_MAX`] entries are kept.
pub(super) type OverlayCache =
    std::sync::Mutex<std::collections::HashMap<(PathBuf, &'static str, u64), Vec<u8>>>;

const OVERLAY_CACHE_MAX: usize = 64;

pub(super) fn overlay_cache() -> &'static OverlayCache {
    static C: OnceLock<OverlayCache> = OnceLock::new();
    C.get_or_init(Default::default)
}

/// A qcow2 overlay over `backing` (not opened: `-u`), made by `qemu-img
/// create` once per backing and size (see [`OverlayCache`]).
pub(super) fn create_overlay(
    overlay: &Path,
    backing: &Path,
    format: DiskFormat,
    size: u64,
) -> Result<(), VmError> {
    let fmt = match format {
        DiskFormat::Raw => "raw",
        DiskFormat::Qcow2 => "qcow2",
    };
    let key = (backing.to_path_buf(), fmt, size);
    let cached = overlay_cache()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
        .cloned();
    if let Some(bytes) = cached {
        use std::io::Write;
        let mut f = std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(overlay)
            .map_err(VmError::io(overlay.display().to_string()))?;
        return f
            .write_all(&bytes)
            .map_err(VmError::io(overlay.display().to_string()));
    }
    qemu_img_overlay(overlay, backing, fmt, size)?;
    if let Ok(bytes) = std::fs::read(overlay)
        && bytes.len() <= 4 << 20
    {
        let mut c = overlay_cache().lock().unwrap_or_else(|p| p.into_inner());
        c.retain(|(b, _, _), _| b.exists());
        if c.len() >= OVERLAY_CACHE_MAX {
            c.clear();
        }
        c.insert(key, bytes);
    }
    Ok(())
}

pub(super) fn qemu_img_overlay(
    overlay: &Path,
    backing: &Path,
    fmt: &str,
    size: u64,
) -> Result<(), VmError> {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-u", "-F", fmt, "-b"])
        .arg(backing)
        .arg(overlay)
        .arg(size.to_string())
        .output()
        .map_err(VmError::io("qemu-img (install qemu-utils)"))?;
    if !out.status.success() {
        return Err(VmError::Restore(format!(
            "qemu-img create: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The restore layers of `snap`'s disk (read-only) plus a new overlay.
pub(super) fn restore_layers(snap: &Snapshot, overlay: &Path) -> Result<Vec<Layer>, VmError> {
    let m = &snap.manifest;
    let top = m.disk.last().expect("validated: a disk");
    create_overlay(
        overlay,
        &snap.path(&top.file),
        top.format,
        m.disk[0].file.size,
    )?;
    let mut layers: Vec<Layer> = m
        .disk
        .iter()
        .map(|l| Layer {
            path: snap.path(&l.file),
            format: l.format,
            read_only: true,
        })
        .collect();
    layers.push(Layer {
        path: overlay.to_path_buf(),
        format: DiskFormat::Qcow2,
        read_only: false,
    });
    Ok(layers)
}

/// Points a stored qcow2 layer's backing name at its sibling `backing` (a
/// relative name, so `qemu-img info` works wherever the directory is;
/// restores build the chain from the manifest anyway).
pub(super) fn rebase(image: &Path, backing: &str, format: DiskFormat) -> Result<(), VmError> {
    let fmt = match format {
        DiskFormat::Raw => "raw",
        DiskFormat::Qcow2 => "qcow2",
    };
    let out = Command::new("qemu-img")
        .args([
            "rebase", "-q", "-u", "-f", "qcow2", "-F", fmt, "-b", backing,
        ])
        .arg(image)
        .output()
        .map_err(VmError::io("qemu-img (install qemu-utils)"))?;
    if !out.status.success() {
        return Err(VmError::Snapshot(format!(
            "qemu-img rebase: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cached(backing: &Path) -> bool {
        overlay_cache()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .any(|(b, _, _)| b == backing)
    }

    #[test]
    fn a_deleted_backing_leaves_the_overlay_cache() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a.raw"), d.path().join("b.raw"));
        for p in [&a, &b] {
            std::fs::File::create(p).unwrap().set_len(1 << 20).unwrap();
        }
        create_overlay(&d.path().join("oa"), &a, DiskFormat::Raw, 1 << 20).unwrap();
        assert!(cached(&a), "the first overlay of a backing is cached");
        // Later overlays of it are the cached bytes.
        create_overlay(&d.path().join("oa2"), &a, DiskFormat::Raw, 1 << 20).unwrap();
        assert_eq!(
            std::fs::read(d.path().join("oa")).unwrap(),
            std::fs::read(d.path().join("oa2")).unwrap()
        );
        std::fs::remove_file(&a).unwrap();
        create_overlay(&d.path().join("ob"), &b, DiskFormat::Raw, 1 << 20).unwrap();
        assert!(cached(&b));
        assert!(!cached(&a), "the deleted backing's entry is still cached");
    }
}
