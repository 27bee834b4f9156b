//! Files in a running machine, as the requested user: write, read, stat,
//! list. Paths are checked and normalised here ([`rules::file_path`]);
//! the guest enforces the user's permissions.

use nullspace_model::machine::FileInfo;
use nullspace_store::Caller;

use super::commands::running;
use super::error::{MachineError, MachineResult};
use super::rules;
use crate::state::Shared;

/// Deepest listing (the agent's limit).
pub const MAX_DEPTH: u32 = nullspace_model::agent::MAX_DEPTH;

/// The guest's view of a file, as the SDK's `FileInfo` (exactly its keys).
pub fn file_info(s: nullspace_model::agent::FileInfo) -> FileInfo {
    use nullspace_model::agent::FileKind;
    FileInfo {
        name: s.name,
        path: s.path,
        is_dir: s.is_dir,
        size: s.size,
        r#type: Some(
            match s.kind {
                FileKind::File => "file",
                FileKind::Dir => "dir",
                FileKind::Symlink => "symlink",
                FileKind::Other => "other",
            }
            .into(),
        ),
        mode: Some(s.mode),
        permissions: Some(s.permissions),
        owner: Some(s.owner),
        group: Some(s.group),
        modified_time: Some(s.modified_time),
        symlink_target: s.symlink_target,
    }
}

pub async fn write_file(
    state: &Shared,
    c: &Caller,
    id: &str,
    path: &str,
    data: Vec<u8>,
    user: Option<&str>,
) -> MachineResult<FileInfo> {
    let path = rules::file_path("path", path, user)?;
    let (_, live) = running(state, c, id).await?;
    live.guest
        .write(&path, data, user)
        .await
        .map_err(|e| MachineError::guest(id, e))?;
    live.guest
        .stat(&path, user)
        .await
        .map(file_info)
        .map_err(|e| MachineError::guest(id, e))
}

pub async fn read_file(
    state: &Shared,
    c: &Caller,
    id: &str,
    path: &str,
    user: Option<&str>,
) -> MachineResult<Vec<u8>> {
    let path = rules::file_path("path", path, user)?;
    let (_, live) = running(state, c, id).await?;
    live.guest
        .read(&path, user)
        .await
        .map_err(|e| MachineError::guest(id, e))
}

pub async fn stat_file(
    state: &Shared,
    c: &Caller,
    id: &str,
    path: &str,
    user: Option<&str>,
) -> MachineResult<FileInfo> {
    let path = rules::file_path("path", path, user)?;
    let (_, live) = running(state, c, id).await?;
    live.guest
        .stat(&path, user)
        .await
        .map(file_info)
        .map_err(|e| MachineError::guest(id, e))
}

pub async fn list_files(
    state: &Shared,
    c: &Caller,
    id: &str,
    path: &str,
    depth: u32,
    user: Option<&str>,
) -> MachineResult<Vec<FileInfo>> {
    let path = rules::file_path("path", path, user)?;
    if !(1..=MAX_DEPTH).contains(&depth) {
        return Err(MachineError::Invalid(format!(
            "depth {depth} must be between 1 and {MAX_DEPTH}"
        )));
    }
    let (_, live) = running(state, c, id).await?;
    let entries = live
        .guest
        .list(&path, depth, user)
        .await
        .map_err(|e| MachineError::guest(id, e))?;
    Ok(entries.into_iter().map(file_info).collect())
}
