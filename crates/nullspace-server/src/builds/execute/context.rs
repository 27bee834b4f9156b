//! A build's inputs that are not in its record: the uploaded context and
//! the request-time credentials.

use nullspace_build::context::{ContextEntry, EntrySource};
use nullspace_build::engine::RegistryCredential;
use nullspace_model::build::context::{Content, ContextManifest};
use serde_json::Value;

use super::Run;
use crate::builds::{Failure, failed, upload_failed};
use crate::model::*;
use crate::state::RunSecrets;

/// The plan's build context as entries to materialize: uploaded blobs
/// (verified by sha256 at upload) of the caller's namespace.
pub async fn context_entries(
    run: &Run<'_>,
    rec: &BuildRecord,
    context: Option<&ContextManifest>,
) -> Result<Vec<ContextEntry>, Failure> {
    let state = run.state;
    let mut entries = Vec::new();
    for e in context.iter().flat_map(|c| &c.entries) {
        let source = match &e.content {
            None => None,
            Some(Content::Blob { blob_id, sha256 }) => {
                let uploaded = state
                    .store
                    .blob_meta(&rec.namespace_slug, blob_id)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|m| m.2);
                let digest = sha256
                    .as_ref()
                    .and_then(|h| nullspace_digest::Digest::parse(&format!("sha256:{h}")).ok())
                    .filter(|_| uploaded)
                    .ok_or_else(|| {
                        upload_failed(
                            format!(
                                "build_context {:?}: blob {blob_id} was not uploaded",
                                e.path
                            ),
                            "upload the context again (preflight, then PUT)",
                        )
                    })?;
                Some(EntrySource::File(state.artifacts.path(&digest)))
            }
            Some(Content::Inline { .. }) => {
                // Inline bytes are not persisted: a build created with them
                // and run later (after a restart) cannot have them.
                return Err(upload_failed(
                    format!(
                        "build_context {:?}: inline content is not kept for builds; upload it as a blob",
                        e.path
                    ),
                    "upload the context with the blob preflight",
                ));
            }
        };
        entries.push(ContextEntry {
            path: e.path.clone(),
            entry_type: e.entry_type,
            mode: e.mode.bits(),
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
        .filter_map(|a| match RegistryAuth::parse(a).ok()? {
            RegistryAuth {
                registry,
                auth: Credentials::Basic { username, password },
            } => Some(RegistryCredential {
                registry,
                username,
                password,
            }),
            _ => None,
        })
        .collect()
}
