//! QMP migration helpers: capabilities, file channels, waiting for an
//! outgoing or incoming migration.

use crate::VmError;
use crate::process::Watch;
use crate::qmp::{MigrationStatus, Qmp, RunState};
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};

/// A file migration channel (QEMU 8.2+), so paths need no URI quoting.
pub(super) fn file_channel(p: &Path) -> Value {
    json!([{"channel-type": "main", "addr": {"transport": "file", "filename": p, "offset": 0}}])
}

/// Migration capabilities and parameters for a snapshot or restore: the
/// stream is written to or read from a local file, so no bandwidth limit
/// (QEMU's default of 128 MiB/s is for networks); `x-ignore-shared` skips
/// the shared file-backed RAM (mapped memory). Both sides must agree.
pub(super) fn set_migration(q: &mut Qmp, ignore_shared: bool) -> Result<(), VmError> {
    q.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "x-ignore-shared", "state": ignore_shared}]}),
    )?;
    q.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1u64 << 40}),
    )?;
    Ok(())
}

/// Waits for the outgoing migration to complete.
pub(super) fn wait_migration(q: &mut Qmp, watch: &Watch, limit: Duration) -> Result<(), VmError> {
    let t = Instant::now();
    loop {
        watch.check()?;
        let m = q.migration()?;
        match &m.status {
            Some(MigrationStatus::Completed) => return Ok(()),
            Some(MigrationStatus::Failed | MigrationStatus::Cancelled) => {
                return Err(VmError::Snapshot(format!("migration failed: {}", m.why())));
            }
            // Not started yet, still going, or a state a newer QEMU added:
            // wait, bounded by `limit`.
            None | Some(_) => {}
        }
        if t.elapsed() > limit {
            return Err(VmError::Snapshot(format!(
                "migration did not complete within {} s (status {:?})",
                limit.as_secs(),
                m.status
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Cancels an outgoing migration and waits (up to 5 s) until it is over.
pub(super) fn stop_migration(q: &mut Qmp) {
    let _ = q.execute("migrate_cancel", json!({}));
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        match q.migration() {
            Ok(m) if m.status.as_ref().is_some_and(MigrationStatus::in_progress) => {}
            // Over (or in a state not known to be going: nothing to wait for).
            _ => return,
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for an incoming migration to leave `inmigrate`; `Ok(true)` if
/// the VM is paused (loaded), `Ok(false)` if it already runs.
pub(super) fn wait_incoming(
    q: &mut Qmp,
    watch: &Watch,
    deadline: Instant,
) -> Result<bool, VmError> {
    loop {
        watch.check()?;
        match q.status()? {
            RunState::Paused | RunState::Postmigrate => return Ok(true),
            RunState::Running => return Ok(false),
            RunState::Inmigrate | RunState::Prelaunch => {}
            // Any other state (an error, or one this driver does not know)
            // is not a loaded VM.
            other => {
                let m = q.migration().unwrap_or_default();
                return Err(VmError::Restore(format!(
                    "VM state {other:?} after incoming migration: {}",
                    m.why()
                )));
            }
        }
        if let Ok(m) = q.migration()
            && m.status == Some(MigrationStatus::Failed)
        {
            return Err(VmError::Restore(format!(
                "incoming migration failed: {}",
                m.why()
            )));
        }
        if Instant::now() > deadline {
            return Err(VmError::Restore(
                "incoming migration did not finish in time".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// An incoming migration from the file `stream` (`ignore_shared`: the RAM
/// is a shared file and not in the stream), waited for; `Ok(true)` if the
/// VM is paused (loaded), `Ok(false)` if it already runs.
pub(super) fn incoming(
    q: &mut Qmp,
    stream: &Path,
    ignore_shared: bool,
    watch: &Watch,
    deadline: Instant,
) -> Result<bool, VmError> {
    set_migration(q, ignore_shared)?;
    q.execute(
        "migrate-incoming",
        json!({"channels": file_channel(stream)}),
    )?;
    wait_incoming(q, watch, deadline)
}
