//! Commands in a running machine: the running machine a request needs
//! (resumed first when it auto-resumes), the command a request describes
//! (the template's defaults, then the machine's envs and cwd, then the
//! command's own), foreground and background runs, processes and their
//! logs.

use std::sync::Arc;
use std::time::Duration;

use nullspace_model::machine::{
    ExecBody, ExecReply, ExecResult, MachineStatus, ProcessEntry, ProcessLogs, Spawned,
};
use nullspace_store::{Caller, now_ms};

use super::error::{MachineError, MachineResult};
use super::record::{self, Machine};
use super::rules;
use crate::guest::{Chunk, Command, Finished, GuestError};
use crate::runtime::Live;
use crate::state::Shared;

/// Bytes of each output stream a foreground command's answer keeps.
pub const OUTPUT_CAP: usize = 8 << 20;
/// The default of a command's `timeout_secs` (what the SDK sends).
pub const DEFAULT_EXEC_SECS: u64 = 30;

/// The caller's running machine on this node (a paused one with
/// `auto_resume` is resumed first), and its VM.
pub async fn running(state: &Shared, c: &Caller, id: &str) -> MachineResult<(Machine, Arc<Live>)> {
    let mut m = record::load(state, c, id).await?;
    if m.status() == MachineStatus::Paused && m.doc.auto_resume {
        super::pause::resume(state, c, id).await?;
        m = record::load(state, c, id).await?;
    }
    m.not_ended()?;
    match m.status() {
        MachineStatus::Running => {}
        MachineStatus::Paused => {
            return Err(MachineError::not_ready(id, "is paused; resume it first"));
        }
        s => return Err(MachineError::not_ready(id, format!("is {s}"))),
    }
    if m.row.node_id != state.machines.node_id {
        return Err(MachineError::conflict(
            "machine_conflict",
            format!(
                "machine {id} runs on node {} (another server sharing this database); send its requests there",
                m.row.node_id
            ),
        ));
    }
    let live = state
        .machines
        .get(id)
        .ok_or_else(|| MachineError::not_ready(id, "has no VM attached to this server yet"))?;
    // Activity counts for the inactivity timeout; written at most every 5 s.
    let now = now_ms();
    if now - m.doc.last_active_at > 5_000 {
        m.doc.last_active_at = now;
        let _ = record::save(state, &mut m, &[MachineStatus::Running]).await;
    }
    Ok((m, live))
}

/// A command of `POST …/exec` or the exec channel.
pub fn command(m: &Machine, live: &Live, b: &ExecBody) -> MachineResult<Command> {
    let (program, args, shell) = (b.command.as_str(), &b.args, b.shell.unwrap_or(false));
    if program.is_empty() {
        return Err(MachineError::Invalid("command is empty".into()));
    }
    if program.len() + args.iter().map(String::len).sum::<usize>() > 256 << 10 {
        return Err(MachineError::Invalid(
            "command and args exceed 256 KiB".into(),
        ));
    }
    let (argv, line) = if shell || args.is_empty() {
        // A bare command is a shell line (`commands.run("ls -la")`).
        let mut line = program.to_string();
        for a in args {
            line.push(' ');
            line.push_str(&nullspace_oci::config::shell_quote(a));
        }
        (vec![], Some(line))
    } else {
        let mut v = vec![program.to_string()];
        v.extend(args.iter().cloned());
        (v, None)
    };
    let mut env = live.envs.clone();
    if let Some(e) = &b.envs {
        rules::envs("envs", e)?;
        env.extend(e.clone());
    }
    let cwd = match b.cwd.as_deref().filter(|c| !c.is_empty()) {
        Some(c) => Some(rules::guest_path("cwd", c)?),
        None => m.doc.cwd.clone(),
    };
    let timeout = match b.timeout_secs.unwrap_or(DEFAULT_EXEC_SECS) {
        0 => None,
        s => Some(Duration::from_secs(s.min(7 * 24 * 3600))),
    };
    Ok(Command {
        argv,
        shell: line,
        env,
        cwd,
        user: b
            .user
            .as_deref()
            .filter(|u| !u.trim().is_empty())
            .map(|u| u.trim().to_string()),
        timeout,
    })
}

pub fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn finished(out: Finished) -> ExecResult {
    let mut stderr = lossy(&out.stderr);
    if out.stdout_dropped + out.stderr_dropped > 0 {
        stderr.push_str(&format!(
            "\n[nullspace: output truncated to {} MiB per stream; {} stdout and {} stderr bytes dropped]\n",
            OUTPUT_CAP >> 20,
            out.stdout_dropped,
            out.stderr_dropped
        ));
    }
    ExecResult {
        exit_code: out.exit_code(),
        stdout: lossy(&out.stdout),
        stderr,
        pid: out.pid,
    }
}

/// `POST …/exec`: the result of a foreground command, or a background
/// command's pid. A command that outlives its `timeout_secs` is killed and
/// reported as [`MachineError::ExecTimeout`].
pub async fn exec(state: &Shared, c: &Caller, id: &str, b: ExecBody) -> MachineResult<ExecReply> {
    let (m, live) = running(state, c, id).await?;
    let cmd = command(&m, &live, &b)?;
    if b.background.unwrap_or(false) {
        let pid = live
            .guest
            .spawn(cmd)
            .await
            .map_err(|e| MachineError::guest(id, e))?;
        return Ok(ExecReply::Background(Spawned { pid }));
    }
    let limit = cmd.timeout;
    let out = live
        .guest
        .run(cmd, OUTPUT_CAP, None)
        .await
        .map_err(|e| MachineError::guest(id, e))?;
    if out.timed_out {
        return Err(MachineError::ExecTimeout(
            limit.map(|t| t.as_secs()).unwrap_or(0),
        ));
    }
    Ok(ExecReply::Finished(finished(out)))
}

/// Runs a command and sends its output to `tx` as it streams (the exec
/// channel).
pub async fn exec_streaming(
    live: &Arc<Live>,
    id: &str,
    cmd: Command,
    tx: tokio::sync::mpsc::Sender<Chunk>,
) -> MachineResult<Finished> {
    live.guest
        .run(cmd, 64 << 10, Some(tx))
        .await
        .map_err(|e| MachineError::guest(id, e))
}

pub async fn processes(state: &Shared, c: &Caller, id: &str) -> MachineResult<Vec<ProcessEntry>> {
    let (_, live) = running(state, c, id).await?;
    let ps = live
        .guest
        .processes()
        .await
        .map_err(|e| MachineError::guest(id, e))?;
    Ok(ps
        .into_iter()
        .map(|p| ProcessEntry {
            pid: p.pid,
            command: p.command,
            running: p.running,
        })
        .collect())
}

/// A process the guest does not know is `process_not_found`.
fn process_error(id: &str, e: GuestError) -> MachineError {
    match e {
        GuestError::NotFound(m) => MachineError::ProcessNotFound(m),
        e => MachineError::guest(id, e),
    }
}

pub async fn process_logs(
    state: &Shared,
    c: &Caller,
    id: &str,
    pid: u32,
) -> MachineResult<ProcessLogs> {
    let (_, live) = running(state, c, id).await?;
    let o = live
        .guest
        .output(pid)
        .await
        .map_err(|e| process_error(id, e))?;
    let (stdout, stderr) = (lossy(&o.stdout), lossy(&o.stderr));
    Ok(ProcessLogs {
        output: format!("{stdout}{stderr}"),
        stdout,
        stderr,
        exit_code: if o.running { None } else { o.exit_code },
    })
}

pub async fn kill_process(state: &Shared, c: &Caller, id: &str, pid: u32) -> MachineResult<()> {
    let (_, live) = running(state, c, id).await?;
    live.guest.kill(pid).await.map_err(|e| process_error(id, e))
}
