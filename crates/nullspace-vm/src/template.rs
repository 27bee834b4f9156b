//! Template snapshots: boot the template rootfs, start the start command
//! with the runtime defaults, wait for readiness, snapshot memory + disk.
//! Sandboxes restore it with a qcow2 overlay each.
//!
//! A snapshot directory holds `disk.ext4` (the rootfs as of the snapshot,
//! grown to `disk_mb`), `memory.bin` (QEMU migration stream), `initrd.img`
//! (the exact initramfs the VM booted) and `snapshot.json` ([`SnapshotMeta`]).

use crate::qemu::{Accel, BootSpec, QemuVm, QemuVmm, RestoreSpec};
use crate::readiness::{Readiness, wait_ready};
use crate::{VmError, rootfs};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What `nullspace-init` reads from `/nullspace/config.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GuestConfig {
    pub hostname: String,
    pub env: BTreeMap<String, String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    pub start_cmd: Option<String>,
    pub agent_port: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub probe_only: bool,
}

impl GuestConfig {
    pub fn new(hostname: &str) -> GuestConfig {
        GuestConfig {
            hostname: hostname.to_string(),
            agent_port: crate::qemu::AGENT_PORT.to_string(),
            ..Default::default()
        }
    }
}

/// The VM shape a snapshot must be restored with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmMeta {
    pub vmlinuz: PathBuf,
    pub kernel_version: String,
    pub memory_mb: u32,
    pub vcpus: u32,
    pub accel: Accel,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub vm: VmMeta,
    pub config: GuestConfig,
    /// The start command's pid and start time in the guest (from `info`).
    pub start: serde_json::Value,
    pub disk_bytes: u64,
    pub memory_bytes: u64,
    pub timings_ms: Timings,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Timings {
    /// QEMU start to the agent's first answer.
    pub boot: u64,
    /// Agent up to readiness (includes the startup grace).
    pub ready: u64,
    /// `stop` + migrate + quit.
    pub snapshot: u64,
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub dir: PathBuf,
    pub meta: SnapshotMeta,
}

pub const SNAPSHOT_FILE: &str = "snapshot.json";

impl Snapshot {
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.ext4")
    }

    pub fn open(dir: &Path) -> Result<Snapshot, VmError> {
        let p = dir.join(SNAPSHOT_FILE);
        let b = std::fs::read(&p).map_err(VmError::io(p.display().to_string()))?;
        let meta = serde_json::from_slice(&b)
            .map_err(|e| VmError::Restore(format!("{}: {e}", p.display())))?;
        Ok(Snapshot {
            dir: dir.to_path_buf(),
            meta,
        })
    }
}

/// Inputs of a template snapshot.
#[derive(Debug, Clone)]
pub struct TemplateSpec {
    /// The imported `rootfs.ext4` (left untouched; copied into the snapshot).
    pub rootfs: PathBuf,
    /// Runtime defaults (env, user, workdir) and the start command.
    pub config: GuestConfig,
    /// `None`: ready as soon as the agent answers (and the start command, if
    /// any, is still running after the grace period of 0).
    pub readiness: Option<Readiness>,
    pub memory_mb: u32,
    pub vcpus: u32,
    /// Minimum rootfs size; grown before boot.
    pub disk_mb: Option<u64>,
    pub boot_timeout: Duration,
}

impl TemplateSpec {
    pub fn new(rootfs: &Path, config: GuestConfig) -> TemplateSpec {
        TemplateSpec {
            rootfs: rootfs.to_path_buf(),
            config,
            readiness: None,
            memory_mb: 512,
            vcpus: 2,
            disk_mb: None,
            boot_timeout: Duration::from_secs(60),
        }
    }
}

/// Removes a half-written snapshot directory unless disarmed.
struct DirGuard<'a>(&'a Path, bool);

impl Drop for DirGuard<'_> {
    fn drop(&mut self) {
        if !self.1 {
            let _ = std::fs::remove_dir_all(self.0);
        }
    }
}

/// Boots the template, waits for readiness and snapshots it into `out`
/// (created; must not exist). On failure `out` is removed and no VM is left.
pub fn build_snapshot(vmm: &QemuVmm, spec: &TemplateSpec, out: &Path) -> Result<Snapshot, VmError> {
    rootfs::check_shell(&spec.rootfs)?;
    std::fs::create_dir(out).map_err(VmError::io(out.display().to_string()))?;
    let mut guard = DirGuard(out, false);
    let disk = out.join("disk.ext4");
    std::fs::copy(&spec.rootfs, &disk).map_err(VmError::io("copy rootfs"))?;
    if let Some(mb) = spec.disk_mb {
        rootfs::grow(&disk, mb)?;
    }
    let boot = BootSpec {
        disk: disk.clone(),
        config: spec.config.clone(),
        memory_mb: spec.memory_mb,
        vcpus: spec.vcpus,
        boot_timeout: spec.boot_timeout,
    };
    let mut vm = QemuVm::boot(vmm, &boot)?;
    let boot_ms = vm.ready_ms as u64;
    let t_ready = Instant::now();
    let agent = crate::Vm::agent(&mut vm);
    match &spec.readiness {
        Some(r) => {
            wait_ready(agent, r)?;
        }
        None => {
            let none = Readiness {
                probe: crate::Probe::Timeout { timeout_ms: 0 },
                timeout: Duration::ZERO,
                interval: Duration::from_millis(100),
                startup_grace: Duration::ZERO,
            };
            wait_ready(agent, &none)?;
        }
    }
    let ready_ms = t_ready.elapsed().as_millis() as u64;
    let info = agent.info(Duration::from_secs(10))?;
    let t_snap = Instant::now();
    let vm_meta = vm.meta().clone();
    vm.snapshot_to(out)?;
    let snapshot_ms = t_snap.elapsed().as_millis() as u64;
    let size = |p: PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let meta = SnapshotMeta {
        vm: vm_meta,
        config: spec.config.clone(),
        start: info["start"].clone(),
        disk_bytes: size(disk),
        memory_bytes: size(out.join("memory.bin")),
        timings_ms: Timings {
            boot: boot_ms,
            ready: ready_ms,
            snapshot: snapshot_ms,
        },
    };
    let json = serde_json::to_vec_pretty(&meta).unwrap_or_default();
    std::fs::write(out.join(SNAPSHOT_FILE), json).map_err(VmError::io("snapshot.json"))?;
    guard.1 = true;
    Ok(Snapshot {
        dir: out.to_path_buf(),
        meta,
    })
}

/// A sandbox from a snapshot: a new QEMU with `-incoming`, a qcow2 overlay
/// over the snapshot disk, `cont`, agent reconnected.
pub fn restore(snapshot: &Snapshot, spec: &RestoreSpec) -> Result<QemuVm, VmError> {
    QemuVm::restore(snapshot, spec)
}
