//! `nullspace machine shell ID`: the machine's terminal in this one. A
//! session on `GET /v1/machines/{id}/ws?channel=pty` with the SDK's frames
//! (`pty_start` with this terminal's size and `TERM`; `pty_input`,
//! `pty_resize`, `pty_kill`; `pty_output` and `pty_exited` back): standard
//! input goes to it, its output to standard output, and its exit code
//! becomes this process's exit status.
//!
//! With a terminal on standard input, that terminal is in raw mode for the
//! session (keys, Ctrl-C included, travel as bytes) and a window change
//! (SIGWINCH) resizes the machine's terminal. Without one (a pipe, a
//! file), input is copied as is and its end is sent as Ctrl-D, so a script
//! can pipe commands. SIGTERM, SIGHUP, SIGINT and SIGQUIT kill the session
//! (it would otherwise go on in the machine) and end with 128 + the signal.

mod connect;
mod tty;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Duration;

use base64::Engine as _;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use nullspace_model::agent::pty::{DEFAULT_COLS, DEFAULT_ROWS};
use nullspace_model::terminal::{PtyEvent, PtyRequest};
use rustix::process::Signal as Sig;
use serde_json::Value;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::template::{Api, enc};

pub use connect::ConnectError;

/// What `pty_start` asks for besides the size.
#[derive(Debug, Default)]
pub struct Options {
    pub cwd: Option<String>,
    pub user: Option<String>,
    /// A shell line instead of the user's login shell.
    pub cmd: Option<String>,
    /// Over the machine's environment; `TERM` is this process's unless given.
    pub env: BTreeMap<String, String>,
}

/// How long the machine may take to start the terminal. Generous: a
/// paused machine with auto-resume is restored first.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Input chunks read ahead of the socket: a fast pipe waits, memory does not grow.
const INPUT_QUEUE: usize = 16;
const INPUT_CHUNK: usize = 4096;
/// Ctrl-D: the end of input for the machine's terminal (canonical mode).
const EOT: u8 = 0x04;

#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("machine {id}: the terminal did not start: {message} (code {code})")]
    StartRefused {
        id: String,
        code: String,
        message: String,
    },
    #[error("machine {id}: no answer to pty_start within {} s", START_TIMEOUT.as_secs())]
    StartTimeout { id: String },
    #[error("machine {id}: the server closed the connection before the terminal exited")]
    Closed { id: String },
    #[error("machine {id}: the connection failed: {source}")]
    Lost {
        id: String,
        source: tungstenite::Error,
    },
    #[error("machine {id}: the terminal failed: {message} (code {code})")]
    Remote {
        id: String,
        code: String,
        message: String,
    },
    #[error("machine {id}: the server sent an invalid pty frame: {why}")]
    BadFrame { id: String, why: String },
    #[error("writing to standard output: {0}")]
    Stdout(std::io::Error),
    #[error("the local terminal: {0}")]
    Tty(std::io::Error),
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("starting the client runtime: {0}")]
    Runtime(std::io::Error),
}

/// Runs the session to its end; returns the machine terminal's exit code
/// (or 128 + the signal that ended this process).
pub fn run(api: &Api, id: &str, o: Options) -> Result<i32, ShellError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ShellError::Runtime)?;
    let r = rt.block_on(session(api.base(), api.key(), id, o));
    // The input thread may still sit in read(2) on the terminal: not waited for.
    rt.shutdown_background();
    r
}

type Tx = SplitSink<connect::Socket, Message>;
type Rx = SplitStream<connect::Socket>;

async fn session(base: &str, key: &str, id: &str, o: Options) -> Result<i32, ShellError> {
    let path = format!("/v1/machines/{}/ws?channel=pty", enc(id));
    let (mut tx, mut rx) = connect::open(base, key, &path).await?.split();
    let raw = tty::stdin_is_tty();
    let (cols, rows) = tty::size().unwrap_or((DEFAULT_COLS, DEFAULT_ROWS));
    let mut env = o.env;
    if let Ok(term) = std::env::var("TERM")
        && !term.is_empty()
    {
        env.entry("TERM".into()).or_insert(term);
    }
    let req = Value::String(nullspace_store::new_id("pty_"));
    let start = PtyRequest::PtyStart {
        id: req.clone(),
        cols,
        rows,
        cwd: o.cwd,
        envs: (!env.is_empty()).then_some(env),
        user: o.user,
        cmd: o.cmd,
    };
    send(&mut tx, &start, id).await?;
    let sid = match tokio::time::timeout(START_TIMEOUT, started(&mut rx, id)).await {
        Ok(r) => r?,
        Err(_) => return Err(ShellError::StartTimeout { id: id.into() }),
    };
    let s = Session {
        id,
        req,
        sid,
        size: (cols, rows),
    };
    // Before raw mode: from here on these signals are returns, never a
    // death with the terminal left raw.
    let mut sigs = Signals::install(tty::size().is_some(), raw)?;
    // Held to the end of this function: every return restores the terminal.
    let guard = if raw {
        Some(tty::RawMode::enter().map_err(ShellError::Tty)?)
    } else {
        None
    };
    let kill = PtyRequest::PtyKill {
        id: s.req.clone(),
        session_id: s.sid.clone(),
    };
    let r = s.pump(&mut tx, &mut rx, guard.as_ref(), &mut sigs).await;
    // Sessions outlive their socket: unless the terminal ended by itself,
    // end it rather than leave it running in the machine.
    if !matches!(r, Ok(End::Exited(_))) {
        let _ = tokio::time::timeout(Duration::from_secs(2), send(&mut tx, &kill, id)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), tx.close()).await;
    drop(guard);
    match r? {
        End::Exited(code) => Ok(code),
        End::Signal(n) => Ok(128 + n),
    }
}

/// How a session ended, short of an error.
enum End {
    /// The machine's terminal exited with this code.
    Exited(i32),
    /// This process got this signal.
    Signal(i32),
}

/// Waits for `pty_started`; returns the session id.
async fn started(rx: &mut Rx, id: &str) -> Result<String, ShellError> {
    loop {
        match next_event(rx, id).await? {
            Some(PtyEvent::PtyStarted { session_id, .. }) => return Ok(session_id),
            Some(PtyEvent::Error { code, message, .. }) => {
                return Err(ShellError::StartRefused {
                    id: id.into(),
                    code,
                    message,
                });
            }
            Some(other) => {
                return Err(ShellError::BadFrame {
                    id: id.into(),
                    why: format!("{other:?} before pty_started"),
                });
            }
            None => {}
        }
    }
}

/// The next pty frame; `None` for a frame of a type this client does not
/// know (skipped, as the SDK skips them). Cancel-safe: the only await is
/// the stream's `next`.
async fn next_event(rx: &mut Rx, id: &str) -> Result<Option<PtyEvent>, ShellError> {
    loop {
        let text = match rx.next().await {
            None | Some(Ok(Message::Close(_))) => return Err(ShellError::Closed { id: id.into() }),
            Some(Err(source)) => {
                return Err(ShellError::Lost {
                    id: id.into(),
                    source,
                });
            }
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(_)) => continue,
        };
        return match serde_json::from_str::<PtyEvent>(&text) {
            Ok(e) => Ok(Some(e)),
            Err(e) => {
                let kind = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_string));
                match kind.as_deref() {
                    Some("pty_started" | "pty_output" | "pty_exited" | "error") | None => {
                        Err(ShellError::BadFrame {
                            id: id.into(),
                            why: e.to_string(),
                        })
                    }
                    Some(_) => Ok(None),
                }
            }
        };
    }
}

async fn send(tx: &mut Tx, r: &PtyRequest, id: &str) -> Result<(), ShellError> {
    // These frames are strings and numbers: encoding cannot fail.
    let text = serde_json::to_string(r).unwrap_or_default();
    tx.send(Message::Text(text.into()))
        .await
        .map_err(|source| ShellError::Lost {
            id: id.into(),
            source,
        })
}

/// One started session.
struct Session<'a> {
    id: &'a str,
    /// The request id every frame repeats (as the SDK does).
    req: Value,
    sid: String,
    size: (u16, u16),
}

impl Session<'_> {
    fn input(&self, bytes: &[u8]) -> PtyRequest {
        PtyRequest::PtyInput {
            id: self.req.clone(),
            session_id: self.sid.clone(),
            data_base64: Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
            data: None,
        }
    }

    /// Copies both ways until the terminal exits, the connection ends or a
    /// signal arrives.
    async fn pump(
        mut self,
        tx: &mut Tx,
        rx: &mut Rx,
        raw: Option<&tty::RawMode>,
        sigs: &mut Signals,
    ) -> Result<End, ShellError> {
        let id = self.id;
        let Signals { ends, winch, cont } = sigs;
        let (in_tx, mut input) = mpsc::channel::<Vec<u8>>(INPUT_QUEUE);
        read_stdin(in_tx);
        let mut input_open = true;
        // A failed send ends input; the reason is reported if no exit
        // frame is left to read.
        let mut send_failed: Option<ShellError> = None;
        let mut remote: Option<ShellError> = None;
        let mut stdout = std::io::stdout();
        loop {
            let mut out = vec![];
            tokio::select! {
                ev = next_event(rx, id) => match ev {
                    Ok(Some(PtyEvent::PtyOutput { data_base64, .. })) => {
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(data_base64.as_bytes())
                            .map_err(|e| ShellError::BadFrame {
                                id: id.into(),
                                why: format!("pty_output data_base64: {e}"),
                            })?;
                        stdout
                            .write_all(&bytes)
                            .and_then(|()| stdout.flush())
                            .map_err(ShellError::Stdout)?;
                    }
                    Ok(Some(PtyEvent::PtyExited { exit_code, .. })) => return Ok(End::Exited(exit_code)),
                    // An answer to one of our frames (input racing the
                    // exit, say) or the session's failure, which the
                    // server follows by closing: reported only if no exit
                    // frame comes.
                    Ok(Some(PtyEvent::Error { code, message, .. })) => {
                        remote = Some(ShellError::Remote { id: id.into(), code, message });
                    }
                    Ok(Some(PtyEvent::PtyStarted { .. }) | None) => {}
                    Err(e) => return Err(remote.or(send_failed).unwrap_or(e)),
                },
                chunk = input.recv(), if input_open => match chunk {
                    Some(bytes) => out.push(self.input(&bytes)),
                    None => {
                        input_open = false;
                        // A terminal's end (hung up) is not the user's Ctrl-D.
                        if raw.is_none() {
                            out.push(self.input(&[EOT]));
                        }
                    }
                },
                Some(()) = recv_some(winch) => {
                    if let Some(size) = tty::size()
                        && size != self.size
                    {
                        self.size = size;
                        out.push(PtyRequest::PtyResize {
                            id: self.req.clone(),
                            session_id: self.sid.clone(),
                            cols: size.0,
                            rows: size.1,
                        });
                    }
                }
                Some(()) = recv_some(cont) => {
                    if let Some(r) = raw {
                        r.reapply().map_err(ShellError::Tty)?;
                    }
                }
                n = any_of(ends) => return Ok(End::Signal(n)),
            }
            for f in out {
                if send_failed.is_some() {
                    break;
                }
                if let Err(e) = send(tx, &f, id).await {
                    input_open = false;
                    send_failed = Some(e);
                }
            }
        }
    }
}

/// The signals a session follows.
struct Signals {
    /// SIGTERM, SIGHUP, SIGINT, SIGQUIT with their numbers: they end it.
    ends: [(i32, Signal); 4],
    /// SIGWINCH, when there is a window to follow.
    winch: Option<Signal>,
    /// SIGCONT in raw mode: a job-control shell may have reset the
    /// terminal while this process was stopped.
    cont: Option<Signal>,
}

impl Signals {
    fn install(resize: bool, raw: bool) -> Result<Signals, ShellError> {
        let sig = |n: Sig| signal(SignalKind::from_raw(n.as_raw())).map_err(ShellError::Signals);
        let end = |n: Sig| Ok::<_, ShellError>((n.as_raw(), sig(n)?));
        Ok(Signals {
            ends: [
                end(Sig::TERM)?,
                end(Sig::HUP)?,
                end(Sig::INT)?,
                end(Sig::QUIT)?,
            ],
            winch: if resize { Some(sig(Sig::WINCH)?) } else { None },
            cont: if raw { Some(sig(Sig::CONT)?) } else { None },
        })
    }
}

/// The next delivery of an optional signal; never, without one.
async fn recv_some(s: &mut Option<Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// The number of the first of these signals to arrive.
async fn any_of(ends: &mut [(i32, Signal); 4]) -> i32 {
    let [(a, sa), (b, sb), (c, sc), (d, sd)] = ends;
    tokio::select! {
        _ = sa.recv() => *a,
        _ = sb.recv() => *b,
        _ = sc.recv() => *c,
        _ = sd.recv() => *d,
    }
}

/// Reads standard input on a thread of its own (a blocking read on a
/// terminal cannot be cancelled) into `tx`; its end or an error closes `tx`.
fn read_stdin(tx: mpsc::Sender<Vec<u8>>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; INPUT_CHUNK];
        loop {
            match rustix::io::read(std::io::stdin(), &mut buf[..]) {
                Ok(0) => break,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => break,
            }
        }
    });
}
