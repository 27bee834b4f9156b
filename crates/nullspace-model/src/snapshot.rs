//! The snapshot manifest (`snapshot.json` in a snapshot directory): what a
//! VM snapshot needs to be restored on this host or another, after its
//! directory moved, or after the host's `/boot` kernel changed.
//!
//! Every file the restore reads is listed with its size and sha256, by a
//! plain file name relative to the snapshot directory (the kernel and the
//! initramfs are copies in the directory, not host paths). The manifest
//! also records the format version, the QEMU version whose device state the
//! migration stream holds, and the device configuration the restore must
//! recreate (machine, accelerator, memory size, vCPUs, network, memory mode).
//!
//! No I/O here: the VM crate writes, hashes and verifies the files.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The manifest format this crate reads and writes. Format 1 is the
/// unversioned `snapshot.json` of earlier nullspace versions (host kernel
/// by absolute path, no checksums): it is refused with a request to rebuild.
pub const FORMAT_VERSION: u32 = 2;

/// The manifest's file name in a snapshot directory.
pub const MANIFEST_FILE: &str = "snapshot.json";

/// How guest memory is stored and restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryMode {
    /// Guest RAM is a file (`memory.ram`) the build VM wrote through a shared
    /// mapping; the migration stream is device state only. A restore maps
    /// the file private copy-on-write: it reads only the pages the guest
    /// touches, and clean pages are shared by every VM of the snapshot
    /// through the page cache.
    #[default]
    Mapped,
    /// The earlier design: all guest RAM is in the migration stream, and
    /// every restore reads all of it into private memory.
    Streamed,
    /// A snapshot of a restored VM: `memory.ram` is the template's RAM file
    /// (a hard link of the one its chain started from), and the migration
    /// stream holds the device state plus only the pages that differ from
    /// it. A restore maps the file private, as for `Mapped`, and loads the
    /// stream over it. Every delta is against the template's file, so a
    /// chain of pauses never grows beyond what the VM changed.
    Delta,
}

/// The accelerator the snapshot was taken under (a restore uses the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

/// QEMU's version as QMP `query-version` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
    /// The distribution's package string, e.g. `Debian 1:10.0.2+ds-2…`.
    #[serde(default)]
    pub package: String,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// A file of the snapshot: a plain name in the snapshot directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    /// Lowercase hex.
    pub sha256: String,
}

/// The guest kernel the VM booted (a copy in the snapshot directory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kernel {
    /// `uname -r` of the guest, e.g. `6.1.0-57-cloud-amd64`.
    pub version: String,
    pub file: FileEntry,
}

/// The VM's device configuration: a restore must recreate exactly this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// QEMU machine type (`microvm`).
    pub machine: String,
    pub accel: Accel,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// QEMU user-mode networking (`virtio-net-device`).
    pub network: bool,
    /// Spare `virtio-blk-device`s after the root disk (volumes); 0 in
    /// snapshots made before volumes existed.
    #[serde(default)]
    pub spare_disks: u32,
    /// A `virtio-net-device` whatever `network` says (every VM booted since
    /// egress policies; absent in older manifests).
    #[serde(default)]
    pub nic: bool,
    /// The kernel command line the VM booted with.
    pub kernel_cmdline: String,
    /// QEMU's size when the VM was booted larger than `memory_mib` and
    /// `vcpus` (the guest's size when the snapshot was taken); absent in
    /// older manifests and for templates of exactly one size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceiling: Option<crate::size::Ceiling>,
}

impl Device {
    /// QEMU's `-m`: the ceiling's memory when there is one.
    pub fn qemu_memory_mib(&self) -> u32 {
        self.ceiling.map_or(self.memory_mib, |c| c.memory_mib)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

/// One layer of the root disk (`/dev/vda`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskLayer {
    pub format: DiskFormat,
    pub file: FileEntry,
}

/// Guest memory and device state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memory {
    pub mode: MemoryMode,
    /// [`MemoryMode::Mapped`] and [`MemoryMode::Delta`]: the raw guest RAM
    /// image (`memory_mib` MiB, sparse where the guest never wrote).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram: Option<FileEntry>,
    /// The QEMU migration stream: device state only (mapped), device state
    /// and the pages that differ from `ram` (delta), or device state and
    /// all of RAM (streamed).
    pub state: FileEntry,
}

/// The snapshot a snapshot of a restored VM was taken from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parent {
    /// sha256 of the parent's `snapshot.json` bytes.
    pub manifest_sha256: String,
}

/// `snapshot.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotManifest {
    pub format_version: u32,
    pub created_unix_ms: u64,
    /// The QEMU that wrote the device state.
    pub qemu: QemuVersion,
    pub kernel: Kernel,
    pub initramfs: FileEntry,
    pub device: Device,
    /// Base first (raw); each later layer is a qcow2 whose backing is the
    /// layer before it. A template has one raw layer; a snapshot of a
    /// restored VM adds that VM's overlay (and carries its parent's layers,
    /// hard-linked, so the directory stands alone).
    pub disk: Vec<DiskLayer>,
    pub memory: Memory,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Parent>,
    /// The guest configuration the VM booted with (the VM crate's
    /// `GuestConfig`; opaque here).
    pub guest: serde_json::Value,
    /// The start command's pid, start time and state as the agent reported
    /// them at snapshot time.
    #[serde(default)]
    pub start: serde_json::Value,
    /// Phase durations (`boot`, `steps`, `ready`, `snapshot`, `commit`).
    #[serde(default)]
    pub timings_ms: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("not a snapshot manifest: {0}")]
    Json(String),
    #[error(
        "written by an older nullspace (format 1: no format_version, host kernel by path, no checksums); this nullspace reads format {FORMAT_VERSION}: rebuild the template"
    )]
    Legacy,
    #[error("format {found}; this nullspace reads format {FORMAT_VERSION}: rebuild the template")]
    Version { found: u64 },
    #[error(
        "made by QEMU {snapshot}, this host runs QEMU {host} (another major version cannot load its device state): rebuild the template"
    )]
    Qemu { snapshot: String, host: String },
    #[error("invalid manifest: {0}")]
    Invalid(String),
}

impl SnapshotManifest {
    /// Parses `snapshot.json`, checking the format version first (so an
    /// older or newer manifest gets that message rather than a field
    /// error), then the structure ([`SnapshotManifest::validate`]).
    pub fn from_json(bytes: &[u8]) -> Result<SnapshotManifest, ManifestError> {
        let v: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Json(e.to_string()))?;
        let obj = v
            .as_object()
            .ok_or_else(|| ManifestError::Json("not a JSON object".into()))?;
        match obj.get("format_version") {
            None => return Err(ManifestError::Legacy),
            Some(f) => match f.as_u64() {
                Some(n) if n == FORMAT_VERSION as u64 => {}
                Some(n) => return Err(ManifestError::Version { found: n }),
                None => return Err(ManifestError::Invalid(format!("format_version {f}"))),
            },
        }
        let m: SnapshotManifest =
            serde_json::from_value(v).map_err(|e| ManifestError::Invalid(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut b = serde_json::to_vec_pretty(self).expect("manifest serializes");
        b.push(b'\n');
        b
    }

    /// Every file with its role, in restore order of interest.
    pub fn files(&self) -> Vec<(&'static str, &FileEntry)> {
        let mut v = vec![
            ("kernel", &self.kernel.file),
            ("initramfs", &self.initramfs),
        ];
        for l in &self.disk {
            v.push(("disk", &l.file));
        }
        if let Some(r) = &self.memory.ram {
            v.push(("memory", r));
        }
        v.push(("device state", &self.memory.state));
        v
    }

    /// Structure rules: plain file names (no directories, no `..`, no
    /// absolute paths: a manifest cannot make a restore read outside its
    /// directory), each used once, sha256 as 64 lowercase hex digits; a
    /// raw base disk then qcow2 layers; a RAM file exactly when mapped.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let bad = |m: String| Err(ManifestError::Invalid(m));
        let mut seen = std::collections::BTreeSet::new();
        for (role, f) in self.files() {
            if !is_plain_name(&f.path) {
                return bad(format!(
                    "{role} file {:?}: must be a plain file name in the snapshot directory",
                    f.path
                ));
            }
            if f.path == MANIFEST_FILE || !seen.insert(f.path.as_str()) {
                return bad(format!("{role} file {:?}: listed twice", f.path));
            }
            if !is_sha256_hex(&f.sha256) {
                return bad(format!("{role} file {}: sha256 {:?}", f.path, f.sha256));
            }
        }
        match self.disk.split_first() {
            None => return bad("no disk".into()),
            Some((base, rest)) => {
                if base.format != DiskFormat::Raw {
                    return bad(format!(
                        "disk {}: the base layer must be raw",
                        base.file.path
                    ));
                }
                if let Some(l) = rest.iter().find(|l| l.format != DiskFormat::Qcow2) {
                    return bad(format!("disk {}: upper layers must be qcow2", l.file.path));
                }
            }
        }
        match (self.memory.mode, &self.memory.ram) {
            (MemoryMode::Mapped | MemoryMode::Delta, None) => {
                return bad("mapped memory without a RAM file".into());
            }
            (MemoryMode::Streamed, Some(r)) => {
                return bad(format!("streamed memory with a RAM file {}", r.path));
            }
            (MemoryMode::Mapped | MemoryMode::Delta, Some(r))
                if r.size != (self.device.qemu_memory_mib() as u64) << 20 =>
            {
                return bad(format!(
                    "RAM file {}: {} bytes for {} MiB of guest memory",
                    r.path,
                    r.size,
                    self.device.qemu_memory_mib()
                ));
            }
            _ => {}
        }
        if self.device.memory_mib == 0 || self.device.vcpus == 0 {
            return bad("memory_mib and vcpus must be positive".into());
        }
        if let Some(c) = &self.device.ceiling
            && c.admits(self.device.vcpus, self.device.memory_mib).is_err()
        {
            return bad(format!(
                "size {} vCPUs / {} MiB is outside its ceiling {c:?}",
                self.device.vcpus, self.device.memory_mib
            ));
        }
        if self.device.machine != "microvm" {
            return bad(format!("machine {:?} (only microvm)", self.device.machine));
        }
        Ok(())
    }

    /// Whether `host`'s QEMU can load this snapshot's device state: the
    /// same major version. (microvm has no versioned machine types, so QEMU
    /// promises no migration compatibility across releases; within a major
    /// version the device state of microvm's devices has been stable.)
    pub fn check_qemu(&self, host: &QemuVersion) -> Result<(), ManifestError> {
        if self.qemu.major == host.major {
            Ok(())
        } else {
            Err(ManifestError::Qemu {
                snapshot: self.qemu.to_string(),
                host: host.to_string(),
            })
        }
    }
}

/// A file name without directories, not hidden, of safe characters.
pub fn is_plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'))
}

pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(p: &str, size: u64) -> FileEntry {
        FileEntry {
            path: p.into(),
            size,
            sha256: "ab".repeat(32),
        }
    }

    fn sample() -> SnapshotManifest {
        SnapshotManifest {
            format_version: FORMAT_VERSION,
            created_unix_ms: 1,
            qemu: QemuVersion {
                major: 10,
                minor: 0,
                micro: 2,
                package: "Debian".into(),
            },
            kernel: Kernel {
                version: "6.1.0-57-cloud-amd64".into(),
                file: file("vmlinuz", 8 << 20),
            },
            initramfs: file("initrd.img", 1 << 20),
            device: Device {
                machine: "microvm".into(),
                accel: Accel::Tcg,
                memory_mib: 512,
                vcpus: 2,
                network: false,
                spare_disks: 4,
                nic: true,
                kernel_cmdline: "console=ttyS0".into(),
                ceiling: None,
            },
            disk: vec![DiskLayer {
                format: DiskFormat::Raw,
                file: file("disk.ext4", 1 << 26),
            }],
            memory: Memory {
                mode: MemoryMode::Mapped,
                ram: Some(file("memory.ram", 512 << 20)),
                state: file("device.state", 60_000),
            },
            parent: None,
            guest: serde_json::json!({"hostname": "h"}),
            start: serde_json::json!({"pid": 7}),
            timings_ms: BTreeMap::from([("snapshot".to_string(), 9)]),
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let back = SnapshotManifest::from_json(&m.to_json()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.files().len(), 5);
    }

    #[test]
    fn older_and_newer_formats_are_refused_with_a_rebuild_hint() {
        let legacy = br#"{"vm": {"vmlinuz": "/boot/vmlinuz-6.1.0-56-cloud-amd64"}, "config": {}}"#;
        let e = SnapshotManifest::from_json(legacy).unwrap_err();
        assert_eq!(e, ManifestError::Legacy);
        assert!(e.to_string().contains("rebuild the template"), "{e}");
        let mut v = serde_json::to_value(sample()).unwrap();
        v["format_version"] = serde_json::json!(3);
        let e = SnapshotManifest::from_json(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert_eq!(e, ManifestError::Version { found: 3 });
        assert!(e.to_string().starts_with("format 3;"), "{e}");
        assert!(matches!(
            SnapshotManifest::from_json(b"[1]"),
            Err(ManifestError::Json(_))
        ));
    }

    #[test]
    fn paths_must_stay_in_the_snapshot_directory() {
        for p in [
            "../disk.ext4",
            "/etc/shadow",
            "a/b",
            "",
            ".hidden",
            "snapshot.json",
        ] {
            let mut m = sample();
            m.disk[0].file.path = p.into();
            let e = SnapshotManifest::from_json(&m.to_json()).unwrap_err();
            assert!(matches!(e, ManifestError::Invalid(_)), "{p}: {e}");
        }
        let mut m = sample();
        m.initramfs.path = "vmlinuz".into();
        assert!(
            m.validate()
                .unwrap_err()
                .to_string()
                .contains("listed twice")
        );
        let mut m = sample();
        m.memory.state.sha256 = "AB".repeat(32);
        assert!(m.validate().is_err());
    }

    #[test]
    fn structure_rules() {
        let mut m = sample();
        m.memory.ram = None;
        assert!(m.validate().unwrap_err().to_string().contains("mapped"));
        let mut m = sample();
        m.memory.mode = MemoryMode::Streamed;
        assert!(m.validate().is_err());
        m.memory.ram = None;
        m.validate().unwrap();
        let mut m = sample();
        m.memory.ram.as_mut().unwrap().size = 1;
        assert!(m.validate().is_err());
        let mut m = sample();
        m.disk[0].format = DiskFormat::Qcow2;
        assert!(m.validate().is_err());
        let mut m = sample();
        m.disk.push(DiskLayer {
            format: DiskFormat::Raw,
            file: file("disk.1.raw", 1),
        });
        assert!(m.validate().is_err());
        m.disk[1].format = DiskFormat::Qcow2;
        m.validate().unwrap();
    }

    #[test]
    fn qemu_major_version_must_match() {
        let m = sample();
        let mut host = m.qemu.clone();
        host.minor = 2;
        m.check_qemu(&host).unwrap();
        host.major = 7;
        let e = m.check_qemu(&host).unwrap_err();
        assert_eq!(
            e.to_string(),
            "made by QEMU 10.0.2, this host runs QEMU 7.2.2 (another major version cannot load its device state): rebuild the template"
        );
    }
}
