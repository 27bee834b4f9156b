//! Terminal sessions and directory watches of a machine's guest (the
//! agent's `pty_*`, `attach`, `write_stdin`, `kill` and `watch` ops), for
//! the pty channel, the pty routes and `file_watch`.
//!
//! The streaming calls ([`Guest::pty_attach`], [`Guest::watch`]) end when
//! their receiver goes away or their token is cancelled; the guest is told
//! at once (an attach detaches, the session goes on; a watch stops).

use super::{CALL, Guest, GuestError, exit_code};
use nullspace_model::agent::{PtyInfo, PtySpec, WatchEvent, WatchSpec};
use nullspace_vm::WatchEnd;
use tokio::sync::mpsc::Sender;
use tokio_util::sync::CancellationToken;

/// A streaming call may last this long.
const FOREVER: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// What a watch reports.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchUpdate {
    /// Set up: later changes are reported.
    Started,
    /// Changes, and how many were lost before them.
    Events(Vec<WatchEvent>, u64),
}

impl Guest {
    pub async fn pty_start(&self, spec: PtySpec) -> Result<PtyInfo, GuestError> {
        self.with(CALL, move |a| a.pty_start(&spec, CALL)).await
    }

    /// Running and recently exited sessions.
    pub async fn pty_list(&self) -> Result<Vec<PtyInfo>, GuestError> {
        self.with(CALL, move |a| a.pty_list(CALL)).await
    }

    /// A session by id or by pid.
    pub async fn pty_find(
        &self,
        session: Option<&str>,
        pid: Option<u32>,
    ) -> Result<PtyInfo, GuestError> {
        let all = self.pty_list().await?;
        all.into_iter()
            .find(|s| Some(s.session.as_str()) == session || Some(s.pid) == pid)
            .ok_or_else(|| {
                GuestError::NotFound(match (session, pid) {
                    (Some(s), _) => format!("no terminal session {s:?} in this machine"),
                    (None, Some(p)) => format!("no terminal session with pid {p} in this machine"),
                    (None, None) => "no terminal session named".into(),
                })
            })
    }

    pub async fn pty_resize(&self, pid: u32, cols: u16, rows: u16) -> Result<PtyInfo, GuestError> {
        self.with(CALL, move |a| a.pty_resize(pid, cols, rows, CALL))
            .await
    }

    /// Types `data` into a session.
    pub async fn pty_input(&self, pid: u32, data: Vec<u8>) -> Result<(), GuestError> {
        self.with(CALL, move |a| a.write_stdin(pid, &data, false, CALL))
            .await
    }

    /// Ends a session: SIGHUP to its process group, as a closed terminal
    /// would, then SIGKILL.
    pub async fn pty_kill(&self, pid: u32) -> Result<(), GuestError> {
        self.with(CALL, move |a| {
            a.kill(pid, 1, true, CALL)?;
            std::thread::sleep(std::time::Duration::from_millis(100));
            a.kill(pid, 9, true, CALL)
        })
        .await
    }

    /// Streams a session's output (with `replay`, what its ring holds
    /// first) to `tx` until it exits (`Ok(Some(exit code))`) or the
    /// stream is stopped (`Ok(None)`: `tx` closed or `stop` cancelled).
    pub async fn pty_attach(
        &self,
        pid: u32,
        replay: bool,
        tx: Sender<Vec<u8>>,
        stop: CancellationToken,
    ) -> Result<Option<i32>, GuestError> {
        self.with_streaming(stop, move |a, stop| {
            let a = a.with_cancel(stop.clone());
            let r = a.attach(pid, replay, FOREVER, &mut |_, d| {
                if tx.blocking_send(d.to_vec()).is_err() {
                    stop.cancel();
                }
            });
            match r {
                Ok(st) => Ok(Some(exit_code(st.code, st.signal))),
                Err(nullspace_vm::VmError::Cancelled) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// Watches a directory, sending to `tx` until the directory goes away
    /// (`Ok(Some(reason))`) or the watch is stopped (`Ok(None)`).
    pub async fn watch(
        &self,
        spec: WatchSpec,
        tx: Sender<WatchUpdate>,
        stop: CancellationToken,
    ) -> Result<Option<String>, GuestError> {
        self.with_streaming(stop, move |a, stop| {
            let a = a.with_cancel(stop);
            let r = a.watch(
                &spec,
                FOREVER,
                &mut |_| {
                    let _ = tx.blocking_send(WatchUpdate::Started);
                },
                &mut |events, dropped| {
                    tx.blocking_send(WatchUpdate::Events(events.to_vec(), dropped))
                        .is_ok()
                },
            );
            match r {
                Ok(WatchEnd::Gone(reason)) => Ok(Some(reason)),
                Ok(WatchEnd::Stopped) | Err(nullspace_vm::VmError::Cancelled) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await
    }
}
