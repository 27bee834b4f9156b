//! The queue is the database. Workers claim waiting builds with this
//! server's owner id and a lease ([`Config::lease`]); the [`monitor`]
//! renews every lease this server holds and polls for cancel requests (set
//! by any server) and for builds it lost; [`recover_once`] (run
//! periodically by every server) hands back builds whose owner is gone:
//! their lease expired, or their owner's run directory on this data
//! directory is no longer locked (it died). Opening the store never changes
//! a build.
//!
//! [`Config::lease`]: crate::state::Config::lease

use nullspace_model::build::status::BuildStatus as Status;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nullspace_store::{LogGate, Writer, now_ms};

use super::lifecycle::{self, entry, fail_detail, finish_cancelled, finish_ready, hand_back};
use super::{Failure, RunHandle, StopReason, execute, parse_record};
use crate::error::{ApiError, ApiResult};
use crate::model::*;
use crate::state::Shared;

/// Starts `n` workers that take waiting builds, oldest first, until the
/// server shuts down. `0` only queues (a server that accepts builds for
/// others to run).
pub fn spawn_workers(state: &Shared, n: usize) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|_| {
            let state = state.clone();
            tokio::spawn(async move {
                while !state.shutdown.is_cancelled() {
                    match next_build(&state).await {
                        Ok(Some((id, attempt))) => run(&state, &id, attempt).await,
                        Ok(None) => {
                            // Poll too: another server sharing the database
                            // may have queued work.
                            tokio::select! {
                                _ = state.wake.notified() => {}
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                                _ = state.shutdown.cancelled() => {}
                            }
                        }
                        Err(e) => {
                            tracing::error!("worker: {}", e.message);
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            })
        })
        .collect()
}

async fn next_build(state: &Shared) -> ApiResult<Option<(String, i64)>> {
    for id in state.store.claimable(&state.owner).await? {
        if state.shutdown.is_cancelled() {
            return Ok(None);
        }
        let Some(row) = state.store.build(&id).await? else {
            continue;
        };
        let mut rec = parse_record(&row)?;
        rec.status = Status::Building;
        rec.started_at = Some(iso(now_ms()));
        rec.updated_at = iso(now_ms());
        let json = serde_json::to_string(&rec).map_err(ApiError::internal)?;
        if let Some(attempt) = state
            .store
            .claim(&id, &state.owner, state.lease_until(), &json)
            .await?
        {
            return Ok(Some((id, attempt)));
        }
    }
    Ok(None)
}

/// Runs one claimed build to its end. The worker (its slot) is busy until
/// every process the build started is gone.
async fn run(state: &Shared, id: &str, attempt: i64) {
    let handle = Arc::new(RunHandle::new());
    state
        .running
        .lock()
        .expect("running lock")
        .insert(id.to_string(), handle.clone());
    run_inner(state, id, attempt, &handle).await;
    state.running.lock().expect("running lock").remove(id);
    state.hub.forget(id);
}

async fn run_inner(state: &Shared, id: &str, attempt: i64, handle: &RunHandle) {
    let owner = state.owner.as_str();
    let Ok(Some(row)) = state.store.build(id).await else {
        return;
    };
    let Ok(mut rec) = parse_record(&row) else {
        return;
    };
    // Cancelled between the claim and now.
    if row.cancel.is_some() {
        handle.stop(StopReason::Cancel);
    }
    let def: Definition = serde_json::from_str(&row.definition).unwrap_or_default();
    let Some(secrets) = state
        .secrets
        .lock()
        .expect("secrets lock")
        .remove(id)
        .or_else(|| (!lifecycle::needs_credentials(&def)).then(Default::default))
    else {
        // Request-time credentials this server does not hold (a build queued
        // before leases pinned such builds to their server): it cannot run.
        lifecycle::fail(
            state,
            Writer::Owner(owner),
            &mut rec,
            "interrupted",
            "this build's credentials were not persisted, and the server that took the request no longer holds them",
            true,
            "retry the build (resupply credentials and secrets)",
        )
        .await;
        return;
    };
    let mut start = entry(
        &rec,
        LogKind::Message,
        LogLevel::Info,
        if attempt > 1 {
            format!("build {} started (attempt {attempt})", rec.build_id)
        } else {
            format!("build {} started", rec.build_id)
        },
    );
    start.phase = Some("preparing".into());
    let _ = lifecycle::append(state, LogGate::Owner(owner), start).await;

    tracing::info!(build = %rec.build_id, source = %rec.source_type, attempt, "build started");
    let run = execute::Run {
        state,
        token: &handle.token,
        attempt,
        def: &def,
        secrets: &secrets,
    };
    let outcome = execute::execute(&run, &mut rec).await;
    let work = run.work_dir(&rec);
    drop(secrets);
    // Whatever happened, the attempt's work directory goes; every process
    // that used it has ended (execution returns only then).
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(work)).await;
    let written = match (outcome, handle.reason()) {
        (_, Some(StopReason::LeaseLost)) => {
            tracing::warn!(build = %rec.build_id, "lease lost to another server; stopped");
            true
        }
        (Err(_), Some(StopReason::Shutdown)) => {
            hand_back(
                state,
                Writer::Owner(owner),
                &row,
                &mut rec,
                "the server stopped",
            )
            .await
        }
        (Ok(mut built), None | Some(StopReason::Shutdown)) => {
            crate::sbom::record(state, &rec.build_id, &mut built.manifest).await;
            finish_ready(
                state,
                owner,
                &mut rec,
                built.manifest,
                built.cache_key.as_deref(),
            )
            .await
        }
        (Ok(_), Some(StopReason::Cancel)) | (Err(Failure::Cancelled), _) => {
            // The cancel request was recorded by whoever asked: keep it.
            if let Ok(Some(row)) = state.store.build(id).await
                && let Ok(stored) = parse_record(&row)
            {
                rec.cancel_requested_at = stored.cancel_requested_at;
                rec.cancel_requested_by = stored.cancel_requested_by;
                rec.cancellation_reason = stored.cancellation_reason;
            }
            finish_cancelled(state, Writer::Owner(owner), &mut rec, &[Status::Building]).await
        }
        (Err(Failure::Failed { .. }), Some(StopReason::Cancel)) => {
            // A step that failed because it was killed: the cancel wins.
            finish_cancelled(state, Writer::Owner(owner), &mut rec, &[Status::Building]).await
        }
        (
            Err(Failure::Failed {
                phase,
                message,
                retryable,
                action,
                code,
                step,
            }),
            None,
        ) => {
            let detail = FailureDetail {
                code: code.into(),
                message,
                phase: phase.into(),
                retryable,
                suggested_action: action.into(),
                step_index: step.map(|s| s.index),
                build_id: Some(rec.build_id.clone()),
                details: None,
            };
            fail_detail(
                state,
                Writer::Owner(owner),
                &mut rec,
                detail,
                step.map(|s| s.total),
            )
            .await
        }
    };
    if !written {
        tracing::warn!(build = %rec.build_id, "the build's final write was refused: another server owns it now");
    }
    tracing::info!(build = %rec.build_id, status = %rec.status, phase = ?rec.failure_phase, "build finished");
}

/// Renews this server's leases every [`Config::lease_renew`] and, every
/// [`Config::cancel_poll`], stops local builds that were cancelled (on any
/// server) or that another server took over. Runs until shutdown.
///
/// [`Config::lease_renew`]: crate::state::Config::lease_renew
/// [`Config::cancel_poll`]: crate::state::Config::cancel_poll
pub async fn monitor(state: Shared) {
    let mut last_renew = Instant::now();
    let mut tick = tokio::time::interval(state.config.cancel_poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = state.shutdown.cancelled() => {}
        }
        if last_renew.elapsed() >= state.config.lease_renew {
            match state
                .store
                .renew_leases(&state.owner, state.lease_until())
                .await
            {
                Ok(_) => last_renew = Instant::now(),
                Err(e) => tracing::error!("renewing leases: {e}"),
            }
        }
        let asked = Instant::now();
        match state.store.owned_running(&state.owner).await {
            Ok(owned) => {
                let running: Vec<(String, Arc<RunHandle>)> = state
                    .running
                    .lock()
                    .expect("running lock")
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                for (id, h) in running {
                    match owned.iter().find(|(o, _)| *o == id) {
                        Some((_, true)) => h.stop(StopReason::Cancel),
                        Some((_, false)) => {}
                        // Not ours any more, if it was ours when we asked.
                        None if h.since < asked => h.stop(StopReason::LeaseLost),
                        None => {}
                    }
                }
            }
            Err(e) => tracing::error!("polling builds: {e}"),
        }
        // Credentials of builds that ended elsewhere (a cancel on another
        // server) or never ran are dropped after a minute.
        if let Ok(live) = state.store.owned_builds(&state.owner).await {
            state.secrets.lock().expect("secrets lock").retain(|id, s| {
                live.iter().any(|r| r.id == *id) || s.created.elapsed() < Duration::from_secs(60)
            });
        }
        if state.shutdown.is_cancelled() && state.running.lock().expect("running lock").is_empty() {
            return;
        }
    }
}

/// Hands back every build whose owner is gone; returns how many this call
/// recovered. Racing servers recover each build once (the transition is
/// conditional). `dead` are owners known to have exited (their run
/// directory on this data directory was unlocked).
pub async fn recover_once(state: &Shared, dead: &[String]) -> ApiResult<usize> {
    let now = now_ms();
    let mut n = 0;
    for row in state.store.recoverable(now, dead).await? {
        let mut rec = parse_record(&row)?;
        let why = match &row.owner {
            Some(o) if dead.contains(o) => "the server that ran this build stopped",
            Some(_) => "the server that ran this build stopped renewing its lease",
            None => "the server stopped",
        };
        if hand_back(state, Writer::Recovery { now, dead }, &row, &mut rec, why).await {
            tracing::warn!(build = %row.id, owner = ?row.owner, status = %rec.status, "recovered a build whose server is gone");
            n += 1;
        }
    }
    Ok(n)
}

/// Every [`Config::recovery_interval`]: ends what dead servers on this data
/// directory left running, then recovers builds whose owner is gone.
///
/// [`Config::recovery_interval`]: crate::state::Config::recovery_interval
pub async fn recovery_loop(state: Shared) {
    loop {
        let dead = reap_dead_owners(&state).await;
        if let Err(e) = recover_once(&state, &dead).await {
            tracing::error!("recovering builds: {}", e.message);
        }
        tokio::select! {
            _ = tokio::time::sleep(state.config.recovery_interval) => {}
            _ = state.shutdown.cancelled() => return,
        }
    }
}

/// Ends the processes of servers that died on this data directory (their
/// pidfiles under `run/`), and returns their owner ids.
pub async fn reap_dead_owners(state: &Shared) -> Vec<String> {
    let run_root = state.run_root();
    let reaped = tokio::task::spawn_blocking(move || {
        nullspace_vm::process::reap_stale(&run_root, Duration::from_secs(5))
    })
    .await;
    match reaped {
        Ok(Ok(r)) => {
            for k in &r.killed {
                tracing::warn!(pid = k.pid, cmd = ?k.cmdline.first(), "ended a process a previous server left running");
            }
            for d in &r.dead_vm_dirs {
                tracing::warn!(dir = %d, "removed a build VM directory a previous server left");
            }
            r.dead_owners
        }
        Ok(Err(e)) => {
            tracing::error!("reaping stale processes: {e}");
            vec![]
        }
        Err(e) => {
            tracing::error!("reaping stale processes: {e}");
            vec![]
        }
    }
}

/// Stops every build this server runs (or lets them finish within
/// `grace`), waits for the workers, then hands back the waiting builds
/// only this server could run (their credentials die with it).
pub async fn drain(state: &Shared, workers: Vec<tokio::task::JoinHandle<()>>, grace: Duration) {
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline
        && !state.running.lock().expect("running lock").is_empty()
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let running: Vec<Arc<RunHandle>> = state
        .running
        .lock()
        .expect("running lock")
        .values()
        .cloned()
        .collect();
    for h in running {
        h.stop(StopReason::Shutdown);
    }
    for w in workers {
        let _ = w.await;
    }
    match state.store.owned_builds(&state.owner).await {
        Ok(rows) => {
            for row in rows {
                if let Ok(mut rec) = parse_record(&row) {
                    hand_back(
                        state,
                        Writer::Owner(&state.owner),
                        &row,
                        &mut rec,
                        "the server stopped",
                    )
                    .await;
                }
            }
        }
        Err(e) => tracing::error!("handing back queued builds: {e}"),
    }
}
