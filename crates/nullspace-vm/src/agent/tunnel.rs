//! TCP connections to ports on the guest's loopback, carried over the agent
//! connection (the protocol's "Tunnels"): the reading half follows the
//! `connect` request's stream, the writing half sends `send` requests.

use super::{AgentClient, Call, unexpected};
use crate::VmError;
use nullspace_model::agent::{Event, MAX_CHUNK, Op};
use std::time::{Duration, Instant};

/// What the guest's side of a tunnel sends. Dropping it closes the
/// connection in the guest (the request is cancelled).
pub struct TunnelReader {
    call: Call,
}

/// Writes to a tunnel; `Clone` so a proxy can hand it to another thread.
#[derive(Clone)]
pub struct TunnelWriter {
    client: AgentClient,
    target: u64,
}

impl AgentClient {
    /// Connects to `port` on the guest's loopback, waiting at most `limit`
    /// for the guest's server to accept. A closed port is
    /// [`VmError::Guest`] with code `connection_refused`. Reads and writes
    /// end early when this client's token is cancelled.
    pub fn open_tunnel(
        &self,
        port: u16,
        limit: Duration,
    ) -> Result<(TunnelReader, TunnelWriter), VmError> {
        let mut call = self.start_call(Op::Connect { port })?;
        match call.next(Instant::now() + limit)? {
            Event::Connected => {}
            ev => return Err(unexpected("connect", ev)),
        }
        let target = call.id;
        Ok((
            TunnelReader { call },
            TunnelWriter {
                client: self.clone(),
                target,
            },
        ))
    }
}

impl TunnelReader {
    /// The next bytes the guest side sent, waiting at most `limit`; `None`
    /// once it closed its end.
    pub fn recv(&mut self, limit: Duration) -> Result<Option<Vec<u8>>, VmError> {
        if self.call.done {
            return Ok(None);
        }
        let deadline = Instant::now() + limit.min(Duration::from_secs(10 * 365 * 86_400));
        match self.call.next(deadline)? {
            Event::Received { data } => Ok(Some(data)),
            Event::Closed => Ok(None),
            ev => Err(unexpected("connect", ev)),
        }
    }
}

impl TunnelWriter {
    /// Writes all of `data` (in [`MAX_CHUNK`] pieces, each acknowledged by
    /// the guest once written: the guest's server sets the pace); `eof`
    /// then shuts the guest connection's write side.
    pub fn send(&self, data: &[u8], eof: bool, limit: Duration) -> Result<(), VmError> {
        let mut pieces: Vec<&[u8]> = data.chunks(MAX_CHUNK).collect();
        if pieces.is_empty() {
            pieces.push(&[]);
        }
        let last = pieces.len() - 1;
        for (i, piece) in pieces.into_iter().enumerate() {
            let op = Op::Send {
                target: self.target,
                data: piece.to_vec(),
                eof: eof && i == last,
            };
            match self.client.call(op, limit)? {
                Event::Written { .. } => {}
                ev => return Err(unexpected("send", ev)),
            }
        }
        Ok(())
    }
}
