//! What the machine API asks of a machine's guest, over its agent
//! connection: commands (foreground with streamed output, background with
//! logs), processes, and files. The one place that knows the agent
//! client's API, so that a new agent protocol is a change here only.
//!
//! This build drives the agent of `nullspace_vm::agent` (protocol 1): one
//! request at a time per connection (calls on a machine queue on a mutex),
//! commands and whole-file reads and writes. Background processes, process
//! lists, attaching to a running process, `stat` and directory listings
//! need the guest ops of the next agent protocol and answer
//! [`GuestError::Unsupported`] until then.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nullspace_vm::VmError;
use nullspace_vm::agent::{AgentClient, ExecRequest, Stream};

/// Longest whole-file read the agent serves (it refuses larger files).
pub const READ_MAX: u64 = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The guest's agent lacks the operation.
    #[error("{0} is not supported by this machine's guest agent")]
    Unsupported(&'static str),
    #[error("{0}")]
    NotFound(String),
    /// The agent connection or the VM is gone.
    #[error("the machine's guest agent is unreachable: {0}")]
    Gone(String),
    #[error("{0}")]
    Failed(String),
    #[error("the guest did not answer within {0:?}")]
    Timeout(Duration),
}

fn classify(e: VmError, limit: Duration) -> GuestError {
    match e {
        VmError::Agent(m) if m.contains("timed out") => GuestError::Timeout(limit),
        VmError::Agent(m)
            if m.contains("closed")
                || m.contains("connect")
                || m.contains("send:")
                || m.contains("recv:") =>
        {
            GuestError::Gone(m)
        }
        VmError::Agent(m)
            if m.contains("No such file or directory") || m.contains("os error 2)") =>
        {
            GuestError::NotFound(m)
        }
        VmError::Agent(m) => GuestError::Failed(m),
        other => GuestError::Failed(other.to_string()),
    }
}

/// A command to run in the guest (the template's runtime defaults apply
/// where these leave a field unset).
#[derive(Debug, Clone, Default)]
pub struct Command {
    /// Run directly; when empty, `shell` runs under `sh -c`.
    pub argv: Vec<String>,
    pub shell: Option<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    /// The guest kills the command's process group after this long.
    pub timeout: Option<Duration>,
}

impl Command {
    /// What a process list shows.
    pub fn display(&self) -> String {
        match &self.shell {
            Some(s) if self.argv.is_empty() => s.clone(),
            _ => self.argv.join(" "),
        }
    }
}

/// A chunk of a command's output, as it streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

#[derive(Debug, Clone, Default)]
pub struct Finished {
    /// The guest pid, when the agent reports it.
    pub pid: Option<u32>,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// At most the requested cap of each stream (the first bytes).
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
}

impl Finished {
    /// The shell's convention: 128 + signal for a killed process.
    pub fn exit_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => -1,
        }
    }
}

/// A process the agent tracks.
#[derive(Debug, Clone)]
pub struct Process {
    pub pid: u32,
    pub command: String,
    pub running: bool,
}

/// A background process's buffered output.
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub running: bool,
    pub exit_code: Option<i32>,
}

/// Metadata of a guest path.
#[derive(Debug, Clone, PartialEq)]
pub struct Stat {
    pub name: String,
    pub path: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: String,
    pub size: u64,
    pub mode: Option<u32>,
    pub owner: Option<String>,
    pub group: Option<String>,
    pub modified_unix_ms: Option<i64>,
    pub symlink_target: Option<String>,
}

/// The agent connection of one machine. Clones share it.
#[derive(Clone)]
pub struct Guest {
    socket: PathBuf,
    conn: Arc<Mutex<Option<AgentClient>>>,
}

/// Connect limit when the connection must be made again.
const CONNECT: Duration = Duration::from_secs(10);

impl Guest {
    pub fn new(socket: PathBuf, agent: Option<AgentClient>) -> Guest {
        Guest {
            socket,
            conn: Arc::new(Mutex::new(agent)),
        }
    }

    /// Runs `f` with the connection (made again if an earlier call lost
    /// it) on a blocking thread; a connection that failed is dropped.
    async fn with<T: Send + 'static>(
        &self,
        limit: Duration,
        f: impl FnOnce(&mut AgentClient) -> Result<T, VmError> + Send + 'static,
    ) -> Result<T, GuestError> {
        let conn = self.conn.clone();
        let socket = self.socket.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            if guard.is_none() {
                let mut a = AgentClient::connect(&socket, CONNECT)
                    .map_err(|e| GuestError::Gone(e.to_string()))?;
                a.ping(CONNECT)
                    .map_err(|e| GuestError::Gone(e.to_string()))?;
                *guard = Some(a);
            }
            let agent = guard.as_mut().expect("connected above");
            let r = f(agent).map_err(|e| classify(e, limit));
            if matches!(r, Err(GuestError::Gone(_)) | Err(GuestError::Timeout(_))) {
                // A timed-out call leaves its reply in flight: start afresh.
                *guard = None;
            }
            r
        })
        .await
        .map_err(|e| GuestError::Failed(format!("guest call: {e}")))?
    }

    /// The agent answers.
    pub async fn ping(&self, limit: Duration) -> Result<(), GuestError> {
        self.with(limit, move |a| a.ping(limit)).await
    }

    /// The start command's `{pid, started_unix_ms, running, …}`.
    pub async fn start_info(&self) -> Result<serde_json::Value, GuestError> {
        let limit = Duration::from_secs(10);
        self.with(limit, move |a| a.info(limit).map(|v| v["start"].clone()))
            .await
    }

    /// Runs a command to its end. Each chunk also goes to `tx` as it
    /// arrives; at most `cap` bytes of each stream are kept.
    pub async fn run(
        &self,
        cmd: Command,
        cap: usize,
        tx: Option<tokio::sync::mpsc::Sender<Chunk>>,
    ) -> Result<Finished, GuestError> {
        // The guest enforces the command's timeout; the call waits a little longer.
        let limit = cmd
            .timeout
            .map(|t| t + Duration::from_secs(30))
            .unwrap_or(Duration::from_secs(7 * 24 * 3600));
        let req = ExecRequest {
            argv: cmd.argv.clone(),
            cmd: cmd.shell.clone(),
            env: cmd.env.clone(),
            cwd: cmd.cwd.clone(),
            user: cmd.user.clone(),
            stdin: None,
            timeout: cmd.timeout,
        };
        self.with(limit, move |a| {
            let mut out = Finished::default();
            let keep = |buf: &mut Vec<u8>, dropped: &mut u64, d: &[u8]| {
                let room = cap.saturating_sub(buf.len()).min(d.len());
                buf.extend_from_slice(&d[..room]);
                *dropped += (d.len() - room) as u64;
            };
            let mut on = |s: Stream, d: &[u8]| {
                match s {
                    Stream::Stdout => keep(&mut out.stdout, &mut out.stdout_dropped, d),
                    Stream::Stderr => keep(&mut out.stderr, &mut out.stderr_dropped, d),
                }
                if let Some(tx) = &tx {
                    let c = match s {
                        Stream::Stdout => Chunk::Stdout(d.to_vec()),
                        Stream::Stderr => Chunk::Stderr(d.to_vec()),
                    };
                    // A receiver that went away stops getting chunks; the
                    // command still runs to its end (or its timeout).
                    let _ = tx.blocking_send(c);
                }
            };
            let r = a.exec_streaming(&req, limit, &mut on)?;
            out.code = r.code;
            out.signal = r.signal;
            out.timed_out = r.timed_out;
            Ok(out)
        })
        .await
    }

    /// Starts a background process; its pid.
    pub async fn spawn(&self, _cmd: Command) -> Result<u32, GuestError> {
        Err(GuestError::Unsupported("background commands"))
    }

    pub async fn processes(&self) -> Result<Vec<Process>, GuestError> {
        Err(GuestError::Unsupported("listing processes"))
    }

    pub async fn output(&self, _pid: u32) -> Result<Output, GuestError> {
        Err(GuestError::Unsupported("process logs"))
    }

    /// Streams a running process's output (what its buffers hold first)
    /// until it exits; its exit code.
    pub async fn attach(
        &self,
        _pid: u32,
        _tx: tokio::sync::mpsc::Sender<Chunk>,
    ) -> Result<Option<i32>, GuestError> {
        Err(GuestError::Unsupported("attaching to a process"))
    }

    pub async fn kill(&self, _pid: u32) -> Result<(), GuestError> {
        Err(GuestError::Unsupported("killing a process"))
    }

    pub async fn stat(&self, _path: &str, _user: Option<&str>) -> Result<Stat, GuestError> {
        Err(GuestError::Unsupported("file info"))
    }

    pub async fn list(
        &self,
        _path: &str,
        _depth: u32,
        _user: Option<&str>,
    ) -> Result<Vec<Stat>, GuestError> {
        Err(GuestError::Unsupported("listing directories"))
    }

    /// A whole file, at most [`READ_MAX`] bytes.
    pub async fn read(&self, path: &str, _user: Option<&str>) -> Result<Vec<u8>, GuestError> {
        let limit = Duration::from_secs(120);
        let path = path.to_string();
        self.with(limit, move |a| a.read_file(&path, limit)).await
    }

    /// Writes (replaces) a file, creating missing parents; bytes written.
    pub async fn write(
        &self,
        path: &str,
        data: Vec<u8>,
        _user: Option<&str>,
    ) -> Result<u64, GuestError> {
        let limit = Duration::from_secs(300);
        let path = path.to_string();
        let n = data.len() as u64;
        self.with(limit, move |a| {
            // 4 MiB per agent line, appended after the first.
            const CHUNK: usize = 4 << 20;
            let mut off = 0;
            loop {
                let end = (off + CHUNK).min(data.len());
                let v = serde_json::json!({
                    "op": "write_file", "path": path, "mode": 0o644, "append": off > 0,
                    "data": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &data[off..end]),
                });
                a.call(v, limit)?;
                off = end;
                if off >= data.len() {
                    return Ok(n);
                }
            }
        })
        .await
    }
}
