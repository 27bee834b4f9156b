//! Directory watches in the guest ([`nullspace_model::agent::watch`]).

use super::{AgentClient, unexpected};
use crate::VmError;
use nullspace_model::agent::{Event, Op, WatchEvent, WatchSpec};
use std::time::{Duration, Instant};

/// How a watch ended without an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEnd {
    /// The callback asked to stop (the guest was told to cancel).
    Stopped,
    /// The watched directory went away: the guest's reason.
    Gone(String),
}

impl AgentClient {
    /// Watches a directory: `on_started` once the guest reports changes
    /// (later changes are seen), then `on_events` per batch with the count
    /// of changes lost before it (see the protocol's flow control) until it
    /// returns false, the directory goes away, `limit` passes, or the
    /// client's token is cancelled ([`VmError::Cancelled`]). The client
    /// holds at most one stream window of events (the callback's pace sets
    /// the guest's).
    pub fn watch(
        &self,
        spec: &WatchSpec,
        limit: Duration,
        on_started: &mut dyn FnMut(&str),
        on_events: &mut dyn FnMut(&[WatchEvent], u64) -> bool,
    ) -> Result<WatchEnd, VmError> {
        // A watch may be meant to run for good: no deadline overflow.
        let deadline = Instant::now() + limit.min(Duration::from_secs(10 * 365 * 86_400));
        let mut c = self.start_call(Op::Watch(spec.clone()))?;
        loop {
            match c.next(deadline)? {
                Event::Watching { path } => on_started(&path),
                Event::FileEvents { events, dropped } => {
                    if !on_events(&events, dropped) {
                        // Dropping the unfinished call cancels it in the guest.
                        return Ok(WatchEnd::Stopped);
                    }
                }
                Event::WatchEnd { reason } => return Ok(WatchEnd::Gone(reason)),
                ev => return Err(unexpected("watch", ev)),
            }
        }
    }
}
