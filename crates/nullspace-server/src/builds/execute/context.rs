//! A build's inputs that are not in its record: the uploaded context and
//! the request-time credentials.

use nullspace_build::context::{ContextEntry, EntrySource, EntryType};
use nullspace_build::engine::RegistryCredential;
use serde_json::Value;

use super::Run;
use crate::builds::{Failure, failed};
use crate::model::*;
use crate::state::RunSecrets;

/// The build context of a request as entries to materialize: uploaded
/// blobs (verified by sha256 at upload) of the caller's namespace.
pub async fn context_entries(
    run: &Run<'_>,
    rec: &BuildRecord,
) -> Result<Vec<ContextEntry>, Failure> {
    let state = run.state;
    let mut entries = Vec::new();
    for f in run.req().build_context.iter().flat_map(|c| &c.files) {
        let is_dir = f.entry_type == "dir";
        let mode = f
            .mode
            .as_deref()
            .and_then(|m| u32::from_str_radix(m, 8).ok())
            .unwrap_or(if is_dir { 0o755 } else { 0o644 });
        let source = if is_dir {
            None
        } else if let Some(blob) = &f.blob_id {
            let uploaded = state
                .store
                .blob_meta(&rec.namespace_slug, blob)
                .await
                .ok()
                .flatten()
                .is_some_and(|m| m.2);
            let digest = blob
                .strip_prefix("blob_")
                .and_then(|h| nullspace_digest::Digest::parse(&format!("sha256:{h}")).ok())
                .filter(|_| uploaded)
                .ok_or_else(|| Failure::Failed {
                    phase: "blob_upload",
                    message: format!("build_context {:?}: blob {blob} was not uploaded", f.path),
                    retryable: false,
                    action: "upload the context again (preflight, then PUT)",
                    code: "file_upload_error",
                })?;
            Some(EntrySource::File(state.artifacts.path(&digest)))
        } else {
            // Inline bytes are not persisted: a build created with them and
            // run later (after a restart) cannot have them.
            return Err(Failure::Failed {
                phase: "blob_upload",
                message: format!(
                    "build_context {:?}: inline content is not kept for builds; upload it as a blob",
                    f.path
                ),
                retryable: false,
                action: "upload the context with the blob preflight",
                code: "file_upload_error",
            });
        };
        entries.push(ContextEntry {
            path: f.path.clone(),
            entry_type: if is_dir {
                EntryType::Dir
            } else {
                EntryType::File
            },
            mode,
            source,
        });
    }
    Ok(entries)
}

/// `base_image_auth` as basic credentials (the only kind this server
/// supports).
pub fn basic_credentials(
    secrets: &RunSecrets,
) -> Result<Option<nullspace_oci::auth::Credentials>, Failure> {
    let Some(a) = &secrets.base_image_auth else {
        return Ok(None);
    };
    let field = |k: &str| {
        a.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    match a.get("kind").and_then(Value::as_str) {
        Some("basic") => Ok(Some(nullspace_oci::auth::Credentials {
            username: field("username"),
            password: field("password"),
        })),
        other => Err(failed(
            "auth",
            format!(
                "base_image_auth kind {} is not supported by this server (basic is)",
                other.unwrap_or("unknown")
            ),
            false,
            "use basic credentials",
        )),
    }
}

/// `registry_auth` entries with basic credentials, per registry host.
pub fn registry_credentials(secrets: &RunSecrets) -> Vec<RegistryCredential> {
    secrets
        .registry_auth
        .iter()
        .filter_map(|a| {
            let auth = a.get("auth")?;
            if auth.get("kind")?.as_str()? != "basic" {
                return None;
            }
            Some(RegistryCredential {
                registry: a.get("registry")?.as_str()?.to_string(),
                username: auth.get("username")?.as_str()?.to_string(),
                password: auth.get("password")?.as_str()?.to_string(),
            })
        })
        .collect()
}
