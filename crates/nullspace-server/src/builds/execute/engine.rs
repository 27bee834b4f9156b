//! The engine stage: a Dockerfile (given, or rendered from declarative
//! steps) built by a Dockerfile engine into an OCI layout.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use nullspace_build::context::ContextEntry;
use nullspace_build::engine::{DockerfileEngine, EngineBuild, EngineError, RegistryCredential};

use super::Run;
use super::context::{basic_credentials, context_entries, registry_credentials};
use crate::builds::lifecycle::entry;
use crate::builds::{Failure, failed};
use crate::model::*;
use crate::validate::{Base, Normalized};

/// Everything the engine will be given, decided before the cache lookup
/// (whose key is made of it).
pub struct EngineJob {
    pub engine: Arc<dyn DockerfileEngine>,
    pub dockerfile: String,
    /// The Dockerfile's name in the context (`Dockerfile`, unless the
    /// context has one of its own).
    df_name: &'static str,
    pub entries: Vec<ContextEntry>,
    pub creds: Vec<RegistryCredential>,
    pub build_args: BTreeMap<String, String>,
    /// The external images the Dockerfile starts from or copies from.
    pub base_refs: Vec<String>,
    build_secrets: Vec<(String, String)>,
    network: bool,
    target: Option<String>,
}

pub async fn prepare(
    run: &Run<'_>,
    rec: &mut BuildRecord,
    n: &Normalized,
) -> Result<EngineJob, Failure> {
    let req = run.req();
    let engine = run
        .state
        .engine_list
        .iter()
        .find(|e| e.name() == n.backend)
        .cloned()
        .ok_or_else(|| {
            failed(
                "preflight",
                format!("engine {} is not available on this server", n.backend),
                false,
                "choose an available build_backend",
            )
        })?;
    rec.engine = Some(format!("{} {}", engine.name(), engine.version()));
    let (dockerfile, bust) = match &n.base {
        Base::Dockerfile => (req.dockerfile.clone().unwrap_or_default(), None),
        _ => {
            let empty = BTreeMap::new();
            let input = nullspace_build::render::RenderInput {
                base_image: req.base_image.as_deref().unwrap_or_default(),
                steps: &n.steps,
                build_envs: req.build_envs.as_ref().unwrap_or(&empty),
                runtime_envs: req
                    .runtime_config
                    .as_ref()
                    .and_then(|r| r.default_envs.as_ref())
                    .unwrap_or(&empty),
            };
            let r = nullspace_build::render::render(&input)
                .map_err(|e| failed("preflight", e.to_string(), false, "fix the steps"))?;
            (r.dockerfile, r.cache_bust_arg)
        }
    };
    let entries = context_entries(run, rec).await?;
    let df_name = if entries.iter().any(|e| e.path == "Dockerfile") {
        ".nullspace.Dockerfile"
    } else {
        "Dockerfile"
    };
    let mut build_args = req.build_args.clone().unwrap_or_default();
    if let Some(b) = bust {
        build_args.insert(b, rec.build_id.clone());
    }
    let analysis = nullspace_build::dockerfile::analyze(&dockerfile, &build_args)
        .map_err(|e| failed("preflight", e.to_string(), false, "fix the Dockerfile"))?;
    let mut base_refs: Vec<String> = analysis
        .external_images()
        .map(|(_, r, _)| r.to_string())
        .chain(analysis.imported_images.iter().map(|i| i.reference.clone()))
        .collect();
    base_refs.sort();
    base_refs.dedup();
    let mut creds = registry_credentials(run.secrets);
    if let Some(c) = basic_credentials(run.secrets)? {
        let host = match &n.base {
            Base::Dockerfile => analysis
                .base_image_auth_host(&|r: &str| {
                    r.starts_with("tmpl_") || r.starts_with("nullspace/")
                })
                .map_err(|e| {
                    failed(
                        "preflight",
                        format!("base_image_auth: {e}"),
                        false,
                        "use registry_auth per registry instead",
                    )
                })?,
            _ => nullspace_build::dockerfile::registry_host(
                req.base_image.as_deref().unwrap_or_default(),
            ),
        };
        creds.push(RegistryCredential {
            registry: host,
            username: c.username,
            password: c.password,
        });
    }
    Ok(EngineJob {
        engine,
        dockerfile,
        df_name,
        entries,
        creds,
        build_args,
        base_refs,
        build_secrets: run
            .secrets
            .build_secrets
            .iter()
            .map(|s| (s.id.clone(), s.value.clone().unwrap_or_default()))
            .collect(),
        network: req.build_config.as_ref().and_then(|c| c.internet_access) != Some(false),
        target: req.target.clone(),
    })
}

/// Builds the job's Dockerfile; returns the OCI layout it produced. On
/// cancel, the engine kills its process tree and this returns once every
/// process of it is gone.
pub async fn engine_build(
    run: &Run<'_>,
    rec: &mut BuildRecord,
    job: EngineJob,
) -> Result<PathBuf, Failure> {
    use nullspace_build::context::materialize;
    let work = run.work_dir(rec).join("engine");
    let ctx = work.join("context");
    let out = work.join("engine-out");
    let handle = tokio::runtime::Handle::current();
    let st = run.state.clone();
    let log_rec = rec.clone();
    let token = run.token.clone();
    run.log(
        rec,
        "message",
        "info",
        Some("step"),
        format!(
            "building with {} ({} context entries)",
            rec.engine.as_deref().unwrap_or_default(),
            job.entries.len()
        ),
    )
    .await;
    let result = tokio::task::spawn_blocking(move || -> Result<PathBuf, EngineFailure> {
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&ctx).map_err(|e| EngineFailure::Other(e.to_string()))?;
        materialize(&ctx, &job.entries).map_err(|e| EngineFailure::Context(e.to_string()))?;
        std::fs::write(ctx.join(job.df_name), &job.dockerfile)
            .map_err(|e| EngineFailure::Other(e.to_string()))?;
        let budget = std::sync::Mutex::new(super::OutputBudget::new(st.config.step_log_limit));
        let send = |line: String| {
            let mut e = entry(&log_rec, "message", "info", line);
            e.phase = Some("step".into());
            let _ = handle.block_on(crate::builds::append(
                &st,
                nullspace_store::LogGate::Owner(&st.owner),
                e,
            ));
        };
        let forward = |line: &str| {
            let kept = budget.lock().expect("budget lock").admit(line).to_string();
            if !kept.is_empty() {
                send(kept);
            }
        };
        let mut b = EngineBuild::new(&ctx, &out, &forward);
        b.dockerfile = job.df_name;
        b.build_args = job.build_args;
        b.target = job.target;
        b.secrets = job.build_secrets;
        b.network = job.network;
        b.registry_auth = job.creds;
        b.cancel = Some(&token);
        let output = job.engine.build(&b).map_err(EngineFailure::Engine);
        if let Some(t) = budget
            .lock()
            .expect("budget lock")
            .take_truncation(job.engine.name())
        {
            send(t);
        }
        let output = output?;
        Ok(output.layout_dir)
    })
    .await
    .map_err(|e| {
        failed(
            "prepare",
            format!("engine task failed: {e}"),
            true,
            "retry the build",
        )
    })?;
    match result {
        Ok(layout) => Ok(layout),
        Err(_) if run.token.is_cancelled() => Err(Failure::Cancelled),
        Err(EngineFailure::Engine(EngineError::Cancelled { .. })) => Err(Failure::Cancelled),
        Err(EngineFailure::Context(message)) => Err(Failure::Failed {
            phase: "blob_upload",
            message,
            retryable: false,
            action: "fix the build context",
            code: "file_upload_error",
        }),
        Err(e) => Err(failed(
            "build_step",
            e.to_string(),
            false,
            "fix the Dockerfile or steps; see the log",
        )),
    }
}

#[derive(Debug, thiserror::Error)]
enum EngineFailure {
    #[error("{0}")]
    Engine(EngineError),
    #[error("{0}")]
    Context(String),
    #[error("{0}")]
    Other(String),
}
