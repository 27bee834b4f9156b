//! Host side of the guest agent: the protocol of [`nullspace_model::agent`]
//! over the VM's virtio-serial socket.
//!
//! One connection per [`AgentClient`] (and its clones): requests from any
//! number of threads are written to it whole, and one reader thread hands
//! each reply to the channel of the request with its id. Ids are unique in
//! the process and seeded from the clock, so after a reconnect (a restored
//! snapshot, a host restart) late replies of an old session are ignored.
//!
//! Every wait has a deadline (the `limit` of the call) and watches the
//! client's [`CancellationToken`] ([`AgentClient::with_cancel`]) at least
//! every 50 ms: a cancelled call sends `cancel` for its request (a
//! foreground exec's process group is killed in the guest) and returns
//! [`VmError::Cancelled`].
//!
//! # Memory bound
//! Everything the guest sends is hostile input. With limits `l`
//! ([`Limits`]), one client holds at most:
//! - the reader's line: `l.max_line` (1 MiB; a longer line drops the
//!   connection, failing every pending request, without being buffered)
//!   plus a 64 KiB read buffer;
//! - per pending request, its undelivered events: at most
//!   [`STREAM_WINDOW`] (512 KiB) of stream data plus one line, because the
//!   guest sends stream data only against credit the client returns as the
//!   caller consumes it (`ack`); a guest that overruns fails that request;
//! - per exec result, `l.output_cap` per stream (1 MiB; the rest is counted
//!   in [`ExecOutput::stdout_dropped`]/`stderr_dropped`, and still passed to
//!   the streaming callback);
//! - per file transfer, one chunk ([`MAX_CHUNK`], 256 KiB) and its line.
//!
//! [`Limits::memory_bound`] adds these up (about 5 MiB for one exec with the
//! defaults); `tests/agent.rs` checks the host's peak RSS during an exec
//! that prints 2 GB against it.

mod pty;
mod search;
mod tunnel;
mod volume;
mod watch;
pub use search::Found;
pub use tunnel::{TunnelReader, TunnelWriter};
pub use watch::WatchEnd;

use crate::VmError;
use nullspace_model::agent::{
    self as proto, AgentInfo, ErrorCode, Event, ExecSpec, ExitStatus, FileInfo, MAX_CHUNK,
    MAX_LINE, Op, OutputEnd, PROTOCOL_VERSION, ProbeSpec, ProcessInfo, Reply, Request,
    STREAM_WINDOW, StartSpec, WriteFileSpec,
};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often a wait checks for cancellation.
const CANCEL_POLL: Duration = Duration::from_millis(50);
/// A blocked write to the socket (the guest stopped reading) fails after this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// `read_file` (whole file into memory) refuses larger files.
pub const READ_FILE_MAX: u64 = 32 << 20;

/// Bounds of one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest reply line accepted (newline included).
    pub max_line: usize,
    /// Bytes of each output stream an [`ExecOutput`] keeps (default, a
    /// request may ask for another with [`ExecRequest::output_cap`]).
    pub output_cap: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line: MAX_LINE,
            output_cap: 1 << 20,
        }
    }
}

impl Limits {
    /// Most bytes of guest data the client holds with `requests` requests
    /// in flight, each an exec with the default output cap (see the module doc).
    pub fn memory_bound(&self, requests: usize) -> usize {
        let reader = self.max_line + (64 << 10);
        let per_request = STREAM_WINDOW + self.max_line + 2 * self.output_cap;
        reader + requests * per_request
    }
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    /// Run `argv` directly, or (when empty) `cmd` under `/bin/sh -c`.
    pub argv: Vec<String>,
    pub cmd: Option<String>,
    /// Over the runtime defaults (the template's env; create-time envs of
    /// a machine go here).
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    /// Sent inline when small, else streamed in chunks; stdin is closed after.
    pub stdin: Option<Vec<u8>>,
    /// Keep stdin open for [`AgentClient::write_stdin`] (a background
    /// process the client feeds later); else it is /dev/null or closed
    /// after `stdin`.
    pub keep_stdin_open: bool,
    /// Killed (process group) after this long in the guest.
    pub timeout: Option<Duration>,
    /// Bytes kept per stream in the [`ExecOutput`] (default
    /// [`Limits::output_cap`]).
    pub output_cap: Option<usize>,
}

impl ExecRequest {
    pub fn shell(cmd: &str) -> Self {
        ExecRequest {
            cmd: Some(cmd.to_string()),
            ..Default::default()
        }
    }

    fn spec(&self) -> Result<ExecSpec, VmError> {
        if self.argv.is_empty() && self.cmd.is_none() {
            return Err(VmError::Agent("exec: no argv or cmd".into()));
        }
        let inline = self.stdin.as_ref().filter(|s| s.len() <= MAX_CHUNK);
        Ok(ExecSpec {
            argv: self.argv.clone(),
            cmd: if self.argv.is_empty() {
                self.cmd.clone()
            } else {
                None
            },
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            user: self.user.clone(),
            stdin: inline.cloned(),
            stdin_open: self.keep_stdin_open || (self.stdin.is_some() && inline.is_none()),
            timeout_ms: self.timeout.map(|t| t.as_millis() as u64),
            background: false,
            ring_bytes: None,
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecOutput {
    pub pid: Option<u32>,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// At most the output cap of each stream (the first bytes).
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Some output went beyond the cap (see the dropped counts).
    pub truncated: bool,
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
}

impl ExecOutput {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).to_string()
    }
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// A background process's buffered output (`output` op).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub running: bool,
    pub exit: Option<ExitStatus>,
    /// Bytes that left the guest's ring buffers before this read.
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
}

/// Options of a file write.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// Mode of a created file (default 0644 less the umask).
    pub mode: Option<u32>,
    /// chmod to exactly `mode` afterwards (not reduced by the umask).
    pub exact_mode: bool,
    /// Create missing parent directories.
    pub parents: bool,
    /// As this user (default: the runtime default user).
    pub user: Option<String>,
}

struct Slot {
    tx: Sender<Event>,
    /// Stream bytes delivered to the channel and not yet consumed.
    queued: Arc<AtomicUsize>,
    /// Events without stream data received (a request has two at most:
    /// `started` and its final event).
    others: usize,
}

/// More events without stream data than this for one request is a guest
/// flooding the host.
const MAX_OTHER_EVENTS: usize = 8;

/// State shared with the reader thread.
struct Shared {
    pending: Mutex<HashMap<u64, Slot>>,
    /// Why the connection is gone.
    closed: Mutex<Option<String>>,
    hello_id: u64,
    /// The guest's agent version, from its `hello`.
    agent: OnceLock<String>,
}

impl Shared {
    fn close(&self, why: String) {
        let mut c = self.closed.lock().unwrap();
        if c.is_none() {
            *c = Some(why);
        }
        drop(c);
        // Dropping the senders wakes every waiter with the reason above.
        self.pending.lock().unwrap().clear();
    }

    fn closed_reason(&self) -> Option<String> {
        self.closed.lock().unwrap().clone()
    }
}

struct Conn {
    path: PathBuf,
    limits: Limits,
    writer: Mutex<UnixStream>,
    shared: Arc<Shared>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Ends the reader thread (its read returns 0).
        if let Ok(w) = self.writer.lock() {
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A connection to one VM's guest agent; clones share it (`Send + Sync`,
/// cheap to clone) and may carry their own cancellation token.
#[derive(Clone)]
pub struct AgentClient {
    conn: Arc<Conn>,
    cancel: CancellationToken,
}

fn next_id() -> u64 {
    static NEXT: OnceLock<AtomicU64> = OnceLock::new();
    NEXT.get_or_init(|| {
        // Microseconds since the epoch: larger than any id an earlier
        // process used, and exact in a JSON double.
        let us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        AtomicU64::new(us)
    })
    .fetch_add(1, Ordering::SeqCst)
}

#[doc(hidden)]
#[derive(Debug, PartialEq, Eq)]
pub enum LineRead {
    Line,
    Eof,
    TooLong,
}

/// Reads one line (without its newline) into `line`, never holding more
/// than `max` bytes. Public for the fuzz target `agent_host`.
#[doc(hidden)]
pub fn read_line_bounded(
    r: &mut impl BufRead,
    line: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<LineRead> {
    line.clear();
    loop {
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(LineRead::Eof);
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (buf.len(), false),
        };
        if line.len() + take + usize::from(done) > max {
            return Ok(LineRead::TooLong);
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take + usize::from(done));
        if done {
            return Ok(LineRead::Line);
        }
    }
}

/// The id of a reply line that begins `{"id":<digits>`.
#[doc(hidden)]
pub fn leading_id(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(b"{\"id\":")?;
    let n = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..n]).ok()?.parse().ok()
}

/// What one line from the guest is.
#[doc(hidden)]
#[derive(Debug)]
pub enum Decoded {
    Reply(Reply),
    /// It names a request, but is no reply we can read.
    Unreadable {
        id: u64,
        error: String,
    },
    /// Not ours (resync garbage): skipped.
    Garbage,
}

/// Reads one reply line. Public for the fuzz target `agent_host`.
#[doc(hidden)]
pub fn decode_reply(line: &[u8]) -> Decoded {
    match serde_json::from_slice::<Reply>(line) {
        Ok(r) => Decoded::Reply(r),
        Err(e) => {
            #[derive(serde::Deserialize)]
            struct Head {
                id: u64,
            }
            // A reply too deep for the parser still names its request
            // first (as the agent writes it): fail that request now
            // rather than at its deadline.
            match serde_json::from_slice::<Head>(line)
                .map(|h| h.id)
                .ok()
                .or_else(|| leading_id(line))
            {
                Some(id) => Decoded::Unreadable {
                    id,
                    error: e.to_string(),
                },
                None => Decoded::Garbage,
            }
        }
    }
}

fn reader(sock: UnixStream, shared: Arc<Shared>, max_line: usize) {
    let mut r = BufReader::with_capacity(64 << 10, sock);
    let mut line = Vec::new();
    // Undelivered stream bytes a request may have queued.
    let overrun = STREAM_WINDOW + max_line;
    loop {
        match read_line_bounded(&mut r, &mut line, max_line) {
            Ok(LineRead::Line) => {}
            Ok(LineRead::Eof) => return shared.close("the guest agent connection closed".into()),
            Ok(LineRead::TooLong) => {
                let _ = r.get_ref().shutdown(std::net::Shutdown::Both);
                return shared.close(format!(
                    "the guest agent sent a line longer than {max_line} bytes; connection dropped"
                ));
            }
            Err(e) => return shared.close(format!("reading from the guest agent: {e}")),
        }
        let reply = match decode_reply(&line) {
            Decoded::Reply(r) => r,
            Decoded::Garbage => continue, // not ours (resync garbage)
            Decoded::Unreadable { id, error } => {
                let text = String::from_utf8_lossy(&line[..line.len().min(300)]).to_string();
                if id == shared.hello_id {
                    let _ = r.get_ref().shutdown(std::net::Shutdown::Both);
                    return shared.close(format!(
                        "the guest agent does not speak protocol {PROTOCOL_VERSION} \
                         (an older template? rebuild it); it answered: {text}"
                    ));
                }
                Reply {
                    id,
                    event: Event::error(
                        ErrorCode::Other,
                        format!("unexpected reply from the guest agent ({error}): {text}"),
                    ),
                }
            }
        };
        if reply.id == shared.hello_id {
            match &reply.event {
                Event::Hello { protocol, agent } if *protocol == PROTOCOL_VERSION => {
                    // Kept for logs: a version, not a megabyte.
                    let _ = shared
                        .agent
                        .set(agent[..agent.floor_char_boundary(64)].to_string());
                }
                other => {
                    let _ = r.get_ref().shutdown(std::net::Shutdown::Both);
                    return shared.close(format!(
                        "the guest agent does not speak protocol {PROTOCOL_VERSION} \
                         (an older template? rebuild it): {}",
                        clipped_debug(other)
                    ));
                }
            }
            continue;
        }
        let mut pending = shared.pending.lock().unwrap();
        let Some(slot) = pending.get_mut(&reply.id) else {
            continue; // a finished, cancelled or old-session request
        };
        let n = reply.event.stream_bytes();
        if n == 0 {
            slot.others += 1;
        }
        if slot.queued.load(Ordering::SeqCst) + n > overrun || slot.others > MAX_OTHER_EVENTS {
            // The guest ignored the flow-control window.
            let slot = pending.remove(&reply.id);
            if let Some(s) = slot {
                let _ = s.tx.send(Event::error(
                    ErrorCode::Other,
                    "the guest agent overran the request's flow-control window; request dropped",
                ));
            }
            continue;
        }
        slot.queued.fetch_add(n, Ordering::SeqCst);
        let _ = slot.tx.send(reply.event);
    }
}

/// One request in flight: its events, its credit, its cancellation.
struct Call {
    client: AgentClient,
    id: u64,
    op: &'static str,
    rx: Receiver<Event>,
    queued: Arc<AtomicUsize>,
    /// Bytes of the event last returned (consumed by the next `next`).
    last: usize,
    /// Consumed bytes not yet acknowledged.
    unacked: usize,
    done: bool,
}

impl Call {
    /// The next event before `deadline`. Consuming the previous one
    /// returns its stream credit: in batches, and always before blocking
    /// (so a guest waiting for credit is never left waiting).
    fn next(&mut self, deadline: Instant) -> Result<Event, VmError> {
        if self.last > 0 {
            self.queued.fetch_sub(self.last, Ordering::SeqCst);
            self.unacked += self.last;
            self.last = 0;
        }
        if self.unacked >= STREAM_WINDOW / 4 {
            self.ack()?;
        }
        let mut ev = self.rx.try_recv().ok();
        loop {
            if self.client.cancel.is_cancelled() {
                return Err(VmError::Cancelled);
            }
            if let Some(ev) = ev.take() {
                self.last = ev.stream_bytes();
                if ev.is_final() {
                    self.done = true;
                }
                return Ok(ev);
            }
            if self.unacked > 0 {
                self.ack()?;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(VmError::Agent(format!(
                    "{}: timed out waiting for the guest agent",
                    self.op
                )));
            }
            match self.rx.recv_timeout(left.min(CANCEL_POLL)) {
                Ok(e) => ev = Some(e),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.done = true;
                    return Err(VmError::Agent(format!(
                        "{}: {}",
                        self.op,
                        self.client
                            .conn
                            .shared
                            .closed_reason()
                            .unwrap_or_else(|| "the guest agent connection closed".into())
                    )));
                }
            }
        }
    }

    fn ack(&mut self) -> Result<(), VmError> {
        let bytes = std::mem::take(&mut self.unacked) as u64;
        self.client.notify(Op::Ack {
            target: self.id,
            bytes,
        })
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.client
            .conn
            .shared
            .pending
            .lock()
            .unwrap()
            .remove(&self.id);
        if !self.done {
            // Cancelled, timed out or abandoned: the guest stops serving it.
            let _ = self.client.notify(Op::Cancel { target: self.id });
        }
    }
}

/// Most bytes of guest text an error carries: the guest is hostile, and
/// its words end up in one-line API errors and logs.
const ERROR_TEXT_MAX: usize = 1024;

/// A guest error event as a [`VmError`] (its message clipped, marked `…`).
fn guest_error(op: &str, code: ErrorCode, mut message: String) -> VmError {
    if message.len() > ERROR_TEXT_MAX {
        message.truncate(message.floor_char_boundary(ERROR_TEXT_MAX));
        message.push('…');
    }
    if message.contains(['\n', '\r']) {
        message = message.replace(['\n', '\r'], " ");
    }
    VmError::Guest {
        op: op.to_string(),
        code,
        message,
    }
}

/// `Debug` of a guest event, stopped at [`ERROR_TEXT_MAX`] bytes (an
/// event may carry a 256 KiB chunk: it is never formatted whole).
fn clipped_debug(ev: &Event) -> String {
    struct Upto(String);
    impl std::fmt::Write for Upto {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            let room = ERROR_TEXT_MAX.saturating_sub(self.0.len());
            if s.len() > room {
                self.0.push_str(&s[..s.floor_char_boundary(room)]);
                self.0.push('…');
                return Err(std::fmt::Error);
            }
            self.0.push_str(s);
            Ok(())
        }
    }
    let mut w = Upto(String::new());
    let _ = std::fmt::write(&mut w, format_args!("{ev:?}"));
    w.0
}

fn unexpected(op: &str, ev: Event) -> VmError {
    match ev {
        Event::Error { code, message } => guest_error(op, code, message),
        other => VmError::Agent(format!("{op}: unexpected reply {}", clipped_debug(&other))),
    }
}

impl AgentClient {
    /// Connects to the VM's agent socket (QEMU is the server), retrying
    /// until `limit`, and opens a session (`hello`). The guest's answer is
    /// checked when it arrives: a guest with another protocol version fails
    /// the first call with a clear message.
    pub fn connect(path: &Path, limit: Duration) -> Result<AgentClient, VmError> {
        AgentClient::connect_with(path, limit, Limits::default())
    }

    pub fn connect_with(
        path: &Path,
        limit: Duration,
        limits: Limits,
    ) -> Result<AgentClient, VmError> {
        let t = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if t.elapsed() > limit => {
                    return Err(VmError::Agent(format!("connect {}: {e}", path.display())));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        s.set_write_timeout(Some(WRITE_TIMEOUT))
            .map_err(VmError::io("agent socket"))?;
        let rd = s.try_clone().map_err(VmError::io("agent socket"))?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            closed: Mutex::new(None),
            hello_id: next_id(),
            agent: OnceLock::new(),
        });
        let sh = shared.clone();
        let max_line = limits.max_line;
        std::thread::Builder::new()
            .name("ns-agent-reader".into())
            .spawn(move || reader(rd, sh, max_line))
            .map_err(VmError::io("agent reader thread"))?;
        let client = AgentClient {
            conn: Arc::new(Conn {
                path: path.to_path_buf(),
                limits,
                writer: Mutex::new(s),
                shared,
            }),
            cancel: CancellationToken::new(),
        };
        client.write(&Request {
            id: client.conn.shared.hello_id,
            op: Op::Hello {
                protocol: PROTOCOL_VERSION,
            },
        })?;
        Ok(client)
    }

    /// A clone whose calls watch `token` (same connection).
    pub fn with_cancel(&self, token: CancellationToken) -> AgentClient {
        AgentClient {
            conn: self.conn.clone(),
            cancel: token,
        }
    }

    pub fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }

    pub fn limits(&self) -> Limits {
        self.conn.limits
    }

    pub fn socket_path(&self) -> &Path {
        &self.conn.path
    }

    /// Why the connection is gone, if it is.
    pub fn closed(&self) -> Option<String> {
        self.conn.shared.closed_reason()
    }

    /// The guest agent's version, once its `hello` arrived.
    pub fn agent_version(&self) -> Option<String> {
        self.conn.shared.agent.get().cloned()
    }

    /// Sleeps `d`, returning early with `Cancelled`.
    pub fn sleep(&self, d: Duration) -> Result<(), VmError> {
        let end = Instant::now() + d;
        loop {
            if self.cancel.is_cancelled() {
                return Err(VmError::Cancelled);
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            std::thread::sleep(left.min(CANCEL_POLL));
        }
    }

    fn write(&self, req: &Request) -> Result<(), VmError> {
        let line = proto::to_line(req);
        if line.len() > MAX_LINE {
            return Err(VmError::Agent(format!(
                "{}: request of {} bytes exceeds the agent's {MAX_LINE}-byte line limit",
                req.op.name(),
                line.len()
            )));
        }
        if let Some(why) = self.closed() {
            return Err(VmError::Agent(format!("{}: {why}", req.op.name())));
        }
        let mut w = self.conn.writer.lock().unwrap();
        w.write_all(&line).map_err(|e| {
            let why = format!("writing to the guest agent: {e}");
            let _ = w.shutdown(std::net::Shutdown::Both);
            self.conn.shared.close(why.clone());
            VmError::Agent(format!("{}: {why}", req.op.name()))
        })
    }

    /// Sends an op without a reply (`ack`, `cancel`).
    fn notify(&self, op: Op) -> Result<(), VmError> {
        self.write(&Request { id: next_id(), op })
    }

    /// Sends a request; its events arrive on the returned call.
    fn start_call(&self, op: Op) -> Result<Call, VmError> {
        if self.cancel.is_cancelled() {
            return Err(VmError::Cancelled);
        }
        let id = next_id();
        let (tx, rx) = channel();
        let queued = Arc::new(AtomicUsize::new(0));
        self.conn.shared.pending.lock().unwrap().insert(
            id,
            Slot {
                tx,
                queued: queued.clone(),
                others: 0,
            },
        );
        let name = op.name();
        let call = Call {
            client: self.clone(),
            id,
            op: name,
            rx,
            queued,
            last: 0,
            unacked: 0,
            done: false,
        };
        self.write(&Request { id, op })?;
        // The reader may have closed the connection before the slot was
        // registered: fail now rather than wait for the deadline.
        if let Some(why) = self.closed() {
            return Err(VmError::Agent(format!("{name}: {why}")));
        }
        Ok(call)
    }

    /// A request with one reply event (an `error` reply is `VmError::Guest`).
    pub fn call(&self, op: Op, limit: Duration) -> Result<Event, VmError> {
        let deadline = Instant::now() + limit;
        let mut c = self.start_call(op)?;
        let op = c.op;
        match c.next(deadline)? {
            Event::Error { code, message } => Err(guest_error(op, code, message)),
            ev => Ok(ev),
        }
    }

    pub fn ping(&self, limit: Duration) -> Result<(), VmError> {
        match self.call(Op::Ping, limit)? {
            Event::Pong => Ok(()),
            ev => Err(unexpected("ping", ev)),
        }
    }

    /// The guest's state: [`AgentInfo`].
    pub fn agent_info(&self, limit: Duration) -> Result<AgentInfo, VmError> {
        match self.call(Op::Info, limit)? {
            Event::Info(i) => Ok(i),
            ev => Err(unexpected("info", ev)),
        }
    }

    /// [`AgentClient::agent_info`] as JSON: `{protocol, start: {configured,
    /// pid, started_unix_ms, running, exit_code, signal, spawn_error,
    /// output}, uptime_ms, hostname}`.
    pub fn info(&self, limit: Duration) -> Result<Value, VmError> {
        let i = self.agent_info(limit)?;
        serde_json::to_value(i).map_err(|e| VmError::Agent(format!("info: {e}")))
    }

    /// Runs a command, calling `on_output` for each chunk as it streams
    /// (every chunk, also beyond the output cap). The process is killed if
    /// the call times out, is cancelled, or `on_output` panics.
    pub fn exec_streaming(
        &self,
        req: &ExecRequest,
        limit: Duration,
        on_output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutput, VmError> {
        let deadline = Instant::now() + limit;
        let spec = req.spec()?;
        let feed = spec.stdin_open.then(|| req.stdin.clone()).flatten();
        let cap = req.output_cap.unwrap_or(self.conn.limits.output_cap);
        let mut c = self.start_call(Op::Exec(spec))?;
        let mut out = ExecOutput::default();
        let mut feeder = None;
        let keep = |buf: &mut Vec<u8>, dropped: &mut u64, d: &[u8]| {
            let room = cap.saturating_sub(buf.len()).min(d.len());
            buf.extend_from_slice(&d[..room]);
            *dropped += (d.len() - room) as u64;
        };
        loop {
            match c.next(deadline)? {
                Event::Started { pid } => {
                    out.pid = Some(pid);
                    if let Some(data) = feed.clone() {
                        // Written from a thread of its own: the process may
                        // need its output read before it reads more input.
                        let token = self.cancel.child_token();
                        let client = self.with_cancel(token.clone());
                        let t = std::thread::spawn(move || {
                            let _ = client.write_stdin(pid, &data, true, limit);
                        });
                        feeder = Some((t, token.drop_guard()));
                    }
                }
                Event::Stdout { data } => {
                    on_output(Stream::Stdout, &data);
                    keep(&mut out.stdout, &mut out.stdout_dropped, &data);
                }
                Event::Stderr { data } => {
                    on_output(Stream::Stderr, &data);
                    keep(&mut out.stderr, &mut out.stderr_dropped, &data);
                }
                Event::Exit(st) => {
                    out.code = st.code;
                    out.signal = st.signal;
                    out.timed_out = st.timed_out;
                    out.truncated = out.stdout_dropped + out.stderr_dropped > 0;
                    if let Some((t, guard)) = feeder.take() {
                        // Stops waiting for a write that a stdin held open
                        // by a leftover child would never finish (also on
                        // an early return, when the guard drops).
                        drop(guard);
                        let _ = t.join();
                    }
                    return Ok(out);
                }
                ev => return Err(unexpected("exec", ev)),
            }
        }
    }

    pub fn exec(&self, req: &ExecRequest, limit: Duration) -> Result<ExecOutput, VmError> {
        self.exec_streaming(req, limit, &mut |_, _| {})
    }

    /// `sh -c cmd` with the template's defaults.
    pub fn sh(&self, cmd: &str, limit: Duration) -> Result<ExecOutput, VmError> {
        self.exec(&ExecRequest::shell(cmd), limit)
    }

    /// Starts a background process and returns its pid at once; its output
    /// goes to ring buffers of `ring_bytes` per stream in the guest (see
    /// [`AgentClient::process_output`], [`AgentClient::attach`]). `stdin`
    /// of the request is written, then closed.
    pub fn exec_background(
        &self,
        req: &ExecRequest,
        ring_bytes: Option<u64>,
        limit: Duration,
    ) -> Result<u32, VmError> {
        let mut spec = req.spec()?;
        spec.background = true;
        spec.ring_bytes = ring_bytes;
        let feed = spec.stdin_open.then(|| req.stdin.clone()).flatten();
        let pid = match self.call(Op::Exec(spec), limit)? {
            Event::Spawned { pid: Some(pid) } => pid,
            ev => return Err(unexpected("exec", ev)),
        };
        if let Some(data) = feed {
            let client = self.clone();
            std::thread::spawn(move || {
                let _ = client.write_stdin(pid, &data, true, limit);
            });
        }
        Ok(pid)
    }

    /// The processes the agent started (and the start command).
    pub fn processes(&self, limit: Duration) -> Result<Vec<ProcessInfo>, VmError> {
        match self.call(Op::Processes, limit)? {
            Event::Processes { processes } => Ok(processes),
            ev => Err(unexpected("processes", ev)),
        }
    }

    /// What a background process's ring buffers hold, and its status.
    pub fn process_output(&self, pid: u32, limit: Duration) -> Result<ProcessOutput, VmError> {
        let deadline = Instant::now() + limit;
        let cap = (proto::MAX_RING_BYTES as usize).max(self.conn.limits.output_cap);
        let mut c = self.start_call(Op::Output { pid })?;
        let mut out = ProcessOutput::default();
        loop {
            match c.next(deadline)? {
                Event::Stdout { data } => {
                    let room = cap.saturating_sub(out.stdout.len()).min(data.len());
                    out.stdout.extend_from_slice(&data[..room]);
                    out.stdout_dropped += (data.len() - room) as u64;
                }
                Event::Stderr { data } => {
                    let room = cap.saturating_sub(out.stderr.len()).min(data.len());
                    out.stderr.extend_from_slice(&data[..room]);
                    out.stderr_dropped += (data.len() - room) as u64;
                }
                Event::OutputEnd(OutputEnd {
                    running,
                    exit,
                    stdout_dropped,
                    stderr_dropped,
                }) => {
                    out.running = running;
                    out.exit = exit;
                    out.stdout_dropped += stdout_dropped;
                    out.stderr_dropped += stderr_dropped;
                    return Ok(out);
                }
                ev => return Err(unexpected("output", ev)),
            }
        }
    }

    /// Streams a tracked process's further output (with `replay`, first
    /// what its ring buffers hold) to `on_output` until it exits; returns
    /// its exit status (`dropped`: bytes this reader missed by falling
    /// behind). Cancelling detaches; the process goes on.
    pub fn attach(
        &self,
        pid: u32,
        replay: bool,
        limit: Duration,
        on_output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExitStatus, VmError> {
        let deadline = Instant::now() + limit;
        let mut c = self.start_call(Op::Attach { pid, replay })?;
        loop {
            match c.next(deadline)? {
                Event::Started { .. } => {}
                Event::Stdout { data } => on_output(Stream::Stdout, &data),
                Event::Stderr { data } => on_output(Stream::Stderr, &data),
                Event::Exit(st) => return Ok(st),
                ev => return Err(unexpected("attach", ev)),
            }
        }
    }

    /// Signals a process the agent started (`group`: its process group).
    pub fn kill(&self, pid: u32, signal: i32, group: bool, limit: Duration) -> Result<(), VmError> {
        match self.call(Op::Kill { pid, signal, group }, limit)? {
            Event::Ok => Ok(()),
            ev => Err(unexpected("kill", ev)),
        }
    }

    /// Writes to the stdin of a process started with stdin kept open
    /// (in chunks); `eof` closes it after.
    pub fn write_stdin(
        &self,
        pid: u32,
        data: &[u8],
        eof: bool,
        limit: Duration,
    ) -> Result<(), VmError> {
        let deadline = Instant::now() + limit;
        let mut chunks: Vec<&[u8]> = data.chunks(MAX_CHUNK).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            let op = Op::WriteStdin {
                pid,
                data: chunk.to_vec(),
                eof: eof && i == last,
            };
            match self.call(op, left)? {
                Event::Written { .. } => {}
                ev => return Err(unexpected("write_stdin", ev)),
            }
        }
        Ok(())
    }

    /// Metadata of a guest path, as `user` (default: the runtime user).
    pub fn stat(
        &self,
        path: &str,
        user: Option<&str>,
        limit: Duration,
    ) -> Result<FileInfo, VmError> {
        let op = Op::Stat {
            path: path.to_string(),
            user: user.map(str::to_string),
        };
        match self.call(op, limit)? {
            Event::File { info } => Ok(info),
            ev => Err(unexpected("stat", ev)),
        }
    }

    /// Entries under a directory down to `depth` levels, parents first;
    /// `true` when `max_entries` cut the list short.
    pub fn list_dir(
        &self,
        path: &str,
        depth: u32,
        user: Option<&str>,
        max_entries: Option<u32>,
        limit: Duration,
    ) -> Result<(Vec<FileInfo>, bool), VmError> {
        let deadline = Instant::now() + limit;
        let mut c = self.start_call(Op::ListDir {
            path: path.to_string(),
            depth,
            user: user.map(str::to_string),
            max_entries,
        })?;
        let mut all = Vec::new();
        loop {
            match c.next(deadline)? {
                Event::Entries { entries } => {
                    if all.len() + entries.len() > proto::MAX_ENTRIES as usize {
                        return Err(VmError::Agent(format!(
                            "list_dir {path}: the guest sent more than {} entries",
                            proto::MAX_ENTRIES
                        )));
                    }
                    all.extend(entries)
                }
                Event::ListEnd { truncated } => return Ok((all, truncated)),
                ev => return Err(unexpected("list_dir", ev)),
            }
        }
    }

    /// At most `length` (≤ [`MAX_CHUNK`]) bytes from `offset`: `(data,
    /// file size, eof)`.
    pub fn read_file_chunk(
        &self,
        path: &str,
        offset: u64,
        length: usize,
        user: Option<&str>,
        limit: Duration,
    ) -> Result<(Vec<u8>, u64, bool), VmError> {
        let op = Op::ReadFile {
            path: path.to_string(),
            offset,
            length: length.min(MAX_CHUNK) as u64,
            user: user.map(str::to_string),
        };
        match self.call(op, limit)? {
            Event::Data { data, size, eof } => Ok((data, size, eof)),
            ev => Err(unexpected("read_file", ev)),
        }
    }

    /// Copies a guest file into `out` in chunks; returns the bytes copied.
    pub fn read_file_to(
        &self,
        path: &str,
        user: Option<&str>,
        out: &mut dyn Write,
        limit: Duration,
    ) -> Result<u64, VmError> {
        let deadline = Instant::now() + limit;
        let mut off = 0u64;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (data, _, eof) = self.read_file_chunk(path, off, MAX_CHUNK, user, left)?;
            out.write_all(&data)
                .map_err(VmError::io(format!("copying guest {path}")))?;
            off += data.len() as u64;
            if eof || data.is_empty() {
                return Ok(off);
            }
        }
    }

    /// A whole guest file (as root), at most [`READ_FILE_MAX`] bytes.
    pub fn read_file(&self, path: &str, limit: Duration) -> Result<Vec<u8>, VmError> {
        let deadline = Instant::now() + limit;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (data, size, eof) =
                self.read_file_chunk(path, out.len() as u64, MAX_CHUNK, Some("root"), left)?;
            if size > READ_FILE_MAX {
                return Err(VmError::Agent(format!(
                    "read_file {path}: {size} bytes, more than {READ_FILE_MAX}"
                )));
            }
            out.extend_from_slice(&data);
            if eof || data.is_empty() {
                return Ok(out);
            }
        }
    }

    /// Writes everything `src` yields to a guest file in chunks (replacing
    /// it); returns the bytes written. Memory: one chunk.
    pub fn write_file_from(
        &self,
        path: &str,
        src: &mut dyn Read,
        opts: &WriteOptions,
        limit: Duration,
    ) -> Result<u64, VmError> {
        let deadline = Instant::now() + limit;
        let mut buf = vec![0u8; MAX_CHUNK];
        let mut off = 0u64;
        // With an exact mode, the file stays owner-writable while chunks
        // arrive and gets its mode at the end.
        let create_mode = match (opts.mode, opts.exact_mode) {
            (Some(m), true) => Some(m | 0o200),
            (m, _) => m,
        };
        loop {
            // Fill a whole chunk (fewer round trips), or up to EOF.
            let mut n = 0;
            while n < buf.len() {
                match src.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(VmError::io(format!("reading the source of {path}"))(e)),
                }
            }
            if n > 0 || off == 0 {
                let op = Op::WriteFile(WriteFileSpec {
                    path: path.to_string(),
                    data: buf[..n].to_vec(),
                    offset: Some(off),
                    truncate: off == 0,
                    mode: create_mode,
                    exact_mode: false,
                    parents: opts.parents && off == 0,
                    user: opts.user.clone(),
                });
                let left = deadline.saturating_duration_since(Instant::now());
                match self.call(op, left)? {
                    Event::Written { .. } => {}
                    ev => return Err(unexpected("write_file", ev)),
                }
                off += n as u64;
            }
            if n < buf.len() {
                break;
            }
        }
        if let (Some(m), true) = (opts.mode, opts.exact_mode) {
            let left = deadline.saturating_duration_since(Instant::now());
            self.chmod(path, m & 0o7777, opts.user.as_deref(), left)?;
        }
        Ok(off)
    }

    /// Writes `data` to a guest file as root (replacing it; parents created).
    pub fn write_file(
        &self,
        path: &str,
        data: &[u8],
        mode: u32,
        limit: Duration,
    ) -> Result<(), VmError> {
        let opts = WriteOptions {
            mode: Some(mode),
            parents: true,
            user: Some("root".into()),
            ..Default::default()
        };
        self.write_file_from(path, &mut &data[..], &opts, limit)
            .map(|_| ())
    }

    /// Like [`AgentClient::write_file`], then sets exactly `mode` (not
    /// reduced by the guest umask).
    pub fn write_file_exact(
        &self,
        path: &str,
        data: &[u8],
        mode: u32,
        limit: Duration,
    ) -> Result<(), VmError> {
        self.copy_to_guest(&mut &data[..], path, mode, limit)
            .map(|_| ())
    }

    /// Streams `src` into a guest file as root with exactly `mode` (the
    /// build's `Copy` step): memory is one chunk, whatever the size.
    pub fn copy_to_guest(
        &self,
        src: &mut dyn Read,
        path: &str,
        mode: u32,
        limit: Duration,
    ) -> Result<u64, VmError> {
        let opts = WriteOptions {
            mode: Some(mode),
            exact_mode: true,
            parents: true,
            user: Some("root".into()),
        };
        self.write_file_from(path, src, &opts, limit)
    }

    /// `mkdir` (`parents`: `-p`); false when it already existed.
    pub fn make_dir(
        &self,
        path: &str,
        mode: Option<u32>,
        parents: bool,
        user: Option<&str>,
        limit: Duration,
    ) -> Result<bool, VmError> {
        let op = Op::MakeDir {
            path: path.to_string(),
            mode,
            parents,
            user: user.map(str::to_string),
        };
        match self.call(op, limit)? {
            Event::Made { created } => Ok(created),
            ev => Err(unexpected("make_dir", ev)),
        }
    }

    pub fn remove(
        &self,
        path: &str,
        recursive: bool,
        user: Option<&str>,
        limit: Duration,
    ) -> Result<(), VmError> {
        let op = Op::Remove {
            path: path.to_string(),
            recursive,
            user: user.map(str::to_string),
        };
        match self.call(op, limit)? {
            Event::Ok => Ok(()),
            ev => Err(unexpected("remove", ev)),
        }
    }

    /// Renames; returns the metadata at the new path.
    pub fn rename(
        &self,
        from: &str,
        to: &str,
        user: Option<&str>,
        limit: Duration,
    ) -> Result<FileInfo, VmError> {
        let op = Op::Rename {
            from: from.to_string(),
            to: to.to_string(),
            user: user.map(str::to_string),
        };
        match self.call(op, limit)? {
            Event::File { info } => Ok(info),
            ev => Err(unexpected("rename", ev)),
        }
    }

    pub fn chmod(
        &self,
        path: &str,
        mode: u32,
        user: Option<&str>,
        limit: Duration,
    ) -> Result<(), VmError> {
        let op = Op::Chmod {
            path: path.to_string(),
            mode,
            user: user.map(str::to_string),
        };
        match self.call(op, limit)? {
            Event::Ok => Ok(()),
            ev => Err(unexpected("chmod", ev)),
        }
    }

    /// Replaces the guest's runtime defaults (env, user, workdir: used by the
    /// start command and every later exec, also in restored machines) and
    /// starts `cmd` as the supervised start command (reported by `info`).
    /// Returns its pid. For a VM booted with `GuestConfig::defer_start`.
    pub fn start(
        &self,
        cmd: Option<&str>,
        env: &BTreeMap<String, String>,
        user: Option<&str>,
        workdir: Option<&str>,
        limit: Duration,
    ) -> Result<Option<u32>, VmError> {
        let op = Op::Start(StartSpec {
            cmd: cmd.map(str::to_string),
            env: env.clone(),
            user: user.map(str::to_string),
            workdir: workdir.map(str::to_string),
        });
        match self.call(op, limit)? {
            Event::Spawned { pid } => Ok(pid),
            ev => Err(unexpected("start", ev)),
        }
    }

    /// Sets the guest's wall clock (`CLOCK_REALTIME`) to `time`. Returns the
    /// guest's previous wall clock.
    pub fn set_time(
        &self,
        time: std::time::SystemTime,
        limit: Duration,
    ) -> Result<std::time::SystemTime, VmError> {
        let ns = time
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| VmError::Agent(format!("set_time: {e}")))?
            .as_nanos() as u64;
        match self.call(Op::SetTime { unix_ns: ns }, limit)? {
            Event::Time { previous_unix_ns } => {
                Ok(std::time::UNIX_EPOCH + Duration::from_nanos(previous_unix_ns))
            }
            ev => Err(unexpected("set_time", ev)),
        }
    }

    /// Takes vCPUs and memory blocks on or offline (`resize`); returns
    /// the vCPUs and the memory (MiB, whole blocks) online afterwards.
    pub fn resize(
        &self,
        vcpus: u32,
        memory_mib: u32,
        limit: Duration,
    ) -> Result<(u32, u32), VmError> {
        match self.call(Op::Resize { vcpus, memory_mib }, limit)? {
            Event::Resized { vcpus, memory_mib } => Ok((vcpus, memory_mib)),
            ev => Err(unexpected("resize", ev)),
        }
    }

    /// Sends 64 fresh bytes from the host's CSPRNG for the guest's kernel
    /// pool (credited) and reseeds its CRNG: after a restore, clones of one
    /// snapshot must not share RNG state.
    pub fn reseed(&self, limit: Duration) -> Result<(), VmError> {
        let mut data = vec![0u8; 64];
        rand::fill(&mut data[..]);
        match self.call(Op::Reseed { data }, limit)? {
            Event::Ok => Ok(()),
            ev => Err(unexpected("reseed", ev)),
        }
    }

    /// What a restored guest needs first: [`AgentClient::set_time`] and
    /// [`AgentClient::reseed`], sent together so that they cost one round
    /// trip (the guest serves them at once, on threads of their own).
    pub fn sync_after_restore(
        &self,
        time: std::time::SystemTime,
        limit: Duration,
    ) -> Result<(), VmError> {
        let deadline = Instant::now() + limit;
        let ns = time
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| VmError::Agent(format!("set_time: {e}")))?
            .as_nanos() as u64;
        let mut data = vec![0u8; 64];
        rand::fill(&mut data[..]);
        let mut clock = self.start_call(Op::SetTime { unix_ns: ns })?;
        let mut seed = self.start_call(Op::Reseed { data })?;
        match clock.next(deadline)? {
            Event::Time { .. } => {}
            ev => return Err(unexpected("set_time", ev)),
        }
        match seed.next(deadline)? {
            Event::Ok => Ok(()),
            ev => Err(unexpected("reseed", ev)),
        }
    }

    /// One probe attempt in the guest: `(ready, detail)`. `probe` is the
    /// guest probe's JSON (`{"kind":"tcp","port":N}`, `http` with `path`,
    /// `command` with `cmd`).
    pub fn probe_once(
        &self,
        probe: Value,
        attempt_limit: Duration,
    ) -> Result<(bool, String), VmError> {
        let probe: ProbeSpec =
            serde_json::from_value(probe).map_err(|e| VmError::Agent(format!("probe: {e}")))?;
        let op = Op::Probe {
            probe,
            timeout_ms: Some(attempt_limit.as_millis() as u64),
        };
        match self.call(op, attempt_limit + Duration::from_secs(10))? {
            Event::Probe { ready, detail } => Ok((ready, detail)),
            ev => Err(unexpected("probe", ev)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_line_reader() {
        let data = b"one\ntwo\nxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\nlast".to_vec();
        let mut r = BufReader::with_capacity(4, &data[..]);
        let mut line = Vec::new();
        assert!(matches!(
            read_line_bounded(&mut r, &mut line, 16).unwrap(),
            LineRead::Line
        ));
        assert_eq!(line, b"one");
        read_line_bounded(&mut r, &mut line, 16).unwrap();
        assert_eq!(line, b"two");
        assert!(matches!(
            read_line_bounded(&mut r, &mut line, 16).unwrap(),
            LineRead::TooLong
        ));
        assert!(line.len() <= 16, "never more than the limit held");
    }

    #[test]
    fn a_reply_names_its_request_first() {
        assert_eq!(leading_id(b"{\"id\":42,\"type\":[[[["), Some(42));
        assert_eq!(leading_id(b"{\"type\":\"x\",\"id\":42}"), None);
        assert_eq!(leading_id(b"{\"id\":\"42\"}"), None);
        assert_eq!(leading_id(b"{\"id\":99999999999999999999999}"), None);
    }

    #[test]
    fn guest_words_stay_one_short_line() {
        let e = guest_error("stat", ErrorCode::Other, "a\nb\r\nc".into());
        assert_eq!(e.to_string(), "agent: stat: a b  c");
        let e = guest_error("stat", ErrorCode::Other, "é".repeat(4000));
        let m = e.to_string();
        assert!(
            m.ends_with('…') && m.len() < ERROR_TEXT_MAX + 32,
            "{}",
            m.len()
        );
        let ev = Event::Stdout {
            data: vec![b'x'; 256 << 10],
        };
        let d = clipped_debug(&ev);
        assert!(d.starts_with("Stdout { data: [120") && d.len() <= ERROR_TEXT_MAX + 3);
    }

    #[test]
    fn memory_bound_adds_up() {
        let l = Limits::default();
        let one = l.memory_bound(1);
        assert!(one > 4 << 20 && one < 6 << 20, "{one}");
        assert_eq!(l.memory_bound(2) - one, one - l.memory_bound(0));
    }

    #[test]
    fn exec_request_to_spec() {
        let mut r = ExecRequest::shell("cat");
        r.stdin = Some(vec![1; MAX_CHUNK + 1]);
        let s = r.spec().unwrap();
        assert!(s.stdin.is_none() && s.stdin_open, "large stdin is streamed");
        r.stdin = Some(b"small".to_vec());
        let s = r.spec().unwrap();
        assert_eq!(s.stdin.as_deref(), Some(&b"small"[..]));
        assert!(!s.stdin_open);
        r.argv = vec!["ls".into()];
        assert_eq!(r.spec().unwrap().cmd, None, "argv wins");
        assert!(ExecRequest::default().spec().is_err());
    }
}
