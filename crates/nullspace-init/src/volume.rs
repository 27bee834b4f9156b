//! The `mount`, `unmount` and `volume_health` ops: a volume is an ext4
//! image the host put behind spare virtio-blk device `slot` (serial
//! `nsvol<slot>`). It is mounted at a staging point of its own, and the
//! wanted directory (its root or `subpath`) is bound onto `mount_path`, so
//! a subpath never exposes the rest of the volume.

use crate::agent::{Failure, Outcome};
use nullspace_model::agent::volume::{serial, staging};
use nullspace_model::agent::{ErrorCode, Event, MountSpec, VolumeStatus};
use rustix::mount::{MountFlags, UnmountFlags};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a mount waits for the kernel to see the capacity the host set
/// (`block_resize` raises a config interrupt; the guest applies it soon after).
const CAPACITY_WAIT: Duration = Duration::from_secs(10);

/// `/dev/vdX` of spare `slot`, found by its serial.
fn device(slot: u32) -> Result<(String, PathBuf), Failure> {
    let want = serial(slot);
    let dir = std::fs::read_dir("/sys/block").map_err(|e| Failure::io("/sys/block", e))?;
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with("vd") {
            continue;
        }
        let got = std::fs::read_to_string(e.path().join("serial")).unwrap_or_default();
        if got.trim() == want {
            return Ok((format!("/dev/{name}"), e.path()));
        }
    }
    Err(Failure::new(
        ErrorCode::NotFound,
        format!("volume slot {slot}: no device with serial {want} (template without spare disks?)"),
    ))
}

fn abs(path: &str) -> Result<PathBuf, Failure> {
    let p = Path::new(path);
    if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(Failure::bad(format!(
            "mount path {path:?} must be absolute without '..'"
        )));
    }
    if p == Path::new("/") {
        return Err(Failure::bad("mount path / would hide the root file system"));
    }
    Ok(p.to_path_buf())
}

fn wait_capacity(sys: &Path, size_bytes: u64) -> Result<(), Failure> {
    let t0 = Instant::now();
    loop {
        let sectors: u64 = std::fs::read_to_string(sys.join("size"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if sectors * 512 == size_bytes && sectors > 0 {
            return Ok(());
        }
        if t0.elapsed() > CAPACITY_WAIT {
            return Err(Failure::new(
                ErrorCode::TimedOut,
                format!(
                    "{}: capacity {} bytes, not the {size_bytes} the host set",
                    sys.display(),
                    sectors * 512
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Is `target` a mount point (of anything)?
fn is_mount_point(target: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = target.to_string_lossy();
    info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .map(unescape)
            .is_some_and(|m| m == want.as_ref())
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = (b[i] == b'\\' && i + 4 <= b.len())
            .then(|| std::str::from_utf8(&b[i + 1..i + 4]).ok())
            .flatten()
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        if let Some(v) = octal {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status(target: &Path) -> VolumeStatus {
    if !is_mount_point(target) {
        return VolumeStatus::default();
    }
    match rustix::fs::statvfs(target) {
        Ok(s) => VolumeStatus {
            mounted: true,
            total_bytes: s.f_blocks * s.f_frsize,
            used_bytes: s.f_blocks.saturating_sub(s.f_bfree) * s.f_frsize,
            inodes_used: s.f_files.saturating_sub(s.f_ffree),
        },
        Err(_) => VolumeStatus {
            mounted: true,
            ..Default::default()
        },
    }
}

fn err(what: String) -> impl FnOnce(rustix::io::Errno) -> Failure {
    move |e| Failure::io(&what, e.into())
}

pub fn mount(spec: MountSpec) -> Outcome {
    let target = abs(&spec.mount_path)?;
    let sub = match spec.subpath.as_deref().map(str::trim) {
        None | Some("") | Some("/") => None,
        Some(s) => {
            let p = Path::new(s.trim_start_matches('/'));
            if p.components().any(|c| !matches!(c, Component::Normal(_))) {
                return Err(Failure::bad(format!(
                    "subpath {s:?} must be relative without '.' or '..'"
                )));
            }
            Some(p.to_path_buf())
        }
    };
    let (dev, sys) = device(spec.slot)?;
    wait_capacity(&sys, spec.size_bytes)?;
    let stage = PathBuf::from(staging(spec.slot));
    if is_mount_point(&target) {
        return Err(Failure::new(
            ErrorCode::AlreadyExists,
            format!("{}: something is mounted there already", target.display()),
        ));
    }
    std::fs::create_dir_all(&stage).map_err(|e| Failure::io(&stage.display().to_string(), e))?;
    if !is_mount_point(&stage) {
        let (flags, data) = if spec.read_only {
            // noload: no journal replay on an image others may read too.
            (
                MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
                Some(c"noload"),
            )
        } else {
            (MountFlags::NOSUID | MountFlags::NODEV, None)
        };
        rustix::mount::mount(dev.as_str(), &stage, "ext4", flags, data)
            .map_err(err(format!("mount {dev} (ext4)")))?;
    }
    let source = match &sub {
        None => stage.clone(),
        Some(s) => stage.join(s),
    };
    let bind = (|| {
        if sub.is_some() && !spec.read_only && !source.exists() {
            std::fs::create_dir_all(&source)
                .map_err(|e| Failure::io(&format!("subpath {}", source.display()), e))?;
            // A new subpath is used like the volume's root: same mode and
            // owner (a fresh volume's root is 1777), not root's 0755.
            if let Ok(root) = std::fs::metadata(&stage) {
                use std::os::unix::fs::MetadataExt;
                let _ = std::fs::set_permissions(&source, root.permissions());
                let _ = std::os::unix::fs::chown(&source, Some(root.uid()), Some(root.gid()));
            }
        }
        if !source.is_dir() {
            return Err(Failure::new(
                ErrorCode::NotFound,
                format!(
                    "subpath {}: not a directory of the volume",
                    source.display()
                ),
            ));
        }
        std::fs::create_dir_all(&target)
            .map_err(|e| Failure::io(&target.display().to_string(), e))?;
        rustix::mount::mount_bind(&source, &target)
            .map_err(err(format!("bind onto {}", target.display())))?;
        if spec.read_only {
            // A bind ignores RDONLY until remounted.
            rustix::mount::mount_remount(&target, MountFlags::BIND | MountFlags::RDONLY, "")
                .map_err(err(format!("read-only {}", target.display())))?;
        }
        Ok(())
    })();
    if let Err(e) = bind {
        let _ = rustix::mount::unmount(&stage, UnmountFlags::DETACH);
        return Err(e);
    }
    Ok(Event::Volume(status(&target)))
}

fn sync_fs(p: &Path) {
    if let Ok(f) = std::fs::File::open(p) {
        let _ = rustix::fs::syncfs(&f);
    }
}

/// Unmounts `mount_path` and the staging point; a busy one is detached
/// lazily (its open files keep it until closed, then the device's I/O
/// fails once the host takes the image away).
pub fn unmount(slot: u32, mount_path: &str) -> Outcome {
    let target = abs(mount_path)?;
    let stage = PathBuf::from(staging(slot));
    for p in [&target, &stage] {
        if !is_mount_point(p) {
            continue;
        }
        sync_fs(p);
        if rustix::mount::unmount(p.as_path(), UnmountFlags::empty()).is_err() {
            rustix::mount::unmount(p.as_path(), UnmountFlags::DETACH)
                .map_err(err(format!("unmount {}", p.display())))?;
        }
    }
    Ok(Event::Ok)
}

pub fn health(slot: u32, mount_path: &str) -> Outcome {
    let target = abs(mount_path)?;
    let mut s = status(&target);
    // The bind without its device is not a healthy mount.
    if s.mounted && !is_mount_point(Path::new(&staging(slot))) {
        s.mounted = false;
    }
    Ok(Event::Volume(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_names_unescape() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/x\\"), "/x\\");
    }

    #[test]
    fn mount_paths_are_checked() {
        assert!(abs("rel").is_err());
        assert!(abs("/").is_err());
        assert!(abs("/a/../b").is_err());
        assert!(abs("/data").is_ok());
    }
}
