//! The final-artifact cache of engine builds: a key made of resolved
//! digests and every input that changes the artifact, and the lookup.
//!
//! The key holds the plan's final-artifact inputs (its source digest:
//! source, steps, envs, runtime settings and the context digest with paths
//! and modes; the backend, disk size, network and secret ids), the
//! manifest digest every base image's tag resolves to *now* (so a moved
//! tag misses), the digest of the Dockerfile the engine runs, the engine
//! and its version, and, when the build VM made the artifact (a
//! snapshot), the VM's settings (vcpus, memory, disk, network) and guest
//! kernel. Never names, tags or credentials.
//!
//! Known gap: the engine pulls by tag after the key was computed, so a tag
//! moved in that window (seconds) stores the newer image under the older
//! digest's key.

use nullspace_model::build::status::BuildStatus as Status;
use std::time::Duration;

use nullspace_model::build::plan::BuildPlan;
use nullspace_oci::{Image, ResolveOptions, SourceRef};
use serde::Serialize;
use serde_json::json;

use nullspace_build::engine::{DockerfileEngine, RegistryCredential};
use nullspace_model::build::views::CachedKey;

use super::execute::engine::EngineJob;
use super::execute::{Run, cache_entry};
use super::{ArtifactManifest, Failure, parse_record};
use crate::model::*;
use crate::state::{RunSecrets, Shared};
use nullspace_store::artifacts::Leased;

/// The lookup's answer.
pub enum Lookup {
    /// A ready build's artifact for the same key.
    Hit(Box<ArtifactManifest>),
    /// Build it; store the result under the key (when there is one: a
    /// bypassed or unresolvable build is not stored).
    Miss(Option<String>),
}

/// Resolves the bases, computes the key and looks it up, logging the
/// `final_artifact` cache entry.
pub async fn lookup(
    run: &Run<'_>,
    rec: &mut BuildRecord,
    p: &BuildPlan,
    job: &EngineJob,
) -> Result<Lookup, Failure> {
    if p.cache.skip_cache {
        rec.cache_summary.final_artifact_bypasses = 1;
        // The subject names the inputs (unresolved: nothing is looked up).
        let key = final_cache_key(run, p, job, &[]);
        cache_entry(
            run,
            rec,
            "final_artifact",
            "bypass",
            Some("whole_build_skip_cache"),
            &key,
            None,
        )
        .await;
        return Ok(Lookup::Miss(None));
    }
    let bases = match resolve_bases(run, job).await? {
        Ok(b) => b,
        Err(why) => {
            // Without a digest a hit could be stale: build, and store nothing.
            rec.cache_summary.final_artifact_misses = 1;
            cache_entry(
                run,
                rec,
                "final_artifact",
                "miss",
                Some("missing_or_incompatible"),
                "",
                Some(format!("final_artifact cache not used: {why}")),
            )
            .await;
            return Ok(Lookup::Miss(None));
        }
    };
    let key = final_cache_key(run, p, job, &bases);
    if let Some(m) =
        cached_artifact(run.state, Some(&rec.build_id), &rec.namespace_slug, &key).await
    {
        rec.cache_summary.final_artifact_hits = 1;
        cache_entry(run, rec, "final_artifact", "hit", None, &key, None).await;
        return Ok(Lookup::Hit(Box::new(m)));
    }
    rec.cache_summary.final_artifact_misses = 1;
    cache_entry(
        run,
        rec,
        "final_artifact",
        "miss",
        Some("missing_or_incompatible"),
        &key,
        None,
    )
    .await;
    Ok(Lookup::Miss(Some(key)))
}

/// `(reference, manifest digest)` of every external image the build starts
/// from, resolved now with the build's credentials. The inner error says
/// which image could not be resolved.
async fn resolve_bases(
    run: &Run<'_>,
    job: &EngineJob,
) -> Result<Result<Vec<(String, String)>, String>, Failure> {
    let mut task = tokio::task::spawn_blocking(resolver(
        job.base_refs.clone(),
        job.creds.clone(),
        run.state.config.insecure_registries.clone(),
    ));
    loop {
        tokio::select! {
            r = &mut task => {
                return Ok(r.unwrap_or_else(|e| Err(format!("resolving base images: {e}"))));
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                if run.token.is_cancelled() {
                    return Err(Failure::Cancelled);
                }
            }
        }
    }
}

/// The blocking resolution of `refs` (registry round trips).
fn resolver(
    refs: Vec<String>,
    creds: Vec<RegistryCredential>,
    insecure: Vec<String>,
) -> impl FnOnce() -> Result<Vec<(String, String)>, String> + Send + 'static {
    move || {
        let mut out = vec![];
        for r in refs {
            let source = SourceRef::parse(&r).map_err(|e| format!("base image {r:?}: {e}"))?;
            let host = nullspace_build::dockerfile::registry_host(&r);
            let credentials = creds.iter().find(|c| c.registry == host).map(|c| {
                nullspace_oci::auth::Credentials {
                    username: c.username.clone(),
                    password: c.password.clone(),
                }
            });
            let opts = ResolveOptions {
                platform: None,
                credentials,
                insecure_registries: insecure.clone(),
            };
            let image = Image::resolve(&source, &opts)
                .map_err(|e| format!("resolving base image {r}: {e}"))?;
            out.push((r, image.manifest_digest.to_string()));
        }
        Ok(out)
    }
}

/// A dry-run's look at the cache: the key a build of `p` would have now
/// and whether a ready build's artifact is stored under it. Nothing is
/// leased, logged or counted; `Err` says why the key cannot be known.
pub async fn probe(
    state: &Shared,
    ns: &str,
    p: &BuildPlan,
    secrets: &RunSecrets,
) -> Result<CachedKey, String> {
    let engine = state
        .engine_list
        .iter()
        .find(|e| e.name() == p.backend.as_str())
        .cloned()
        .ok_or_else(|| format!("engine {} is not available on this server", p.backend))?;
    // The cache-bust argument is not part of the key (the Dockerfile is).
    let inputs = super::execute::engine::inputs(p, secrets, "dry-run").map_err(|f| f.message())?;
    let refs = inputs.base_refs.clone();
    let bases = tokio::task::spawn_blocking(resolver(
        refs,
        inputs.creds,
        state.config.insecure_registries.clone(),
    ))
    .await
    .map_err(|e| format!("resolving base images: {e}"))??;
    let key = key_of(state, p, engine.as_ref(), &inputs.dockerfile, &bases);
    let cached = cached_artifact(state, None, ns, &key).await.is_some();
    Ok(CachedKey { key, cached })
}

/// The key (see the module docs).
fn final_cache_key(
    run: &Run<'_>,
    p: &BuildPlan,
    job: &EngineJob,
    bases: &[(String, String)],
) -> String {
    key_of(run.state, p, job.engine.as_ref(), &job.dockerfile, bases)
}

fn key_of(
    state: &Shared,
    p: &BuildPlan,
    engine: &dyn DockerfileEngine,
    dockerfile: &str,
    bases: &[(String, String)],
) -> String {
    let vm = state.vmm.as_ref().map(|v| {
        json!({
            "kernel": v.kernel.version,
            "vcpus": p.vm.vcpus,
            "memory_mib": p.vm.memory_mib,
            "ceiling": p.vm.ceiling,
            "disk_mb": p.vm.disk_mb,
            "network": state.config.build_vm_network && p.vm.internet_access,
        })
    });
    sha256_json(&json!({
        "v": 3,
        "nullspace": env!("CARGO_PKG_VERSION"),
        "inputs": p.cache.final_artifact_inputs,
        "engine": [engine.name(), engine.version()],
        "bases": bases,
        "dockerfile_digest": sha256_json(&dockerfile),
        "vm": vm,
    }))
}

fn sha256_json(v: &impl Serialize) -> String {
    nullspace_digest::Digest::sha256_of(&serde_json::to_vec(v).unwrap_or_default()).to_string()
}

/// The artifact a ready build stored under `key`, if all of it is still
/// there (the collector may have removed it), leased to `holder` (the build
/// that reuses it) until that build's own record references it; a look
/// only (no lease) without a holder.
async fn cached_artifact(
    state: &Shared,
    holder: Option<&str>,
    ns: &str,
    key: &str,
) -> Option<ArtifactManifest> {
    let build_id = state.store.cache_get(ns, key).await.ok()??;
    let row = state.store.build(&build_id).await.ok()??;
    let rec = parse_record(&row).ok()?;
    if rec.status != Status::Ready {
        return None;
    }
    let digest = nullspace_digest::Digest::parse(rec.artifact_ids.first()?).ok()?;
    let artifacts = state.artifacts.clone();
    let snapshots = state.template_snapshots_dir();
    let holder = holder.map(str::to_string);
    // Read and lease under one hold of the store, so the collector cannot
    // remove what was just found.
    tokio::task::spawn_blocking(move || {
        let w = artifacts.writing().ok()?;
        let bytes = std::fs::read(artifacts.path(&digest)).ok()?;
        let m: ArtifactManifest = serde_json::from_slice(&bytes).ok()?;
        let rootfs = nullspace_digest::Digest::parse(&m.rootfs).ok()?;
        let mut keep = vec![Leased::Artifact(digest), Leased::Artifact(rootfs)];
        if let Some(s) = &m.snapshot {
            let name = std::path::Path::new(s).file_name()?.to_str()?.to_string();
            if !snapshots.join(&name).is_dir() {
                return None;
            }
            keep.push(Leased::Snapshot(name));
        }
        if let Some(holder) = &holder {
            for what in &keep {
                if !w.lease(holder, what).ok()? {
                    return None;
                }
            }
        } else if !keep.iter().all(|what| match what {
            Leased::Artifact(d) => artifacts.path(d).is_file(),
            Leased::Snapshot(_) => true,
        }) {
            return None;
        }
        Some(m)
    })
    .await
    .ok()?
}
