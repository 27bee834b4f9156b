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
use crate::builds::{Failure, failed, upload_failed};
use crate::model::*;
use crate::state::RunSecrets;
use nullspace_model::build::plan::{BuildPlan, Source};

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
    p: &BuildPlan,
) -> Result<EngineJob, Failure> {
    let engine = run
        .state
        .engine_list
        .iter()
        .find(|e| e.name() == p.backend.as_str())
        .cloned()
        .ok_or_else(|| {
            failed(
                "preflight",
                format!("engine {} is not available on this server", p.backend),
                false,
                "choose an available build_backend",
            )
        })?;
    rec.engine = Some(format!("{} {}", engine.name(), engine.version()));
    let inputs = inputs(p, run.secrets, &rec.build_id)?;
    let entries = context_entries(run, rec, p.context.as_ref()).await?;
    let df_name = if entries.iter().any(|e| e.path == "Dockerfile") {
        ".nullspace.Dockerfile"
    } else {
        "Dockerfile"
    };
    let EngineInputs {
        dockerfile,
        build_args,
        target,
        base_refs,
        creds,
    } = inputs;
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
        network: p.vm.internet_access,
        target,
    })
}

/// What the engine is given that the final-artifact key is made of,
/// decided from the plan and the request's credentials alone (a dry-run
/// computes the same key with it).
pub struct EngineInputs {
    pub dockerfile: String,
    pub build_args: BTreeMap<String, String>,
    pub target: Option<String>,
    /// The external images the Dockerfile starts from or copies from.
    pub base_refs: Vec<String>,
    pub creds: Vec<RegistryCredential>,
}

/// The Dockerfile (given, or rendered from the steps with its cache-bust
/// argument set to `bust`), its external images and the credentials per
/// registry.
pub fn inputs(p: &BuildPlan, secrets: &RunSecrets, bust: &str) -> Result<EngineInputs, Failure> {
    let (dockerfile, bust_arg, mut build_args, target) = match &p.source {
        Source::Dockerfile {
            text,
            build_args,
            target,
            ..
        } => (text.clone(), None, build_args.clone(), target.clone()),
        Source::Image { .. } | Source::Template { .. } => {
            let r = nullspace_build::render::render_plan(p)
                .map_err(|e| failed("preflight", e.to_string(), false, "fix the steps"))?;
            (r.dockerfile, r.cache_bust_arg, BTreeMap::new(), None)
        }
    };
    if let Some(b) = bust_arg {
        build_args.insert(b, bust.to_string());
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
    let mut creds = registry_credentials(secrets);
    if let Some(c) = basic_credentials(secrets)? {
        let host = match &p.source {
            Source::Dockerfile { .. } => analysis
                .base_image_auth_host(&|r: &str| crate::refs::names_template(r, None).is_some())
                .map_err(|e| {
                    failed(
                        "preflight",
                        format!("base_image_auth: {e}"),
                        false,
                        "use registry_auth per registry instead",
                    )
                })?,
            other => {
                nullspace_build::dockerfile::registry_host(other.base_ref().unwrap_or_default())
            }
        };
        creds.push(RegistryCredential {
            registry: host,
            username: c.username,
            password: c.password,
        });
    }
    Ok(EngineInputs {
        dockerfile,
        build_args,
        target,
        base_refs,
        creds,
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
        LogKind::Message,
        LogLevel::Info,
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
        std::fs::create_dir_all(&ctx)?;
        materialize(&ctx, &job.entries)?;
        std::fs::write(ctx.join(job.df_name), &job.dockerfile)?;
        let budget = std::sync::Mutex::new(super::OutputBudget::new(st.config.step_log_limit));
        let send = |line: String| {
            let mut e = entry(&log_rec, LogKind::Message, LogLevel::Info, line);
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
        let output = job.engine.build(&b);
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
        Err(EngineFailure::Context(e)) => {
            Err(upload_failed(e.to_string(), "fix the build context"))
        }
        Err(e) => Err(failed(
            "build_step",
            e.to_string(),
            false,
            "fix the Dockerfile or steps; see the log",
        )),
    }
}

/// Why an engine build failed, as it crosses from the blocking task.
#[derive(Debug, thiserror::Error)]
enum EngineFailure {
    /// The uploaded context could not be laid out (the caller's input).
    #[error(transparent)]
    Context(#[from] nullspace_build::context::ContextError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Engine(#[from] EngineError),
}
