//! Running one build, as stages a reader can follow top-down in
//! [`execute`]; each is a function of typed inputs (the [`BuildPlan`], the
//! [`ArtifactManifest`] so far) and the build's one [`CancellationToken`]:
//!
//! ```text
//! preflight   request ─▶ BuildPlan (the route, and what it needs: a build VM, an OCI base)
//! rootfs      resolve base ─┬─ Import:      registry image imported (import.rs) | template's artifact
//!                           ├─ NativeSteps: the same; the steps run in the VM below
//!                           └─ Engine:      final-artifact cache (cache.rs) ─▶ Dockerfile engine
//!                                           (engine.rs) ─▶ its OCI layout imported (import.rs)
//!             ⇒ an ext4 rootfs in the artifact store, with the image's defaults
//! runtime     the request's start command, readiness, envs, user, workdir over the base's
//! build VM    boot ─▶ native steps ─▶ start ─▶ readiness ─▶ snapshot (vm.rs, nullspace-vm)
//! publish     the worker stores the manifest and moves the tags in one write
//!             (lifecycle::finish_ready)
//! ```
//!
//! A stage that starts processes returns only once they are gone (so the
//! worker slot bounds them); the importer, which starts none, returns at
//! once and leaves its thread to clean up after itself.

mod budget;
mod context;
pub(crate) mod engine;
mod import;
mod vm;

use std::path::PathBuf;

use nullspace_store::LogGate;
use tokio_util::sync::CancellationToken;

pub use budget::OutputBudget;

use super::lifecycle::{self, entry};
use super::{ArtifactManifest, Failure, cache, failed};
use crate::model::*;
use crate::state::{RunSecrets, Shared};
use crate::validate;
use nullspace_model::build::plan::{BuildPlan, Route, Source};

/// What every stage of one run needs besides the record it updates.
pub struct Run<'a> {
    pub state: &'a Shared,
    pub token: &'a CancellationToken,
    /// 1 for the first claim; a re-queued build runs again with the next.
    pub attempt: i64,
    pub def: &'a Definition,
    pub secrets: &'a RunSecrets,
}

/// A build's result: its manifest, and the final-artifact cache key it
/// should be stored under.
pub struct Built {
    pub manifest: ArtifactManifest,
    pub cache_key: Option<String>,
}

impl Run<'_> {
    pub fn req(&self) -> &BuildRequest {
        &self.def.request
    }

    /// Log appends of a run are accepted only while this server owns it.
    pub fn gate(&self) -> LogGate<'_> {
        LogGate::Owner(&self.state.owner)
    }

    /// This attempt's own work directory, so a re-queued build never
    /// shares (or deletes) a directory with an earlier attempt whose
    /// processes might still be ending.
    pub fn work_dir(&self, rec: &BuildRecord) -> PathBuf {
        self.state
            .work_dir
            .join(format!("{}.{}", rec.build_id, self.attempt))
    }

    pub async fn log(
        &self,
        rec: &BuildRecord,
        kind: LogKind,
        level: LogLevel,
        phase: Option<&str>,
        msg: impl Into<String>,
    ) {
        lifecycle::log(self.state, self.gate(), rec, kind, level, phase, msg).await
    }

    pub async fn append(&self, e: LogEntry) {
        let _ = lifecycle::append(self.state, self.gate(), e).await;
    }

    fn cancelled(&self) -> Result<(), Failure> {
        if self.token.is_cancelled() {
            Err(Failure::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// `base_image_auth` as registry credentials, for a caller outside a run
/// (a dry-run resolving the base the way the build would).
pub fn base_credentials(
    secrets: &RunSecrets,
) -> Result<Option<nullspace_oci::auth::Credentials>, String> {
    context::basic_credentials(secrets).map_err(|f| f.message())
}

/// One build, stage by stage (see the module docs).
pub async fn execute(run: &Run<'_>, rec: &mut BuildRecord) -> Result<Built, Failure> {
    let plan = preflight(run, rec)?;
    let (base, cache_key) = match rootfs(run, rec, &plan).await? {
        Rootfs::Cached(m) => {
            // A ready build of the same inputs: its snapshot is reused.
            return Ok(Built {
                manifest: runtime_settings(m, &plan),
                cache_key: None,
            });
        }
        Rootfs::Built { base, cache_key } => (base, cache_key),
    };
    run.cancelled()?;
    let manifest = runtime_settings(base, &plan);
    let manifest = match run.state.vmm.clone() {
        Some(vmm) => vm::snapshot_in_vm(run, rec, manifest, vmm, &plan).await?,
        None => manifest,
    };
    Ok(Built {
        manifest,
        cache_key,
    })
}

/// The request as a plan (every rule checked again: the server that runs a
/// build may differ from the one that took it), and what its route needs
/// from this server.
fn preflight(run: &Run<'_>, rec: &BuildRecord) -> Result<BuildPlan, Failure> {
    let p = validate::plan(run.req(), &rec.namespace_slug, &run.state.engines).map_err(|i| {
        failed(
            "preflight",
            i.iter()
                .map(|x| x.message.clone())
                .collect::<Vec<_>>()
                .join("; "),
            false,
            "fix the request",
        )
    })?;
    match (p.route, &p.source) {
        (Route::NativeSteps, _) if run.state.vmm.is_none() => Err(failed(
            "prepare",
            format!(
                "{} declarative step(s) with the native backend need the build VM, and this server runs without --build-vm",
                p.steps.len()
            ),
            false,
            "send build_backend buildah (or buildkit) to run the steps through a Dockerfile engine, or use a server started with --build-vm",
        )),
        (Route::Engine, Source::Template { .. }) => Err(failed(
            "prepare",
            "declarative steps on a template base need the build VM, which this server does not have yet",
            false,
            "build the steps on an OCI base image",
        )),
        _ => Ok(p),
    }
}

/// What the rootfs stage produced.
enum Rootfs {
    /// The final-artifact cache had the whole result.
    Cached(ArtifactManifest),
    /// The base's rootfs in the artifact store, and the final-artifact cache
    /// key to store the result under (engine builds only).
    Built {
        base: ArtifactManifest,
        cache_key: Option<String>,
    },
}

/// Resolve base → engine or import → an ext4 rootfs in the artifact store.
async fn rootfs(run: &Run<'_>, rec: &mut BuildRecord, p: &BuildPlan) -> Result<Rootfs, Failure> {
    match p.route {
        Route::Import | Route::NativeSteps => Ok(Rootfs::Built {
            base: import::resolve_base(run, rec, p).await?,
            cache_key: None,
        }),
        Route::Engine => {
            let job = engine::prepare(run, rec, p).await?;
            let cache_key = match cache::lookup(run, rec, p, &job).await? {
                cache::Lookup::Hit(m) => return Ok(Rootfs::Cached(*m)),
                cache::Lookup::Miss(key) => key,
            };
            let layout = engine::engine_build(run, rec, job).await?;
            let source = nullspace_oci::SourceRef::OciDir {
                path: layout,
                reference: Some("latest".into()),
            };
            let imported = import::import_source(run, rec, p, source, None).await;
            // The engine's context and output layout are done with (its
            // processes are gone: engine_build returned).
            let _ = std::fs::remove_dir_all(run.work_dir(rec).join("engine"));
            let base = imported?;
            if cache_key.is_some() {
                rec.cache_summary.final_artifact_stores = 1;
            }
            Ok(Rootfs::Built { base, cache_key })
        }
    }
}

/// The request's runtime settings (the plan's) over the image's. With
/// native steps the VM applies envs, user and workdir after the steps
/// (where the SDK's own `workdir`/`user` steps put them), so only the start
/// command and readiness are set here.
fn runtime_settings(mut m: ArtifactManifest, p: &BuildPlan) -> ArtifactManifest {
    let r = &p.runtime;
    if r.start_cmd.is_some() {
        m.start_cmd = r.start_cmd.clone();
    }
    if let Some(rd) = &r.readiness {
        m.readiness = Some(rd.to_json());
    }
    if p.route != Route::NativeSteps {
        m.env.extend(r.env.0.clone());
        if r.user.is_some() {
            m.user = r.user.clone();
        }
        if r.workdir.is_some() {
            m.workdir = r.workdir.clone();
        }
    }
    m
}

/// A `cache` entry of the build log.
pub async fn cache_entry(
    run: &Run<'_>,
    rec: &BuildRecord,
    kind: &str,
    status: &str,
    reason: Option<&str>,
    subject: &str,
    message: Option<String>,
) {
    let mut e = entry(
        rec,
        LogKind::Cache,
        LogLevel::Info,
        message.unwrap_or_else(|| format!("{kind} cache {status}")),
    );
    e.phase = Some("cache".into());
    e.cache_kind = Some(kind.into());
    e.cache_status = Some(status.into());
    e.cache_reason = reason.map(str::to_string);
    e.cache_subject = Some(subject.to_string());
    run.append(e).await;
}
