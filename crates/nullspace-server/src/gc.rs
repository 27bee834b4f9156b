//! The garbage collector (`nullspace gc`, and periodically in the server).
//!
//! One rule, references and leases, never file age (see
//! [`nullspace_store::artifacts`] for the locks that make it race-free):
//! while the collector runs it holds the artifact store exclusively, lists
//! what exists, then marks, then removes what is unmarked.
//!
//! Mark: the roots are every ready build of a template that still exists
//! (its artifact manifest, every digest that manifest names, its snapshot
//! directory and every digest the snapshot's files name), every announced
//! context blob, every live machine's template snapshot, everything leased
//! to a live (waiting or building) build, and the work and snapshot
//! directories of live builds. Sweep:
//!
//! - artifacts (`artifacts/sha256/*`) and snapshots
//!   (`artifacts/snapshots/*`) nothing marks;
//! - leases whose holder is no longer live (what it kept is referenced by
//!   its record now, or garbage);
//! - final-artifact cache entries whose build is no longer a root;
//! - logs of builds that ended more than [`Policy::log_retention`] ago;
//! - spools in `artifacts/tmp/` that no process holds, and `work/`
//!   directories of builds that are not live;
//! - machine snapshot directories no snapshot row names, once no take
//!   holds their `.taking` marker (a crash between the VM's snapshot and
//!   its record).
//!
//! A ready build whose artifacts were collected says so in its record
//! (`artifact_availability: unavailable`). Recorded machine snapshots are
//! the machine core's: deleted when no live machine or later snapshot
//! references them (`machines::snapshots`).

use nullspace_model::build::status::BuildStatus as Status;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::builds;
use crate::error::{ApiError, ApiResult};
use crate::model::{Availability, iso};
use crate::state::Shared;
use nullspace_store::artifacts::{Artifacts, Leased};
use nullspace_store::inflight;

#[derive(Debug, Clone)]
pub struct Policy {
    /// Logs of builds that ended longer ago than this are removed.
    pub log_retention: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            log_retention: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// One thing the collector removed (or, in a dry run, would remove).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Item {
    /// `artifact`, `snapshot`, `machine_snapshot`, `lease`, `logs`,
    /// `cache_entry`, `tmp` or `work`.
    pub kind: &'static str,
    /// A path, or a build id (logs) or cache key (cache entries).
    pub what: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub dry_run: bool,
    pub items: Vec<Item>,
    pub bytes: u64,
    /// Things the collector could not remove (it goes on with the rest).
    pub errors: Vec<String>,
}

/// What the mark found.
#[derive(Default)]
struct Marks {
    digests: BTreeSet<String>,
    /// Snapshot directories (canonical paths).
    snapshots: BTreeSet<PathBuf>,
    /// Ids of live builds: their work and snapshot directories are theirs.
    live: BTreeSet<String>,
    /// Ready builds whose template is gone (their artifacts may go).
    orphaned: Vec<String>,
    /// Builds whose artifacts are roots.
    rooted: BTreeSet<String>,
    /// Holders of leases that keep nothing any more.
    expired_leases: Vec<String>,
    /// Machine snapshot directories (and markers) of takes that crashed.
    unrecorded: Vec<PathBuf>,
}

/// Every `sha256:…` string anywhere in `v`.
fn digests_in(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::String(s) => {
            if let Ok(d) = nullspace_digest::Digest::parse(s) {
                out.insert(d.to_string());
            }
        }
        Value::Array(a) => a.iter().for_each(|x| digests_in(x, out)),
        Value::Object(o) => o.values().for_each(|x| digests_in(x, out)),
        _ => {}
    }
}

fn canonical(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

/// Marks a snapshot directory and every digest its JSON files name (the
/// snapshot format may content-address its kernel and initramfs).
fn mark_snapshot(dir: &Path, m: &mut Marks) {
    m.snapshots.insert(canonical(dir));
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let small = e
            .metadata()
            .is_ok_and(|md| md.is_file() && md.len() < 4 << 20);
        if small
            && p.extension().is_some_and(|x| x == "json")
            && let Ok(v) = serde_json::from_slice::<Value>(&std::fs::read(&p).unwrap_or_default())
        {
            digests_in(&v, &mut m.digests);
        }
    }
}

fn mark_manifest(state: &Shared, digest: &str, m: &mut Marks) {
    m.digests.insert(digest.to_string());
    let Ok(d) = nullspace_digest::Digest::parse(digest) else {
        return;
    };
    let Ok(bytes) = std::fs::read(state.artifacts.path(&d)) else {
        return;
    };
    let Ok(v) = serde_json::from_slice::<Value>(&bytes) else {
        return;
    };
    digests_in(&v, &mut m.digests);
    // Read as JSON, not as [`ArtifactManifest`]: a manifest this version
    // cannot parse still protects what it names.
    if let Some(s) = v.get("snapshot").and_then(Value::as_str) {
        mark_snapshot(&builds::snapshot_path(state, s), m);
    }
}

async fn mark(state: &Shared) -> ApiResult<Marks> {
    let mut m = Marks::default();
    for b in state.store.gc_builds().await? {
        match Status::parse(&b.status) {
            Some(Status::Waiting | Status::Building) => {
                m.live.insert(b.id.clone());
            }
            Some(Status::Ready) if b.template_exists => {
                let rec: Value = serde_json::from_str(&b.record).unwrap_or_default();
                for a in rec["artifact_ids"].as_array().into_iter().flatten() {
                    if let Some(a) = a.as_str() {
                        mark_manifest(state, a, &mut m);
                    }
                }
                m.rooted.insert(b.id.clone());
            }
            Some(Status::Ready) => m.orphaned.push(b.id.clone()),
            _ => {}
        }
    }
    for hex in state.store.blob_digests().await? {
        let d = if hex.contains(':') {
            hex
        } else {
            format!("sha256:{hex}")
        };
        m.digests.insert(d);
    }
    // A live machine keeps the template snapshot at the root of its disk
    // chain (a snapshot of the machine links that snapshot's files), and
    // the snapshot it sits on.
    for row in state
        .store
        .machines_in(nullspace_store::machines::LIVE)
        .await?
    {
        // A record this server cannot read keeps nothing alive: fail the
        // mark rather than collect what it may hold.
        let machine = crate::machines::record::Machine::from_row(row)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        for dir in [&machine.doc.template_dir, &machine.doc.base_dir] {
            if !dir.is_empty() {
                mark_snapshot(&state.machines.resolve(dir), &mut m);
            }
        }
    }
    let leases = state.artifacts.leases().map_err(ApiError::internal)?;
    let snapshots = state.template_snapshots_dir();
    for (holder, kept) in leases {
        if !m.live.contains(&holder) {
            m.expired_leases.push(holder);
            continue;
        }
        for what in kept {
            match what {
                Leased::Artifact(d) => {
                    m.digests.insert(d.to_string());
                }
                Leased::Snapshot(name) => mark_snapshot(&snapshots.join(name), &mut m),
            }
        }
    }
    Ok(m)
}

fn size_of(p: &Path) -> u64 {
    let Ok(md) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if !md.is_dir() {
        return md.len();
    }
    std::fs::read_dir(p)
        .map(|rd| rd.flatten().map(|e| size_of(&e.path())).sum())
        .unwrap_or(0)
}

/// A work or snapshot entry belongs to a build when its name is the build
/// id, optionally followed by `.attempt` and a suffix.
fn owner_of(name: &str) -> &str {
    let end = name
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(name.len());
    &name[..end]
}

fn remove(p: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(p)?.is_dir() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    }
}

/// Runs the collector once (see the module docs). `dry_run` lists what it
/// would remove, with sizes, and changes nothing.
pub async fn collect(state: &Shared, policy: &Policy, dry_run: bool) -> ApiResult<Report> {
    let artifacts = state.artifacts.clone();
    let _hold = tokio::task::spawn_blocking(move || artifacts.collecting())
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    // List before marking: what appears later is no candidate (a build
    // row exists before its directories do), and while the hold lasts
    // nothing is committed or leased.
    let st = state.clone();
    let mut found = tokio::task::spawn_blocking(move || list(&st))
        .await
        .map_err(ApiError::internal)?;
    let mut marks = mark(state).await?;
    // Machine snapshots no row names and no take holds.
    for (name, p) in std::mem::take(&mut found.machine_snapshots) {
        let (id, marker) = match name.strip_suffix(".taking") {
            Some(id) => (id.to_string(), p.clone()),
            None => (name.clone(), p.with_extension("taking")),
        };
        if !inflight::is_held(&marker) && state.store.snapshot(&id).await?.is_none() {
            marks.unrecorded.push(p);
        }
    }
    let mut report = Report {
        dry_run,
        ..Default::default()
    };
    // Cache entries whose build is no longer a root: a lookup must not
    // hit what the sweep below removes.
    for (ns, key, build_id) in state.store.cache_entries().await? {
        if !marks.rooted.contains(&build_id) {
            report.items.push(Item {
                kind: "cache_entry",
                what: format!("{ns}/{key}"),
                bytes: 0,
            });
            if !dry_run {
                state.store.delete_cache_entry(&ns, &key).await?;
            }
        }
    }
    let st = state.clone();
    let ((items, errors), orphaned) =
        tokio::task::spawn_blocking(move || sweep(&st, found, &marks, dry_run))
            .await
            .map_err(ApiError::internal)?;
    report.items.extend(items);
    report.errors.extend(errors);
    // Ready builds of deleted templates whose artifacts are gone now.
    if !dry_run {
        for id in orphaned {
            if let Ok(Some(row)) = state.store.build(&id).await
                && let Ok(mut rec) = builds::parse_record(&row)
                && rec.artifact_availability.status == "available"
                && !rec.artifact_ids.iter().all(|a| {
                    nullspace_digest::Digest::parse(a).is_ok_and(|d| state.artifacts.contains(&d))
                })
            {
                rec.artifact_availability = Availability {
                    status: "unavailable".into(),
                    reason: Some("template deleted; its artifacts were collected".into()),
                };
                let _ = builds::save(state, &mut rec).await;
            }
        }
    }
    let cutoff = nullspace_store::now_ms() - policy.log_retention.as_millis() as i64;
    for (build_id, entries, bytes) in state.store.expired_logs(cutoff).await? {
        report.items.push(Item {
            kind: "logs",
            what: format!("{build_id} ({entries} entries)"),
            bytes: bytes as u64,
        });
        if !dry_run {
            state.store.delete_logs(&build_id).await?;
        }
    }
    report.bytes = report.items.iter().map(|i| i.bytes).sum();
    Ok(report)
}

type Swept = ((Vec<Item>, Vec<String>), Vec<String>);

/// What exists when the collection starts.
struct Found {
    /// `(digest, path)` of every artifact.
    artifacts: Vec<(String, PathBuf)>,
    snapshots: Vec<PathBuf>,
    /// `(id, path)` of machine snapshot directories and markers.
    machine_snapshots: Vec<(String, PathBuf)>,
    spools: Vec<PathBuf>,
    work: Vec<PathBuf>,
}

fn entries(dir: &Path) -> Vec<std::fs::DirEntry> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .collect()
}

fn list(state: &Shared) -> Found {
    let art = state.config.data_dir.join("artifacts");
    let artifacts = ["sha256", "sha512"]
        .into_iter()
        .flat_map(|alg| {
            entries(&art.join(alg)).into_iter().map(move |e| {
                (
                    format!("{alg}:{}", e.file_name().to_string_lossy()),
                    e.path(),
                )
            })
        })
        .collect();
    let paths = |d: &Path| entries(d).iter().map(|e| e.path()).collect::<Vec<_>>();
    Found {
        artifacts,
        snapshots: paths(&state.template_snapshots_dir()),
        machine_snapshots: entries(&state.machines.machine_snapshots_dir)
            .iter()
            .map(|e| (name_of(&e.path()), e.path()))
            .collect(),
        spools: paths(&state.artifacts.tmp_dir()),
        work: paths(&state.work_dir),
    }
}

fn name_of(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The file-system half of the sweep; returns the items, the ids of
/// orphaned builds whose artifacts it removed, and errors.
fn sweep(state: &Shared, found: Found, marks: &Marks, dry_run: bool) -> Swept {
    let mut items = vec![];
    let mut errors = vec![];
    let mut take = |kind: &'static str, p: PathBuf, items: &mut Vec<Item>| {
        let bytes = size_of(&p);
        if !dry_run && let Err(e) = remove(&p) {
            errors.push(format!("removing {}: {e}", p.display()));
            return;
        }
        items.push(Item {
            kind,
            what: p.display().to_string(),
            bytes,
        });
    };
    for (digest, p) in found.artifacts {
        if !marks.digests.contains(&digest) {
            take("artifact", p, &mut items);
        }
    }
    for p in found.snapshots {
        if marks.live.contains(owner_of(&name_of(&p))) || marks.snapshots.contains(&canonical(&p)) {
            continue;
        }
        if !dry_run {
            // Pooled VMs of it are not users that keep it: they end first.
            let dir = canonical(&p);
            state
                .machines
                .drop_pooled(|k| k.snapshot_dir.starts_with(&dir));
        }
        take("snapshot", p, &mut items);
    }
    for p in found.spools {
        if !Artifacts::spool_in_use(&p) {
            take("tmp", p, &mut items);
        }
    }
    for p in found.work {
        if !marks.live.contains(owner_of(&name_of(&p))) {
            take("work", p, &mut items);
        }
    }
    for p in &marks.unrecorded {
        take("machine_snapshot", p.clone(), &mut items);
    }
    for holder in &marks.expired_leases {
        if !dry_run && let Err(e) = state.artifacts.release(holder) {
            errors.push(format!("releasing the leases of {holder}: {e}"));
            continue;
        }
        items.push(Item {
            kind: "lease",
            what: holder.clone(),
            bytes: 0,
        });
    }
    let collected = marks.orphaned.clone();
    ((items, errors), collected)
}

/// Collects every `every` until the server stops.
pub async fn periodic(state: Shared, every: Duration) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = state.shutdown.cancelled() => return,
        }
        match collect(&state, &state.config.gc, false).await {
            Ok(r) if !r.items.is_empty() => tracing::info!(
                removed = r.items.len(),
                bytes = r.bytes,
                errors = r.errors.len(),
                at = %iso(nullspace_store::now_ms()),
                "garbage collected"
            ),
            Ok(_) => {}
            Err(e) => tracing::error!("garbage collection: {}", e.message),
        }
    }
}
