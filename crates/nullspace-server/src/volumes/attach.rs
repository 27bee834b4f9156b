//! Volumes in machines: attach (the store's lock, a spare disk re-pointed
//! at the image, the guest's mount), detach, health, remount, and what
//! pause, resume, fork, snapshots and a machine's end do with them (see
//! the module doc of `volumes`).

use std::sync::Arc;

use nullspace_model::agent::MountSpec;
use nullspace_model::machine::MachineStatus;
use nullspace_model::machine::volume::{VolumeAttachment, VolumeMountBody};
use nullspace_store::{AttachOutcome, AttachmentRow, Caller, now_ms};
use nullspace_vm::spares::{self, SpareImage};

use super::{VolumeError, VolumeResult, catalog, rules};
use crate::machines::commands::running;
use crate::machines::record;
use crate::model::iso;
use crate::runtime::{Live, Runtime};
use crate::state::Shared;

pub const MOUNTED: &str = "mounted";
pub const FAILED: &str = "failed";
pub const PAUSED: &str = "paused";
pub const RELEASED: &str = "released";

/// An attachment as the SDK reads it; a paused machine's says `paused`.
pub fn wire(a: &AttachmentRow, machine_paused: bool) -> VolumeAttachment {
    let state = if machine_paused && a.state == MOUNTED {
        PAUSED.to_string()
    } else {
        a.state.clone()
    };
    VolumeAttachment {
        id: a.id.clone(),
        volume_id: a.volume_id.clone(),
        machine_id: a.machine_id.clone(),
        mount_path: a.mount_path.clone(),
        read_only: a.read_only,
        state,
        subpath: (!a.subpath.is_empty()).then(|| a.subpath.clone()),
        last_error_code: (!a.last_error.is_empty()).then(|| "mount_failed".to_string()),
        last_error_message: (!a.last_error.is_empty()).then(|| a.last_error.clone()),
        created_at: iso(a.created_at),
        updated_at: iso(a.updated_at),
    }
}

fn spare_image(state: &Shared, a: &AttachmentRow, size: i64) -> SpareImage {
    SpareImage {
        path: super::image(state, &a.volume_id),
        read_only: a.read_only,
        size: size as u64,
    }
}

fn mount_spec(a: &AttachmentRow, size: i64) -> MountSpec {
    MountSpec {
        slot: a.slot as u32,
        mount_path: a.mount_path.clone(),
        read_only: a.read_only,
        subpath: (!a.subpath.is_empty()).then(|| a.subpath.clone()),
        size_bytes: size as u64,
    }
}

fn device_err(volume: &str, reason: impl std::fmt::Display) -> VolumeError {
    VolumeError::Device {
        volume: volume.to_string(),
        reason: reason.to_string(),
    }
}

/// Re-points the spare at the image and mounts it in the guest.
async fn plug(
    live: &Arc<Live>,
    img: SpareImage,
    spec: MountSpec,
    volume: &str,
) -> VolumeResult<()> {
    let dir = live.handle.dir.clone();
    let slot = spec.slot;
    tokio::task::spawn_blocking(move || spares::attach(&dir, slot, &img))
        .await
        .map_err(|e| device_err(volume, e))?
        .map_err(|e| device_err(volume, format!("attaching spare disk {slot}: {e}")))?;
    if let Err(e) = live.guest.mount_volume(spec).await {
        unplug_device(live, slot).await;
        return Err(device_err(volume, format!("mounting in the guest: {e}")));
    }
    Ok(())
}

/// The spare back on its placeholder (QEMU closes the image).
async fn unplug_device(live: &Arc<Live>, slot: u32) {
    let dir = live.handle.dir.clone();
    match tokio::task::spawn_blocking(move || spares::detach(&dir, slot)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(machine = %live.id, slot, "releasing a spare disk: {e}"),
        Err(e) => tracing::warn!(machine = %live.id, slot, "releasing a spare disk: {e}"),
    }
}

/// `POST /v1/machines/{id}/volumes`: attaches at run time.
pub async fn attach(
    state: &Shared,
    c: &Caller,
    machine_id: &str,
    b: &VolumeMountBody,
) -> VolumeResult<VolumeAttachment> {
    let mount_path = rules::mount_path(&b.mount_path)?;
    let subpath = rules::subpath(b.subpath.as_deref())?;
    let (_m, live) = running(state, c, machine_id).await?;
    let v = catalog::resolve(state, c, &b.reference).await?;
    let _l = live.lifecycle.lock().await;
    let spares_n = Runtime::spare_disks(&live);
    if spares_n == 0 {
        return Err(VolumeError::Conflict(format!(
            "machine {machine_id} has no spare disks for volumes: its template was built before volumes existed; rebuild the template"
        )));
    }
    let held = state.store.volume_attachments(machine_id, true).await?;
    if held.iter().any(|a| a.mount_path == mount_path) {
        return Err(VolumeError::Conflict(format!(
            "machine {machine_id} has a volume at {mount_path} already"
        )));
    }
    let Some(slot) = (0..spares_n as i64).find(|s| held.iter().all(|a| a.slot != *s)) else {
        return Err(VolumeError::Conflict(format!(
            "machine {machine_id} has {spares_n} volumes attached, the most it can have"
        )));
    };
    let now = now_ms();
    let row = AttachmentRow {
        id: nullspace_store::new_id("vatt_"),
        volume_id: v.id.clone(),
        machine_id: machine_id.to_string(),
        namespace: c.namespace.clone(),
        slot,
        mount_path,
        read_only: b.read_only,
        subpath: subpath.unwrap_or_default(),
        state: "mounting".into(),
        last_error: String::new(),
        created_at: now,
        updated_at: now,
    };
    match state.store.attach_volume(&row).await? {
        AttachOutcome::Attached => {}
        AttachOutcome::Gone => return Err(VolumeError::NotFound(b.reference.clone())),
        AttachOutcome::Duplicate => {
            return Err(VolumeError::Conflict(format!(
                "volume {} is attached to machine {machine_id} already",
                v.id
            )));
        }
        AttachOutcome::InUse { holder, ro_count } => {
            let holder = if holder.is_empty() {
                format!("{ro_count} read-only attachment(s); a read-write attach needs none")
            } else if holder == super::files::HOST_HOLDER {
                "a file operation on the server (retry)".to_string()
            } else {
                format!("machine {holder}")
            };
            return Err(VolumeError::InUse {
                volume: v.id,
                holder,
            });
        }
    }
    let t = std::time::Instant::now();
    if let Err(e) = plug(
        &live,
        spare_image(state, &row, v.size_bytes),
        mount_spec(&row, v.size_bytes),
        &v.id,
    )
    .await
    {
        let _ = state.store.detach_volume(&row.id).await;
        return Err(e);
    }
    tracing::info!(machine = %machine_id, volume = %v.id, slot, ms = t.elapsed().as_millis() as u64, "volume attached");
    let mut row = row;
    row.state = MOUNTED.into();
    row.updated_at = now_ms();
    state
        .store
        .set_attachment_state(&row.id, MOUNTED, "", row.updated_at)
        .await?;
    Ok(wire(&row, false))
}

/// The volumes of a create body, attached once the machine runs; a
/// failure ends the machine (a create gives all it asked or nothing).
pub async fn at_create(
    state: &Shared,
    c: &Caller,
    machine_id: &str,
    mounts: &[VolumeMountBody],
) -> VolumeResult<Vec<VolumeAttachment>> {
    let mut out = Vec::new();
    for b in mounts {
        match attach(state, c, machine_id, b).await {
            Ok(a) => out.push(a),
            Err(e) => {
                let _ = crate::machines::end::destroy(state, c, machine_id).await;
                return Err(e);
            }
        }
    }
    Ok(out)
}

/// Before a create makes anything: every `ref` is one of the caller's
/// volumes, and none is in exclusive use (a race can still lose, at
/// attach, which then ends the machine).
pub async fn check_at_create(
    state: &Shared,
    c: &Caller,
    mounts: &[VolumeMountBody],
) -> VolumeResult<()> {
    for b in mounts {
        let v = catalog::resolve(state, c, &b.reference).await?;
        let held = state.store.volume_attachments(&v.id, false).await?;
        let rw = held.iter().filter(|a| !a.read_only).count();
        if !rules::may_join(b.read_only, rw, held.len() - rw) {
            let holder = held
                .iter()
                .find(|a| !a.read_only)
                .map(|a| format!("machine {}", a.machine_id))
                .unwrap_or_else(|| format!("{} read-only attachment(s)", held.len()));
            return Err(VolumeError::InUse {
                volume: v.id,
                holder,
            });
        }
    }
    Ok(())
}

/// The caller's attachment `aid` of machine `machine_id`.
async fn attachment(
    state: &Shared,
    c: &Caller,
    machine_id: &str,
    aid: &str,
) -> VolumeResult<AttachmentRow> {
    state
        .store
        .volume_attachment(aid)
        .await?
        .filter(|a| a.namespace == c.namespace && a.machine_id == machine_id)
        .ok_or_else(|| VolumeError::AttachmentNotFound(aid.to_string()))
}

async fn volume_size(state: &Shared, a: &AttachmentRow) -> VolumeResult<i64> {
    Ok(state
        .store
        .volume(&a.namespace, &a.volume_id)
        .await?
        .ok_or_else(|| VolumeError::NotFound(a.volume_id.clone()))?
        .size_bytes)
}

/// `DELETE /v1/machines/{id}/volumes/{attachment_id}`: unmounts (synced),
/// releases the spare and the lock. A paused machine must be resumed
/// first: its guest still has the mount in its memory.
pub async fn detach(
    state: &Shared,
    c: &Caller,
    machine_id: &str,
    aid: &str,
) -> VolumeResult<VolumeAttachment> {
    let m = record::load(state, c, machine_id).await?;
    let a = attachment(state, c, machine_id, aid).await?;
    if m.status() == MachineStatus::Paused {
        return Err(VolumeError::Conflict(format!(
            "machine {machine_id} is paused with volume {} mounted; resume it, then detach",
            a.volume_id
        )));
    }
    let (_m, live) = running(state, c, machine_id).await?;
    let _l = live.lifecycle.lock().await;
    if let Err(e) = live
        .guest
        .unmount_volume(a.slot as u32, &a.mount_path)
        .await
    {
        // The device goes anyway: the guest's open files then fail.
        tracing::warn!(machine = %machine_id, attachment = %aid, "unmount in the guest: {e}");
    }
    unplug_device(&live, a.slot as u32).await;
    state.store.detach_volume(&a.id).await?;
    let mut a = a;
    a.state = RELEASED.into();
    a.updated_at = now_ms();
    Ok(wire(&a, false))
}

/// A machine's attachments.
pub async fn list_for_machine(
    state: &Shared,
    c: &Caller,
    machine_id: &str,
) -> VolumeResult<Vec<VolumeAttachment>> {
    let m = record::load(state, c, machine_id).await?;
    let paused = m.status() == MachineStatus::Paused;
    Ok(state
        .store
        .volume_attachments(machine_id, true)
        .await?
        .iter()
        .map(|a| wire(a, paused))
        .collect())
}

/// A volume's attachments.
pub async fn list_for_volume(
    state: &Shared,
    c: &Caller,
    volume_id: &str,
) -> VolumeResult<Vec<VolumeAttachment>> {
    let v = catalog::get(state, c, volume_id).await?;
    Ok(state
        .store
        .volume_attachments(&v.id, false)
        .await?
        .iter()
        .map(|a| wire(a, false))
        .collect())
}

/// `GET …/volumes/{attachment_id}/health`: asks the guest whether it is
/// still mounted (`failed` otherwise, with the reason).
pub async fn health(
    state: &Shared,
    c: &Caller,
    machine_id: &str,
    aid: &str,
) -> VolumeResult<VolumeAttachment> {
    let m = record::load(state, c, machine_id).await?;
    let mut a = attachment(state, c, machine_id, aid).await?;
    if m.status() == MachineStatus::Paused {
        return Ok(wire(&a, true));
    }
    let (_m, live) = running(state, c, machine_id).await?;
    let (st, err) = match live.guest.volume_health(a.slot as u32, &a.mount_path).await {
        Ok(s) if s.mounted => (MOUNTED, String::new()),
        Ok(_) => (
            FAILED,
            format!("{} is not mounted in the guest", a.mount_path),
        ),
        Err(e) => (FAILED, format!("the guest did not answer: {e}")),
    };
    a.state = st.into();
    a.last_error = err;
    a.updated_at = now_ms();
    state
        .store
        .set_attachment_state(&a.id, &a.state, &a.last_error, a.updated_at)
        .await?;
    Ok(wire(&a, false))
}

/// `POST …/volumes/{attachment_id}/remount`: unmounts and mounts again
/// (the spare re-pointed too), e.g. after the guest unmounted it.
pub async fn remount(
    state: &Shared,
    c: &Caller,
    machine_id: &str,
    aid: &str,
) -> VolumeResult<VolumeAttachment> {
    let mut a = attachment(state, c, machine_id, aid).await?;
    let (_m, live) = running(state, c, machine_id).await?;
    let size = volume_size(state, &a).await?;
    let _l = live.lifecycle.lock().await;
    let _ = live
        .guest
        .unmount_volume(a.slot as u32, &a.mount_path)
        .await;
    // The spare is re-pointed from scratch, in case the device is what failed.
    unplug_device(&live, a.slot as u32).await;
    let r = plug(
        &live,
        spare_image(state, &a, size),
        mount_spec(&a, size),
        &a.volume_id,
    )
    .await;
    let (st, err) = match &r {
        Ok(()) => (MOUNTED, String::new()),
        Err(e) => (FAILED, e.to_string()),
    };
    a.state = st.into();
    a.last_error = err;
    a.updated_at = now_ms();
    state
        .store
        .set_attachment_state(&a.id, &a.state, &a.last_error, a.updated_at)
        .await?;
    r?;
    Ok(wire(&a, false))
}

/// A paused machine's images by slot, for the restore that resumes it.
pub async fn resume_images(
    state: &Shared,
    machine_id: &str,
) -> VolumeResult<Vec<Option<SpareImage>>> {
    let mut out: Vec<Option<SpareImage>> = Vec::new();
    for a in state.store.volume_attachments(machine_id, true).await? {
        let size = volume_size(state, &a).await?;
        let slot = a.slot as usize;
        if out.len() <= slot {
            out.resize(slot + 1, None);
        }
        out[slot] = Some(spare_image(state, &a, size));
    }
    Ok(out)
}

/// Before a fork or a user snapshot (the caller holds the lifecycle lock):
/// every volume unmounted (synced) and its spare on the placeholder, so
/// the snapshot holds no file system another machine could write through.
/// Returns what [`after_snapshot`] mounts again.
pub async fn before_snapshot(
    state: &Shared,
    live: &Arc<Live>,
) -> VolumeResult<Vec<(AttachmentRow, i64)>> {
    let held = state.store.volume_attachments(&live.id, true).await?;
    let mut out = Vec::new();
    for a in held {
        let size = volume_size(state, &a).await?;
        live.guest
            .unmount_volume(a.slot as u32, &a.mount_path)
            .await
            .map_err(|e| {
                device_err(&a.volume_id, format!("unmounting before the snapshot: {e}"))
            })?;
        unplug_device(live, a.slot as u32).await;
        out.push((a, size));
    }
    Ok(out)
}

/// After the snapshot: the original machine gets its volumes back.
pub async fn after_snapshot(state: &Shared, live: &Arc<Live>, held: Vec<(AttachmentRow, i64)>) {
    for (a, size) in held {
        let r = plug(
            live,
            spare_image(state, &a, size),
            mount_spec(&a, size),
            &a.volume_id,
        )
        .await;
        let (st, err) = match r {
            Ok(()) => (MOUNTED, String::new()),
            Err(e) => {
                tracing::warn!(machine = %live.id, attachment = %a.id, "remount after snapshot: {e}");
                (FAILED, e.to_string())
            }
        };
        let _ = state
            .store
            .set_attachment_state(&a.id, st, &err, now_ms())
            .await;
    }
}

/// A machine ended: its attachments and their locks go (its QEMU, which
/// held the images, is gone).
pub async fn release_machine(state: &Shared, machine_id: &str) {
    let held = match state.store.volume_attachments(machine_id, true).await {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(machine = %machine_id, "releasing volumes: {e}");
            return;
        }
    };
    for a in held {
        if let Err(e) = state.store.detach_volume(&a.id).await {
            tracing::warn!(machine = %machine_id, attachment = %a.id, "releasing a volume: {e}");
        }
    }
}
