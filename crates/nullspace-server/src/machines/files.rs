//! Files in a running machine, as the requested user: write, read, stat,
//! list. Paths are checked and normalised here ([`rules::file_path`]);
//! the guest enforces the user's permissions.

use nullspace_model::machine::FileInfo;
use nullspace_store::Caller;

use super::commands::running;
use super::error::{MachineError, MachineResult};
use super::rules;
use crate::state::Shared;

/// Bytes per piece of a streamed read (the agent's largest data field).
const CHUNK: usize = nullspace_model::agent::MAX_CHUNK;

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

/// A file as a stream of pieces of at most [`CHUNK`] bytes, each read
/// from the guest when the client takes the previous one: a download holds
/// one piece on the host whatever the file's size. The first piece is read
/// before answering, so a missing file is an error, not a broken stream.
pub async fn read_stream(
    state: &Shared,
    c: &Caller,
    id: &str,
    path: &str,
    user: Option<&str>,
) -> MachineResult<(
    u64,
    impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> + Send + 'static,
)> {
    use futures_util::StreamExt as _;
    let path = rules::file_path("path", path, user)?;
    let (_, live) = running(state, c, id).await?;
    let guest = live.guest.clone();
    let user = user.map(str::to_string);
    let (first, size, eof) = guest
        .read_chunk(&path, 0, CHUNK, user.as_deref())
        .await
        .map_err(|e| MachineError::guest(id, e))?;
    let at = (
        guest,
        path,
        user,
        first.len() as u64,
        eof || first.is_empty(),
    );
    let rest = futures_util::stream::unfold(at, |(guest, path, user, off, eof)| async move {
        if eof {
            return None;
        }
        match guest.read_chunk(&path, off, CHUNK, user.as_deref()).await {
            Ok((d, _, eof)) => {
                let eof = eof || d.is_empty();
                let next = off + d.len() as u64;
                Some((Ok(d), (guest, path, user, next, eof)))
            }
            Err(e) => Some((
                Err(std::io::Error::other(format!("reading {path}: {e}"))),
                (guest, path, user, off, true),
            )),
        }
    });
    Ok((
        size,
        futures_util::stream::once(async move { Ok(first) }).chain(rest),
    ))
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
