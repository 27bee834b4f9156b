//! Templates between nodes, through the artifact registry: a ready build's
//! snapshot is published as an OCI artifact (`nullspace_oci::artifact`)
//! before the build is `ready`, and a node that lacks it pulls it once,
//! however many creates wait for it.
//!
//! The build record in the shared store anchors what a node may accept:
//! its first artifact id is the sha256 of the artifact manifest (the JSON
//! `templates::manifest_of` reads), and its second the registry reference
//! by digest (`HOST/REPO/<namespace>/<template>@sha256:…`). The artifact's
//! payload carries the manifest's exact bytes, checked against the first;
//! every file is checked against the artifact's config while it is pulled,
//! and the snapshot against its own `snapshot.json` when it is opened.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use nullspace_digest::Digest;
use nullspace_model::build::wire::BuildRecord;
use nullspace_oci::artifact::{self, ArtifactError, FileSpec, PushSpec, RegistryOptions};
use serde::{Deserialize, Serialize};

use crate::builds::ArtifactManifest;
use crate::state::Shared;

/// The artifact type of a template in the registry.
pub const ARTIFACT_TYPE: &str = "application/vnd.nullspace.template.v1";

/// Pushes that fail are tried this many times in all, further apart each
/// time (a registry restarting, a network blip).
const PUSH_ATTEMPTS: u32 = 3;

/// What the artifact's config carries besides its file table.
#[derive(Debug, Serialize, Deserialize)]
struct Payload {
    /// The artifact manifest's exact bytes (UTF-8 JSON).
    manifest: String,
    /// Where the snapshot lives under the artifact store
    /// (`snapshots/<build>.<attempt>`), as the manifest names it.
    snapshot: Option<String>,
}

/// Why a template could not be published or fetched.
#[derive(Debug, thiserror::Error)]
pub enum ReplicateError {
    /// The registry could not be reached (retry later: 503).
    #[error("{0}")]
    Unavailable(String),
    /// The template is not on this node and not in any registry.
    #[error("{0}")]
    NotPublished(String),
    /// What the registry holds is not what the build recorded, or another
    /// local failure.
    #[error("{0}")]
    Failed(String),
}

/// Single flight per build: one pull, however many creates wait.
#[derive(Default)]
pub struct Pulls {
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn registry_options(state: &Shared) -> RegistryOptions {
    RegistryOptions {
        insecure_registries: state.config.insecure_registries.clone(),
        ..Default::default()
    }
}

/// `HOST[:PORT]/REPO/<namespace>/<template id>:<build id>`: one repository
/// per template, every build a tag (a registry's GC deletes untagged
/// manifests).
pub fn destination(registry: &str, rec: &BuildRecord) -> String {
    format!(
        "{}/{}/{}:{}",
        registry.trim_end_matches('/'),
        rec.namespace_slug,
        rec.template_id.to_ascii_lowercase(),
        rec.build_id
    )
}

/// The files of a snapshot directory, with `snapshot.json` itself.
fn snapshot_files(dir: &Path) -> Result<Vec<FileSpec>, String> {
    let snap = nullspace_vm::Snapshot::open(dir).map_err(|e| e.to_string())?;
    let mut files: Vec<FileSpec> = snap
        .manifest
        .files()
        .into_iter()
        .map(|(_, f)| FileSpec {
            name: f.path.clone(),
            size: f.size,
            sha256: f.sha256.clone(),
        })
        .collect();
    let json = dir.join(nullspace_model::snapshot::MANIFEST_FILE);
    let size = std::fs::metadata(&json)
        .map_err(|e| format!("{}: {e}", json.display()))?
        .len();
    files.push(FileSpec {
        name: nullspace_model::snapshot::MANIFEST_FILE.to_string(),
        size,
        sha256: snap.manifest_sha256.clone(),
    });
    files.sort_by(|a, b| a.name.cmp(&b.name));
    files.dedup_by(|a, b| a.name == b.name);
    Ok(files)
}

/// Publishes a build about to be `ready` when the server has an artifact
/// registry: its snapshot (if any) and its artifact manifest (`bytes`).
/// Returns the reference by digest to record, `None` without a registry.
pub async fn publish(
    state: &Shared,
    rec: &BuildRecord,
    m: &ArtifactManifest,
    bytes: &[u8],
) -> Result<Option<String>, ReplicateError> {
    let Some(registry) = state.config.artifact_registry.clone() else {
        return Ok(None);
    };
    let dest = destination(&registry, rec);
    let dir = crate::templates::snapshot_dir(state, m);
    let payload = serde_json::to_value(Payload {
        manifest: String::from_utf8_lossy(bytes).into_owned(),
        snapshot: m.snapshot.clone(),
    })
    .map_err(|e| ReplicateError::Failed(e.to_string()))?;
    let opts = registry_options(state);
    let annotations: BTreeMap<String, String> = [
        ("dev.nullspace.template.id", rec.template_id.clone()),
        ("dev.nullspace.build.id", rec.build_id.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let started = std::time::Instant::now();
    let build = rec.build_id.clone();
    let pushed = tokio::task::spawn_blocking(move || {
        let files = match &dir {
            Some(d) => snapshot_files(d).map_err(|e| {
                ReplicateError::Failed(format!("build {build}: reading its snapshot: {e}"))
            })?,
            None => vec![],
        };
        let empty = std::env::temp_dir();
        let spec = PushSpec {
            dir: dir.as_deref().unwrap_or(&empty),
            files: &files,
            artifact_type: ARTIFACT_TYPE,
            payload: &payload,
            annotations: &annotations,
        };
        let mut attempt = 1;
        loop {
            match artifact::push(&dest, &spec, &opts) {
                Ok(p) => return Ok(p),
                Err(e @ (ArtifactError::Unreachable { .. } | ArtifactError::Registry { .. }))
                    if attempt < PUSH_ATTEMPTS =>
                {
                    tracing::warn!(build = %build, attempt, "pushing the template: {e}; retrying");
                    std::thread::sleep(std::time::Duration::from_secs(1 << (2 * attempt)));
                    attempt += 1;
                }
                Err(e @ ArtifactError::Unreachable { .. }) => {
                    return Err(ReplicateError::Unavailable(e.to_string()));
                }
                Err(e) => return Err(ReplicateError::Failed(e.to_string())),
            }
        }
    })
    .await
    .map_err(|e| ReplicateError::Failed(e.to_string()))??;
    tracing::info!(
        build = %rec.build_id,
        reference = %pushed.reference,
        chunks = pushed.chunks,
        uploaded_mib = pushed.uploaded_bytes >> 20,
        ms = started.elapsed().as_millis() as u64,
        "template published"
    );
    Ok(Some(pushed.reference))
}

/// Makes a ready build's artifact manifest and snapshot local: nothing to
/// do on the node that built it (or one that pulled it already); else the
/// artifact the record names is pulled, once, however many wait.
pub async fn ensure_local(
    state: &Shared,
    rec: &BuildRecord,
    raw: &str,
) -> Result<(), ReplicateError> {
    let digest = rec
        .artifact_ids
        .first()
        .and_then(|d| Digest::parse(d).ok())
        .ok_or_else(|| ReplicateError::Failed(format!("template {raw} has no artifact")))?;
    if state.artifacts.contains(&digest) {
        return Ok(());
    }
    let Some(reference) = rec.artifact_ids.get(1).cloned() else {
        return Err(ReplicateError::NotPublished(format!(
            "template {raw:?} (build {}) was built on another node and not published to an artifact registry; create machines on the node that built it, or rebuild it on nodes started with --artifact-registry",
            rec.build_id
        )));
    };
    let gate = {
        let mut m = state.pulls.inflight.lock().expect("pulls lock");
        m.entry(rec.build_id.clone()).or_default().clone()
    };
    let _held = gate.lock().await;
    if state.artifacts.contains(&digest) {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let (st, build) = (state.clone(), rec.build_id.clone());
    let fetched = tokio::task::spawn_blocking(move || pull(&st, &reference, &digest, &build))
        .await
        .map_err(|e| ReplicateError::Failed(e.to_string()))??;
    // Kept after a failure, so that retries still take turns (they share
    // the staging directory); gone once the template is local.
    state
        .pulls
        .inflight
        .lock()
        .expect("pulls lock")
        .remove(&rec.build_id);
    tracing::info!(
        build = %rec.build_id,
        fetched_mib = fetched >> 20,
        ms = started.elapsed().as_millis() as u64,
        "template pulled from the artifact registry"
    );
    Ok(())
}

/// The blocking pull: the artifact into the snapshot directory its payload
/// names, then the manifest bytes into the artifact store.
fn pull(
    state: &Shared,
    reference: &str,
    digest: &Digest,
    build: &str,
) -> Result<u64, ReplicateError> {
    let opts = registry_options(state);
    // The collector waits while a pull is under way: it would take the
    // staging directory and the snapshot for things nothing marks.
    let w = state
        .artifacts
        .writing()
        .map_err(|e| ReplicateError::Failed(e.to_string()))?;
    let map = |e: ArtifactError| match e {
        ArtifactError::Unreachable { .. } => ReplicateError::Unavailable(e.to_string()),
        e => ReplicateError::Failed(e.to_string()),
    };
    // Pulled beside the snapshots (one file system: the rename is atomic),
    // then moved to where the manifest names it.
    let staging = state
        .template_snapshots_dir()
        .join(format!(".pull-{build}"));
    if staging.exists() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    std::fs::create_dir_all(state.template_snapshots_dir())
        .map_err(|e| ReplicateError::Failed(e.to_string()))?;
    let shutdown = state.shutdown.clone();
    let pulled = artifact::pull(reference, &staging, &opts, ARTIFACT_TYPE, &|| {
        shutdown.is_cancelled()
    })
    .map_err(map)?;
    let cleanup = |e: ReplicateError| {
        let _ = std::fs::remove_dir_all(&staging);
        e
    };
    let payload: Payload = serde_json::from_value(pulled.payload).map_err(|e| {
        cleanup(ReplicateError::Failed(format!(
            "artifact {reference}: payload: {e}"
        )))
    })?;
    let bytes = payload.manifest.into_bytes();
    let actual = Digest::sha256_of(&bytes);
    if &actual != digest {
        return Err(cleanup(ReplicateError::Failed(format!(
            "artifact {reference}: its manifest is {actual}, but build {build} recorded {digest}"
        ))));
    }
    if let Some(rel) = &payload.snapshot {
        let m: ArtifactManifest = serde_json::from_slice(&bytes).map_err(|e| {
            cleanup(ReplicateError::Failed(format!(
                "artifact {reference}: manifest: {e}"
            )))
        })?;
        if m.snapshot.as_deref() != Some(rel.as_str()) || !plain_snapshot_path(rel) {
            return Err(cleanup(ReplicateError::Failed(format!(
                "artifact {reference}: snapshot path {rel:?} is not the manifest's"
            ))));
        }
        let target = crate::builds::snapshot_path(state, rel);
        if target.exists() {
            let _ = std::fs::remove_dir_all(&staging);
        } else {
            std::fs::rename(&staging, &target).map_err(|e| {
                cleanup(ReplicateError::Failed(format!("{}: {e}", target.display())))
            })?;
        }
    } else {
        let _ = std::fs::remove_dir_all(&staging);
    }
    w.put(&bytes[..])
        .map_err(|e| ReplicateError::Failed(e.to_string()))?;
    Ok(pulled.fetched_bytes)
}

/// `snapshots/<name>`, one plain name: what builds write (the payload is
/// hostile until checked).
fn plain_snapshot_path(rel: &str) -> bool {
    rel.strip_prefix("snapshots/").is_some_and(|n| {
        !n.is_empty() && !n.contains('/') && n != "." && n != ".." && !n.starts_with(".pull-")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_paths_from_a_payload_are_plain() {
        assert!(plain_snapshot_path("snapshots/bld_1.1"));
        for bad in [
            "snapshots/../x",
            "snapshots/a/b",
            "/etc",
            "snapshots/",
            "x/bld_1",
            "snapshots/.pull-x",
        ] {
            assert!(!plain_snapshot_path(bad), "{bad}");
        }
    }
}
