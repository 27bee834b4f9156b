//! Spare disks: where volumes go. A microvm cannot hot-plug a device
//! (`Bus 'virtio-mmio-bus.N' does not support hotplugging`), so every VM
//! booted from now on declares [`SPARE_DISKS`] `virtio-blk-device`s after
//! its root disk, each a `raw` node `vol<slot>` over a `null-co`
//! placeholder (a 0-byte disk), with serial `nsvol<slot>` for the guest to
//! find it by. The count is recorded in the snapshot ([`VmMeta::spare_disks`];
//! older snapshots read 0: no volumes), and a restore declares the same
//! devices, each over the placeholder or over a volume's image.
//!
//! At run time a spare is re-pointed by QMP: `blockdev-add` of the image,
//! `blockdev-reopen` of the raw node onto it, `block_resize` to its size
//! (which tells the guest the new capacity); a detach re-points it at a
//! new placeholder and deletes the image's node, after which QEMU no
//! longer holds the file. A read-only attachment is a qcow2 overlay in the
//! VM's directory over the image opened read-only: whatever the guest
//! writes lands in the overlay (thrown away at detach), never in a shared
//! image.

use super::overlay::create_overlay;
use crate::VmError;
use crate::qmp::Qmp;
use crate::snapshot::VmMeta;
use nullspace_model::agent::volume::serial;
use nullspace_model::snapshot::DiskFormat;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Spare disks of every VM booted from now on: the most volumes one
/// machine can have attached at once.
pub const SPARE_DISKS: u32 = 4;

/// A volume's image behind a spare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpareImage {
    /// The ext4 image (raw, fixed size).
    pub path: PathBuf,
    pub read_only: bool,
    /// The image's size: the capacity the guest is told.
    pub size: u64,
}

fn raw_node(slot: u32) -> String {
    format!("vol{slot}")
}
fn image_node(slot: u32) -> String {
    format!("vol{slot}img")
}
fn placeholder_node(slot: u32) -> String {
    format!("vol{slot}p")
}

/// The read-only overlay of `slot` in VM directory `dir`.
fn overlay_path(dir: &Path, slot: u32) -> PathBuf {
    dir.join(format!("vol{slot}.ro.qcow2"))
}

fn placeholder(slot: u32) -> Value {
    json!({"driver": "null-co", "node-name": placeholder_node(slot), "size": 0, "read-zeroes": true})
}

/// The node an image is opened as (a fresh overlay for read-only).
fn image(dir: &Path, slot: u32, img: &SpareImage) -> Result<Value, VmError> {
    if !img.read_only {
        return Ok(json!({"driver": "file", "node-name": image_node(slot), "filename": img.path}));
    }
    let ov = overlay_path(dir, slot);
    let _ = std::fs::remove_file(&ov);
    create_overlay(&ov, &img.path, DiskFormat::Raw, img.size)?;
    Ok(json!({
        "driver": "qcow2",
        "node-name": image_node(slot),
        "file": {"driver": "file", "filename": ov},
        "backing": {
            "driver": "raw",
            "read-only": true,
            "file": {"driver": "file", "filename": img.path, "read-only": true},
        },
    }))
}

/// The `-blockdev`/`-device` arguments of `meta`'s spares, slot `i` over
/// `images[i]` when given, else over the placeholder. Creates read-only
/// overlays in `dir`.
pub(super) fn args(
    meta: &VmMeta,
    dir: &Path,
    images: &[Option<SpareImage>],
) -> Result<Vec<String>, VmError> {
    if images.len() > meta.spare_disks as usize {
        return Err(VmError::Restore(format!(
            "{} volumes for a snapshot with {} spare disks (templates built before volumes have none: rebuild the template)",
            images.len(),
            meta.spare_disks
        )));
    }
    let mut a = Vec::new();
    for slot in 0..meta.spare_disks {
        let file = match images.get(slot as usize).and_then(Option::as_ref) {
            Some(img) => image(dir, slot, img)?,
            None => placeholder(slot),
        };
        let node = json!({"driver": "raw", "node-name": raw_node(slot), "file": file});
        a.extend([
            "-blockdev".to_string(),
            node.to_string(),
            "-device".into(),
            format!(
                "virtio-blk-device,drive={},serial={}",
                raw_node(slot),
                serial(slot)
            ),
        ]);
    }
    Ok(a)
}

fn qmp(dir: &Path) -> Result<Qmp, VmError> {
    Qmp::connect(&dir.join("qmp.sock"), Duration::from_secs(10))
}

fn reopen(q: &mut Qmp, slot: u32, file: &str) -> Result<(), VmError> {
    q.execute(
        "blockdev-reopen",
        json!({"options": [{"driver": "raw", "node-name": raw_node(slot), "file": file}]}),
    )
    .map(|_| ())
}

/// Points spare `slot` of the running VM whose directory (sockets) is
/// `dir` at `img`, and tells the guest its capacity. The guest then
/// mounts it (agent `mount`).
pub fn attach(dir: &Path, slot: u32, img: &SpareImage) -> Result<(), VmError> {
    let mut q = qmp(dir)?;
    // A node left by an earlier attach that failed half-way.
    let _ = q.execute("blockdev-del", json!({"node-name": image_node(slot)}));
    q.execute("blockdev-add", image(dir, slot, img)?)?;
    if let Err(e) = reopen(&mut q, slot, &image_node(slot)) {
        let _ = q.execute("blockdev-del", json!({"node-name": image_node(slot)}));
        return Err(e);
    }
    // The placeholder added by an earlier detach (one made on the command
    // line went with the reopen).
    let _ = q.execute("blockdev-del", json!({"node-name": placeholder_node(slot)}));
    q.execute(
        "block_resize",
        json!({"node-name": raw_node(slot), "size": img.size}),
    )?;
    Ok(())
}

/// Points spare `slot` back at a placeholder and closes the image (the
/// guest must have unmounted it: reads of a still-mounted one fail).
pub fn detach(dir: &Path, slot: u32) -> Result<(), VmError> {
    let mut q = qmp(dir)?;
    let _ = q.execute("blockdev-del", json!({"node-name": placeholder_node(slot)}));
    q.execute("blockdev-add", placeholder(slot))?;
    reopen(&mut q, slot, &placeholder_node(slot))?;
    let _ = q.execute("blockdev-del", json!({"node-name": image_node(slot)}));
    let _ = std::fs::remove_file(overlay_path(dir, slot));
    Ok(())
}
