//! Processes the agent runs for the host: foreground `exec` (output
//! streamed to the request, flow-controlled), background `exec` (output
//! kept in a ring buffer per stream), the process table behind `processes`,
//! `output`, `attach`, `kill` and `write_stdin`.
//!
//! Bounds: at most [`MAX_BACKGROUND`] background processes run at once;
//! [`KEEP_EXITED`] exited ones stay listed (with their output) until newer
//! ones push them out; the ring capacities of all tracked processes add up
//! to at most [`RING_BUDGET`]; an attached reader that falls more than
//! [`SUB_BACKLOG`] behind loses chunks (counted in its `exit.dropped`), so
//! a background process never waits for the host.

use crate::agent::{Failure, Outcome, Resp, clip};
use crate::procs::{self, Exit, State};
use nullspace_model::agent::{
    DEFAULT_RING_BYTES, ErrorCode, Event, ExecSpec, ExitStatus, MAX_CHUNK, MAX_RING_BYTES,
    OUTPUT_CHUNK, OutputEnd, ProcessInfo,
};
use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::process::ChildStdin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const MAX_BACKGROUND: usize = 64;
pub const KEEP_EXITED: usize = 32;
pub const RING_BUDGET: u64 = 64 << 20;
pub const SUB_BACKLOG: usize = 1 << 20;
/// After a process exits, its pipes are read until EOF, or until nothing
/// came for this long (a background grandchild may hold them open).
const DRAIN_IDLE: Duration = Duration::from_millis(500);
/// Stack of the helper threads (pipe readers, waiters).
const HELPER_STACK: usize = 256 << 10;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Stream {
    Stdout = 0,
    Stderr = 1,
}

impl Stream {
    fn event(self, data: Vec<u8>) -> Event {
        match self {
            Stream::Stdout => Event::Stdout { data },
            Stream::Stderr => Event::Stderr { data },
        }
    }
}

/// Tracked processes by pid.
#[derive(Default)]
pub struct Table {
    procs: Mutex<BTreeMap<u32, Arc<Proc>>>,
}

pub struct Proc {
    pid: u32,
    command: String,
    background: bool,
    started_unix_ms: u64,
    st: Mutex<ProcState>,
    stdin: Mutex<Option<ChildStdin>>,
}

struct ProcState {
    exit: Option<ExitStatus>,
    /// Order of exit (for pushing out the oldest exited).
    exit_seq: u64,
    /// Both pipes drained (or given up on): attached readers end.
    output_done: bool,
    rings: [Ring; 2],
    subs: Vec<Arc<Sub>>,
}

/// The newest `cap` bytes of an output stream (also a terminal session's).
pub(crate) struct Ring {
    pub(crate) buf: VecDeque<u8>,
    cap: usize,
    pub(crate) dropped: u64,
}

impl Ring {
    pub(crate) fn new(cap: usize) -> Ring {
        Ring {
            buf: VecDeque::new(),
            cap,
            dropped: 0,
        }
    }

    pub(crate) fn push(&mut self, data: &[u8]) {
        if self.cap == 0 {
            return;
        }
        self.buf.extend(data);
        let over = self.buf.len().saturating_sub(self.cap);
        if over > 0 {
            self.buf.drain(..over);
            self.dropped += over as u64;
        }
    }
}

/// An attached reader's queue.
pub(crate) struct Sub {
    q: Mutex<SubQ>,
    cv: Condvar,
}

struct SubQ {
    chunks: VecDeque<(Stream, Vec<u8>)>,
    bytes: usize,
    cap: usize,
    dropped: u64,
    done: bool,
}

impl Sub {
    /// A queue of at most [`SUB_BACKLOG`] bytes, first holding `replay`
    /// (a ring's contents, beyond the backlog).
    pub(crate) fn new(replay: &[(Stream, Vec<u8>)]) -> Arc<Sub> {
        let mut q = SubQ {
            chunks: VecDeque::new(),
            bytes: 0,
            cap: SUB_BACKLOG,
            dropped: 0,
            done: false,
        };
        for (s, held) in replay {
            q.cap += held.len();
            q.bytes += held.len();
            for c in held.chunks(OUTPUT_CHUNK) {
                q.chunks.push_back((*s, c.to_vec()));
            }
        }
        Arc::new(Sub {
            q: Mutex::new(q),
            cv: Condvar::new(),
        })
    }

    pub(crate) fn push(&self, s: Stream, data: &[u8]) {
        let mut q = self.q.lock().unwrap();
        if q.bytes + data.len() > q.cap {
            q.dropped += data.len() as u64;
        } else {
            q.bytes += data.len();
            q.chunks.push_back((s, data.to_vec()));
        }
        drop(q);
        self.cv.notify_all();
    }

    pub(crate) fn finish(&self) {
        self.q.lock().unwrap().done = true;
        self.cv.notify_all();
    }

    /// Sends the queue's chunks to the request until the source finishes
    /// it: the bytes this reader missed, or `Err` when the host went away
    /// (the caller then unsubscribes it).
    pub(crate) fn forward(&self, resp: &Resp) -> Result<u64, Failure> {
        loop {
            let next = {
                let mut q = self.q.lock().unwrap();
                loop {
                    if let Some((s, d)) = q.chunks.pop_front() {
                        q.bytes -= d.len();
                        break Some((s, d));
                    }
                    if q.done || !resp.live() {
                        break None;
                    }
                    q = self
                        .cv
                        .wait_timeout(q, Duration::from_millis(100))
                        .unwrap()
                        .0;
                }
            };
            match next {
                Some((s, d)) => {
                    if !resp.send_stream(s.event(d)) {
                        return Err(Failure::new(ErrorCode::Cancelled, "detached"));
                    }
                }
                None if !resp.live() => return Err(Failure::new(ErrorCode::Cancelled, "detached")),
                None => return Ok(self.q.lock().unwrap().dropped),
            }
        }
    }
}

impl Proc {
    /// New output: into the ring and to every attached reader.
    fn publish(&self, s: Stream, data: &[u8]) {
        let mut st = self.st.lock().unwrap();
        st.rings[s as usize].push(data);
        for sub in &st.subs {
            sub.push(s, data);
        }
    }

    fn info(&self) -> ProcessInfo {
        let st = self.st.lock().unwrap();
        ProcessInfo {
            pid: self.pid,
            command: self.command.clone(),
            running: st.exit.is_none(),
            background: self.background,
            start_command: false,
            started_unix_ms: self.started_unix_ms,
            exit: st.exit,
        }
    }
}

static EXIT_SEQ: AtomicU64 = AtomicU64::new(0);

pub fn kill_group(pid: u32, signal: i32) {
    if let (Some(p), Some(sig)) = (
        rustix::process::Pid::from_raw(pid as i32),
        rustix::process::Signal::from_named_raw(signal),
    ) {
        let _ = rustix::process::kill_process_group(p, sig);
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// Reader progress, shared by a process's pipe readers and its waiter.
#[derive(Default)]
struct Drain {
    /// Readers still running, by stream.
    open: [bool; 2],
    /// A reader is sending to the request (not waiting on the pipe).
    sending: [bool; 2],
    last_data: Option<Instant>,
    /// The waiter gave up on the pipes: nothing more is sent.
    abandoned: bool,
}

type DrainState = Arc<(Mutex<Drain>, Condvar)>;

/// Reads one pipe to its end: publishes every chunk and, for a foreground
/// exec, streams it to the request.
fn pump(proc: Arc<Proc>, s: Stream, mut r: impl Read, fg: Option<Resp>, drain: DrainState) {
    let mut buf = vec![0u8; OUTPUT_CHUNK];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let send = {
            let mut d = drain.0.lock().unwrap();
            d.last_data = Some(Instant::now());
            let send = !d.abandoned && fg.as_ref().is_some_and(Resp::live);
            d.sending[s as usize] = send;
            send
        };
        proc.publish(s, &buf[..n]);
        if send && let Some(resp) = &fg {
            // Blocks while the host has a full window; the process then
            // blocks on its pipe (foreground flow control).
            resp.send_stream(s.event(buf[..n].to_vec()));
        }
        drain.0.lock().unwrap().sending[s as usize] = false;
    }
    let mut d = drain.0.lock().unwrap();
    d.open[s as usize] = false;
    d.sending[s as usize] = false;
    drop(d);
    drain.1.notify_all();
}

/// After the exit: waits for the readers to hit EOF, or for the pipes to
/// stay silent for [`DRAIN_IDLE`] while no reader is sending.
fn wait_drained(drain: &DrainState, exited: Instant) {
    let mut d = drain.0.lock().unwrap();
    loop {
        if !d.open.iter().any(|o| *o) {
            return;
        }
        let since = d.last_data.map_or(exited, |t| t.max(exited));
        if !d.sending.iter().any(|s| *s) && since.elapsed() >= DRAIN_IDLE {
            d.abandoned = true;
            return;
        }
        d = drain
            .1
            .wait_timeout(d, Duration::from_millis(50))
            .unwrap()
            .0;
    }
}

fn spawn_helper(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), Failure> {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(HELPER_STACK)
        .spawn(f)
        .map(|_| ())
        .map_err(|e| Failure::new(ErrorCode::Busy, format!("thread: {e}")))
}

fn argv_of(spec: &ExecSpec) -> Result<Vec<String>, Failure> {
    if !spec.argv.is_empty() {
        return Ok(spec.argv.clone());
    }
    match &spec.cmd {
        Some(c) => Ok(vec!["/bin/sh".into(), "-c".into(), c.clone()]),
        None => Err(Failure::bad("exec needs argv or cmd")),
    }
}

/// Counts, and makes room for, one more background process with a ring of
/// `ring` bytes per stream: pushes out the oldest exited ones as needed.
fn admit(table: &mut BTreeMap<u32, Arc<Proc>>, ring: u64) -> Result<(), Failure> {
    let running = table
        .values()
        .filter(|p| p.background && p.st.lock().unwrap().exit.is_none())
        .count();
    if running >= MAX_BACKGROUND {
        return Err(Failure::new(
            ErrorCode::Busy,
            format!("{MAX_BACKGROUND} background processes are running"),
        ));
    }
    loop {
        let mut exited: Vec<(u64, u32)> = table
            .values()
            .filter_map(|p| p.st.lock().unwrap().exit.map(|_| p))
            .map(|p| (p.st.lock().unwrap().exit_seq, p.pid))
            .collect();
        let reserved: u64 = table
            .values()
            .map(|p| {
                let st = p.st.lock().unwrap();
                (st.rings[0].cap + st.rings[1].cap) as u64
            })
            .sum();
        if exited.len() < KEEP_EXITED && reserved + 2 * ring <= RING_BUDGET {
            return Ok(());
        }
        exited.sort();
        match exited.first() {
            Some((_, pid)) => {
                table.remove(pid);
            }
            None => {
                return Err(Failure::new(
                    ErrorCode::Busy,
                    format!(
                        "the output buffers of running processes use {reserved} of {RING_BUDGET} bytes"
                    ),
                ));
            }
        }
    }
}

/// The `exec` op.
pub fn exec(state: &State, resp: &Resp, spec: ExecSpec) -> Outcome {
    let argv = argv_of(&spec)?;
    if spec.stdin.as_ref().is_some_and(|d| d.len() > MAX_CHUNK) {
        return Err(Failure::bad(format!(
            "inline stdin is limited to {MAX_CHUNK} bytes; send more with write_stdin"
        )));
    }
    let ring = if spec.background {
        spec.ring_bytes
            .unwrap_or(DEFAULT_RING_BYTES)
            .min(MAX_RING_BYTES)
    } else {
        0
    };
    let piped = spec.stdin.is_some() || spec.stdin_open;
    let pspec = procs::Spec {
        argv,
        env: spec.env.clone(),
        cwd: spec.cwd.clone(),
        user: spec.user.as_deref(),
        stdin: if piped {
            procs::Stdin::Piped
        } else {
            procs::Stdin::Null
        },
        new_session: spec.background,
        capture: true,
    };
    // Admission and spawn under the table lock: the budget holds.
    let mut table = state.table.procs.lock().unwrap();
    if spec.background {
        admit(&mut table, ring)?;
    }
    let mut sp = procs::spawn(state, pspec).map_err(|e| Failure::new(ErrorCode::SpawnFailed, e))?;
    let pid = sp.child.id();
    let stdin = sp.child.stdin.take();
    let proc = Arc::new(Proc {
        pid,
        command: clip(&spec.display(), 4096).to_string(),
        background: spec.background,
        started_unix_ms: procs::now_unix_ms(),
        st: Mutex::new(ProcState {
            exit: None,
            exit_seq: 0,
            output_done: false,
            rings: [Ring::new(ring as usize), Ring::new(ring as usize)],
            subs: Vec::new(),
        }),
        stdin: Mutex::new(None),
    });
    table.insert(pid, proc.clone());
    drop(table);
    match (spec.stdin, stdin) {
        (Some(data), Some(mut w)) => {
            // Written by a helper (the process may not read it at once);
            // with `stdin_open` the pipe then serves write_stdin.
            let (keep, proc) = (spec.stdin_open, proc.clone());
            let _ = spawn_helper("stdin", move || {
                if w.write_all(&data).is_ok() && keep {
                    *proc.stdin.lock().unwrap() = Some(w);
                }
            });
        }
        (None, Some(w)) => *proc.stdin.lock().unwrap() = Some(w),
        _ => {}
    }

    let fg = (!spec.background).then(|| resp.clone());
    if let Some(r) = &fg {
        *r.ctl().kill_pgid.lock().unwrap() = Some(pid);
        // A cancel that came before the pid was known kills it now.
        if r.cancelled() {
            kill_group(pid, 9);
        }
        r.send(Event::Started { pid });
    }
    let drain: DrainState = Arc::new((
        Mutex::new(Drain {
            open: [true, true],
            ..Default::default()
        }),
        Condvar::new(),
    ));
    let pipes: [(Stream, Option<Box<dyn Read + Send>>); 2] = [
        (
            Stream::Stdout,
            sp.child
                .stdout
                .take()
                .map(|r| Box::new(r) as Box<dyn Read + Send>),
        ),
        (
            Stream::Stderr,
            sp.child
                .stderr
                .take()
                .map(|r| Box::new(r) as Box<dyn Read + Send>),
        ),
    ];
    for (s, r) in pipes {
        let Some(r) = r else {
            drain.0.lock().unwrap().open[s as usize] = false;
            continue;
        };
        let (proc, fg, drain2) = (proc.clone(), fg.clone(), drain.clone());
        if let Err(e) = spawn_helper("pump", move || pump(proc, s, r, fg, drain2)) {
            kill_group(pid, 9);
            drain.0.lock().unwrap().open[s as usize] = false;
            crate::log(&format!("exec {pid}: {}", e.message));
        }
    }
    let timeout = spec.timeout_ms.map(Duration::from_millis);
    let exit_rx = sp.exit;
    // The `Child` is not waited on through std: the reaper owns exits.
    drop(sp.child);
    let supervise = {
        let (proc, drain, state) = (proc.clone(), drain.clone(), state.clone());
        move || -> ExitStatus {
            let mut timed_out = false;
            let exit = match timeout {
                Some(t) => match exit_rx.recv_timeout(t) {
                    Ok(e) => Some(e),
                    Err(_) => {
                        timed_out = true;
                        kill_group(pid, 9);
                        exit_rx.recv().ok()
                    }
                },
                None => exit_rx.recv().ok(),
            };
            let status = exit.unwrap_or(Exit::Signal(9)).status(timed_out);
            let exited = Instant::now();
            {
                let mut st = proc.st.lock().unwrap();
                st.exit = Some(status);
                st.exit_seq = EXIT_SEQ.fetch_add(1, Ordering::SeqCst);
            }
            proc.stdin.lock().unwrap().take();
            wait_drained(&drain, exited);
            let mut st = proc.st.lock().unwrap();
            st.output_done = true;
            for sub in st.subs.drain(..) {
                sub.finish();
            }
            drop(st);
            if !proc.background {
                let mut t = state.table.procs.lock().unwrap();
                if t.get(&pid).is_some_and(|p| Arc::ptr_eq(p, &proc)) {
                    t.remove(&pid);
                }
            }
            status
        }
    };
    if spec.background {
        spawn_helper("waiter", move || {
            supervise();
        })
        .inspect_err(|_| kill_group(pid, 9))?;
        return Ok(Event::Spawned { pid: Some(pid) });
    }
    let status = supervise();
    *resp.ctl().kill_pgid.lock().unwrap() = None;
    Ok(Event::Exit(status))
}

fn find(state: &State, pid: u32) -> Result<Arc<Proc>, Failure> {
    state
        .table
        .procs
        .lock()
        .unwrap()
        .get(&pid)
        .cloned()
        .ok_or_else(|| {
            Failure::new(
                ErrorCode::NotFound,
                format!("no process {pid} started by the agent"),
            )
        })
}

/// The `processes` op: tracked processes, then the start command.
pub fn processes(state: &State) -> Event {
    let procs: Vec<Arc<Proc>> = state
        .table
        .procs
        .lock()
        .unwrap()
        .values()
        .cloned()
        .collect();
    let mut list: Vec<ProcessInfo> = procs.iter().map(|p| p.info()).collect();
    let st = state.start.lock().unwrap();
    if let Some(pid) = st.pid {
        list.push(ProcessInfo {
            pid,
            command: clip(&st.cmd, 4096).to_string(),
            running: st.exit.is_none(),
            background: true,
            start_command: true,
            started_unix_ms: st.started_unix_ms,
            exit: st.exit.map(|e| e.status(false)),
        });
    }
    Event::Processes { processes: list }
}

/// The `output` op: what the rings hold, as stream events, then the status.
pub fn output(state: &State, resp: &Resp, pid: u32) -> Outcome {
    let proc = find(state, pid)?;
    let (data, end) = {
        let st = proc.st.lock().unwrap();
        let data: [Vec<u8>; 2] = [
            st.rings[0].buf.iter().copied().collect(),
            st.rings[1].buf.iter().copied().collect(),
        ];
        let end = OutputEnd {
            running: st.exit.is_none(),
            exit: st.exit,
            stdout_dropped: st.rings[0].dropped,
            stderr_dropped: st.rings[1].dropped,
        };
        (data, end)
    };
    for (s, d) in [(Stream::Stdout, &data[0]), (Stream::Stderr, &data[1])] {
        for c in d.chunks(OUTPUT_CHUNK) {
            if !resp.send_stream(s.event(c.to_vec())) {
                return Err(Failure::new(ErrorCode::Cancelled, "host gone"));
            }
        }
    }
    Ok(Event::OutputEnd(end))
}

/// The `attach` op: further output (after the rings' contents, with
/// `replay`) until the process exits and its pipes are drained.
pub fn attach(state: &State, resp: &Resp, pid: u32, replay: bool) -> Outcome {
    let proc = find(state, pid)?;
    let sub;
    {
        let mut st = proc.st.lock().unwrap();
        let held: Vec<(Stream, Vec<u8>)> = if replay {
            [Stream::Stdout, Stream::Stderr]
                .into_iter()
                .map(|s| (s, st.rings[s as usize].buf.iter().copied().collect()))
                .collect()
        } else {
            Vec::new()
        };
        sub = Sub::new(&held);
        if st.output_done {
            sub.q.lock().unwrap().done = true;
        } else {
            st.subs.push(sub.clone());
        }
    }
    let detach = || {
        proc.st
            .lock()
            .unwrap()
            .subs
            .retain(|s| !Arc::ptr_eq(s, &sub));
    };
    resp.send(Event::Started { pid });
    let dropped = sub.forward(resp).inspect_err(|_| detach())?;
    let mut status = proc
        .st
        .lock()
        .unwrap()
        .exit
        .unwrap_or(Exit::Signal(9).status(false));
    status.dropped = dropped;
    Ok(Event::Exit(status))
}

/// The `kill` op: tracked processes and the start command only.
pub fn kill(state: &State, pid: u32, signal: i32, group: bool) -> Outcome {
    let sig = rustix::process::Signal::from_named_raw(signal)
        .ok_or_else(|| Failure::bad(format!("kill: unknown signal {signal}")))?;
    let running = match find(state, pid) {
        Ok(p) => p.st.lock().unwrap().exit.is_none(),
        Err(e) => {
            let st = state.start.lock().unwrap();
            if st.pid != Some(pid) {
                return Err(e);
            }
            st.exit.is_none()
        }
    };
    if !running {
        return Ok(Event::Ok);
    }
    let p =
        rustix::process::Pid::from_raw(pid as i32).ok_or_else(|| Failure::bad("kill: pid 0"))?;
    let r = if group {
        rustix::process::kill_process_group(p, sig)
            .or_else(|_| rustix::process::kill_process(p, sig))
    } else {
        rustix::process::kill_process(p, sig)
    };
    match r {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(Event::Ok),
        Err(e) => Err(Failure::new(ErrorCode::Io, format!("kill {pid}: {e}"))),
    }
}

/// The `write_stdin` op.
pub fn write_stdin(state: &State, pid: u32, data: &[u8], eof: bool) -> Outcome {
    if data.len() > MAX_CHUNK {
        return Err(Failure::bad(format!(
            "write_stdin: at most {MAX_CHUNK} bytes per request"
        )));
    }
    let proc = find(state, pid)?;
    // Taken out while writing: a concurrent write gets "not open" rather
    // than interleaving.
    let mut w = proc.stdin.lock().unwrap().take().ok_or_else(|| {
        Failure::bad(format!(
            "process {pid} has no open stdin (exec with stdin_open, not closed, not busy)"
        ))
    })?;
    let r = w.write_all(data);
    if !eof && r.is_ok() {
        *proc.stdin.lock().unwrap() = Some(w);
    }
    r.map_err(|e| Failure::io(&format!("stdin of {pid}"), e))?;
    Ok(Event::Written {
        bytes: data.len() as u64,
    })
}
