//! Terminal sessions in the guest ([`nullspace_model::agent::pty`]): start,
//! resize, list. A session's output is read with [`AgentClient::attach`]
//! (as [`Stream::Stdout`](super::Stream)), typed into with
//! [`AgentClient::write_stdin`] and signalled with [`AgentClient::kill`],
//! all by its pid; it goes on when the connection ends.

use super::{AgentClient, unexpected};
use crate::VmError;
use nullspace_model::agent::{Event, Op, PtyInfo, PtySpec};
use std::time::Duration;

impl AgentClient {
    /// Starts a terminal session and returns at once (its output waits in
    /// the guest's ring buffer for an `attach`).
    pub fn pty_start(&self, spec: &PtySpec, limit: Duration) -> Result<PtyInfo, VmError> {
        match self.call(Op::PtyStart(spec.clone()), limit)? {
            Event::Pty { info } => Ok(info),
            ev => Err(unexpected("pty_start", ev)),
        }
    }

    /// Sets a session's window size.
    pub fn pty_resize(
        &self,
        pid: u32,
        cols: u16,
        rows: u16,
        limit: Duration,
    ) -> Result<PtyInfo, VmError> {
        match self.call(Op::PtyResize { pid, cols, rows }, limit)? {
            Event::Pty { info } => Ok(info),
            ev => Err(unexpected("pty_resize", ev)),
        }
    }

    /// The guest's sessions, running and recently exited.
    pub fn pty_list(&self, limit: Duration) -> Result<Vec<PtyInfo>, VmError> {
        match self.call(Op::PtyList, limit)? {
            Event::Ptys { sessions } => Ok(sessions),
            ev => Err(unexpected("pty_list", ev)),
        }
    }

    /// One session by its id, `None` when the guest has no such session.
    pub fn pty_session(&self, session: &str, limit: Duration) -> Result<Option<PtyInfo>, VmError> {
        Ok(self
            .pty_list(limit)?
            .into_iter()
            .find(|s| s.session == session))
    }
}
