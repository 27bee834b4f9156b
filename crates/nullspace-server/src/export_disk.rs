//! `GET /v1/templates/refs/{ref}/disk?format=qcow2|raw`: a template of the
//! caller's namespace as a bootable disk (`nullspace_vm::disk_export`),
//! its runtime settings in the disk's guest config. The disk is written
//! under `DATA_DIR/work`, opened, unlinked, and streamed: nothing stays
//! behind, whether the client reads it all or goes away.

use axum::body::Body;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use nullspace_model::guest::GuestConfig;
use nullspace_model::snapshot::DiskFormat;
use nullspace_store::Caller;

use crate::error::{ApiError, ApiResult};
use crate::openapi::{QueryKind, QueryParam};
use crate::state::Shared;

/// `?format=`, documented in `/openapi.json`.
pub const FORMAT: QueryParam = QueryParam {
    name: "format",
    description: "Disk image format: qcow2 (the default) or raw",
    kind: QueryKind::OneOf(&["qcow2", "raw"]),
};

pub fn parse_format(v: Option<&str>) -> ApiResult<DiskFormat> {
    match v {
        None | Some("qcow2") => Ok(DiskFormat::Qcow2),
        Some("raw") => Ok(DiskFormat::Raw),
        Some(other) => Err(ApiError::invalid(format!(
            "format {other:?} is not one of qcow2, raw"
        ))),
    }
}

/// Exports at once per server: each writes a whole disk under
/// `DATA_DIR/work` before it streams, so they are bounded like machines.
const MAX_EXPORTS: usize = 2;
static EXPORTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_EXPORTS);

pub async fn disk(
    state: &Shared,
    caller: &Caller,
    r: &str,
    format: DiskFormat,
) -> ApiResult<Response> {
    let tref = crate::refs::TemplateRef::parse(r).map_err(ApiError::invalid)?;
    // Resolved in the caller's namespace: another namespace's template is
    // not found, as everywhere else.
    let m = crate::templates::resolve_artifact(state, &caller.namespace, &tref).await?;
    let Some(snapshot) = &m.snapshot else {
        return Err(ApiError::conflict(
            "no_snapshot",
            format!(
                "template {r} has no snapshot (built by a server without --build-vm): there is no disk to boot"
            ),
        ));
    };
    let Some(vmm) = state.vmm.as_ref() else {
        return Err(ApiError::conflict(
            "no_build_vm",
            "this server runs without --build-vm: it has no guest kernel modules to put on a disk",
        ));
    };
    // Held until the disk is written and opened (streaming needs no more).
    let _permit = EXPORTS.try_acquire().map_err(|_| {
        ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "capacity_exceeded",
            format!("{MAX_EXPORTS} disk exports are running on this server: retry later"),
        )
    })?;
    let snapshot_dir = crate::builds::snapshot_path(state, snapshot);
    let mut config = GuestConfig::new(&hostname(r));
    config.env = m.env.clone();
    config.user = m.user.clone();
    config.workdir = m.workdir.clone();
    config.start_cmd = m.start_cmd.clone();
    let kernel = vmm.kernel.clone();
    let work = state.work_dir.clone();
    let out = tokio::task::spawn_blocking(move || -> Result<(tokio::fs::File, u64), String> {
        std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
        let dir = tempfile::Builder::new()
            .prefix("export-disk-")
            .tempdir_in(&work)
            .map_err(|e| format!("{}: {e}", work.display()))?;
        let file = dir.path().join("disk");
        let size = nullspace_vm::disk_export::export(&nullspace_vm::disk_export::DiskExport {
            snapshot_dir: &snapshot_dir,
            kernel: &kernel,
            config,
            format,
            output: &file,
        })
        .map_err(|e| e.to_string())?;
        let f = std::fs::File::open(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        // `dir` goes now: the open file is all that is left of it.
        Ok((tokio::fs::File::from_std(f), size))
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e| ApiError::internal(format!("exporting {r} as a disk: {e}")))?;
    let (file, size) = out;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 256 << 10)),
    )
        .into_response())
}

/// The template's name as a host name (letters, digits and `-`).
fn hostname(r: &str) -> String {
    let name = r.rsplit('/').next().unwrap_or(r);
    let name = name.split(':').next().unwrap_or(name);
    let h: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    if h.is_empty() { "nullspace".into() } else { h }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_host_names() {
        assert_eq!(parse_format(None).unwrap(), DiskFormat::Qcow2);
        assert_eq!(parse_format(Some("raw")).unwrap(), DiskFormat::Raw);
        assert!(
            parse_format(Some("vmdk"))
                .unwrap_err()
                .message
                .contains("not one of qcow2, raw")
        );
        assert_eq!(hostname("team-a/web_app:v1"), "web-app");
        assert_eq!(hostname("tmpl_1"), "tmpl-1");
    }
}
