//! Files in a running machine beyond read and write (remove, rename,
//! mkdir, permissions, batch write, search by name, find by content,
//! replace) and the machine's metrics. Each as the requested user: paths
//! are checked and normalised here ([`rules::file_path`]), permissions,
//! bounds and atomic rewrites are the guest's (`nullspace-init`).

use nullspace_model::machine::FileInfo;
use nullspace_model::machine_files::{
    BatchEntry, MachineMetrics, ReplaceBody, ReplaceResult, SearchMatch, parse_mode,
};
use nullspace_store::{Caller, now_ms};

use super::commands::running;
use super::error::{MachineError, MachineResult};
use super::files::file_info;
use super::rules;
use crate::state::Shared;

/// Most files in one batch write (the SDK sends one part per file).
pub const MAX_BATCH_FILES: usize = 1_000;
/// Most files in one replace (the guest's limit).
pub const MAX_REPLACE_FILES: usize = nullspace_model::agent::MAX_REPLACE_FILES;

/// Removes a file, a symlink or a directory with its contents.
pub async fn remove(
    state: &Shared,
    c: &Caller,
    id: &str,
    path: &str,
    user: Option<&str>,
) -> MachineResult<()> {
    let path = rules::file_path("path", path, user)?;
    if path == "/" {
        return Err(MachineError::Invalid("path / cannot be removed".into()));
    }
    let (_, live) = running(state, c, id).await?;
    live.guest
        .remove(&path, true, user)
        .await
        .map_err(|e| MachineError::guest(id, e))
}

/// Renames `old` to `new` (replacing a file there); the new path's metadata.
pub async fn rename(
    state: &Shared,
    c: &Caller,
    id: &str,
    old: &str,
    new: &str,
    user: Option<&str>,
) -> MachineResult<FileInfo> {
    let old = rules::file_path("old_path", old, user)?;
    let new = rules::file_path("new_path", new, user)?;
    let (_, live) = running(state, c, id).await?;
    live.guest
        .rename(&old, &new, user)
        .await
        .map(file_info)
        .map_err(|e| MachineError::guest(id, e))
}

/// `mkdir -p`; false when the directory was there already.
pub async fn make_dir(
    state: &Shared,
    c: &Caller,
    id: &str,
    path: &str,
    user: Option<&str>,
) -> MachineResult<bool> {
    let path = rules::file_path("path", path, user)?;
    let (_, live) = running(state, c, id).await?;
    live.guest
        .make_dir(&path, user)
        .await
        .map_err(|e| MachineError::guest(id, e))
}

/// Sets a path's permission bits from an octal string (`"0755"`).
pub async fn set_permissions(
    state: &Shared,
    c: &Caller,
    id: &str,
    path: &str,
    permissions: &str,
    user: Option<&str>,
) -> MachineResult<()> {
    let path = rules::file_path("path", path, user)?;
    let mode = parse_mode(permissions).map_err(|e| MachineError::Invalid(e.to_string()))?;
    let (_, live) = running(state, c, id).await?;
    live.guest
        .chmod(&path, mode, user)
        .await
        .map_err(|e| MachineError::guest(id, e))
}

/// One file of a batch write: its path as sent and its bytes.
pub struct BatchItem {
    pub path: String,
    pub data: Vec<u8>,
}

/// Writes one file of a batch (parents made), as the SDK reports it: a
/// failure is that file's entry, not the request's. The machine's own
/// failures (not running, gone) fail the request.
pub async fn write_one(
    state: &Shared,
    c: &Caller,
    id: &str,
    item: BatchItem,
    user: Option<&str>,
) -> MachineResult<BatchEntry> {
    let path = match rules::file_path("path", &item.path, user) {
        Ok(p) => p,
        Err(e) => {
            return Ok(BatchEntry::Error {
                path: item.path,
                error: e.to_string(),
            });
        }
    };
    let (_, live) = running(state, c, id).await?;
    let written = match live.guest.write(&path, item.data, user).await {
        Ok(_) => live.guest.stat(&path, user).await,
        Err(e) => Err(e),
    };
    match written {
        Ok(info) => Ok(BatchEntry::Success {
            path: item.path,
            info: Box::new(file_info(info)),
        }),
        Err(e) if e.is_machine_gone() => Err(MachineError::guest(id, e)),
        Err(e) => Ok(BatchEntry::Error {
            path: item.path,
            error: e.to_string(),
        }),
    }
}

/// Paths under `path` whose name (or, with a `/` in the pattern, relative
/// path) matches the glob.
pub async fn search_names(
    state: &Shared,
    c: &Caller,
    id: &str,
    path: &str,
    pattern: &str,
    user: Option<&str>,
) -> MachineResult<Vec<String>> {
    let path = rules::file_path("path", path, user)?;
    let (_, live) = running(state, c, id).await?;
    let found = live
        .guest
        .search_names(&path, pattern, user)
        .await
        .map_err(|e| MachineError::guest(id, e))?;
    if let Some(limit) = found.truncated {
        tracing::info!(machine = id, %path, ?limit, "name search cut short");
    }
    Ok(found.items)
}

/// Lines matching `pattern` in the text files under `path` (or the file).
pub async fn find_content(
    state: &Shared,
    c: &Caller,
    id: &str,
    path: &str,
    pattern: &str,
    user: Option<&str>,
) -> MachineResult<Vec<SearchMatch>> {
    let path = rules::file_path("path", path, user)?;
    let (_, live) = running(state, c, id).await?;
    let found = live
        .guest
        .search_content(&path, pattern, user)
        .await
        .map_err(|e| MachineError::guest(id, e))?;
    if let Some(limit) = found.truncated {
        tracing::info!(machine = id, %path, ?limit, "content search cut short");
    }
    Ok(found
        .items
        .into_iter()
        .map(|m| SearchMatch {
            file: m.file,
            line: m.line,
            content: m.content,
        })
        .collect())
}

/// Replaces the body's pattern in its files (all checked before any file
/// changes; `dry_run` counts only).
pub async fn replace(
    state: &Shared,
    c: &Caller,
    id: &str,
    b: &ReplaceBody,
) -> MachineResult<ReplaceResult> {
    if b.files.is_empty() || b.files.len() > MAX_REPLACE_FILES {
        return Err(MachineError::Invalid(format!(
            "files must list 1 to {MAX_REPLACE_FILES} paths, not {}",
            b.files.len()
        )));
    }
    let files = b
        .files
        .iter()
        .map(|f| rules::file_path("files[]", f, b.user.as_deref()))
        .collect::<MachineResult<Vec<_>>>()?;
    let (_, live) = running(state, c, id).await?;
    let r = live
        .guest
        .replace(
            files,
            &b.pattern,
            &b.replacement,
            b.dry_run.unwrap_or(false),
            b.user.as_deref(),
        )
        .await
        .map_err(|e| MachineError::guest(id, e))?;
    Ok(ReplaceResult {
        replacements: r.replacements,
        files_modified: r.files_modified,
        files_skipped: r.files_skipped,
        binary_files_skipped: r.binary_files_skipped,
    })
}

/// One sample of the machine's CPU, memory, disk and network, taken now
/// in the guest.
pub async fn metrics(state: &Shared, c: &Caller, id: &str) -> MachineResult<Vec<MachineMetrics>> {
    let (_, live) = running(state, c, id).await?;
    let m = live
        .guest
        .metrics()
        .await
        .map_err(|e| MachineError::guest(id, e))?;
    Ok(vec![MachineMetrics {
        timestamp: crate::model::iso(now_ms()),
        cpu_percent: m.cpu_percent,
        cpu_count: m.cpu_count,
        mem_used_bytes: m.mem_used_bytes,
        mem_total_bytes: m.mem_total_bytes,
        disk_used_bytes: m.disk_used_bytes,
        disk_total_bytes: m.disk_total_bytes,
        network_rx_bytes: m.network_rx_bytes,
        network_tx_bytes: m.network_tx_bytes,
    }])
}
