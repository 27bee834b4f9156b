//! Taking snapshots of a VM: a build VM's (its RAM file already shared)
//! and a restored VM's (fork, snapshot, pause).

use super::args::RAM_ID;
use super::migration::{file_channel, set_migration, stop_migration, wait_migration};
use super::overlay::rebase;
use super::vm::{AfterSnapshot, Origin, QemuVm};
use crate::VmError;
use crate::agent::AgentClient;
use crate::process::{self, Watch};
use crate::qmp::RunState;
use crate::snapshot::{self as snapfs, Snapshot};
use nullspace_model::snapshot::{Device, DiskFormat, DiskLayer, Memory, Parent, SnapshotManifest};
use nullspace_model::snapshot::{MemoryMode, QemuVersion};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Removes a half-written snapshot directory unless disarmed.
pub(crate) struct DirGuard<'a>(pub &'a Path, pub bool);

impl Drop for DirGuard<'_> {
    fn drop(&mut self) {
        if !self.1 {
            // Read-only files go too: removal needs the directory writable,
            // which commits leave it.
            let _ = std::fs::remove_dir_all(self.0);
        }
    }
}

pub(super) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl QemuVm {
    /// The build VM's snapshot: pause, write the device state (mapped: the
    /// RAM is already in its file) or device state + RAM (streamed) into
    /// `out`, quit QEMU, copy the kernel and initramfs in. Returns the
    /// QEMU version and how long the VM was paused until its state was
    /// written. The files are committed by the caller.
    pub(crate) fn snapshot_build(
        mut self,
        out: &Path,
        watch: &Watch,
    ) -> Result<(QemuVersion, Duration), VmError> {
        self.settle_balloon(Duration::from_secs(120))?;
        // Drop the agent connection first: the guest sees the host leave,
        // and a restored guest waits for the next host to connect.
        self.agent = None;
        let mapped = self.meta.memory_mode == MemoryMode::Mapped;
        let stream = out.join(if mapped { "device.state" } else { "memory.bin" });
        let mut qmp = self.qmp(Duration::from_secs(10), watch)?;
        let version = qmp.version()?;
        set_migration(&mut qmp, mapped)?;
        let t = Instant::now();
        qmp.execute("stop", json!({}))?;
        qmp.execute("migrate", json!({"channels": file_channel(&stream)}))?;
        wait_migration(&mut qmp, watch, Duration::from_secs(120))?;
        // The snapshot's content is fixed from here (a stopped guest does
        // not write its RAM); the rest is cleanup and commit.
        let paused = t.elapsed();
        let _ = qmp.execute("quit", json!({}));
        drop(qmp);
        // QEMU unmaps guest RAM as it exits: only then is `memory.ram` done.
        self.qemu.end(Duration::from_secs(5));
        std::fs::copy(&self.initrd, out.join("initrd.img")).map_err(VmError::io("copy initrd"))?;
        std::fs::copy(&self.meta.vmlinuz, out.join("vmlinuz"))
            .map_err(VmError::io(format!("copy {}", self.meta.vmlinuz.display())))?;
        Ok((version, paused))
    }

    /// Snapshots a restored VM into `out` (created; must not exist) and
    /// leaves the VM as `after` says. `out` stands alone: the parent's
    /// kernel, initramfs and disk layers are hard-linked in (copied across
    /// filesystems), and the VM's disk overlay is added as `disk.N.qcow2`
    /// (only what this VM wrote; its backing is the layer before it).
    ///
    /// Memory (when the parent maps its RAM: mapped or delta) is stored as
    /// the difference from the parent's RAM file, which is the template's
    /// ([`super::delta`]): the VM is paused while QEMU writes its full
    /// migration stream through the delta filter into `device.state`, and
    /// its disk overlay is copied; the RAM file is hard-linked. Costs are
    /// in `timings_ms` (`snapshot`: VM paused; `commit`: the rest) and
    /// `bench/README.md`.
    ///
    /// On cancel the migration is cancelled, `out` removed, the VM left as
    /// `after` says (or paused, if cancelled while paused), and `Cancelled`
    /// returned.
    pub fn snapshot(
        &mut self,
        out: &Path,
        after: AfterSnapshot,
        cancel: &CancellationToken,
    ) -> Result<Snapshot, VmError> {
        let watch = Watch::new(cancel);
        let r = self.snapshot_watched(out, after, &watch);
        process::settle(r, watch)
    }

    pub(super) fn snapshot_watched(
        &mut self,
        out: &Path,
        after: AfterSnapshot,
        watch: &Watch,
    ) -> Result<Snapshot, VmError> {
        let Origin::Restored(origin) = &self.origin else {
            return Err(VmError::Snapshot(
                "only a restored VM can be snapshotted this way (a build VM is snapshotted by template::build_snapshot)".into(),
            ));
        };
        let origin = origin.clone();
        watch.check()?;
        std::fs::create_dir(out).map_err(VmError::io(out.display().to_string()))?;
        let out = std::fs::canonicalize(out).map_err(VmError::io(out.display().to_string()))?;
        let mut guard = DirGuard(&out, false);
        let om = &origin.manifest;
        let delta = om.memory.mode != MemoryMode::Streamed;
        let mut qmp = self.qmp(Duration::from_secs(10), watch)?;
        let version = qmp.version()?;
        // The start command's state, from the guest while it runs (a paused
        // guest cannot answer: then the parent's record stands).
        let start = match (qmp.status()?, self.agent.as_mut()) {
            (RunState::Running, Some(a)) => a
                .info(Duration::from_secs(10))
                .ok()
                .map(|i| i["start"].clone()),
            _ => None,
        };
        // As for a build snapshot: the guest in the snapshot has seen the
        // host leave and waits for the next one.
        self.agent = None;
        let t0 = Instant::now();
        if qmp.status()? == RunState::Postmigrate {
            // Paused after an earlier snapshot: QEMU migrates only after the
            // VM ran again (it runs for the few ms between the two commands).
            qmp.execute("cont", json!({}))?;
        }
        qmp.execute("stop", json!({}))?;
        set_migration(&mut qmp, false)?;
        let limit = Duration::from_secs(300);
        let migrated = if delta {
            let ram = om.memory.ram.as_ref().expect("validated: a RAM file");
            let state = out.join("device.state");
            super::delta::migrate(&mut qmp, RAM_ID, &origin.path(ram), &state, watch, limit)
                .map(|_| ())
        } else {
            let stream = out.join("memory.bin");
            let r = qmp
                .execute("migrate", json!({"channels": file_channel(&stream)}))
                .and_then(|_| wait_migration(&mut qmp, watch, limit));
            if r.is_err() {
                // Cancelled or failed: make sure no migration is still
                // running before the VM is resumed (a completed one would
                // pause it).
                stop_migration(&mut qmp);
            }
            r
        };
        // The disk overlay as of the pause (QEMU flushed it at `stop`).
        let n = om.disk.len();
        let top = format!("disk.{n}.qcow2");
        let copied = migrated.and_then(|_| {
            std::fs::copy(self.dir.path().join("disk.qcow2"), out.join(&top))
                .map(|_| ())
                .map_err(VmError::io("copy the disk overlay"))
        });
        let snapshot_ms = t0.elapsed().as_millis() as u64;
        // Leave the VM as asked before the slow part (and on failure too).
        let then = match after {
            AfterSnapshot::Resume => qmp.execute("cont", json!({})).map(|_| ()),
            AfterSnapshot::Pause => Ok(()),
            AfterSnapshot::Stop => {
                let _ = qmp.execute("quit", json!({}));
                Ok(())
            }
        };
        drop(qmp);
        match after {
            AfterSnapshot::Resume => {
                then.and_then(|_| self.reconnect_agent(Duration::from_secs(30)))?
            }
            AfterSnapshot::Pause => {
                // Connected now, answering once resumed.
                self.agent = AgentClient::connect(
                    &self.dir.path().join("agent.sock"),
                    Duration::from_secs(5),
                )
                .ok();
            }
            AfterSnapshot::Stop => {
                // A child is killed after the grace; an adopted QEMU is
                // waited for (it quit).
                self.qemu.end(Duration::from_secs(5));
            }
        }
        copied?;

        let t1 = Instant::now();
        for f in [&om.kernel.file, &om.initramfs]
            .into_iter()
            .chain(om.disk.iter().map(|l| &l.file))
        {
            snapfs::link_or_copy(&origin.path(f), &out.join(&f.path))?;
        }
        let prev = &om.disk[n - 1];
        rebase(&out.join(&top), &prev.file.path, prev.format)?;
        let memory = if delta {
            // The parent's RAM file is the template's (a delta's parent
            // links the same one): linked, its entry (and sha256) kept.
            let ram = om.memory.ram.as_ref().expect("validated: a RAM file");
            snapfs::link_or_copy(&origin.path(ram), &out.join(&ram.path))?;
            Memory {
                mode: MemoryMode::Delta,
                ram: Some(ram.clone()),
                state: snapfs::commit_file(&out, "device.state")?,
            }
        } else {
            Memory {
                mode: MemoryMode::Streamed,
                ram: None,
                state: snapfs::commit_file(&out, "memory.bin")?,
            }
        };
        let mut disk = om.disk.clone();
        disk.push(DiskLayer {
            format: DiskFormat::Qcow2,
            file: snapfs::commit_file(&out, &top)?,
        });
        let commit_ms = t1.elapsed().as_millis() as u64;
        let manifest = SnapshotManifest {
            created_unix_ms: now_ms(),
            qemu: version,
            disk,
            memory,
            parent: Some(Parent {
                manifest_sha256: origin.manifest_sha256.clone(),
            }),
            start: start.unwrap_or_else(|| om.start.clone()),
            // The machine's own size (a resize changes it), on its
            // origin's device set.
            device: Device {
                memory_mib: self.meta.memory_mb,
                vcpus: self.meta.vcpus,
                ..om.device.clone()
            },
            timings_ms: crate::snapshot::Timings {
                snapshot: snapshot_ms,
                commit: commit_ms,
                ..Default::default()
            }
            .to_map(),
            ..om.clone()
        };
        snapfs::write_manifest(&out, &manifest)?;
        guard.1 = true;
        Snapshot::open(&out)
    }
}
