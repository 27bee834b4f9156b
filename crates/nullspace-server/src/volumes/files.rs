//! `Volume.files` on the server (`/v1/volumes/{id}/files…`): the image
//! read and written with e2fsprogs in a child process
//! (`nullspace_vm::volume_image`, whose module doc says why not a loop
//! mount or a utility machine). Every call holds the volume's lock in the
//! store for its duration (writes exclusively, reads shared with
//! read-only attachments), so no machine writes the image meanwhile: a
//! volume attached read-write is refused (409), and its files are the
//! machine's file routes under its mount path.

use base64::Engine;
use nullspace_model::machine::FileInfo;
use nullspace_model::machine::volume::VolumeReadReply;
use nullspace_store::{AttachOutcome, Caller};
use nullspace_vm::volume_image::{self, Entry, ImageError};

use super::{VolumeError, VolumeResult, catalog};
use crate::state::Shared;

/// The store's `rw_holder` while a file operation writes.
pub const HOST_HOLDER: &str = "server:files";
/// Most entries a recursive listing returns.
pub const MAX_LIST: usize = 10_000;
/// Largest file written or read through these routes.
pub const MAX_FILE: usize = 32 << 20;

/// Runs `f` on a blocking thread with the image, under the volume's lock.
async fn with_image<T: Send + 'static>(
    state: &Shared,
    c: &Caller,
    id: &str,
    write: bool,
    f: impl FnOnce(&std::path::Path, &std::path::Path) -> Result<T, ImageError> + Send + 'static,
) -> VolumeResult<T> {
    let v = catalog::get(state, c, id).await?;
    match state
        .store
        .lock_volume(&c.namespace, &v.id, HOST_HOLDER, write)
        .await?
    {
        AttachOutcome::Attached => {}
        AttachOutcome::Gone | AttachOutcome::Duplicate => {
            return Err(VolumeError::NotFound(id.to_string()));
        }
        AttachOutcome::InUse { holder, ro_count } => {
            let holder = if holder.is_empty() {
                format!("{ro_count} read-only attachment(s) (files can be read, not written)")
            } else if holder == HOST_HOLDER {
                "another file operation (retry)".to_string()
            } else {
                format!("machine {holder} (use its file routes under the mount path)")
            };
            return Err(VolumeError::InUse {
                volume: v.id,
                holder,
            });
        }
    }
    let img = super::image(state, &v.id);
    let spool = super::dir(state, &v.id);
    let r = tokio::task::spawn_blocking(move || f(&img, &spool)).await;
    let _ = state.store.unlock_volume(&v.id, HOST_HOLDER, write).await;
    r.map_err(|e| VolumeError::Invalid(format!("volume file task: {e}")))?
        .map_err(|e| match e {
            ImageError::NotFound(p) => {
                VolumeError::Invalid(format!("{p}: no such file or directory"))
            }
            e => VolumeError::Image(e),
        })
}

fn info(e: &Entry) -> FileInfo {
    let kind = match e.mode & 0o170000 {
        0o040000 => ('d', "dir"),
        0o100000 => ('-', "file"),
        0o120000 => ('l', "symlink"),
        _ => ('?', "other"),
    };
    let mode = e.mode & 0o7777;
    let mut perms = String::from(kind.0);
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        perms.push(if mode & (0o400 >> i) != 0 { c } else { '-' });
    }
    let name = |id: u32| {
        if id == 0 {
            "root".to_string()
        } else {
            id.to_string()
        }
    };
    FileInfo {
        name: e.name.clone(),
        path: e.path.clone(),
        is_dir: e.is_dir(),
        size: if e.is_dir() { 0 } else { e.size },
        r#type: Some(kind.1.to_string()),
        mode: Some(format!("{mode:04o}")),
        permissions: Some(perms),
        owner: Some(name(e.uid)),
        group: Some(name(e.gid)),
        modified_time: None,
        symlink_target: None,
    }
}

pub async fn list(
    state: &Shared,
    c: &Caller,
    id: &str,
    path: &str,
    depth: u32,
) -> VolumeResult<Vec<FileInfo>> {
    let path = path.to_string();
    let depth = depth.clamp(1, 32);
    with_image(state, c, id, false, move |img, _| {
        let mut out = Vec::new();
        let mut dirs = vec![(volume_image::clean(&path)?, 1)];
        while let Some((d, level)) = dirs.pop() {
            for e in volume_image::list(img, &d)? {
                if e.is_dir() && level < depth && e.name != "lost+found" {
                    dirs.push((e.path.clone(), level + 1));
                }
                out.push(info(&e));
                if out.len() >= MAX_LIST {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    })
    .await
}

pub async fn stat(
    state: &Shared,
    c: &Caller,
    id: &str,
    path: &str,
) -> VolumeResult<Option<FileInfo>> {
    let path = path.to_string();
    with_image(state, c, id, false, move |img, _| {
        Ok(volume_image::stat(img, &path)?.map(|e| info(&e)))
    })
    .await
}

pub async fn read(
    state: &Shared,
    c: &Caller,
    id: &str,
    path: &str,
    encoding: Option<&str>,
) -> VolumeResult<VolumeReadReply> {
    let b64 = match encoding.unwrap_or("utf8") {
        "utf8" | "utf-8" | "text" => false,
        "base64" => true,
        other => {
            return Err(VolumeError::Invalid(format!(
                "encoding {other:?} must be utf8 or base64"
            )));
        }
    };
    let path = path.to_string();
    let data = with_image(state, c, id, false, move |img, _| {
        volume_image::read(img, &path)
    })
    .await?;
    let size = data.len() as u64;
    let content = if b64 {
        base64::engine::general_purpose::STANDARD.encode(&data)
    } else {
        String::from_utf8(data).map_err(|_| {
            VolumeError::Invalid("the file is not UTF-8 text; read it with encoding base64".into())
        })?
    };
    Ok(VolumeReadReply {
        content,
        encoding: if b64 { "base64" } else { "utf8" }.into(),
        size,
    })
}

pub async fn write(
    state: &Shared,
    c: &Caller,
    id: &str,
    path: &str,
    content: &str,
    encoding: Option<&str>,
) -> VolumeResult<FileInfo> {
    let data = match encoding.unwrap_or("utf8") {
        "utf8" | "utf-8" | "text" => content.as_bytes().to_vec(),
        "base64" => base64::engine::general_purpose::STANDARD
            .decode(content)
            .map_err(|e| VolumeError::Invalid(format!("content is not base64: {e}")))?,
        other => {
            return Err(VolumeError::Invalid(format!(
                "encoding {other:?} must be utf8 or base64"
            )));
        }
    };
    if data.len() > MAX_FILE {
        return Err(VolumeError::Invalid(format!(
            "a volume file written here is at most {MAX_FILE} bytes"
        )));
    }
    let path = path.to_string();
    with_image(state, c, id, true, move |img, spool| {
        volume_image::write(img, &path, &data, spool).map(|e| info(&e))
    })
    .await
}

pub async fn make_dir(state: &Shared, c: &Caller, id: &str, path: &str) -> VolumeResult<()> {
    let path = path.to_string();
    with_image(state, c, id, true, move |img, _| {
        volume_image::make_dirs(img, &path).map(|_| ())
    })
    .await
}

pub async fn remove(state: &Shared, c: &Caller, id: &str, path: &str) -> VolumeResult<()> {
    let path = path.to_string();
    with_image(state, c, id, true, move |img, _| {
        volume_image::remove(img, &path)
    })
    .await
}
