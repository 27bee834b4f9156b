//! The final-artifact cache of engine builds: a key made of resolved
//! digests and every input that changes the artifact, and the lookup.
//!
//! The key holds the manifest digest every base image's tag resolves to
//! *now* (so a moved tag misses), the Dockerfile's digest, the context's
//! blob digests with paths and modes, the rest of the request (args,
//! target, steps, envs, runtime settings, disk size, network), the secret
//! ids, the engine and its version, and, when the build VM made the
//! artifact (a snapshot), the VM's settings (vcpus, memory, disk, network)
//! and guest kernel. Never names, tags or credentials.
//!
//! Known gap: the engine pulls by tag after the key was computed, so a tag
//! moved in that window (seconds) stores the newer image under the older
//! digest's key.

use std::time::Duration;

use nullspace_oci::{Image, ResolveOptions, SourceRef};
use serde_json::json;

use super::execute::engine::EngineJob;
use super::execute::{Run, cache_entry};
use super::lifecycle::sha256_json;
use super::{ArtifactManifest, Failure, parse_record};
use crate::model::*;
use crate::state::Shared;
use crate::validate::Normalized;

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
    n: &Normalized,
    job: &EngineJob,
) -> Result<Lookup, Failure> {
    let req = run.req();
    if req.skip_cache == Some(true) {
        rec.cache_summary.final_artifact_bypasses = 1;
        // The subject names the inputs (unresolved: nothing is looked up).
        let key = final_cache_key(run, n, job, &[]);
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
    let key = final_cache_key(run, n, job, &bases);
    if let Some(m) = cached_artifact(run.state, &rec.namespace_slug, &key).await {
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
    let refs = job.base_refs.clone();
    let creds = job.creds.clone();
    let insecure = run.state.config.insecure_registries.clone();
    let mut task = tokio::task::spawn_blocking(move || {
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
    });
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

/// The key (see the module docs).
fn final_cache_key(
    run: &Run<'_>,
    n: &Normalized,
    job: &EngineJob,
    bases: &[(String, String)],
) -> String {
    let state = run.state;
    let mut r = run.req().clone();
    r.name = None;
    r.alias = None;
    r.tags = None;
    r.skip_cache = None;
    r.claim_token = None;
    let config = r.build_config.clone().unwrap_or_default();
    if let Some(c) = r.build_config.as_mut() {
        // The VM's size is keyed below, only when a VM made the artifact.
        c.vcpus = None;
        c.memory_mib = None;
    }
    let mut context: Vec<(String, String, Option<String>, Option<String>)> = r
        .build_context
        .iter()
        .flat_map(|c| &c.files)
        .map(|f| {
            (
                f.path.clone(),
                f.entry_type.clone(),
                f.mode.clone(),
                f.blob_id.clone(),
            )
        })
        .collect();
    context.sort();
    let vm = state.vmm.as_ref().map(|v| {
        json!({
            "kernel": v.kernel.version,
            "vcpus": config.vcpus,
            "memory_mib": config.memory_mib,
            "disk_mb": config.disk_mb,
            "network": state.config.build_vm_network && config.internet_access != Some(false),
        })
    });
    sha256_json(&json!({
        "v": 2,
        "nullspace": env!("CARGO_PKG_VERSION"),
        "backend": n.backend,
        "engine": [job.engine.name(), job.engine.version()],
        "bases": bases,
        "dockerfile_digest": sha256_json(&job.dockerfile),
        "context": context,
        "request": r,
        "secret_ids": run.def.secret_ids,
        "vm": vm,
    }))
}

/// The artifact a ready build stored under `key`, if all of it is still
/// there (the collector may have removed it).
async fn cached_artifact(state: &Shared, ns: &str, key: &str) -> Option<ArtifactManifest> {
    let build_id = state.store.cache_get(ns, key).await.ok()??;
    let row = state.store.build(&build_id).await.ok()??;
    let rec = parse_record(&row).ok()?;
    if rec.status != "ready" {
        return None;
    }
    let digest = nullspace_digest::Digest::parse(rec.artifact_ids.first()?).ok()?;
    let bytes = std::fs::read(state.artifacts.path(&digest)).ok()?;
    let m: ArtifactManifest = serde_json::from_slice(&bytes).ok()?;
    let rootfs = nullspace_digest::Digest::parse(&m.rootfs).ok()?;
    let snapshot_ok = m
        .snapshot
        .as_ref()
        .is_none_or(|s| super::snapshot_path(state, s).is_dir());
    if !(state.artifacts.contains(&rootfs) && snapshot_ok) {
        return None;
    }
    // Young again: the collector spares what a build just reused, until
    // that build's own manifest (ready) names it.
    let now = std::time::SystemTime::now();
    let mut paths = vec![state.artifacts.path(&digest), state.artifacts.path(&rootfs)];
    paths.extend(m.snapshot.as_ref().map(|s| super::snapshot_path(state, s)));
    for p in paths {
        if let Ok(f) = std::fs::File::open(&p) {
            let _ = f.set_modified(now);
        }
    }
    Some(m)
}
