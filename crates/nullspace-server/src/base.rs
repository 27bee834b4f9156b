//! The server's `base` template: `nullspace/base`, public, built in the
//! background at start-up from the embedded demo image
//! (`nullspace_oci::demo`, written as an OCI layout into the data
//! directory: no registry, no internet). `Machine.create()` without a
//! template asks for `base`, which resolves to the caller's own `base` if
//! it has one, else to this.

use std::path::PathBuf;

use nullspace_store::{BuildFilter, Caller};

use crate::builds;
use crate::model::BuildRequest;
use crate::state::Shared;
use crate::templates;

pub const NAMESPACE: &str = "nullspace";
pub const NAME: &str = "base";

pub fn layout_dir(state: &Shared) -> PathBuf {
    state.config.data_dir.join("base-image")
}

/// The `base_image` of the base template's build: the server's own layout
/// (the one non-registry source builds accept).
pub fn source_ref(state: &Shared) -> String {
    format!("oci:{}:{NAME}", layout_dir(state).display())
}

fn caller() -> Caller {
    Caller {
        key_id: "server".into(),
        namespace: NAMESPACE.into(),
    }
}

/// Queues the base template's build unless it is ready (with a snapshot)
/// or already building. Needs the build VM (a template without a snapshot
/// cannot start machines).
pub async fn ensure(state: &Shared) {
    if !state.config.base_template {
        return;
    }
    if state.vmm.is_none() {
        tracing::info!("no base template: this server has no build VM");
        return;
    }
    let c = caller();
    if let Ok((_, rec)) = templates::resolve_build(state, &c, NAME).await
        && rec.status == nullspace_model::build::status::BuildStatus::Ready
        && templates::resolve_artifact(
            state,
            NAMESPACE,
            &crate::refs::TemplateRef::parse(NAME).expect("base is a valid ref"),
        )
        .await
        .ok()
        .and_then(|m| templates::snapshot_dir(state, &m))
        .is_some_and(|d| d.join("snapshot.json").exists())
    {
        return;
    }
    if let Ok(Some(tid)) = state.store.template_id(NAMESPACE, NAME).await {
        for status in ["waiting", "building"] {
            let f = BuildFilter {
                status: Some(status.into()),
                ..Default::default()
            };
            if state
                .store
                .builds(&tid, &f, 1, None)
                .await
                .is_ok_and(|b| !b.is_empty())
            {
                return;
            }
        }
    }
    let dir = layout_dir(state);
    match tokio::task::spawn_blocking(move || nullspace_oci::demo::write_layout(&dir, NAME)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!("no base template: writing the demo image: {e}");
            return;
        }
        Err(e) => {
            tracing::warn!("no base template: {e}");
            return;
        }
    }
    let req = BuildRequest {
        name: Some(NAME.into()),
        base_image: Some(source_ref(state)),
        tags: Some(vec!["default".into()]),
        ..Default::default()
    };
    match builds::create(state, &c, req, None).await {
        Ok(rec) => {
            tracing::info!(build = %rec.build_id, "building the base template nullspace/base");
            if let Err(e) = templates::set_visibility(state, &c, NAME, "public").await {
                tracing::warn!("base template visibility: {}", e.message);
            }
        }
        Err(e) => tracing::warn!("no base template: {}", e.message),
    }
}
