//! The server's own duties toward machines: recovery at start-up (take
//! over what still runs, end the rest, sweep what has no record) and the
//! reaper (timeouts, auto-delete, VMs that died).

use std::time::Duration;

use nullspace_model::machine::{MachineStatus, TimeoutAction};
use nullspace_store::now_ms;

use super::create::{SCOPE_CREATE, open_snapshot};
use super::end::end;
use super::error::MachineResult;
use super::events::{self, Event};
use super::pause::pause_now;
use super::record::{self, Machine};
use crate::state::Shared;
use nullspace_model::machine::lifecycle::LifecycleOperation as Op;

/// At start-up: running machines of this node whose QEMU still runs and
/// whose agent answers are taken over; the others (and those interrupted
/// while being created) end with status `error` and the reason; a paused
/// machine caught mid-resume is paused again. Machine directories without
/// a live record are removed, their QEMU killed. Nothing runs without a
/// record, no record claims a VM that is gone.
pub async fn recover(state: &Shared) -> MachineResult<()> {
    let rt = &state.machines;
    let rows = state
        .store
        .machines_on_node(
            &rt.node_id,
            &[MachineStatus::Creating, MachineStatus::Running],
        )
        .await?;
    let mut adopted = vec![];
    for row in rows {
        let m = Machine::from_row(row)?;
        let outcome = if m.status() == MachineStatus::Creating {
            Err("the server stopped while the machine was being created or resumed".to_string())
        } else {
            match (&m.doc.vm, open_snapshot(state, &m.doc.base_dir)) {
                (Some(v), Ok(base)) => match rt.reserve(m.doc.memory_mb) {
                    Ok(res) => rt
                        .adopt(
                            m.id(),
                            rt.handle_of(m.id(), v.pid),
                            base,
                            res,
                            (m.doc.vcpus, m.doc.memory_mb),
                        )
                        .await
                        .map_err(|e| {
                            format!("its VM did not answer after the server restarted ({e})")
                        }),
                    Err(e) => Err(format!("{e}")),
                },
                (None, _) => Err("no VM was recorded".into()),
                (_, Err(e)) => Err(format!("its snapshot is unreadable: {e}")),
            }
        };
        match outcome {
            Ok(_) => {
                tracing::info!(machine = %m.id(), "machine taken over after restart");
                adopted.push(m.row.id.clone());
            }
            Err(why) => {
                tracing::warn!(machine = %m.id(), "machine ended at start-up: {why}");
                if m.status() == MachineStatus::Creating {
                    // Its VM (created or resumed), if the restore got that
                    // far, was never recorded: found by its directory.
                    let (rt, id) = (rt.clone(), m.id().to_string());
                    let _ = tokio::task::spawn_blocking(move || rt.end_strays(&id)).await;
                }
                let was_resuming =
                    m.status() == MachineStatus::Creating && m.doc.paused_at.is_some();
                if was_resuming {
                    // It keeps its hibernation snapshot: paused again.
                    let mut m = m;
                    let handle = m.doc.vm.take().map(|v| rt.handle_of(m.id(), v.pid));
                    let _ = rt.destroy(m.id(), handle).await;
                    let _ = record::transition(state, &mut m, MachineStatus::Paused).await;
                } else {
                    if m.status() == MachineStatus::Creating
                        && let Some(k) = &m.doc.idempotency_key
                    {
                        // The client's retry (same key) creates it afresh.
                        let _ = state
                            .store
                            .release_idempotency_key(&m.row.namespace, SCOPE_CREATE, k)
                            .await;
                    }
                    end(
                        state,
                        m,
                        MachineStatus::Error,
                        &why,
                        &[MachineStatus::Creating, MachineStatus::Running],
                    )
                    .await?;
                }
            }
        }
    }
    let swept = {
        let rt = state.machines.clone();
        tokio::task::spawn_blocking(move || rt.sweep_orphans(&adopted))
            .await
            .unwrap_or_default()
    };
    for id in swept {
        tracing::warn!(machine = %id, "removed a machine directory without a running record");
    }
    Ok(())
}

/// Every second: machines past a deadline get their timeout action
/// (destroy or hibernate; a paused one past `auto_delete_after_ms` is
/// destroyed); every few seconds, a running machine whose QEMU is gone
/// ends with status `error`.
pub fn spawn_reaper(state: Shared) {
    tokio::spawn(async move {
        let mut tick: u64 = 0;
        loop {
            // A stopping server neither times out nor ends machines: they
            // run on for the next start.
            tokio::select! {
                _ = state.shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            tick += 1;
            if let Err(e) = reap_due(&state).await {
                tracing::warn!("machine timeouts: {e}");
            }
            if tick.is_multiple_of(3) {
                check_alive(&state).await;
            }
        }
    });
}

async fn reap_due(state: &Shared) -> MachineResult<()> {
    let due = state
        .store
        .machines_due(&state.machines.node_id, now_ms())
        .await?;
    for row in due {
        let m = Machine::from_row(row)?;
        let st = state.clone();
        // One task per machine: a slow hibernate does not hold up the others.
        tokio::spawn(async move {
            let id = m.row.id.clone();
            let r = match (m.status(), m.doc.timeout_action) {
                (MachineStatus::Running, TimeoutAction::Hibernate) => hibernate_due(&st, &id).await,
                (MachineStatus::Running, TimeoutAction::Destroy) => {
                    end(
                        &st,
                        m,
                        MachineStatus::Destroyed,
                        "timeout",
                        &[MachineStatus::Running],
                    )
                    .await
                }
                (MachineStatus::Paused, _) => {
                    end(
                        &st,
                        m,
                        MachineStatus::Destroyed,
                        "auto_delete_after_ms",
                        &[MachineStatus::Paused],
                    )
                    .await
                }
                _ => Ok(()),
            };
            if let Err(e) = r {
                tracing::warn!(machine = %id, "timeout action: {e}");
            }
        });
    }
    Ok(())
}

/// A running machine whose timeout hibernates it, read again under its
/// lifecycle lock (it may have changed meanwhile).
async fn hibernate_due(state: &Shared, id: &str) -> MachineResult<()> {
    let Some(live) = state.machines.get(id) else {
        return Ok(());
    };
    let _l = live.lifecycle.lock().await;
    match state.store.machine(id).await? {
        Some(r) if r.status == MachineStatus::Running => {
            let m = Machine::from_row(r)?;
            let ev = Event::ok(Op::TimeoutExpired)
                .by_system()
                .reason("hibernate");
            events::record(state, &m, ev).await;
            pause_now(state, m, &live).await.map(|_| ())
        }
        _ => Ok(()),
    }
}

async fn check_alive(state: &Shared) {
    for live in state.machines.all() {
        let h = live.handle.clone();
        let alive = tokio::task::spawn_blocking(move || h.alive())
            .await
            .unwrap_or(true);
        if alive {
            continue;
        }
        let ours = match state.store.machine(&live.id).await {
            Ok(Some(row)) if row.status == MachineStatus::Running => Machine::from_row(row)
                .ok()
                .filter(|m| m.doc.vm.is_some_and(|v| v.pid == live.handle.pid)),
            _ => None,
        };
        match ours {
            Some(m) => {
                let _ = end(
                    state,
                    m,
                    MachineStatus::Error,
                    "its VM exited unexpectedly",
                    &[MachineStatus::Running],
                )
                .await;
            }
            None => state.machines.remove_if(&live),
        }
    }
}
