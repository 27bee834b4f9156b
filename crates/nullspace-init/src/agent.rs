//! The guest agent on the virtio-serial port `nullspace.agent`: the protocol
//! of `nullspace_model::agent` (read its module doc for the ops, framing,
//! flow control and sessions).
//!
//! The read loop parses one line at a time (at most `MAX_LINE`; a longer
//! line is discarded up to its newline without being buffered), answers
//! `hello`, `ack` and `cancel` inline and runs every other request on a
//! thread of its own, at most [`MAX_REQUEST_THREADS`] at once (beyond that
//! the answer is `error {code: busy}`). Replies are whole lines written
//! under one lock, so lines of concurrent requests never mix.
//!
//! The port stays open across hosts: EOF/POLLHUP means "host gone" (the
//! partial line is dropped and a new session begins), and a restored
//! snapshot's guest simply waits for the next host.

use crate::procs::{self, Exit, State};
use nullspace_model::agent::lines::LineSplitter;
use nullspace_model::agent::{
    self as proto, AgentInfo, ErrorCode, Event, MAX_LINE, Op, PROTOCOL_VERSION, ProbeSpec, Reply,
    Request, STREAM_WINDOW, StartInfo, StartSpec,
};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Requests served at once (each on its own thread). Foreground execs,
/// attaches and tunnels hold theirs while they stream.
pub const MAX_REQUEST_THREADS: usize = 128;
/// Stack of a request thread (file ops, probes, exec supervision).
const REQUEST_STACK: usize = 512 << 10;

/// A request's failure: the final `error` event's code and message.
#[derive(Debug)]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: clip(&message.into(), 4096).to_string(),
        }
    }

    pub fn bad(message: impl Into<String>) -> Failure {
        Failure::new(ErrorCode::BadRequest, message)
    }

    /// `what: error`, coded by the error's kind.
    pub fn io(what: &str, e: std::io::Error) -> Failure {
        Failure::new(ErrorCode::of_io(e.kind()), format!("{what}: {e}"))
    }

    fn event(self) -> Event {
        Event::error(self.code, self.message)
    }
}

pub type Outcome = Result<Event, Failure>;

/// At most `max` bytes of `s`, cut at a char boundary.
pub fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut i = max;
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    &s[..i]
}

/// The connection: the writer, the session generation, live requests.
pub struct Conn {
    out: Mutex<File>,
    session: AtomicU64,
    reqs: Mutex<HashMap<u64, Arc<Ctl>>>,
    active: AtomicUsize,
}

/// One live request's control block: its session, cancellation, stream credit.
pub struct Ctl {
    id: u64,
    session: u64,
    cancelled: AtomicBool,
    /// Stream bytes sent and not yet acknowledged.
    unacked: Mutex<usize>,
    cv: Condvar,
    /// Process group to kill on cancel (a foreground exec's).
    pub kill_pgid: Mutex<Option<u32>>,
}

impl Ctl {
    /// The request's id (`target` of later `ack`, `cancel` and `send`).
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// Sends a request's events.
#[derive(Clone)]
pub struct Resp {
    conn: Arc<Conn>,
    ctl: Arc<Ctl>,
}

impl Resp {
    /// The host still wants this request's events (same session, not cancelled).
    pub fn live(&self) -> bool {
        !self.ctl.cancelled.load(Ordering::SeqCst)
            && self.ctl.session == self.conn.session.load(Ordering::SeqCst)
    }

    pub fn cancelled(&self) -> bool {
        self.ctl.cancelled.load(Ordering::SeqCst)
    }

    pub fn ctl(&self) -> &Ctl {
        &self.ctl
    }

    /// Sends an event; false when the host no longer wants it.
    pub fn send(&self, event: Event) -> bool {
        if !self.live() {
            return false;
        }
        self.conn.write(&Reply {
            id: self.ctl.id,
            event,
        });
        true
    }

    /// Stream bytes [`Resp::send_stream`] sends now without waiting.
    pub fn stream_room(&self) -> usize {
        STREAM_WINDOW.saturating_sub(*self.ctl.unacked.lock().unwrap())
    }

    /// Sends stream data, first waiting until the request's unacknowledged
    /// stream bytes leave room in the window. False (nothing sent) when the
    /// host no longer wants it.
    pub fn send_stream(&self, event: Event) -> bool {
        let n = event.stream_bytes();
        let mut unacked = self.ctl.unacked.lock().unwrap();
        loop {
            if !self.live() {
                return false;
            }
            if *unacked == 0 || *unacked + n <= STREAM_WINDOW {
                break;
            }
            unacked = self
                .ctl
                .cv
                .wait_timeout(unacked, Duration::from_millis(200))
                .unwrap()
                .0;
        }
        *unacked += n;
        drop(unacked);
        self.send(event)
    }
}

impl Conn {
    fn write(&self, reply: &Reply) {
        let mut line = proto::to_line(reply);
        if line.len() > MAX_LINE {
            // Every event is bounded by construction; this is the backstop.
            line = proto::to_line(&Reply {
                id: reply.id,
                event: Event::error(
                    ErrorCode::Io,
                    format!("reply of {} bytes exceeds the line limit", line.len()),
                ),
            });
        }
        let mut f = self.out.lock().unwrap();
        if let Err(e) = f.write_all(&line) {
            crate::log(&format!("agent write: {e}"));
        }
    }

    /// A new session: requests of the old one stop streaming.
    fn new_session(&self) {
        self.session.fetch_add(1, Ordering::SeqCst);
        for ctl in self.reqs.lock().unwrap().values() {
            ctl.cv.notify_all();
        }
    }

    fn ack(&self, target: u64, bytes: u64) {
        if let Some(ctl) = self.reqs.lock().unwrap().get(&target) {
            let mut u = ctl.unacked.lock().unwrap();
            *u = u.saturating_sub(bytes as usize);
            ctl.cv.notify_all();
        }
    }

    fn cancel(&self, target: u64) {
        if let Some(ctl) = self.reqs.lock().unwrap().get(&target) {
            ctl.cancelled.store(true, Ordering::SeqCst);
            if let Some(pgid) = *ctl.kill_pgid.lock().unwrap() {
                crate::exec::kill_group(pgid, 9);
            }
            crate::tunnel::close(target);
            ctl.cv.notify_all();
        }
    }
}

fn find_port(name: &str) -> Option<String> {
    let dir = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for e in dir.flatten() {
        let n = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if n.trim() == name {
            return Some(format!("/dev/{}", e.file_name().to_string_lossy()));
        }
    }
    None
}

fn open_port(name: &str) -> File {
    let t = Instant::now();
    loop {
        if let Some(p) = find_port(name)
            && let Ok(f) = File::options().read(true).write(true).open(&p)
        {
            crate::log(&format!("agent on {p}"));
            return f;
        }
        if t.elapsed() > Duration::from_secs(10) {
            // Fallback: the first virtio console, in raw mode.
            if let Ok(f) = File::options().read(true).write(true).open("/dev/hvc0") {
                if let Ok(mut t) = rustix::termios::tcgetattr(&f) {
                    t.make_raw();
                    let _ =
                        rustix::termios::tcsetattr(&f, rustix::termios::OptionalActions::Now, &t);
                }
                crate::log("agent on /dev/hvc0");
                return f;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn serve(state: State) -> ! {
    let port = open_port(&state.cfg.agent_port);
    let conn = Arc::new(Conn {
        out: Mutex::new(port.try_clone().expect("dup agent port")),
        session: AtomicU64::new(0),
        reqs: Mutex::new(HashMap::new()),
        active: AtomicUsize::new(0),
    });
    let mut input = port;
    let mut lines = LineSplitter::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut hung_up = false;
    loop {
        use rustix::event::{PollFd, PollFlags};
        let mut fds = [PollFd::new(&input, PollFlags::IN)];
        let timeout = rustix::time::Timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(n) if n > 0 => {}
            _ => continue,
        }
        let revents = fds[0].revents();
        if !revents.contains(PollFlags::IN) {
            // POLLHUP: no host connected. Drop any partial request.
            lines.reset();
            if !hung_up {
                hung_up = true;
                conn.new_session();
            }
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        hung_up = false;
        match input.read(&mut chunk) {
            Ok(0) => {
                lines.reset();
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(n) => {
                let discarded =
                    lines.push(&chunk[..n], &mut |line| handle_line(&state, &conn, line));
                if discarded > 0 {
                    crate::log("agent: request line over the limit, discarded");
                }
            }
            Err(e) => {
                crate::log(&format!("agent read: {e}"));
                lines.reset();
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn handle_line(state: &State, conn: &Arc<Conn>, line: &[u8]) {
    let req = match proto::parse_request(line) {
        Ok(r) => r,
        Err(e) => {
            // Garbage without an id (e.g. half a line from an old session)
            // gets no answer.
            if let Some(r) = e.reply() {
                conn.write(&r);
            }
            return;
        }
    };
    let Request { id, op } = req;
    match op {
        Op::Ack { target, bytes } => return conn.ack(target, bytes),
        Op::Cancel { target } => return conn.cancel(target),
        Op::Hello { protocol } => {
            conn.new_session();
            if protocol != PROTOCOL_VERSION {
                crate::log(&format!(
                    "host speaks agent protocol {protocol}, this agent {PROTOCOL_VERSION}"
                ));
            }
            return conn.write(&Reply {
                id,
                event: Event::Hello {
                    protocol: PROTOCOL_VERSION,
                    agent: env!("CARGO_PKG_VERSION").to_string(),
                },
            });
        }
        _ => {}
    }
    if conn.active.fetch_add(1, Ordering::SeqCst) >= MAX_REQUEST_THREADS {
        conn.active.fetch_sub(1, Ordering::SeqCst);
        return conn.write(&Reply {
            id,
            event: Event::error(
                ErrorCode::Busy,
                format!("{} requests in progress; retry later", MAX_REQUEST_THREADS),
            ),
        });
    }
    let ctl = Arc::new(Ctl {
        id,
        session: conn.session.load(Ordering::SeqCst),
        cancelled: AtomicBool::new(false),
        unacked: Mutex::new(0),
        cv: Condvar::new(),
        kill_pgid: Mutex::new(None),
    });
    conn.reqs.lock().unwrap().insert(id, ctl.clone());
    let resp = Resp {
        conn: conn.clone(),
        ctl,
    };
    let state = state.clone();
    let spawned = std::thread::Builder::new()
        .stack_size(REQUEST_STACK)
        .spawn({
            let resp = resp.clone();
            move || run(&state, &resp, op)
        });
    if let Err(e) = spawned {
        finish(
            &resp,
            Err(Failure::new(ErrorCode::Busy, format!("thread: {e}"))),
        );
    }
}

fn run(state: &State, resp: &Resp, op: Op) {
    let out = dispatch(state, resp, op);
    finish(resp, out);
}

/// Sends the final event and forgets the request.
fn finish(resp: &Resp, out: Outcome) {
    let event = match out {
        Ok(e) => e,
        Err(f) => f.event(),
    };
    let event = if resp.cancelled() {
        Event::error(ErrorCode::Cancelled, "cancelled by the host")
    } else {
        event
    };
    // A cancelled request's end still goes out (the host ignores it); only
    // a dead session's is dropped.
    if resp.ctl.session == resp.conn.session.load(Ordering::SeqCst) {
        resp.conn.write(&Reply {
            id: resp.ctl.id,
            event,
        });
    }
    resp.conn.reqs.lock().unwrap().remove(&resp.ctl.id);
    resp.conn.active.fetch_sub(1, Ordering::SeqCst);
}

fn dispatch(state: &State, resp: &Resp, op: Op) -> Outcome {
    match op {
        Op::Ping => Ok(Event::Pong),
        Op::Info => Ok(Event::Info(info(state))),
        // A terminal session's pid: its own table (`pty.rs`).
        Op::Attach { pid, replay } if crate::pty::owns(pid) => {
            crate::pty::attach(resp, pid, replay)
        }
        Op::Kill { pid, signal, group } if crate::pty::owns(pid) => {
            crate::pty::kill(pid, signal, group)
        }
        Op::WriteStdin { pid, data, eof } if crate::pty::owns(pid) => {
            crate::pty::write(pid, &data, eof)
        }
        Op::PtyStart(spec) => crate::pty::start(state, spec),
        Op::PtyResize { pid, cols, rows } => crate::pty::resize(pid, cols, rows),
        Op::PtyList => Ok(crate::pty::list()),
        Op::Watch(spec) => crate::watch::watch(state, resp, spec),
        Op::Connect { port } => crate::tunnel::connect(resp, resp.ctl().id(), port),
        Op::Send { target, data, eof } => crate::tunnel::send(target, &data, eof),
        Op::Mount(spec) => crate::volume::mount(spec),
        Op::Unmount { slot, mount_path } => crate::volume::unmount(slot, &mount_path),
        Op::VolumeHealth { slot, mount_path } => crate::volume::health(slot, &mount_path),
        Op::Exec(spec) => crate::exec::exec(state, resp, spec),
        Op::Attach { pid, replay } => crate::exec::attach(state, resp, pid, replay),
        Op::Processes => Ok(crate::exec::processes(state)),
        Op::Output { pid } => crate::exec::output(state, resp, pid),
        Op::Kill { pid, signal, group } => crate::exec::kill(state, pid, signal, group),
        Op::WriteStdin { pid, data, eof } => crate::exec::write_stdin(state, pid, &data, eof),
        Op::Stat { path, user } => {
            let out = crate::files::stat(state, &path, user.as_deref());
            crate::files::naming_user(state, user.as_deref(), out)
        }
        Op::ListDir {
            path,
            depth,
            user,
            max_entries,
        } => {
            let out =
                crate::files::list_dir(state, resp, &path, depth, user.as_deref(), max_entries);
            crate::files::naming_user(state, user.as_deref(), out)
        }
        Op::ReadFile {
            path,
            offset,
            length,
            user,
        } => {
            let out = crate::files::read(state, &path, offset, length, user.as_deref());
            crate::files::naming_user(state, user.as_deref(), out)
        }
        Op::WriteFile(spec) => {
            let out = crate::files::write(state, &spec);
            crate::files::naming_user(state, spec.user.as_deref(), out)
        }
        Op::MakeDir {
            path,
            mode,
            parents,
            user,
        } => {
            let out = crate::files::make_dir(state, &path, mode, parents, user.as_deref());
            crate::files::naming_user(state, user.as_deref(), out)
        }
        Op::Remove {
            path,
            recursive,
            user,
        } => {
            let out = crate::files::remove(state, &path, recursive, user.as_deref());
            crate::files::naming_user(state, user.as_deref(), out)
        }
        Op::Rename { from, to, user } => {
            let out = crate::files::rename(state, &from, &to, user.as_deref());
            crate::files::naming_user(state, user.as_deref(), out)
        }
        Op::Chmod { path, mode, user } => {
            let out = crate::files::chmod(state, &path, mode, user.as_deref());
            crate::files::naming_user(state, user.as_deref(), out)
        }
        Op::SearchNames(spec) => {
            let out = crate::search::search_names(state, resp, &spec);
            crate::files::naming_user(state, spec.user.as_deref(), out)
        }
        Op::SearchContent(spec) => {
            let out = crate::search::search_content(state, resp, &spec);
            crate::files::naming_user(state, spec.user.as_deref(), out)
        }
        Op::Replace(spec) => {
            let out = crate::replace::replace(state, &spec);
            crate::files::naming_user(state, spec.user.as_deref(), out)
        }
        Op::Metrics { sample_ms } => crate::metrics::metrics(sample_ms),
        Op::Start(spec) => start(state, spec),
        Op::Probe { probe, timeout_ms } => Ok(probe_once(
            state,
            &probe,
            Duration::from_millis(timeout_ms.unwrap_or(2000)),
        )),
        Op::SetTime { unix_ns } => {
            // Sent once per restore, before anything else: the moment to
            // forget what the snapshot's network looked like.
            crate::net::forget_neighbours();
            set_time(unix_ns)
        }
        Op::Reseed { data } => reseed(&data),
        Op::Resize { vcpus, memory_mib } => crate::resize::resize(vcpus, memory_mib),
        // Answered inline by `handle_line`.
        Op::Hello { .. } | Op::Ack { .. } | Op::Cancel { .. } => Ok(Event::Ok),
    }
}

pub fn info(state: &State) -> AgentInfo {
    let st = state.start.lock().unwrap();
    let (exit_code, signal) = match st.exit {
        Some(Exit::Code(c)) => (Some(c), None),
        Some(Exit::Signal(s)) => (None, Some(s)),
        None => (None, None),
    };
    let output: Vec<u8> = st.output.iter().copied().collect();
    AgentInfo {
        protocol: PROTOCOL_VERSION,
        start: StartInfo {
            configured: st.configured,
            pid: st.pid,
            started_unix_ms: st.started_unix_ms,
            running: st.pid.is_some() && st.exit.is_none(),
            exit_code,
            signal,
            spawn_error: st.spawn_error.clone(),
            output: String::from_utf8_lossy(&output).to_string(),
        },
        uptime_ms: state.boot.elapsed().as_millis() as u64,
        hostname: state.cfg.hostname.clone(),
    }
}

/// The `set_time` op: a restored snapshot's wall clock continues from the
/// snapshot's time, so the host sends its own.
fn set_time(unix_ns: u64) -> Outcome {
    use rustix::time::{ClockId, Timespec};
    let prev = rustix::time::clock_gettime(ClockId::Realtime);
    let ts = Timespec {
        tv_sec: (unix_ns / 1_000_000_000) as i64,
        tv_nsec: (unix_ns % 1_000_000_000) as _,
    };
    rustix::time::clock_settime(ClockId::Realtime, ts)
        .map_err(|e| Failure::new(ErrorCode::Io, format!("clock_settime: {e}")))?;
    let prev_ns = (prev.tv_sec.max(0) as u64) * 1_000_000_000 + prev.tv_nsec as u64;
    Ok(Event::Time {
        previous_unix_ns: prev_ns,
    })
}

/// `struct rand_pool_info` with room for the largest accepted seed.
#[repr(C)]
struct RandPoolInfo {
    entropy_count: i32,
    buf_size: i32,
    buf: [u8; proto::MAX_RESEED],
}

/// The `reseed` op: the host's fresh bytes go into the input pool with full
/// credit (`RNDADDENTROPY`), then the CRNG is reseeded from it at once
/// (`RNDRESEEDCRNG`), so clones of one snapshot diverge before anything
/// reads randomness. Neither rustix nor nix wraps these two ioctls, so
/// they go through rustix's typed (unsafe) `ioctl`.
fn reseed(data: &[u8]) -> Outcome {
    use rustix::ioctl::{NoArg, Setter, opcode};
    if !(proto::MIN_RESEED..=proto::MAX_RESEED).contains(&data.len()) {
        return Err(Failure::bad(format!(
            "reseed needs {}..={} bytes, got {}",
            proto::MIN_RESEED,
            proto::MAX_RESEED,
            data.len()
        )));
    }
    let mut pool = RandPoolInfo {
        entropy_count: (data.len() * 8) as i32,
        buf_size: data.len() as i32,
        buf: [0; proto::MAX_RESEED],
    };
    pool.buf[..data.len()].copy_from_slice(data);
    let dev = File::options()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| Failure::io("/dev/urandom", e))?;
    const RNDADDENTROPY: rustix::ioctl::Opcode = opcode::write::<[i32; 2]>(b'R', 0x03);
    const RNDRESEEDCRNG: rustix::ioctl::Opcode = opcode::none(b'R', 0x07);
    // SAFETY: RNDADDENTROPY reads a `struct rand_pool_info` (two ints and
    // `buf_size` bytes); `pool` is that layout and its buffer holds
    // `buf_size` bytes.
    unsafe { rustix::ioctl::ioctl(&dev, Setter::<RNDADDENTROPY, RandPoolInfo>::new(pool)) }
        .map_err(|e| Failure::new(ErrorCode::Io, format!("RNDADDENTROPY: {e}")))?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    unsafe { rustix::ioctl::ioctl(&dev, NoArg::<RNDRESEEDCRNG>::new()) }
        .map_err(|e| Failure::new(ErrorCode::Io, format!("RNDRESEEDCRNG: {e}")))?;
    Ok(Event::Ok)
}

/// The `start` op: new runtime defaults (for the start command and every
/// later exec, including in restored sandboxes), then the start command.
fn start(state: &State, spec: StartSpec) -> Outcome {
    let opt = |s: Option<String>| s.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    let user = opt(spec.user);
    if let Some(u) = &user {
        crate::users::resolve(Some(u)).map_err(Failure::bad)?;
    }
    {
        let mut d = state.defaults.lock().unwrap();
        d.env = spec.env;
        d.user = user;
        d.workdir = opt(spec.workdir);
    }
    match opt(spec.cmd) {
        Some(cmd) => {
            let pid = procs::start_command(state, &cmd)
                .map_err(|e| Failure::new(ErrorCode::SpawnFailed, e))?;
            crate::log(&format!("start command running as pid {pid}"));
            Ok(Event::Spawned { pid: Some(pid) })
        }
        None => Ok(Event::Spawned { pid: None }),
    }
}

/// One readiness check (the host owns interval, grace and overall timeout).
fn probe_once(state: &State, p: &ProbeSpec, limit: Duration) -> Event {
    let (ready, detail) = match p {
        ProbeSpec::Tcp { port, host } => {
            let host = host.as_deref().unwrap_or("127.0.0.1");
            match connect(host, *port, limit) {
                Ok(_) => (true, format!("{host}:{port} accepts connections")),
                Err(e) => (false, format!("{host}:{port}: {e}")),
            }
        }
        ProbeSpec::Http { port, host, path } => {
            http_get(host.as_deref().unwrap_or("127.0.0.1"), *port, path, limit)
        }
        ProbeSpec::Command { cmd } => {
            let spec = procs::Spec {
                argv: vec!["/bin/sh".into(), "-c".into(), cmd.clone()],
                env: BTreeMap::new(),
                cwd: None,
                user: None,
                stdin: procs::Stdin::Null,
                new_session: false,
                capture: false,
            };
            match procs::spawn(state, spec) {
                Err(e) => (false, e),
                Ok(sp) => {
                    let pid = sp.child.id();
                    drop(sp.child); // output went to /dev/null
                    match sp.exit.recv_timeout(limit) {
                        Ok(Exit::Code(0)) => (true, "exit 0".into()),
                        Ok(e) => (false, format!("{e:?}")),
                        Err(_) => {
                            crate::exec::kill_group(pid, 9);
                            (false, "probe command timed out".into())
                        }
                    }
                }
            }
        }
    };
    Event::Probe {
        ready,
        detail: clip(&detail, 4096).to_string(),
    }
}

fn connect(host: &str, port: u16, limit: Duration) -> std::io::Result<std::net::TcpStream> {
    use std::net::ToSocketAddrs;
    let addr = (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other("no address"))?;
    std::net::TcpStream::connect_timeout(&addr, limit)
}

fn http_get(host: &str, port: u16, path: &str, limit: Duration) -> (bool, String) {
    let mut s = match connect(host, port, limit) {
        Ok(s) => s,
        Err(e) => return (false, format!("{host}:{port}: {e}")),
    };
    let _ = s.set_read_timeout(Some(limit));
    let _ = s.set_write_timeout(Some(limit));
    let req = format!("GET {path} HTTP/1.0\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n");
    if let Err(e) = s.write_all(req.as_bytes()) {
        return (false, e.to_string());
    }
    let mut head = Vec::new();
    let mut b = [0u8; 512];
    while !head.contains(&b'\n') && head.len() < 4096 {
        match s.read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&b[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or("").to_string();
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    ((200..400).contains(&code), format!("GET {path}: {line}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_char_boundaries() {
        assert_eq!(clip("héllo", 2), "h");
        assert_eq!(clip("abc", 10), "abc");
    }
}
