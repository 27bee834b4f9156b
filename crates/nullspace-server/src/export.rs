//! `GET /v1/templates/refs/{ref}/export`: a ready template as one
//! `image.oci.tar` (`nullspace_build::export`), written to a private file
//! under `DATA_DIR/run/<this server>/exports` and streamed from its open
//! descriptor (the name is removed first, so nothing outlives the request).
//!
//! The disk read is the snapshot's `disk.ext4` (what native steps wrote),
//! or the imported rootfs for a template built without a VM. Both are
//! opened once, so a collection during the export cannot pull the file
//! from under it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use nullspace_build::export::{
    ExportFormat, ExportSpec, LayerCompression, TemplateRuntime, export_template,
};
use nullspace_model::build::probe::Readiness;
use nullspace_model::build::status::BuildStatus;
use nullspace_store::Caller;
use tokio::sync::Semaphore;

use crate::error::{ApiError, ApiResult};
use crate::refs::Qualifier;
use crate::state::Shared;
use crate::templates;

/// Exports read a whole disk and compress it: two at a time per server.
static EXPORTS: Semaphore = Semaphore::const_new(2);

/// An export written and opened, its name already removed.
pub struct Exported {
    pub file: std::fs::File,
    pub size: u64,
    pub manifest_digest: String,
}

/// Exports the template `raw` (as the caller sees it) as an archive.
pub async fn export_archive(
    state: &Shared,
    caller: &Caller,
    raw: &str,
    compression: LayerCompression,
) -> ApiResult<Exported> {
    let (row, _, m) = ready_template(state, caller, raw).await?;
    let disk = template_disk(state, &m, raw)?;
    let readiness =
        match &m.readiness {
            Some(v) => Some(Readiness::parse(v).map_err(|e| {
                ApiError::internal(format!("template {raw}: recorded readiness: {e}"))
            })?),
            None => None,
        };
    let mut labels: BTreeMap<String, String> = m.oci.labels.clone();
    labels.insert("dev.nullspace.template".into(), row.name.clone());
    let tag = ref_tag(raw).unwrap_or_else(|| "latest".into());
    // In this server's own run directory: what a crash leaves there is
    // removed with the directory when the server is found dead
    // (`nullspace_vm::process::reap_stale`).
    let scratch = state.run_root().join(&state.owner).join("exports");
    std::fs::create_dir_all(&scratch).map_err(ApiError::internal)?;
    let output: PathBuf = scratch.join(format!("{}.oci.tar", nullspace_store::new_id("exp")));
    let spec = ExportSpec {
        disk,
        runtime: TemplateRuntime {
            env: m.env.clone(),
            user: m.user.clone(),
            workdir: m.workdir.clone(),
            start_cmd: m.start_cmd.clone(),
            readiness,
            labels,
        },
        compression,
        format: ExportFormat::OciArchive,
        output: output.clone(),
        scratch,
        ref_name: Some(tag),
    };
    let _permit = EXPORTS.acquire().await.map_err(ApiError::internal)?;
    let raw_owned = raw.to_owned();
    tokio::task::spawn_blocking(move || {
        let summary = export_template(&spec)
            .map_err(|e| ApiError::internal(format!("export of template {raw_owned}: {e}")))?;
        let file = std::fs::File::open(&output).map_err(ApiError::internal)?;
        // The open descriptor is all the response needs.
        let _ = std::fs::remove_file(&output);
        let size = file.metadata().map_err(ApiError::internal)?.len();
        Ok(Exported {
            file,
            size,
            manifest_digest: summary.manifest_digest.to_string(),
        })
    })
    .await
    .map_err(ApiError::internal)?
}

/// The template `raw` as the caller sees it, ready (else 409
/// `template_not_ready`), with its artifact manifest.
pub(crate) async fn ready_template(
    state: &Shared,
    caller: &Caller,
    raw: &str,
) -> ApiResult<(
    nullspace_store::TemplateRow,
    nullspace_model::build::wire::BuildRecord,
    crate::builds::ArtifactManifest,
)> {
    let (row, rec) = templates::resolve_build(state, caller, raw).await?;
    if rec.status != BuildStatus::Ready {
        return Err(ApiError::conflict(
            "template_not_ready",
            format!(
                "template {raw} points at build {} which is {}",
                rec.build_id, rec.status
            ),
        ));
    }
    let m = templates::manifest_of(state, &rec, raw).await?;
    Ok((row, rec, m))
}

/// The disk a template's machines boot: its snapshot's `disk.ext4`, or the
/// imported rootfs of a template built without a VM.
pub(crate) fn template_disk(
    state: &Shared,
    m: &crate::builds::ArtifactManifest,
    what: &str,
) -> ApiResult<PathBuf> {
    match templates::snapshot_dir(state, m) {
        Some(dir) => snapshot_disk(&dir, what),
        None => {
            let d = nullspace_digest::Digest::parse(&m.rootfs).map_err(|_| {
                ApiError::internal(format!("template {what}: rootfs digest {:?}", m.rootfs))
            })?;
            Ok(state.artifacts.path(&d))
        }
    }
}

/// The tag a ref names (`name:tag`), for the archive's ref annotation.
fn ref_tag(raw: &str) -> Option<String> {
    match crate::refs::TemplateRef::parse(raw).ok()? {
        crate::refs::TemplateRef::Named {
            qualifier: Qualifier::Tag(t),
            ..
        } => Some(t),
        _ => None,
    }
}

/// The one raw disk of a build's snapshot. A snapshot whose disk is a
/// chain (a restored VM's: a base plus qcow2 layers) is refused rather
/// than exported without its upper layers.
fn snapshot_disk(dir: &std::path::Path, raw: &str) -> ApiResult<PathBuf> {
    use nullspace_model::snapshot::{DiskFormat, MANIFEST_FILE, SnapshotManifest};
    let bytes = std::fs::read(dir.join(MANIFEST_FILE)).map_err(ApiError::internal)?;
    let m: SnapshotManifest = serde_json::from_slice(&bytes).map_err(ApiError::internal)?;
    match m.disk.as_slice() {
        [only]
            if only.format == DiskFormat::Raw
                && !only.file.path.contains('/')
                && !only.file.path.starts_with('.') =>
        {
            Ok(dir.join(&only.file.path))
        }
        layers => Err(ApiError::internal(format!(
            "template {raw}: its snapshot's disk has {} layers; only a single raw disk can be exported",
            layers.len()
        ))),
    }
}
