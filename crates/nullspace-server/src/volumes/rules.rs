//! What a volume request may ask: names, sizes, mount paths, subpaths.

use super::{VolumeError, VolumeResult};
use nullspace_model::machine::volume::VolumeMountBody;

/// A volume without `max_size_bytes`.
pub const DEFAULT_SIZE: u64 = 1 << 30;
pub const MIN_SIZE: u64 = 16 << 20;
pub const MAX_SIZE: u64 = 64 << 30;
/// Volumes one create may attach (a machine has at most its spare disks).
pub const MAX_AT_CREATE: usize = 8;

/// 1 to 63 of `[A-Za-z0-9._-]`, starting with a letter or digit.
pub fn name(n: &str) -> VolumeResult<()> {
    let ok = !n.is_empty()
        && n.len() <= 63
        && n.starts_with(|c: char| c.is_ascii_alphanumeric())
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(VolumeError::Invalid(format!(
            "volume name {:?} must be 1 to 63 of A-Z a-z 0-9 . _ - starting with a letter or digit",
            n.chars().take(80).collect::<String>()
        )))
    }
}

pub fn size(s: Option<u64>) -> VolumeResult<u64> {
    let s = s.unwrap_or(DEFAULT_SIZE);
    if !(MIN_SIZE..=MAX_SIZE).contains(&s) || !s.is_multiple_of(4096) {
        return Err(VolumeError::Invalid(format!(
            "max_size_bytes {s} must be a multiple of 4096 from {MIN_SIZE} to {MAX_SIZE}"
        )));
    }
    Ok(s)
}

/// Absolute, no `..`, not `/`, at most 1024 bytes, no control characters.
pub fn mount_path(p: &str) -> VolumeResult<String> {
    let bad = |rule: &str| {
        Err(VolumeError::Invalid(format!(
            "mount_path {:?} {rule}",
            p.chars().take(200).collect::<String>()
        )))
    };
    if !p.starts_with('/') {
        return bad("must be absolute");
    }
    if p.len() > 1024 || p.chars().any(char::is_control) {
        return bad("must be at most 1024 bytes without control characters");
    }
    if p.split('/').any(|c| c == "..") {
        return bad("must not contain '..'");
    }
    let clean: Vec<&str> = p
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if clean.is_empty() {
        return bad("must not be /");
    }
    let clean = format!("/{}", clean.join("/"));
    for sys in ["/proc", "/sys", "/dev", "/run/nullspace", "/nullspace"] {
        if clean == sys || clean.starts_with(&format!("{sys}/")) {
            return bad("must not be under /proc, /sys, /dev or the agent's own directories");
        }
    }
    Ok(clean)
}

/// Relative (a leading `/` is dropped), no `.` or `..`; `None` for the root.
pub fn subpath(s: Option<&str>) -> VolumeResult<Option<String>> {
    let Some(s) = s.map(str::trim).filter(|s| !s.is_empty() && *s != "/") else {
        return Ok(None);
    };
    let parts: Vec<&str> = s.split('/').filter(|c| !c.is_empty()).collect();
    if s.len() > 1024
        || s.chars().any(char::is_control)
        || parts.iter().any(|c| *c == "." || *c == "..")
    {
        return Err(VolumeError::Invalid(format!(
            "subpath {:?} must be a relative path of the volume without '.' or '..'",
            s.chars().take(200).collect::<String>()
        )));
    }
    Ok(Some(parts.join("/")))
}

/// The `volumes` of a create body: a list of mount requests.
pub fn mounts(v: Option<&serde_json::Value>) -> VolumeResult<Vec<VolumeMountBody>> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let list: Vec<VolumeMountBody> = serde_json::from_value(v.clone()).map_err(|e| {
        VolumeError::Invalid(format!(
            "volumes must be a list of {{ref, mount_path, read_only, subpath}}: {e}"
        ))
    })?;
    if list.len() > MAX_AT_CREATE {
        return Err(VolumeError::Invalid(format!(
            "at most {MAX_AT_CREATE} volumes per machine"
        )));
    }
    for (i, m) in list.iter().enumerate() {
        mount_path(&m.mount_path)
            .map_err(|e| VolumeError::Invalid(format!("volumes[{i}]: {e}")))?;
        subpath(m.subpath.as_deref())
            .map_err(|e| VolumeError::Invalid(format!("volumes[{i}]: {e}")))?;
        if list[..i].iter().any(|o| o.mount_path == m.mount_path) {
            return Err(VolumeError::Invalid(format!(
                "volumes[{i}]: mount_path {:?} is used twice",
                m.mount_path
            )));
        }
    }
    Ok(list)
}

/// Whether a new attachment may join the ones a volume has (the store's
/// lock enforces the same; this explains a refusal): read-write needs
/// none, read-only needs no read-write one.
pub fn may_join(read_only: bool, existing_rw: usize, existing_ro: usize) -> bool {
    if read_only {
        existing_rw == 0
    } else {
        existing_rw == 0 && existing_ro == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(name("work-dir_1.v2").is_ok());
        for bad in ["", "-x", ".x", "a/b", "a b", &"x".repeat(64)] {
            assert!(name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(size(None).unwrap(), DEFAULT_SIZE);
        assert!(size(Some(MIN_SIZE - 4096)).is_err());
        assert!(size(Some(MAX_SIZE + 4096)).is_err());
        assert!(size(Some((64 << 20) + 1)).is_err());
    }

    #[test]
    fn mount_paths_and_subpaths() {
        assert_eq!(mount_path("/data//x/.").unwrap(), "/data/x");
        for bad in ["data", "/", "/a/../b", "/proc/x", "/dev", "/a\nb"] {
            assert!(mount_path(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            subpath(Some("/team/a/")).unwrap().as_deref(),
            Some("team/a")
        );
        assert_eq!(subpath(Some("/")).unwrap(), None);
        assert!(subpath(Some("a/../b")).is_err());
    }

    #[test]
    fn modes() {
        // Exclusive read-write; shared read-only only without a writer.
        assert!(may_join(false, 0, 0));
        assert!(!may_join(false, 1, 0));
        assert!(!may_join(false, 0, 2));
        assert!(may_join(true, 0, 5));
        assert!(!may_join(true, 1, 0));
    }

    #[test]
    fn create_bodies() {
        let v =
            serde_json::json!([{"ref": "a", "mount_path": "/a"}, {"ref": "b", "mount_path": "/a"}]);
        assert!(mounts(Some(&v)).is_err());
        let v = serde_json::json!([{"ref": "a", "mount_path": "/a", "read_only": true}]);
        assert!(mounts(Some(&v)).unwrap()[0].read_only);
        assert!(mounts(Some(&serde_json::json!("x"))).is_err());
        assert!(mounts(None).unwrap().is_empty());
    }
}
