//! `POST /v1/templates/plan?view=…`: the plan's views
//! ([`nullspace_model::build::views`]) answered, and the dry-run's look at
//! this server's caches ([`CacheFacts`]): the base resolved now, each layer
//! looked up in the importer's layer cache, an engine build's
//! final-artifact key computed and looked up (`builds::cache::probe`), a
//! template base's artifact found. Looks only: nothing is leased, fetched
//! beyond manifests, or counted as a hit or miss.

use std::time::Duration;

use nullspace_model::build::plan::{BuildPlan, Route, Source};
use nullspace_model::build::request::BuildRequest;
use nullspace_model::build::views::{self, BaseFacts, CacheFacts, PlanView};
use nullspace_oci::{Image, ResolveOptions, SourceRef};
use nullspace_rootfs::LayerCache;
use serde::Serialize;

use crate::error::ApiError;
use crate::openapi::{QueryKind, QueryParam};
use crate::state::{RunSecrets, Shared};

/// How long a dry-run waits for a registry before saying "unknown" (well
/// under a client's patience: the answer is a look, not a build).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

/// `?view=`, documented in `/openapi.json`.
pub const VIEW: QueryParam = QueryParam {
    name: "view",
    description: "Which view of the plan: plan (the default), deps, dry-run, steps, outputs",
    kind: QueryKind::OneOf(&["plan", "deps", "dry-run", "steps", "outputs"]),
};

/// One of the plan's answers (untagged: the default keeps its shape).
#[derive(Serialize, schemars::JsonSchema)]
#[cfg_attr(test, derive(Debug))]
#[serde(untagged)]
pub enum PlanAnswer {
    Plan(Box<nullspace_model::build::plan::PlanResponse>),
    Deps(views::DepsView),
    DryRun(views::DryRunView),
    Steps(views::StepsView),
    Outputs(views::OutputsView),
}

/// `?view=` read: absent is the plan itself.
pub fn parse_view(v: Option<&str>) -> Result<PlanView, ApiError> {
    match v {
        None => Ok(PlanView::Plan),
        Some(s) => PlanView::parse(s).ok_or_else(|| {
            ApiError::invalid(format!(
                "view {s:?} is not one of {}",
                PlanView::ALL.map(PlanView::as_str).join(", ")
            ))
        }),
    }
}

pub async fn answer(
    state: &Shared,
    namespace: &str,
    req: &BuildRequest,
    plan: BuildPlan,
    view: PlanView,
) -> PlanAnswer {
    match view {
        PlanView::Plan => PlanAnswer::Plan(Box::new(crate::plan::response(plan))),
        PlanView::Deps => PlanAnswer::Deps(views::deps(&plan)),
        PlanView::Steps => PlanAnswer::Steps(views::steps(&plan)),
        PlanView::Outputs => PlanAnswer::Outputs(views::outputs(&plan)),
        PlanView::DryRun => {
            let facts = cache_facts(state, namespace, req, &plan).await;
            PlanAnswer::DryRun(views::dry_run(&plan, &facts))
        }
    }
}

/// What this server's caches hold for `plan`, looked at now.
async fn cache_facts(
    state: &Shared,
    namespace: &str,
    req: &BuildRequest,
    plan: &BuildPlan,
) -> CacheFacts {
    // The request's credentials, held for this call only.
    let secrets = RunSecrets {
        base_image_auth: req.base_image_auth.clone(),
        registry_auth: req.registry_auth.clone().unwrap_or_default(),
        ..Default::default()
    };
    let base = match &plan.source {
        Source::Dockerfile { .. } => None,
        Source::Template { reference } => Some(template_base(state, namespace, reference).await),
        // An engine pulls its own bases: only the key below matters.
        Source::Image { .. } if plan.route == Route::Engine => None,
        Source::Image { reference } => Some(image_base(state, reference, &secrets).await),
    };
    let final_artifact = match plan.route {
        Route::Engine if !plan.cache.skip_cache => Some(
            match tokio::time::timeout(
                RESOLVE_TIMEOUT,
                crate::builds::cache::probe(state, namespace, plan, &secrets),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(format!(
                    "resolving the base images took longer than {}s",
                    RESOLVE_TIMEOUT.as_secs()
                )),
            },
        ),
        _ => None,
    };
    CacheFacts {
        build_vm: state.vmm.is_some(),
        base,
        final_artifact,
    }
}

async fn template_base(state: &Shared, namespace: &str, reference: &str) -> BaseFacts {
    let r = match crate::refs::TemplateRef::parse(reference) {
        Ok(r) => r,
        Err(e) => return BaseFacts::Unresolved(e.to_string()),
    };
    match crate::templates::resolve_artifact(state, namespace, &r).await {
        Ok(m) => BaseFacts::Template {
            rootfs_digest: m.rootfs,
        },
        Err(e) => BaseFacts::Unresolved(e.message),
    }
}

/// The image's manifest and each layer's presence in the layer cache, the
/// way the importer would use it (registry images only; a local layout is
/// read in place, never cached).
async fn image_base(state: &Shared, reference: &str, secrets: &RunSecrets) -> BaseFacts {
    let source = match SourceRef::parse(reference) {
        Ok(s) => s,
        Err(e) => return BaseFacts::Unresolved(e.to_string()),
    };
    let credentials = match &secrets.base_image_auth {
        None => None,
        Some(_) => match crate::builds::execute::base_credentials(secrets) {
            Ok(c) => c,
            Err(m) => return BaseFacts::Unresolved(m),
        },
    };
    let opts = ResolveOptions {
        platform: None,
        credentials,
        insecure_registries: state.config.insecure_registries.clone(),
    };
    let cached = matches!(source, SourceRef::Registry(_));
    let layers_dir = state.cache_dir.join("layers");
    let cache_dir = state.cache_dir.clone();
    let look = tokio::task::spawn_blocking(move || {
        let image = Image::resolve(&source, &opts).map_err(|e| e.to_string())?;
        let cache = if cached && layers_dir.is_dir() {
            Some(LayerCache::open(&cache_dir, u64::MAX).map_err(|e| e.to_string())?)
        } else {
            None
        };
        let layers = image
            .manifest
            .layers
            .iter()
            .map(|l| {
                let d = l.digest.to_string();
                let held = cache.as_ref().is_some_and(|c| c.holds(&d).unwrap_or(false));
                (d, held)
            })
            .collect();
        Ok::<_, String>(BaseFacts::Image {
            manifest_digest: image.manifest_digest.to_string(),
            layers,
        })
    });
    match tokio::time::timeout(RESOLVE_TIMEOUT, look).await {
        Ok(Ok(Ok(f))) => f,
        Ok(Ok(Err(m))) => BaseFacts::Unresolved(format!("resolving {reference}: {m}")),
        Ok(Err(e)) => BaseFacts::Unresolved(format!("resolving {reference}: {e}")),
        Err(_) => BaseFacts::Unresolved(format!(
            "resolving {reference} took longer than {}s",
            RESOLVE_TIMEOUT.as_secs()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_by_name() {
        let QueryKind::OneOf(names) = VIEW.kind else {
            panic!("view is one of a list")
        };
        assert_eq!(names, PlanView::ALL.map(PlanView::as_str));
        assert_eq!(parse_view(None).unwrap(), PlanView::Plan);
        assert_eq!(parse_view(Some("dry-run")).unwrap(), PlanView::DryRun);
        let e = parse_view(Some("graph")).unwrap_err();
        assert!(
            e.message
                .contains("\"graph\" is not one of plan, deps, dry-run, steps, outputs"),
            "{}",
            e.message
        );
    }
}
