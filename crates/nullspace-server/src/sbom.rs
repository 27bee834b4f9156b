//! Templates' software bills of materials: the packages of a build's final
//! disk, listed when the build ends and kept as an artifact its manifest
//! names (`sbom`), rendered as SPDX 2.3 or CycloneDX 1.5 JSON on request
//! (`GET /v1/templates/refs/{ref}/sbom`).

use nullspace_sbom::{DocumentInfo, Format, Inventory};
use nullspace_store::Caller;

use crate::builds::ArtifactManifest;
use crate::error::{ApiError, ApiResult};
use crate::state::Shared;

/// Lists the packages of the disk `m` describes and records them in `m`
/// (the inventory stored as an artifact leased to `holder`, the build,
/// until its ready record names it). A disk whose package databases cannot
/// be read does not fail the build: the reason is recorded instead.
pub async fn record(state: &Shared, holder: &str, m: &mut ArtifactManifest) {
    let disk = match crate::export::template_disk(state, m, holder) {
        Ok(d) => d,
        Err(_) => {
            // Logged as an internal error where it was found.
            m.sbom_error = Some("the template's disk could not be located".into());
            return;
        }
    };
    let scratch = state.run_root().join(&state.owner).join("sbom");
    let artifacts = state.artifacts.clone();
    let holder_owned = holder.to_owned();
    let r = tokio::task::spawn_blocking(move || -> Result<String, String> {
        std::fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
        let inv =
            nullspace_build::sbom::disk_inventory(&disk, &scratch).map_err(|e| e.to_string())?;
        let bytes = serde_json::to_vec(&inv).map_err(|e| e.to_string())?;
        let w = artifacts.writing().map_err(|e| e.to_string())?;
        let (d, _) = w.put(&bytes[..]).map_err(|e| e.to_string())?;
        w.lease(
            &holder_owned,
            &nullspace_store::artifacts::Leased::Artifact(d.clone()),
        )
        .map_err(|e| e.to_string())?;
        Ok(d.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    match r {
        Ok(d) => m.sbom = Some(d),
        Err(e) => {
            tracing::warn!(build = %holder, error = %e, "listing the template's packages failed");
            m.sbom_error = Some(e);
        }
    }
}

/// The SBOM of the template `raw` (as the caller sees it) in `format`.
pub async fn document(
    state: &Shared,
    caller: &Caller,
    raw: &str,
    format: Format,
) -> ApiResult<Vec<u8>> {
    let (row, rec, m) = crate::export::ready_template(state, caller, raw).await?;
    let digest = match (&m.sbom, &m.sbom_error) {
        (Some(d), _) => d,
        (None, Some(e)) => {
            return Err(ApiError::new(
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                "sbom_unavailable",
                format!("template {raw}: its packages could not be listed when it was built: {e}"),
            ));
        }
        (None, None) => {
            return Err(ApiError::conflict(
                "sbom_unavailable",
                format!(
                    "template {raw} (build {}) was built before SBOMs were recorded: rebuild it",
                    rec.build_id
                ),
            ));
        }
    };
    let d = nullspace_digest::Digest::parse(digest)
        .map_err(|_| ApiError::internal(format!("template {raw}: SBOM digest {digest:?}")))?;
    let bytes = tokio::fs::read(state.artifacts.path(&d))
        .await
        .map_err(|e| ApiError::internal(format!("template {raw}: its SBOM {d}: {e}")))?;
    let inv: Inventory = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::internal(format!("template {raw}: its SBOM {d}: {e}")))?;
    let info = DocumentInfo {
        name: format!("{}@{}", row.name, rec.build_id),
        created: None,
    };
    Ok(nullspace_sbom::render(&inv, format, &info))
}
