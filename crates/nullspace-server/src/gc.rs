//! The garbage collector (`nullspace gc`, and periodically in the server).
//!
//! Mark: the roots are every ready build of a template that still exists
//! (its artifact manifest, every digest that manifest names, its snapshot
//! directory and every digest the snapshot's files name), every uploaded
//! context blob, every live machine's template snapshot, and anything of a live
//! (waiting or building) build. Sweep:
//!
//! - artifacts (`artifacts/sha256/*`) and snapshots
//!   (`artifacts/snapshots/*`) nothing marks, once older than
//!   [`Policy::min_age`] (a running build stores its rootfs before any
//!   manifest names it; a commit sets the mtime, so young files are spared);
//! - final-artifact cache entries whose build is no longer a root;
//! - logs of builds that ended more than [`Policy::log_retention`] ago;
//! - leftovers in `artifacts/tmp/`, `work/` and the layer cache's temp
//!   spools older than [`Policy::leftover_age`] that no live build owns.
//!
//! A ready build whose artifacts were collected says so in its record
//! (`artifact_availability: unavailable`).

use nullspace_model::build::status::BuildStatus as Status;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::Value;

use crate::builds;
use crate::error::{ApiError, ApiResult};
use crate::model::{Availability, iso};
use crate::state::Shared;

#[derive(Debug, Clone)]
pub struct Policy {
    /// Logs of builds that ended longer ago than this are removed.
    pub log_retention: Duration,
    /// Unreferenced artifacts and snapshots younger than this are kept.
    pub min_age: Duration,
    /// Leftovers in `tmp/` and `work/` younger than this are kept.
    pub leftover_age: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            log_retention: Duration::from_secs(30 * 24 * 3600),
            min_age: Duration::from_secs(3600),
            leftover_age: Duration::from_secs(24 * 3600),
        }
    }
}

/// One thing the collector removed (or, in a dry run, would remove).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Item {
    /// `artifact`, `snapshot`, `logs`, `cache_entry`, `tmp` or `work`.
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
    Ok(m)
}

fn older_than(p: &Path, age: Duration) -> bool {
    std::fs::symlink_metadata(p)
        .and_then(|md| md.modified())
        .map(|t| SystemTime::now().duration_since(t).unwrap_or_default() >= age)
        .unwrap_or(false)
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
    let marks = mark(state).await?;
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
    let pol = policy.clone();
    let ((items, errors), orphaned) =
        tokio::task::spawn_blocking(move || sweep(&st, &pol, &marks, dry_run))
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

/// The file-system half of the sweep; returns the items, the ids of
/// orphaned builds whose artifacts it removed, and errors.
fn sweep(state: &Shared, policy: &Policy, marks: &Marks, dry_run: bool) -> Swept {
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
    let art = state.config.data_dir.join("artifacts");
    for alg in ["sha256", "sha512"] {
        for e in std::fs::read_dir(art.join(alg))
            .into_iter()
            .flatten()
            .flatten()
        {
            let digest = format!("{alg}:{}", e.file_name().to_string_lossy());
            if !marks.digests.contains(&digest) && older_than(&e.path(), policy.min_age) {
                take("artifact", e.path(), &mut items);
            }
        }
    }
    for e in std::fs::read_dir(state.snapshots_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let p = e.path();
        if marks.live.contains(owner_of(&name))
            || marks.snapshots.contains(&canonical(&p))
            || !older_than(&p, policy.min_age)
        {
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
    for e in std::fs::read_dir(art.join("tmp"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if older_than(&e.path(), policy.leftover_age) {
            take("tmp", e.path(), &mut items);
        }
    }
    for e in std::fs::read_dir(&state.work_dir)
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if !marks.live.contains(owner_of(&name)) && older_than(&e.path(), policy.leftover_age) {
            take("work", e.path(), &mut items);
        }
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
