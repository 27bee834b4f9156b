//! The base of a build, and the importer stage (image → ext4 rootfs in
//! the artifact store).

use std::time::Duration;

use nullspace_build::import::{ImportError, ImportOptions, import};
use nullspace_oci::layout::NoProgress;
use nullspace_oci::{Image, ResolveOptions, SourceRef};
use nullspace_store::artifacts::Leased;

use super::Run;
use super::context::basic_credentials;
use crate::builds::lifecycle::entry;
use crate::builds::{ArtifactManifest, Failure, failed};
use crate::model::*;
use crate::templates;
use nullspace_model::build::plan::{BuildPlan, Source};
use nullspace_model::build::probe::Readiness;

/// The base of a non-engine build: a registry image imported, or a
/// template's artifact.
pub async fn resolve_base(
    run: &Run<'_>,
    rec: &mut BuildRecord,
    p: &BuildPlan,
) -> Result<ArtifactManifest, Failure> {
    let ns = rec.namespace_slug.clone();
    match &p.source {
        Source::Template { reference } => {
            run.log(
                rec,
                LogKind::Message,
                LogLevel::Info,
                Some("preparing"),
                format!("resolving template {reference}"),
            )
            .await;
            let r = crate::refs::TemplateRef::parse(reference)
                .map_err(|e| failed("prepare", e, false, "check the template reference"))?;
            templates::resolve_artifact(run.state, &ns, &r)
                .await
                .map_err(|e| failed("prepare", e.message, false, "check the template reference"))
        }
        Source::Image { reference } => {
            run.log(
                rec,
                LogKind::Message,
                LogLevel::Info,
                Some("preparing"),
                format!("resolving {reference}"),
            )
            .await;
            let source = SourceRef::parse(reference)
                .map_err(|e| failed("prepare", e.to_string(), false, "fix base_image"))?;
            // The one local source: the server's own base image layout.
            if !matches!(source, SourceRef::Registry(_))
                && *reference != crate::base::source_ref(run.state)
            {
                return Err(failed(
                    "prepare",
                    format!("base_image {reference:?} must be a registry reference"),
                    false,
                    "use a registry reference",
                ));
            }
            let credentials = basic_credentials(run.secrets)?;
            import_source(run, rec, p, source, credentials).await
        }
        Source::Dockerfile { .. } => Err(failed(
            "preflight",
            "a Dockerfile build has no base to import",
            false,
            "report this",
        )),
    }
}

/// Why the import thread gave up.
enum ImportFailure {
    Resolve(nullspace_oci::OciError),
    Cancelled,
    Other(String),
}

/// Imports `source` into the artifact store. The import thread owns its
/// scratch directory (`work/<build>.<attempt>-import`) and removes it
/// whatever happens; on cancel this returns at once (a network read may
/// block the thread for minutes, and it starts no process).
pub async fn import_source(
    run: &Run<'_>,
    rec: &mut BuildRecord,
    p: &BuildPlan,
    source: SourceRef,
    credentials: Option<nullspace_oci::auth::Credentials>,
) -> Result<ArtifactManifest, Failure> {
    let state = run.state;
    let opts = ResolveOptions {
        platform: None,
        credentials,
        insecure_registries: state.config.insecure_registries.clone(),
    };
    let work = state
        .work_dir
        .join(format!("{}.{}-import", rec.build_id, run.attempt));
    // Only registry layers are worth caching: an engine's output layout is
    // unique to its build (the engine keeps its own layer cache), and caching
    // it would keep another copy of whatever the build wrote.
    let cache_dir = if p.cache.skip_cache || !matches!(source, SourceRef::Registry(_)) {
        None
    } else {
        Some(state.cache_dir.clone())
    };
    let import_opts = ImportOptions {
        disk_mb: p.vm.disk_mb,
        cache_dir,
        cache_max_bytes: state.config.cache_max_bytes,
        cancel: Some(run.token.clone()),
        ..Default::default()
    };
    let token = run.token.clone();
    let artifacts = state.artifacts.clone();
    let holder = rec.build_id.clone();
    let mut task = tokio::task::spawn_blocking(move || {
        let _ = std::fs::remove_dir_all(&work);
        let result = (|| {
            std::fs::create_dir_all(&work).map_err(|e| ImportFailure::Other(e.to_string()))?;
            let image = Image::resolve(&source, &opts).map_err(ImportFailure::Resolve)?;
            let out = work.join("template");
            let meta = import(&image, &out, &import_opts, &NoProgress).map_err(|e| match e {
                ImportError::Cancelled { .. } => ImportFailure::Cancelled,
                other => ImportFailure::Other(other.to_string()),
            })?;
            if token.is_cancelled() {
                return Err(ImportFailure::Cancelled);
            }
            // Leased to the build until its record references the rootfs.
            let stored = artifacts
                .writing()
                .and_then(|w| {
                    let stored = w.adopt(&out.join("rootfs.ext4"))?;
                    w.lease(&holder, &Leased::Artifact(stored.0.clone()))?;
                    Ok(stored)
                })
                .map_err(|e| ImportFailure::Other(format!("storing the rootfs: {e}")))?;
            Ok((image, meta, stored))
        })();
        let _ = std::fs::remove_dir_all(&work);
        result
    });
    let result = loop {
        tokio::select! {
            r = &mut task => break r,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                if run.token.is_cancelled() {
                    return Err(Failure::Cancelled);
                }
            }
        }
    }
    .map_err(|e| {
        failed(
            "prepare",
            format!("import worker failed: {e}"),
            true,
            "retry the build",
        )
    })?;
    let (image, meta, (digest, size)) = match result {
        Ok(v) => v,
        Err(_) if run.token.is_cancelled() => return Err(Failure::Cancelled),
        Err(ImportFailure::Cancelled) => return Err(Failure::Cancelled),
        Err(ImportFailure::Resolve(e)) => {
            let auth = matches!(e.kind, nullspace_oci::error::ErrorKind::Auth(_));
            return Err(failed(
                if auth { "auth" } else { "prepare" },
                e.to_string(),
                !auth,
                if auth {
                    "check base_image_auth"
                } else {
                    "check base_image and retry"
                },
            ));
        }
        Err(ImportFailure::Other(e)) => return Err(failed("prepare", e, false, "check the image")),
    };
    for l in &meta.image.layers {
        let hit = meta.cache.reused.contains(&l.digest);
        let mut e = entry(
            rec,
            LogKind::Cache,
            LogLevel::Debug,
            format!(
                "layer {} {}",
                l.digest,
                if hit { "reused" } else { "fetched" }
            ),
        );
        e.phase = Some("cache".into());
        e.cache_kind = Some("layer".into());
        e.cache_subject = Some(l.digest.to_string());
        e.cache_status = Some(
            if p.cache.skip_cache {
                "bypass"
            } else if hit {
                "hit"
            } else {
                "miss"
            }
            .into(),
        );
        if p.cache.skip_cache {
            e.cache_reason = Some("whole_build_skip_cache".into());
        }
        run.append(e).await;
    }
    let cs = &mut rec.cache_summary;
    if p.cache.skip_cache {
        cs.layer_bypasses = meta.image.layers.len() as i64;
    } else {
        cs.layer_hits = meta.cache.layers_reused as i64;
        cs.layer_misses = meta.cache.layers_fetched as i64;
        cs.layer_stores = meta.cache.layers_fetched as i64;
    }
    run.log(
        rec,
        LogKind::Message,
        LogLevel::Info,
        Some("finalize"),
        format!(
            "rootfs: {} MiB, {} files, {} dirs ({} of {} layers from cache)",
            meta.rootfs.size_bytes >> 20,
            meta.rootfs.files,
            meta.rootfs.dirs,
            meta.cache.layers_reused,
            meta.image.layers.len()
        ),
    )
    .await;
    let rt = image.runtime_defaults();
    let oci = image.oci_metadata();
    // A mapped HEALTHCHECK is a command probe with the model's default
    // schedule.
    let readiness = rt
        .ready_cmd
        .as_ref()
        .map(|c| Readiness::command(c).to_json());
    Ok(ArtifactManifest {
        rootfs: digest.to_string(),
        rootfs_size: size,
        env: rt.env.clone(),
        user: rt.user.clone(),
        workdir: rt.workdir.clone(),
        start_cmd: rt.start_cmd.clone(),
        readiness: readiness.clone(),
        image: serde_json::to_value(&meta.image).unwrap_or_default(),
        snapshot: None,
        sbom: None,
        sbom_error: None,
        oci: OciMetadataOut {
            labels: oci.labels.clone(),
            exposed_ports: oci.exposed_ports.clone(),
            volumes: oci.volumes.clone(),
            healthcheck: oci.healthcheck.as_ref().map(|h| HealthcheckOut {
                test: h.test.clone(),
                interval_ns: h.interval_ns,
                timeout_ns: h.timeout_ns,
                start_period_ns: h.start_period_ns,
                retries: h.retries,
                mapped_readiness: if h.mapped_readiness.is_some() {
                    readiness.clone()
                } else {
                    None
                },
            }),
        },
    })
}
