//! Running one build, as stages a reader can follow top-down:
//!
//! ```text
//! normalize ─▶ route ─┬─ import:  resolve base (registry import | template) ─────────────┐
//!                     ├─ engine:  final-artifact cache ─▶ engine (Dockerfile) ─▶ import ─┤─▶ runtime overrides ─▶ build VM ─▶ Built
//!                     └─ native:  resolve base ─▶ build VM with the steps ───────────────┘
//! ```
//!
//! Every stage takes the build's one [`CancellationToken`] by reference.
//! A stage that starts processes returns only once they are gone (so the
//! worker slot bounds them); the importer, which starts none, returns at
//! once and leaves its thread to clean up after itself.

mod context;
pub(crate) mod engine;
mod import;
mod vm;

use std::path::PathBuf;

use nullspace_store::LogGate;
use tokio_util::sync::CancellationToken;

use super::lifecycle::{self, entry};
use super::{ArtifactManifest, Failure, cache, failed};
use crate::model::*;
use crate::state::{RunSecrets, Shared};
use crate::validate::{self, Base, Normalized};

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
        kind: &str,
        level: &str,
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

/// How much of a build's own output (a native step's, or a Dockerfile
/// engine's) reaches the durable log. A guest or a `RUN` may print without
/// end; past the limit output is counted, not stored, and one entry says
/// how much was left out. (The host side of the guest channel is bounded
/// on its own; this bounds the database and the SSE replay.)
#[derive(Debug, Clone)]
pub struct OutputBudget {
    limit: u64,
    logged: u64,
    dropped: u64,
}

impl OutputBudget {
    pub fn new(limit: u64) -> OutputBudget {
        OutputBudget {
            limit,
            logged: 0,
            dropped: 0,
        }
    }

    /// The part of `chunk` that may still be logged (cut on a UTF-8
    /// boundary); the rest is counted as dropped.
    pub fn admit<'a>(&mut self, chunk: &'a str) -> &'a str {
        let room = self.limit.saturating_sub(self.logged) as usize;
        let mut cut = chunk.len().min(room);
        while !chunk.is_char_boundary(cut) {
            cut -= 1;
        }
        self.logged += cut as u64;
        if cut < chunk.len() {
            // Once output was cut, nothing later in the step is logged (a
            // log with holes in it would read as the whole output).
            self.logged = self.limit;
        }
        self.dropped += (chunk.len() - cut) as u64;
        &chunk[..cut]
    }

    /// Bytes dropped since the last call, and a one-line entry for them.
    pub fn take_truncation(&mut self, what: &str) -> Option<String> {
        let d = std::mem::take(&mut self.dropped);
        (d > 0).then(|| {
            format!(
                "{what}: output truncated: {d} more bytes were not logged (limit {} bytes)",
                self.limit
            )
        })
    }

    /// Starts a new budget (the next step's).
    pub fn reset(&mut self) {
        self.logged = 0;
        self.dropped = 0;
    }
}

/// The three ways a build runs.
enum Route {
    /// A registry image or a template, as is.
    Import,
    /// A Dockerfile, or declarative steps rendered to one.
    Engine,
    /// Declarative steps with the native backend, in the build VM.
    Native,
}

fn route(n: &Normalized) -> Route {
    if matches!(n.base, Base::Dockerfile) {
        Route::Engine
    } else if n.steps.is_empty() {
        Route::Import
    } else if n.backend == "native" {
        Route::Native
    } else {
        Route::Engine
    }
}

pub async fn execute(run: &Run<'_>, rec: &mut BuildRecord) -> Result<Built, Failure> {
    let req = run.req();
    let n = validate::normalize(req, &rec.namespace_slug, &run.state.engines).map_err(|i| {
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
    match route(&n) {
        Route::Import => {
            let base = import::resolve_base(run, rec, &n).await?;
            finish(run, rec, base, None).await
        }
        Route::Native => {
            let Some(vmm) = run.state.vmm.clone() else {
                return Err(failed(
                    "prepare",
                    format!(
                        "{} declarative step(s) with the native backend need the build VM, and this server runs without --build-vm",
                        n.steps.len()
                    ),
                    false,
                    "send build_backend buildah (or buildkit) to run the steps through a Dockerfile engine, or use a server started with --build-vm",
                ));
            };
            let mut m = import::resolve_base(run, rec, &n).await?;
            // Steps start from the image's defaults; the native plan applies
            // the request's runtime workdir/user/envs after them (where the
            // SDK's own `workdir`/`user` steps put them too).
            if req.start_cmd.is_some() {
                m.start_cmd = req.start_cmd.clone();
            }
            if let Some(r) = req
                .runtime_config
                .as_ref()
                .and_then(|r| r.readiness.clone())
            {
                m.readiness = Some(r);
            }
            let m = vm::snapshot_in_vm(run, rec, m, vmm, &n.steps).await?;
            Ok(Built {
                manifest: m,
                cache_key: None,
            })
        }
        Route::Engine => {
            if matches!(n.base, Base::Template(_)) {
                return Err(failed(
                    "prepare",
                    "declarative steps on a template base need the build VM, which this server does not have yet",
                    false,
                    "build the steps on an OCI base image",
                ));
            }
            let job = engine::prepare(run, rec, &n).await?;
            let key = match cache::lookup(run, rec, &n, &job).await? {
                cache::Lookup::Hit(m) => {
                    return Ok(Built {
                        manifest: with_request_overrides(*m, req),
                        cache_key: None,
                    });
                }
                cache::Lookup::Miss(key) => key,
            };
            let layout = engine::engine_build(run, rec, job).await?;
            let source = nullspace_oci::SourceRef::OciDir {
                path: layout,
                reference: Some("latest".into()),
            };
            let imported = import::import_source(run, rec, source, None).await;
            // The engine's context and output layout are done with (its
            // processes are gone: engine_build returned).
            let _ = std::fs::remove_dir_all(run.work_dir(rec).join("engine"));
            let base = imported?;
            if key.is_some() {
                rec.cache_summary.final_artifact_stores = 1;
            }
            finish(run, rec, base, key).await
        }
    }
}

/// The request's runtime settings over the base's, then (with a build VM)
/// boot, start, readiness and snapshot.
async fn finish(
    run: &Run<'_>,
    rec: &mut BuildRecord,
    base: ArtifactManifest,
    cache_key: Option<String>,
) -> Result<Built, Failure> {
    run.cancelled()?;
    let m = with_request_overrides(base, run.req());
    let m = match run.state.vmm.clone() {
        Some(vmm) => vm::snapshot_in_vm(run, rec, m, vmm, &[]).await?,
        None => m,
    };
    Ok(Built {
        manifest: m,
        cache_key,
    })
}

/// Request runtime settings override the image's (and the steps').
pub fn with_request_overrides(mut m: ArtifactManifest, req: &BuildRequest) -> ArtifactManifest {
    if let Some(rc) = &req.runtime_config {
        if let Some(envs) = &rc.default_envs {
            m.env.extend(envs.clone());
        }
        if rc.default_user.is_some() {
            m.user = rc.default_user.clone();
        }
        if rc.default_workdir.is_some() {
            m.workdir = rc.default_workdir.clone();
        }
        if rc.readiness.is_some() {
            m.readiness = rc.readiness.clone();
        }
    }
    if req.start_cmd.is_some() {
        m.start_cmd = req.start_cmd.clone();
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
        "cache",
        "info",
        message.unwrap_or_else(|| format!("{kind} cache {status}")),
    );
    e.phase = Some("cache".into());
    e.cache_kind = Some(kind.into());
    e.cache_status = Some(status.into());
    e.cache_reason = reason.map(str::to_string);
    e.cache_subject = Some(subject.to_string());
    run.append(e).await;
}

#[cfg(test)]
mod tests {
    use super::OutputBudget;

    #[test]
    fn the_budget_cuts_on_char_boundaries_and_reports_what_it_dropped() {
        let mut b = OutputBudget::new(5);
        assert_eq!(b.admit("abc"), "abc");
        assert_eq!(b.take_truncation("step 1"), None);
        // 'é' is two bytes: only "d" fits before the limit of 5.
        assert_eq!(b.admit("déf"), "d");
        assert_eq!(b.admit("more"), "");
        let t = b.take_truncation("step 1").unwrap();
        assert!(t.contains("7 more bytes") && t.contains("limit 5"), "{t}");
        assert_eq!(b.take_truncation("step 1"), None);
        b.reset();
        assert_eq!(b.admit("abcdefg"), "abcde");
    }
}
