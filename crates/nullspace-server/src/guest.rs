//! What the machine API asks of a machine's guest, over its agent
//! connection (`nullspace_vm::agent`, the protocol of
//! `nullspace_model::agent`): commands (foreground with streamed output,
//! background with logs), processes, files (single-file operations,
//! searches by name and content, replace in files) and the guest's
//! metrics. The one place that knows the agent client's API.
//!
//! One multiplexed connection per machine: calls from any number of
//! requests run at once on it. A connection that closed (the agent
//! restarted its session, the VM was paused and resumed elsewhere) is made
//! again on the next call.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nullspace_model::agent::{
    ContentMatch, ErrorCode, FileInfo, FileKind, GuestMetrics, ReplaceResult, ReplaceSpec,
    SearchContentSpec, SearchNamesSpec, WriteFileSpec,
};
use nullspace_vm::VmError;
use nullspace_vm::agent::{
    AgentClient, ExecRequest, Found, Stream, TunnelReader, TunnelWriter, WriteOptions,
};
use tokio_util::sync::CancellationToken;

mod terminal;
pub use terminal::WatchUpdate;

use crate::uploads::GuestFiles;
use crate::uploads::publish::EntryKind;

/// Longest whole-file read answered in one response body.
pub const READ_MAX: u64 = 64 << 20;
/// Ring buffer per stream of a background process in the guest.
const RING_BYTES: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The guest's agent lacks the operation.
    #[error("{0} is not supported by this machine's guest agent")]
    Unsupported(&'static str),
    #[error("{0}")]
    NotFound(String),
    /// The user may not do this (the guest kernel's permission check).
    #[error("{0}")]
    Denied(String),
    /// The request does not fit what is there, in the guest's words and
    /// code: a file where a directory is expected or the reverse, a target
    /// that exists, a directory not empty, a name over the limits, a file
    /// too large, a malformed pattern.
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
    /// The agent connection or the VM is gone.
    #[error("the machine's guest agent is unreachable: {0}")]
    Gone(String),
    #[error("{0}")]
    Failed(String),
    #[error("the guest did not answer within {0:?}")]
    Timeout(Duration),
}

impl GuestError {
    /// The machine, not the request, failed: the agent is unreachable or
    /// does not answer.
    pub fn is_machine_gone(&self) -> bool {
        matches!(self, GuestError::Gone(_) | GuestError::Timeout(_))
    }
}

fn classify(e: VmError, limit: Duration) -> GuestError {
    match e {
        VmError::Guest {
            code: ErrorCode::NotFound,
            message,
            ..
        } => GuestError::NotFound(message),
        VmError::Guest {
            code: ErrorCode::PermissionDenied,
            message,
            ..
        } => GuestError::Denied(message),
        VmError::Guest {
            code:
                code @ (ErrorCode::BadRequest
                | ErrorCode::NotADirectory
                | ErrorCode::IsADirectory
                | ErrorCode::AlreadyExists
                | ErrorCode::DirectoryNotEmpty
                | ErrorCode::NameTooLong
                | ErrorCode::FileTooLarge
                | ErrorCode::ConnectionRefused
                | ErrorCode::TimedOut
                | ErrorCode::Busy),
            message,
            ..
        } => GuestError::Refused { code, message },
        VmError::Guest {
            code: ErrorCode::UnknownOp,
            op,
            ..
        } => GuestError::Failed(format!("the guest agent does not know {op}")),
        VmError::Guest { op, message, .. } => GuestError::Failed(format!("{op}: {message}")),
        VmError::Agent(m) if m.contains("timed out") => GuestError::Timeout(limit),
        VmError::Agent(m) => GuestError::Gone(m),
        VmError::Cancelled => GuestError::Failed("cancelled".into()),
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
    /// Keep stdin open for [`Guest::write_stdin`] (background commands).
    pub stdin_open: bool,
}

impl Command {
    fn request(&self) -> ExecRequest {
        ExecRequest {
            argv: self.argv.clone(),
            cmd: self.shell.clone(),
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            user: self.user.clone(),
            timeout: self.timeout,
            keep_stdin_open: self.stdin_open,
            ..Default::default()
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

/// The shell's convention: 128 + signal for a killed process.
fn exit_code(code: Option<i32>, signal: Option<i32>) -> i32 {
    match (code, signal) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        (None, None) => -1,
    }
}

impl Finished {
    pub fn exit_code(&self) -> i32 {
        exit_code(self.code, self.signal)
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

/// The agent connection of one machine. Clones share it.
///
/// QEMU serves one connection at a time, and a snapshot that lets the VM
/// go on makes a new one (`QemuVm::snapshot`): [`Guest::quiesce`] waits for
/// the calls in flight, closes the connection and holds new calls until
/// [`Guest::resume_with`] hands over the VM's new one.
#[derive(Clone)]
pub struct Guest {
    socket: PathBuf,
    conn: Arc<Mutex<Option<AgentClient>>>,
    /// Read-held by every call; write-held while the VM is snapshotted.
    gate: Arc<std::sync::RwLock<()>>,
    /// Cancelled by [`Guest::quiesce`]: streams that may last for good
    /// (terminals, watches) hold no gate and end instead.
    streams: Arc<Mutex<CancellationToken>>,
}

/// Held while a machine is quiesced (see [`Guest::quiesce`]).
pub struct Quiesced<'a>(#[allow(dead_code)] std::sync::RwLockWriteGuard<'a, ()>);

/// Connect limit when the connection must be made again.
const CONNECT: Duration = Duration::from_secs(10);
/// Limit of ordinary (non-exec) calls.
const CALL: Duration = Duration::from_secs(60);

impl Guest {
    pub fn new(socket: PathBuf, agent: Option<AgentClient>) -> Guest {
        Guest {
            socket,
            conn: Arc::new(Mutex::new(agent)),
            gate: Default::default(),
            streams: Default::default(),
        }
    }

    /// Waits up to `limit` for the calls in flight to end, then closes the
    /// connection; new calls wait until the guard is gone. `None` when
    /// calls are still running after `limit` (blocking; not on a runtime thread).
    pub fn quiesce(&self, limit: Duration) -> Option<Quiesced<'_>> {
        let t = std::time::Instant::now();
        std::mem::take(&mut *self.streams.lock().unwrap_or_else(|p| p.into_inner())).cancel();
        loop {
            if let Ok(g) = self.gate.try_write() {
                self.conn.lock().unwrap_or_else(|p| p.into_inner()).take();
                return Some(Quiesced(g));
            }
            if t.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Uses `agent` from now on (the VM's connection after a snapshot).
    pub fn resume_with(&self, agent: Option<AgentClient>) {
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = agent;
    }

    /// The connection, made again if it closed.
    fn client(&self) -> Result<AgentClient, GuestError> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = guard.as_ref()
            && c.closed().is_none()
        {
            return Ok(c.clone());
        }
        let c = AgentClient::connect(&self.socket, CONNECT)
            .and_then(|c| c.ping(CONNECT).map(|_| c))
            .map_err(|e| GuestError::Gone(e.to_string()))?;
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Runs `f` with the connection on a blocking thread.
    async fn with<T: Send + 'static>(
        &self,
        limit: Duration,
        f: impl FnOnce(&AgentClient) -> Result<T, VmError> + Send + 'static,
    ) -> Result<T, GuestError> {
        let g = self.clone();
        tokio::task::spawn_blocking(move || {
            let _open = g.gate.read().unwrap_or_else(|p| p.into_inner());
            let c = g.client()?;
            f(&c).map_err(|e| classify(e, limit))
        })
        .await
        .map_err(|e| GuestError::Failed(format!("guest call: {e}")))?
    }

    /// A task that cancels `stop` when the machine is quiesced; it ends when
    /// either is cancelled.
    fn link_to_quiesce(&self, stop: &CancellationToken) -> tokio::task::JoinHandle<()> {
        let quiesce = self
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let linked = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = quiesce.cancelled() => linked.cancel(),
                _ = linked.cancelled() => {}
            }
        })
    }

    /// Runs a stream that may last for good with the connection, on a
    /// blocking thread, without holding the gate: `f` watches `stop`, which
    /// a quiesce cancels too.
    async fn with_streaming<T: Send + 'static>(
        &self,
        stop: CancellationToken,
        f: impl FnOnce(&AgentClient, CancellationToken) -> Result<T, VmError> + Send + 'static,
    ) -> Result<T, GuestError> {
        let link = self.link_to_quiesce(&stop);
        let g = self.clone();
        let r = tokio::task::spawn_blocking(move || {
            let c = g.client()?;
            f(&c, stop).map_err(|e| classify(e, Duration::ZERO))
        })
        .await
        .map_err(|e| GuestError::Failed(format!("guest call: {e}")));
        link.abort();
        r?
    }

    /// The agent answers.
    pub async fn ping(&self, limit: Duration) -> Result<(), GuestError> {
        self.with(limit, move |a| a.ping(limit)).await
    }

    /// Runs `f` on a blocking thread with the guest's file operations as
    /// `user`, each call limited to `limit` (upload completions; they hold
    /// off a snapshot's quiesce while they run).
    pub async fn with_files<T: Send + 'static>(
        &self,
        user: Option<String>,
        limit: Duration,
        f: impl FnOnce(&dyn GuestFiles) -> T + Send + 'static,
    ) -> Result<T, GuestError> {
        self.with(limit, move |a| {
            let files = AgentFiles {
                agent: a.clone(),
                user,
                limit,
            };
            Ok(f(&files))
        })
        .await
    }

    /// At most `len` bytes of a file from `offset`: `(data, size, eof)`
    /// (downloads stream a file this way).
    pub async fn read_chunk(
        &self,
        path: &str,
        offset: u64,
        len: usize,
        user: Option<&str>,
    ) -> Result<(Vec<u8>, u64, bool), GuestError> {
        let (path, user) = (path.to_string(), user.map(str::to_string));
        self.with(CALL, move |a| {
            a.read_file_chunk(&path, offset, len, user.as_deref(), CALL)
        })
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
        // The guest enforces the command's timeout; the call waits longer.
        let limit = cmd
            .timeout
            .map(|t| t + Duration::from_secs(30))
            .unwrap_or(Duration::from_secs(7 * 24 * 3600));
        let mut req = cmd.request();
        req.output_cap = Some(cap);
        self.with(limit, move |a| {
            let r = a.exec_streaming(&req, limit, &mut |s: Stream, d: &[u8]| {
                if let Some(tx) = &tx {
                    let c = match s {
                        Stream::Stdout => Chunk::Stdout(d.to_vec()),
                        Stream::Stderr => Chunk::Stderr(d.to_vec()),
                    };
                    // A receiver that went away stops getting chunks; the
                    // command still runs to its end (or its timeout).
                    let _ = tx.blocking_send(c);
                }
            })?;
            Ok(Finished {
                pid: r.pid,
                code: r.code,
                signal: r.signal,
                timed_out: r.timed_out,
                stdout: r.stdout,
                stderr: r.stderr,
                stdout_dropped: r.stdout_dropped,
                stderr_dropped: r.stderr_dropped,
            })
        })
        .await
    }

    /// Starts a background process; its pid. Its output is kept in the
    /// guest (a ring buffer per stream) for [`Guest::output`] and
    /// [`Guest::attach`].
    pub async fn spawn(&self, cmd: Command) -> Result<u32, GuestError> {
        let req = cmd.request();
        self.with(CALL, move |a| {
            a.exec_background(&req, Some(RING_BYTES), CALL)
        })
        .await
    }

    pub async fn processes(&self) -> Result<Vec<Process>, GuestError> {
        let ps = self.with(CALL, move |a| a.processes(CALL)).await?;
        Ok(ps
            .into_iter()
            .map(|p| Process {
                pid: p.pid,
                command: p.command,
                running: p.running,
            })
            .collect())
    }

    pub async fn output(&self, pid: u32) -> Result<Output, GuestError> {
        let o = self
            .with(CALL, move |a| a.process_output(pid, CALL))
            .await?;
        Ok(Output {
            stdout: o.stdout,
            stderr: o.stderr,
            running: o.running,
            exit_code: o.exit.map(|e| exit_code(e.code, e.signal)),
        })
    }

    /// Streams a process's output (what its buffers hold first) until it
    /// exits; its exit code.
    pub async fn attach(
        &self,
        pid: u32,
        tx: tokio::sync::mpsc::Sender<Chunk>,
    ) -> Result<Option<i32>, GuestError> {
        let limit = Duration::from_secs(7 * 24 * 3600);
        self.with(limit, move |a| {
            let st = a.attach(pid, true, limit, &mut |s: Stream, d: &[u8]| {
                let c = match s {
                    Stream::Stdout => Chunk::Stdout(d.to_vec()),
                    Stream::Stderr => Chunk::Stderr(d.to_vec()),
                };
                let _ = tx.blocking_send(c);
            })?;
            Ok(Some(exit_code(st.code, st.signal)))
        })
        .await
    }

    /// [`Guest::attach`] that holds no gate (a snapshot ends it instead of
    /// waiting for it): streams until the process exits (`Ok(Some(exit
    /// code))`) or the stream is stopped (`Ok(None)`: `tx` closed or `stop`
    /// cancelled); with `replay`, what its buffers hold first. For streams
    /// a client may keep open for good.
    pub async fn follow(
        &self,
        pid: u32,
        replay: bool,
        tx: tokio::sync::mpsc::Sender<Chunk>,
        stop: CancellationToken,
    ) -> Result<Option<i32>, GuestError> {
        let limit = Duration::from_secs(7 * 24 * 3600);
        self.with_streaming(stop, move |a, stop| {
            let a = a.with_cancel(stop.clone());
            let r = a.attach(pid, replay, limit, &mut |s: Stream, d: &[u8]| {
                let c = match s {
                    Stream::Stdout => Chunk::Stdout(d.to_vec()),
                    Stream::Stderr => Chunk::Stderr(d.to_vec()),
                };
                if tx.blocking_send(c).is_err() {
                    stop.cancel();
                }
            });
            match r {
                Ok(st) => Ok(Some(exit_code(st.code, st.signal))),
                Err(VmError::Cancelled) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// Writes to the stdin of a process started with `stdin_open`; `eof`
    /// closes it after the data.
    pub async fn write_stdin(&self, pid: u32, data: Vec<u8>, eof: bool) -> Result<(), GuestError> {
        self.with(CALL, move |a| a.write_stdin(pid, &data, eof, CALL))
            .await
    }

    /// SIGKILL to the process's group.
    pub async fn kill(&self, pid: u32) -> Result<(), GuestError> {
        self.with(CALL, move |a| a.kill(pid, 9, true, CALL)).await
    }

    /// Runs a file operation as `user` (the guest's errors name the path
    /// and the user).
    async fn file_call<T: Send + 'static>(
        &self,
        user: Option<&str>,
        limit: Duration,
        f: impl FnOnce(&AgentClient, Option<&str>) -> Result<T, VmError> + Send + 'static,
    ) -> Result<T, GuestError> {
        let user = user.map(str::to_string);
        self.with(limit, move |a| f(a, user.as_deref())).await
    }

    pub async fn stat(&self, path: &str, user: Option<&str>) -> Result<FileInfo, GuestError> {
        let path = path.to_string();
        self.file_call(user, CALL, move |a, u| a.stat(&path, u, CALL))
            .await
    }

    /// Entries under `path`, `depth` levels down, parents first.
    pub async fn list(
        &self,
        path: &str,
        depth: u32,
        user: Option<&str>,
    ) -> Result<Vec<FileInfo>, GuestError> {
        let path = path.to_string();
        let (entries, _truncated) = self
            .file_call(user, CALL, move |a, u| {
                a.list_dir(&path, depth, u, None, CALL)
            })
            .await?;
        Ok(entries)
    }

    /// A whole file, at most [`READ_MAX`] bytes.
    pub async fn read(&self, path: &str, user: Option<&str>) -> Result<Vec<u8>, GuestError> {
        let p = path.to_string();
        let limit = Duration::from_secs(300);
        self.file_call(user, limit, move |a, u| {
            let mut out = Vec::new();
            let mut w = Bounded(&mut out, READ_MAX as usize);
            a.read_file_to(&p, u, &mut w, limit)?;
            Ok(out)
        })
        .await
        .map_err(|e| match e {
            GuestError::Failed(m) if m.contains("more than") => GuestError::Failed(format!(
                "{path} is larger than {} MiB: read it in pieces",
                READ_MAX >> 20
            )),
            e => e,
        })
    }

    /// Writes (replaces) a file, creating missing parents, as `user`;
    /// bytes written.
    pub async fn write(
        &self,
        path: &str,
        data: Vec<u8>,
        user: Option<&str>,
    ) -> Result<u64, GuestError> {
        let path = path.to_string();
        let limit = Duration::from_secs(300);
        self.file_call(user, limit, move |a, u| {
            let opts = WriteOptions {
                parents: true,
                user: u.map(str::to_string),
                ..Default::default()
            };
            a.write_file_from(&path, &mut &data[..], &opts, limit)
        })
        .await
    }
}

/// The file operations beyond read and write: each as `user` (default:
/// the template's user), through the guest's own checks and bounds.
impl Guest {
    /// Removes a file, a symlink or (with `recursive`, with its contents) a
    /// directory.
    pub async fn remove(
        &self,
        path: &str,
        recursive: bool,
        user: Option<&str>,
    ) -> Result<(), GuestError> {
        let path = path.to_string();
        self.file_call(user, CALL, move |a, u| a.remove(&path, recursive, u, CALL))
            .await
    }

    /// Renames `from` to `to`; the metadata at `to`.
    pub async fn rename(
        &self,
        from: &str,
        to: &str,
        user: Option<&str>,
    ) -> Result<FileInfo, GuestError> {
        let (from, to) = (from.to_string(), to.to_string());
        self.file_call(user, CALL, move |a, u| a.rename(&from, &to, u, CALL))
            .await
    }

    /// `mkdir -p`; false when the directory already existed.
    pub async fn make_dir(&self, path: &str, user: Option<&str>) -> Result<bool, GuestError> {
        let path = path.to_string();
        self.file_call(user, CALL, move |a, u| {
            a.make_dir(&path, None, true, u, CALL)
        })
        .await
    }

    /// Sets the permission bits (`0..=0o7777`).
    pub async fn chmod(&self, path: &str, mode: u32, user: Option<&str>) -> Result<(), GuestError> {
        let path = path.to_string();
        self.file_call(user, CALL, move |a, u| a.chmod(&path, mode, u, CALL))
            .await
    }

    /// Paths under `path` whose name (or, with a `/` in the pattern, whose
    /// path relative to `path`) matches the glob; the guest's default
    /// bounds (`nullspace_model::agent`: result count, bytes, time).
    pub async fn search_names(
        &self,
        path: &str,
        pattern: &str,
        user: Option<&str>,
    ) -> Result<Found<String>, GuestError> {
        let spec = SearchNamesSpec {
            path: path.to_string(),
            pattern: pattern.to_string(),
            user: user.map(str::to_string),
            ..Default::default()
        };
        self.file_call(user, CALL, move |a, _| a.search_names(&spec, CALL))
            .await
    }

    /// Lines matching `pattern` (an expression, or text when it is not
    /// one) in the text files under `path` or in the file `path`.
    pub async fn search_content(
        &self,
        path: &str,
        pattern: &str,
        user: Option<&str>,
    ) -> Result<Found<ContentMatch>, GuestError> {
        let spec = SearchContentSpec {
            path: path.to_string(),
            pattern: pattern.to_string(),
            user: user.map(str::to_string),
            ..Default::default()
        };
        self.file_call(user, CALL, move |a, _| a.search_content(&spec, CALL))
            .await
    }

    /// Replaces `pattern` in `files` (each rewritten atomically; all
    /// checked before any changes); `dry_run` counts only.
    pub async fn replace(
        &self,
        files: Vec<String>,
        pattern: &str,
        replacement: &str,
        dry_run: bool,
        user: Option<&str>,
    ) -> Result<ReplaceResult, GuestError> {
        let spec = ReplaceSpec {
            files,
            pattern: pattern.to_string(),
            replacement: replacement.to_string(),
            literal: false,
            dry_run,
            user: user.map(str::to_string),
        };
        self.file_call(user, CALL, move |a, _| a.replace(&spec, CALL))
            .await
    }

    /// The guest's CPU (over a short sample), memory, disk and network
    /// figures.
    pub async fn metrics(&self) -> Result<GuestMetrics, GuestError> {
        self.with(CALL, move |a| a.metrics(None, CALL)).await
    }

    /// Opens a connection to `port` on the guest's loopback. Like a
    /// terminal it may last for good, so it holds no gate: its reads and
    /// writes end when `stop` or a quiesce (snapshot, pause) cancels.
    pub async fn open_tunnel(
        &self,
        port: u16,
        stop: CancellationToken,
    ) -> Result<(TunnelReader, TunnelWriter), GuestError> {
        self.link_to_quiesce(&stop);
        let g = self.clone();
        tokio::task::spawn_blocking(move || {
            let c = g.client()?.with_cancel(stop);
            c.open_tunnel(port, TUNNEL_CONNECT)
                .map_err(|e| classify(e, TUNNEL_CONNECT))
        })
        .await
        .map_err(|e| GuestError::Failed(format!("guest call: {e}")))?
    }

    /// Mounts a volume's spare disk in the guest (`volumes::attach`).
    pub async fn mount_volume(
        &self,
        spec: nullspace_model::agent::MountSpec,
    ) -> Result<nullspace_model::agent::VolumeStatus, GuestError> {
        self.with(CALL, move |a| a.mount_volume(spec, CALL)).await
    }

    /// Syncs and unmounts a volume in the guest.
    pub async fn unmount_volume(&self, slot: u32, mount_path: &str) -> Result<(), GuestError> {
        let p = mount_path.to_string();
        self.with(CALL, move |a| a.unmount_volume(slot, &p, CALL))
            .await
    }

    /// Whether a volume is still mounted in the guest, and its usage.
    pub async fn volume_health(
        &self,
        slot: u32,
        mount_path: &str,
    ) -> Result<nullspace_model::agent::VolumeStatus, GuestError> {
        let p = mount_path.to_string();
        self.with(CALL, move |a| a.volume_health(slot, &p, CALL))
            .await
    }

    /// One readiness check of `probe` in the guest: ready, and what it saw.
    pub async fn probe(
        &self,
        probe: nullspace_model::agent::ProbeSpec,
        limit: Duration,
    ) -> Result<(bool, String), GuestError> {
        let v =
            serde_json::to_value(&probe).map_err(|e| GuestError::Failed(format!("probe: {e}")))?;
        self.with(limit + CALL, move |a| a.probe_once(v, limit))
            .await
    }
}

/// How long a tunnel waits for the guest's server to accept (the guest
/// gives up after 5 s itself).
const TUNNEL_CONNECT: Duration = Duration::from_secs(15);

/// A writer that refuses to grow past its bound (guest data is hostile).
struct Bounded<'a>(&'a mut Vec<u8>, usize);

impl std::io::Write for Bounded<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > self.1 {
            return Err(std::io::Error::other(format!("more than {} bytes", self.1)));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The upload engine's file operations on an agent connection, as one user.
struct AgentFiles {
    agent: AgentClient,
    user: Option<String>,
    limit: Duration,
}

/// An agent failure as an I/O error of its kind (the engine tells a
/// missing path from other failures).
fn io_error(e: VmError) -> std::io::Error {
    use std::io::ErrorKind as K;
    let kind = match &e {
        VmError::Guest { code, .. } => match code {
            ErrorCode::NotFound => K::NotFound,
            ErrorCode::PermissionDenied => K::PermissionDenied,
            ErrorCode::AlreadyExists => K::AlreadyExists,
            ErrorCode::NotADirectory => K::NotADirectory,
            ErrorCode::IsADirectory => K::IsADirectory,
            ErrorCode::DirectoryNotEmpty => K::DirectoryNotEmpty,
            _ => K::Other,
        },
        _ => K::Other,
    };
    let message = match e {
        VmError::Guest { message, .. } => message,
        e => e.to_string(),
    };
    std::io::Error::new(kind, message)
}

impl GuestFiles for AgentFiles {
    fn write_at(&self, path: &str, offset: u64, data: &[u8], mode: u32) -> std::io::Result<()> {
        let op = nullspace_model::agent::Op::WriteFile(WriteFileSpec {
            path: path.to_string(),
            data: data.to_vec(),
            offset: Some(offset),
            truncate: offset == 0,
            mode: Some(mode),
            exact_mode: false,
            parents: false,
            user: self.user.clone(),
        });
        self.agent
            .call(op, self.limit)
            .map(|_| ())
            .map_err(io_error)
    }

    fn make_dir(&self, path: &str, mode: u32, parents: bool) -> std::io::Result<()> {
        self.agent
            .make_dir(path, Some(mode), parents, self.user.as_deref(), self.limit)
            .map(|_| ())
            .map_err(io_error)
    }

    fn chmod(&self, path: &str, mode: u32) -> std::io::Result<()> {
        self.agent
            .chmod(path, mode, self.user.as_deref(), self.limit)
            .map_err(io_error)
    }

    /// The agent has no symlink call: `ln -s` without a shell.
    fn symlink(&self, target: &str, path: &str) -> std::io::Result<()> {
        let req = ExecRequest {
            argv: ["ln", "-s", "--", target, path].map(String::from).to_vec(),
            user: self.user.clone(),
            timeout: Some(self.limit),
            ..Default::default()
        };
        let out = self.agent.exec(&req, self.limit).map_err(io_error)?;
        if out.success() {
            return Ok(());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        let kind = if err.contains("File exists") {
            std::io::ErrorKind::AlreadyExists
        } else {
            std::io::ErrorKind::Other
        };
        Err(std::io::Error::new(kind, format!("ln -s: {}", err.trim())))
    }

    fn rename(&self, from: &str, to: &str) -> std::io::Result<()> {
        self.agent
            .rename(from, to, self.user.as_deref(), self.limit)
            .map(|_| ())
            .map_err(io_error)
    }

    fn remove(&self, path: &str, recursive: bool) -> std::io::Result<()> {
        self.agent
            .remove(path, recursive, self.user.as_deref(), self.limit)
            .map_err(io_error)
    }

    fn kind(&self, path: &str) -> std::io::Result<Option<EntryKind>> {
        match self.agent.stat(path, self.user.as_deref(), self.limit) {
            Ok(i) if i.symlink_target.is_some() => Ok(Some(EntryKind::Symlink)),
            Ok(i) => Ok(Some(match i.kind {
                FileKind::Dir => EntryKind::Dir,
                FileKind::File => EntryKind::File,
                FileKind::Symlink => EntryKind::Symlink,
                FileKind::Other => EntryKind::Other,
            })),
            Err(e) => match io_error(e) {
                e if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                e => Err(e),
            },
        }
    }
}
