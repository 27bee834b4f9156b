//! Volumes themselves: create (the image made before the row names it),
//! list, get by id or name, delete (refused while attached), and what the
//! SDK's `VolumeInfo` says of one.

use nullspace_model::machine::volume::{CreateVolumeBody, VolumeInfo};
use nullspace_store::{Caller, VolumeRow, now_ms};
use nullspace_vm::volume_image;

use super::{VolumeError, VolumeResult, rules};
use crate::model::iso;
use crate::state::Shared;

pub async fn create(state: &Shared, c: &Caller, b: &CreateVolumeBody) -> VolumeResult<VolumeInfo> {
    rules::name(&b.name)?;
    let size = rules::size(b.max_size_bytes)?;
    if state
        .store
        .volume_by_name(&c.namespace, &b.name)
        .await?
        .is_some()
    {
        return Err(VolumeError::NameTaken(b.name.clone()));
    }
    let id = nullspace_store::new_id("vol_");
    let dir = super::dir(state, &id);
    let img = super::image(state, &id);
    // The image first, in a directory of its own: a row never names a
    // volume without one, and a failed create leaves nothing.
    let made = {
        let (dir, img) = (dir.clone(), img.clone());
        tokio::task::spawn_blocking(move || -> VolumeResult<()> {
            std::fs::create_dir_all(&dir).map_err(|e| {
                VolumeError::Invalid(format!("volume directory {}: {e}", dir.display()))
            })?;
            volume_image::create(&img, size)?;
            Ok(())
        })
        .await
        .map_err(|e| VolumeError::Invalid(format!("volume create task: {e}")))?
    };
    let row = VolumeRow {
        id: id.clone(),
        namespace: c.namespace.clone(),
        name: b.name.clone(),
        size_bytes: size as i64,
        created_at: now_ms(),
        rw_holder: String::new(),
        ro_count: 0,
    };
    let inserted = match made {
        Ok(()) => state.store.insert_volume(&row).await,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
    };
    match inserted {
        Ok(true) => Ok(info(state, &row).await),
        Ok(false) => {
            let _ = std::fs::remove_dir_all(&dir);
            Err(VolumeError::NameTaken(b.name.clone()))
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            Err(e.into())
        }
    }
}

/// The caller's volume by id.
pub async fn get(state: &Shared, c: &Caller, id: &str) -> VolumeResult<VolumeRow> {
    state
        .store
        .volume(&c.namespace, id)
        .await?
        .ok_or_else(|| VolumeError::NotFound(id.to_string()))
}

pub async fn get_by_name(state: &Shared, c: &Caller, name: &str) -> VolumeResult<VolumeRow> {
    state
        .store
        .volume_by_name(&c.namespace, name)
        .await?
        .ok_or_else(|| VolumeError::NotFound(name.to_string()))
}

/// A mount's `ref`: the caller's volume by id, else by name.
pub async fn resolve(state: &Shared, c: &Caller, reference: &str) -> VolumeResult<VolumeRow> {
    if let Some(v) = state.store.volume(&c.namespace, reference).await? {
        return Ok(v);
    }
    get_by_name(state, c, reference).await
}

pub async fn list(state: &Shared, c: &Caller) -> VolumeResult<Vec<VolumeInfo>> {
    let mut out = Vec::new();
    for v in state.store.volumes(&c.namespace).await? {
        out.push(info(state, &v).await);
    }
    Ok(out)
}

/// Deletes a volume and its image; refused while any machine has it.
pub async fn delete(state: &Shared, c: &Caller, id: &str) -> VolumeResult<()> {
    let v = get(state, c, id).await?;
    if !state.store.delete_volume(&c.namespace, &v.id).await? {
        let count = state.store.volume_attachments(&v.id, false).await?.len() as u64;
        if count == 0 {
            // Held by a `Volume.files` call for the moment.
            return Err(VolumeError::InUse {
                volume: v.id,
                holder: "a file operation on the server (retry)".into(),
            });
        }
        return Err(VolumeError::Attached {
            volume: v.id,
            count,
        });
    }
    let dir = super::dir(state, &v.id);
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
    Ok(())
}

/// The SDK's `VolumeInfo`: usage from the image's superblock (what the
/// guest last flushed while it is mounted read-write).
pub async fn info(state: &Shared, v: &VolumeRow) -> VolumeInfo {
    let img = super::image(state, &v.id);
    let usage = tokio::task::spawn_blocking(move || volume_image::usage(&img))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let mounts = state
        .store
        .volume_attachments(&v.id, false)
        .await
        .map(|a| a.len() as u64)
        .unwrap_or(0);
    VolumeInfo {
        id: v.id.clone(),
        name: v.name.clone(),
        created_at: iso(v.created_at),
        used_bytes: usage.used_bytes,
        inode_count: usage.inodes_used,
        mount_count: mounts,
        max_size_bytes: v.size_bytes as u64,
        max_file_count: None,
        max_mounts: if v.rw_holder.is_empty() {
            None
        } else {
            Some(1)
        },
        last_reconciled_at: None,
        status: if mounts > 0 { "attached" } else { "available" }.to_string(),
        host_id: Some(state.machines.node_id.clone()),
    }
}
