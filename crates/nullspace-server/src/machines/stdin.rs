//! Input to a background process: its stdin was kept open when it was
//! started (`commands::exec`), and the guest agent writes to it.

use nullspace_model::agent::MAX_CHUNK;
use nullspace_store::Caller;

use super::commands::running;
use super::error::{MachineError, MachineResult};
use crate::guest::GuestError;
use crate::state::Shared;

/// Most bytes one request may send (the request body bounds it anyway).
pub const STDIN_MAX: usize = 8 << 20;

/// `POST …/processes/{pid}/stdin`: `data` to process `pid`, in chunks the
/// agent accepts; stdin stays open.
pub async fn send(
    state: &Shared,
    c: &Caller,
    id: &str,
    pid: u32,
    data: &[u8],
) -> MachineResult<()> {
    if data.len() > STDIN_MAX {
        return Err(MachineError::Invalid(format!(
            "stdin data for process {pid} is {} bytes; at most {STDIN_MAX} per request",
            data.len()
        )));
    }
    let (_m, live) = running(state, c, id).await?;
    for chunk in data.chunks(MAX_CHUNK) {
        live.guest
            .write_stdin(pid, chunk.to_vec(), false)
            .await
            .map_err(|e| match e {
                GuestError::NotFound(_) => MachineError::ProcessNotFound(format!(
                    "process {pid} not found in machine {id}"
                )),
                GuestError::Failed(m) => MachineError::Invalid(format!(
                    "process {pid} in machine {id} does not take input: {m}"
                )),
                e => MachineError::guest(id, e),
            })?;
    }
    Ok(())
}
