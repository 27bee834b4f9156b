//! Terminal sessions: a process on a pseudo-terminal of its own that
//! outlives the host connection (`pty_start`, `pty_resize`, `pty_list`, and
//! `attach`, `write_stdin`, `kill` for a session's pid).
//!
//! The process is a session leader with the terminal as its controlling
//! one (so job control, ^C and SIGWINCH work as on a console), runs as the
//! requested user with the runtime defaults, and `TERM` is
//! `xterm-256color` unless the request sets it. A reader thread copies the
//! terminal's output into a ring buffer and to attached readers; it never
//! waits for the host (a reader that falls behind loses chunks, counted in
//! its `exit.dropped`), so a program that floods its terminal costs the
//! guest one ring. Bounds: [`MAX_SESSIONS`] running, [`KEEP_EXITED`]
//! exited ones listed, all rings together at most [`RING_BUDGET`].

use crate::agent::{Failure, Outcome, Resp, clip};
use crate::exec::{Ring, Stream, Sub};
use crate::procs::{self, Exit, State};
use nullspace_model::agent::pty::{self as proto, DEFAULT_PTY_RING, DEFAULT_TERM, MAX_PTY_RING};
use nullspace_model::agent::{
    ErrorCode, Event, ExitStatus, MAX_CHUNK, OUTPUT_CHUNK, PtyInfo, PtySpec,
};
use rustix::fd::OwnedFd;
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const MAX_SESSIONS: usize = 32;
pub const KEEP_EXITED: usize = 16;
pub const RING_BUDGET: u64 = 32 << 20;
/// After the process exits, its terminal is read until every other holder
/// closes it, or until it stays silent this long.
const DRAIN_IDLE: Duration = Duration::from_millis(500);
/// A write to a terminal whose program does not read its input fails after this.
const INPUT_TIMEOUT: Duration = Duration::from_secs(10);
const HELPER_STACK: usize = 256 << 10;
/// The terminal's end-of-file character (^D), what `write_stdin {eof}` sends.
const VEOF: u8 = 0x04;

/// Sessions by pid.
static SESSIONS: Mutex<BTreeMap<u32, Arc<Session>>> = Mutex::new(BTreeMap::new());
static EXIT_SEQ: AtomicU64 = AtomicU64::new(0);

struct Session {
    id: String,
    pid: u32,
    command: String,
    started_unix_ms: u64,
    /// The terminal's master side (non-blocking): output is read from it,
    /// input written to it, the window size set on it.
    master: OwnedFd,
    /// Writers take turns, so one request's input is not split by another's.
    input: Mutex<()>,
    st: Mutex<SessionState>,
}

struct SessionState {
    cols: u16,
    rows: u16,
    exit: Option<ExitStatus>,
    exit_seq: u64,
    ring: Ring,
    ring_cap: u64,
    subs: Vec<Arc<Sub>>,
    /// The reader still runs.
    reading: bool,
    last_output: Option<Instant>,
    /// Output is complete: attached readers end.
    output_done: bool,
    /// Forgotten (pushed out of the table): the reader stops.
    closed: bool,
}

impl Session {
    fn info(&self) -> PtyInfo {
        let st = self.st.lock().unwrap();
        PtyInfo {
            session: self.id.clone(),
            pid: self.pid,
            cols: st.cols,
            rows: st.rows,
            command: self.command.clone(),
            running: st.exit.is_none(),
            started_unix_ms: self.started_unix_ms,
            exit: st.exit,
        }
    }

    fn publish(&self, data: &[u8]) {
        let mut st = self.st.lock().unwrap();
        st.last_output = Some(Instant::now());
        st.ring.push(data);
        for sub in &st.subs {
            sub.push(Stream::Stdout, data);
        }
    }
}

/// The pid is a terminal session's (its ops go here, not to `exec`).
pub fn owns(pid: u32) -> bool {
    SESSIONS.lock().unwrap().contains_key(&pid)
}

fn find(pid: u32) -> Result<Arc<Session>, Failure> {
    SESSIONS.lock().unwrap().get(&pid).cloned().ok_or_else(|| {
        Failure::new(
            ErrorCode::NotFound,
            format!("no terminal session with pid {pid}"),
        )
    })
}

/// `pty_` and 16 hex digits from the kernel's RNG.
fn session_id() -> Result<String, Failure> {
    let mut b = [0u8; 8];
    rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty())
        .map_err(|e| Failure::new(ErrorCode::Io, format!("getrandom: {e}")))?;
    Ok(format!("pty_{:016x}", u64::from_be_bytes(b)))
}

/// The user's shell from /etc/passwd when it exists, else `/bin/sh`.
fn login_shell(user: &str) -> String {
    let name = user.split(':').next().unwrap_or(user);
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && (f[0] == name || f[2] == name))
        .map(|f| f[6].trim().to_string())
        .filter(|s| {
            !s.is_empty()
                && !s.ends_with("/nologin")
                && !s.ends_with("/false")
                && std::path::Path::new(s).exists()
        })
        .unwrap_or_else(|| "/bin/sh".into())
}

/// Makes room for one more session with a ring of `ring` bytes: pushes
/// out the oldest exited ones as needed.
fn admit(table: &mut BTreeMap<u32, Arc<Session>>, ring: u64) -> Result<(), Failure> {
    let running = table
        .values()
        .filter(|s| s.st.lock().unwrap().exit.is_none())
        .count();
    if running >= MAX_SESSIONS {
        return Err(Failure::new(
            ErrorCode::Busy,
            format!("{MAX_SESSIONS} terminal sessions are running"),
        ));
    }
    loop {
        let mut exited: Vec<(u64, u32)> = Vec::new();
        let mut reserved = 0;
        for s in table.values() {
            let st = s.st.lock().unwrap();
            reserved += st.ring_cap;
            if st.exit.is_some() {
                exited.push((st.exit_seq, s.pid));
            }
        }
        if exited.len() < KEEP_EXITED && reserved + ring <= RING_BUDGET {
            return Ok(());
        }
        exited.sort();
        let Some((_, pid)) = exited.first() else {
            return Err(Failure::new(
                ErrorCode::Busy,
                format!("terminal output buffers use {reserved} of {RING_BUDGET} bytes"),
            ));
        };
        if let Some(s) = table.remove(pid) {
            s.st.lock().unwrap().closed = true;
        }
    }
}

/// A new terminal: (master, slave), the window size set.
fn open_terminal(cols: u16, rows: u16) -> Result<(OwnedFd, OwnedFd), Failure> {
    use rustix::fs::{Mode, OFlags};
    use rustix::pty::OpenptFlags;
    let io = |what: &str, e: rustix::io::Errno| {
        Failure::new(ErrorCode::Io, format!("terminal: {what}: {e}"))
    };
    let master =
        rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
            .map_err(|e| io("open /dev/ptmx", e))?;
    rustix::pty::grantpt(&master).map_err(|e| io("grantpt", e))?;
    rustix::pty::unlockpt(&master).map_err(|e| io("unlockpt", e))?;
    let name = rustix::pty::ptsname(&master, Vec::new()).map_err(|e| io("ptsname", e))?;
    let slave = rustix::fs::open(
        name.as_c_str(),
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io(&format!("open {}", name.to_string_lossy()), e))?;
    rustix::termios::tcsetwinsize(
        &master,
        rustix::termios::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )
    .map_err(|e| io("TIOCSWINSZ", e))?;
    let flags = rustix::fs::fcntl_getfl(&master).map_err(|e| io("F_GETFL", e))?;
    rustix::fs::fcntl_setfl(&master, flags | OFlags::NONBLOCK).map_err(|e| io("O_NONBLOCK", e))?;
    Ok((master, slave))
}

fn spawn_helper(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), Failure> {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(HELPER_STACK)
        .spawn(f)
        .map(|_| ())
        .map_err(|e| Failure::new(ErrorCode::Busy, format!("thread: {e}")))
}

/// The `pty_start` op.
pub fn start(state: &State, spec: PtySpec) -> Outcome {
    proto::check_size(spec.cols, spec.rows).map_err(Failure::bad)?;
    let user = spec
        .user
        .clone()
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .or_else(|| state.defaults.lock().unwrap().user.clone());
    let ident = crate::users::resolve(user.as_deref()).map_err(Failure::bad)?;
    let argv = if !spec.argv.is_empty() {
        spec.argv.clone()
    } else if let Some(cmd) = &spec.cmd {
        vec!["/bin/sh".into(), "-c".into(), cmd.clone()]
    } else {
        // Interactive without a login: a login shell's profile would reset
        // the template's PATH.
        vec![login_shell(user.as_deref().unwrap_or("root")), "-i".into()]
    };
    let mut env = spec.env.clone();
    env.entry("TERM".into())
        .or_insert_with(|| DEFAULT_TERM.into());
    let ring = spec
        .ring_bytes
        .unwrap_or(DEFAULT_PTY_RING)
        .clamp(OUTPUT_CHUNK as u64, MAX_PTY_RING);
    let id = session_id()?;
    let (master, slave) = open_terminal(spec.cols, spec.rows)?;
    // The terminal belongs to its user, as login(1) would leave it.
    rustix::fs::fchown(
        &slave,
        Some(rustix::process::Uid::from_raw(ident.uid)),
        Some(rustix::process::Gid::from_raw(ident.gid)),
    )
    .map_err(|e| Failure::new(ErrorCode::Io, format!("terminal: chown: {e}")))?;
    let stdio = |fd: &OwnedFd| {
        fd.try_clone()
            .map(Stdio::from)
            .map_err(|e| Failure::io("terminal: dup", e))
    };
    let (i, o, e) = (stdio(&slave)?, stdio(&slave)?, stdio(&slave)?);
    let pspec = procs::Spec {
        argv: argv.clone(),
        env,
        cwd: spec.cwd.clone(),
        user: user.as_deref(),
        stdin: procs::Stdin::Null,
        new_session: true,
        capture: false,
    };
    let mut table = SESSIONS.lock().unwrap();
    admit(&mut table, ring)?;
    let sp = procs::spawn_with(state, pspec, move |cmd| {
        cmd.stdin(i).stdout(o).stderr(e);
        // SAFETY: runs in the child between fork and exec, after `setsid`
        // and the stdio set-up; it makes one raw ioctl through rustix (no
        // allocation, no locks), as `pre_exec` requires. TIOCSCTTY makes
        // the terminal on fd 0 the new session's controlling terminal.
        unsafe {
            cmd.pre_exec(|| {
                rustix::process::ioctl_tiocsctty(rustix::stdio::stdin())?;
                Ok(())
            });
        }
    })
    .map_err(|e| Failure::new(ErrorCode::SpawnFailed, e))?;
    // Only the child holds the terminal's other side now: its end is the
    // reader's EIO.
    drop(slave);
    let pid = sp.child.id();
    let command = clip(&argv.join(" "), 4096).to_string();
    let session = Arc::new(Session {
        id,
        pid,
        command,
        started_unix_ms: procs::now_unix_ms(),
        master,
        input: Mutex::new(()),
        st: Mutex::new(SessionState {
            cols: spec.cols,
            rows: spec.rows,
            exit: None,
            exit_seq: 0,
            ring: Ring::new(ring as usize),
            ring_cap: ring,
            subs: Vec::new(),
            reading: true,
            last_output: None,
            output_done: false,
            closed: false,
        }),
    });
    table.insert(pid, session.clone());
    drop(table);
    // The reaper owns exits; the `Child` is not waited on.
    drop(sp.child);
    let exit_rx = sp.exit;
    let reader = session.clone();
    if let Err(e) = spawn_helper("pty-read", move || read_output(&reader)) {
        crate::exec::kill_group(pid, 9);
        session.st.lock().unwrap().reading = false;
        crate::log(&format!("pty {pid}: {}", e.message));
    }
    let waiter = session.clone();
    spawn_helper("pty-wait", move || {
        let status = exit_rx.recv().unwrap_or(Exit::Signal(9)).status(false);
        wait_exit(&waiter, status);
    })
    .inspect_err(|_| crate::exec::kill_group(pid, 9))?;
    Ok(Event::Pty {
        info: session.info(),
    })
}

/// Copies the terminal's output until every holder of its other side
/// closed it (EIO) or the session is forgotten.
fn read_output(s: &Session) {
    use rustix::event::{PollFd, PollFlags};
    let mut buf = vec![0u8; OUTPUT_CHUNK];
    loop {
        if s.st.lock().unwrap().closed {
            break;
        }
        let mut fds = [PollFd::new(&s.master, PollFlags::IN)];
        let t = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 200_000_000,
        };
        match rustix::event::poll(&mut fds, Some(&t)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            Ok(_) => {}
            Err(_) => break,
        }
        match rustix::io::read(&s.master, &mut buf) {
            Ok(0) => break,
            Ok(n) => s.publish(&buf[..n]),
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
            // EIO: the other side is closed everywhere.
            Err(_) => break,
        }
    }
    s.st.lock().unwrap().reading = false;
}

/// After the exit: records it, lets the reader drain, then ends the
/// attached readers.
fn wait_exit(s: &Session, status: ExitStatus) {
    let exited = Instant::now();
    {
        let mut st = s.st.lock().unwrap();
        st.exit = Some(status);
        st.exit_seq = EXIT_SEQ.fetch_add(1, Ordering::SeqCst);
    }
    loop {
        {
            let st = s.st.lock().unwrap();
            let since = st.last_output.map_or(exited, |t| t.max(exited));
            if !st.reading || since.elapsed() >= DRAIN_IDLE {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut st = s.st.lock().unwrap();
    st.output_done = true;
    for sub in st.subs.drain(..) {
        sub.finish();
    }
}

/// `attach` of a session: its output as `stdout` (with `replay`, what the
/// ring holds first) until it exits.
pub fn attach(resp: &Resp, pid: u32, replay: bool) -> Outcome {
    let s = find(pid)?;
    let sub = {
        let mut st = s.st.lock().unwrap();
        let held = if replay {
            vec![(Stream::Stdout, st.ring.buf.iter().copied().collect())]
        } else {
            Vec::new()
        };
        let sub = Sub::new(&held);
        if st.output_done {
            sub.finish();
        } else {
            st.subs.push(sub.clone());
        }
        sub
    };
    resp.send(Event::Started { pid });
    let dropped = sub.forward(resp).inspect_err(|_| {
        s.st.lock().unwrap().subs.retain(|x| !Arc::ptr_eq(x, &sub));
    })?;
    let mut status =
        s.st.lock()
            .unwrap()
            .exit
            .unwrap_or(Exit::Signal(9).status(false));
    status.dropped = dropped;
    Ok(Event::Exit(status))
}

/// `write_stdin` of a session: types `data` (then ^D with `eof`).
pub fn write(pid: u32, data: &[u8], eof: bool) -> Outcome {
    use rustix::event::{PollFd, PollFlags};
    if data.len() > MAX_CHUNK {
        return Err(Failure::bad(format!(
            "write_stdin: at most {MAX_CHUNK} bytes per request"
        )));
    }
    let s = find(pid)?;
    let _turn = s.input.lock().unwrap();
    let mut rest: Vec<u8> = data.to_vec();
    if eof {
        rest.push(VEOF);
    }
    let deadline = Instant::now() + INPUT_TIMEOUT;
    let mut off = 0;
    while off < rest.len() {
        if s.st.lock().unwrap().exit.is_some() {
            return Err(Failure::new(
                ErrorCode::NotFound,
                format!("terminal session {pid} has exited"),
            ));
        }
        match rustix::io::write(&s.master, &rest[off..]) {
            Ok(n) => off += n,
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {
                if Instant::now() >= deadline {
                    return Err(Failure::new(
                        ErrorCode::Busy,
                        format!(
                            "terminal session {pid} does not read its input ({off} of {} bytes written)",
                            rest.len()
                        ),
                    ));
                }
                let mut fds = [PollFd::new(&s.master, PollFlags::OUT)];
                let t = rustix::time::Timespec {
                    tv_sec: 0,
                    tv_nsec: 100_000_000,
                };
                let _ = rustix::event::poll(&mut fds, Some(&t));
            }
            Err(e) => {
                return Err(Failure::new(
                    ErrorCode::Io,
                    format!("input of terminal session {pid}: {e}"),
                ));
            }
        }
    }
    Ok(Event::Written {
        bytes: data.len() as u64,
    })
}

/// The `pty_resize` op: the program gets SIGWINCH from the kernel.
pub fn resize(pid: u32, cols: u16, rows: u16) -> Outcome {
    proto::check_size(cols, rows).map_err(Failure::bad)?;
    let s = find(pid)?;
    rustix::termios::tcsetwinsize(
        &s.master,
        rustix::termios::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )
    .map_err(|e| Failure::new(ErrorCode::Io, format!("resize terminal session {pid}: {e}")))?;
    {
        let mut st = s.st.lock().unwrap();
        st.cols = cols;
        st.rows = rows;
    }
    Ok(Event::Pty { info: s.info() })
}

/// `kill` of a session: by default its whole process group.
pub fn kill(pid: u32, signal: i32, group: bool) -> Outcome {
    let sig = rustix::process::Signal::from_named_raw(signal)
        .ok_or_else(|| Failure::bad(format!("kill: unknown signal {signal}")))?;
    let s = find(pid)?;
    if s.st.lock().unwrap().exit.is_some() {
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
        Err(e) => Err(Failure::new(
            ErrorCode::Io,
            format!("kill terminal session {pid}: {e}"),
        )),
    }
}

/// The `pty_list` op.
pub fn list() -> Event {
    let sessions: Vec<Arc<Session>> = SESSIONS.lock().unwrap().values().cloned().collect();
    Event::Ptys {
        sessions: sessions.iter().map(|s| s.info()).collect(),
    }
}
