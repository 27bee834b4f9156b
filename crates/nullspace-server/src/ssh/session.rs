//! One SSH connection (a russh [`Handler`]): certificate authentication
//! against the grants and the machine, then session channels: an `exec`
//! request runs the command through the agent's exec (stdin, stdout,
//! stderr and the exit status forwarded), a `shell` or an `exec` after a
//! `pty-req` opens one of the agent's terminals (window changes resize
//! it). A channel's guest process ends with the channel or the
//! connection.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use nullspace_model::agent::PtySpec;
use nullspace_model::agent::pty::check_size;
use nullspace_store::Caller;
use russh::keys::Certificate;
use russh::server::{Auth, ChannelOpenHandle, Handle, Handler, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure, Pty};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::access::{AccessRecord, Refusal, now_secs};
use crate::guest::{Chunk, Command, Guest};
use crate::machines::commands;
use crate::state::Shared;

/// Input messages waiting for the guest, per session.
const INPUT_QUEUE: usize = 16;
/// Output chunks waiting for the client, per session.
const OUTPUT_QUEUE: usize = 16;
/// Longest command line an exec request may carry.
const MAX_COMMAND: usize = 256 << 10;
/// Environment variables a client may pass (as OpenSSH's `AcceptEnv`).
const MAX_ENV: usize = 32;

/// Session bounds shared by the listener's connections.
#[derive(Clone)]
pub struct Limits {
    pub sessions: Arc<Semaphore>,
    pub per_connection: usize,
}

/// What a session's task is told by the connection.
enum Input {
    Data(Vec<u8>),
    Eof,
    Resize(u16, u16),
}

/// A requested terminal.
#[derive(Clone)]
struct PtyReq {
    term: String,
    cols: u16,
    rows: u16,
}

/// A session channel: what it asked for before it started, then its task.
struct Chan {
    pty: Option<PtyReq>,
    env: BTreeMap<String, String>,
    permit: Option<OwnedSemaphorePermit>,
    input: Option<mpsc::Sender<Input>>,
    stop: CancellationToken,
}

/// The admitted login: which machine, as whom.
#[derive(Clone)]
struct Admitted {
    record: AccessRecord,
    caller: Caller,
}

pub struct Conn {
    state: Shared,
    peer: SocketAddr,
    limits: Limits,
    authed: Arc<AtomicBool>,
    stop: CancellationToken,
    admitted: Option<Admitted>,
    chans: HashMap<ChannelId, Chan>,
}

impl Conn {
    pub fn new(
        state: Shared,
        peer: SocketAddr,
        limits: Limits,
        authed: Arc<AtomicBool>,
        stop: CancellationToken,
    ) -> Conn {
        Conn {
            state,
            peer,
            limits,
            authed,
            stop,
            admitted: None,
            chans: HashMap::new(),
        }
    }

    /// Checks a certificate for `login`: the grant, then the machine in
    /// the grant's namespace, running on this node.
    async fn admit(&self, login: &str, cert: &Certificate) -> Result<Admitted, Refusal> {
        let ssh = &self.state.ssh;
        let record = ssh
            .grants
            .admit(&ssh.keys.ca_fingerprint(), login, cert, now_secs())?;
        let caller = Caller {
            key_id: format!("ssh:{}", record.access_id),
            namespace: record.namespace.clone(),
        };
        match commands::running(&self.state, &caller, login).await {
            Ok(_) => Ok(Admitted { record, caller }),
            Err(crate::machines::MachineError::NotFound(_)) => Err(Refusal::OtherNamespace {
                access: record.access_id,
                granted: record.namespace,
                machine: login.to_string(),
            }),
            Err(e) => Err(Refusal::Machine {
                id: login.to_string(),
                why: e.to_string(),
            }),
        }
    }

    /// Starts the channel's session: `command` (`None`: a shell).
    async fn start(
        &mut self,
        channel: ChannelId,
        command: Option<String>,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let Some(a) = self.admitted.clone() else {
            return session.channel_failure(channel);
        };
        let Some(ch) = self.chans.get_mut(&channel) else {
            return session.channel_failure(channel);
        };
        if ch.input.is_some() {
            // One program per channel (RFC 4254 §6.5).
            return session.channel_failure(channel);
        }
        let Some(permit) = ch.permit.take() else {
            return session.channel_failure(channel);
        };
        let (live, cwd) = match commands::running(&self.state, &a.caller, &a.record.machine_id)
            .await
        {
            Ok((m, live)) => (live, m.doc.cwd.clone()),
            Err(e) => {
                tracing::warn!(peer = %self.peer, machine = %a.record.machine_id, "ssh: session refused: {e}");
                return session.channel_failure(channel);
            }
        };
        let (tx, rx) = mpsc::channel(INPUT_QUEUE);
        ch.input = Some(tx);
        let mut env = live.envs.clone();
        env.extend(ch.env.clone());
        let run = Run {
            guest: live.guest.clone(),
            handle: session.handle(),
            channel,
            user: a.record.user.clone(),
            env,
            cwd,
            stop: ch.stop.clone(),
            machine: a.record.machine_id.clone(),
        };
        let pty = ch.pty.clone();
        session.channel_success(channel)?;
        tracing::info!(
            peer = %self.peer,
            machine = %run.machine,
            access = %a.record.access_id,
            pty = pty.is_some(),
            "ssh: session started"
        );
        tokio::spawn(async move {
            let _permit = permit;
            let code = match pty {
                Some(p) => run.terminal(p, command, rx).await,
                None => run.exec(command, rx).await,
            };
            run.finish(code).await;
        });
        Ok(())
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // The connection is gone: its sessions end.
        self.stop.cancel();
    }
}

impl Handler for Conn {
    type Error = russh::Error;

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        certificate: &Certificate,
    ) -> Result<Auth, Self::Error> {
        match self.admit(user, certificate).await {
            Ok(a) => {
                tracing::info!(
                    peer = %self.peer,
                    machine = %a.record.machine_id,
                    access = %a.record.access_id,
                    "ssh: admitted"
                );
                self.admitted = Some(a);
                self.authed.store(true, Ordering::Release);
                Ok(Auth::Accept)
            }
            Err(r) => {
                // The client's words: one line, bounded, printable.
                let login: String = user
                    .chars()
                    .take(64)
                    .map(|c| if c.is_ascii_graphic() { c } else { '?' })
                    .collect();
                tracing::warn!(peer = %self.peer, login = %login, "ssh: refused: {r}");
                Ok(Auth::reject())
            }
        }
    }

    async fn channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Data comes through the handler's callbacks; the channel object
        // is not read (dropping it lets russh skip it).
        let id = _channel.id();
        drop(_channel);
        if self.admitted.is_none() {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        self.chans.retain(|_, c| !c.stop.is_cancelled());
        if self.chans.len() >= self.limits.per_connection {
            tracing::warn!(peer = %self.peer, "ssh: channel refused: {} sessions on this connection", self.limits.per_connection);
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        let Ok(permit) = self.limits.sessions.clone().try_acquire_owned() else {
            tracing::warn!(peer = %self.peer, "ssh: channel refused: the server's SSH sessions are all in use");
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        self.chans.insert(
            id,
            Chan {
                pty: None,
                env: BTreeMap::new(),
                permit: Some(permit),
                input: None,
                stop: self.stop.child_token(),
            },
        );
        reply.accept().await;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let size = dimensions(col_width, row_height);
        match (self.chans.get_mut(&channel), size) {
            (Some(ch), Some((cols, rows))) if ch.input.is_none() => {
                let term = if term.is_empty() || term.len() > 64 {
                    "xterm".to_string()
                } else {
                    term.to_string()
                };
                ch.pty = Some(PtyReq { term, cols, rows });
                session.channel_success(channel)
            }
            _ => session.channel_failure(channel),
        }
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // As OpenSSH's default AcceptEnv: the locale only.
        let accepted = (name == "LANG" || name.starts_with("LC_"))
            && name.len() <= 64
            && value.len() <= 256
            && !value.contains('\0');
        match self.chans.get_mut(&channel) {
            Some(ch) if accepted && ch.env.len() < MAX_ENV => {
                ch.env.insert(name.to_string(), value.to_string());
                session.channel_success(channel)
            }
            _ => session.channel_failure(channel),
        }
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start(channel, None, session).await
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if data.len() > MAX_COMMAND || data.contains(&0) {
            tracing::warn!(peer = %self.peer, "ssh: exec refused: the command is over {MAX_COMMAND} bytes or holds a NUL");
            return session.channel_failure(channel);
        }
        let line = String::from_utf8_lossy(data).into_owned();
        self.start(channel, Some(line), session).await
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let name: String = name.chars().take(64).collect();
        tracing::info!(peer = %self.peer, "ssh: subsystem {name:?} is not served");
        session.channel_failure(channel)
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let (Some(ch), Some((c, r))) = (
            self.chans.get_mut(&channel),
            dimensions(col_width, row_height),
        ) {
            match (&ch.input, &mut ch.pty) {
                (Some(tx), _) => {
                    let _ = tx.send(Input::Resize(c, r)).await;
                }
                (None, Some(p)) => (p.cols, p.rows) = (c, r),
                _ => {}
            }
        }
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(tx) = self.chans.get(&channel).and_then(|c| c.input.clone()) {
            // A full queue holds the connection back (flow control).
            let _ = tx.send(Input::Data(data.to_vec())).await;
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(tx) = self.chans.get(&channel).and_then(|c| c.input.clone()) {
            let _ = tx.send(Input::Eof).await;
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(ch) = self.chans.remove(&channel) {
            ch.stop.cancel();
        }
        Ok(())
    }
}

/// A terminal size from a request, when it is one the agent takes.
fn dimensions(cols: u32, rows: u32) -> Option<(u16, u16)> {
    let (c, r) = (u16::try_from(cols).ok()?, u16::try_from(rows).ok()?);
    // OpenSSH sends 0x0 when stdin is not a terminal: a default size then.
    let (c, r) = if c == 0 || r == 0 { (80, 24) } else { (c, r) };
    check_size(c, r).ok().map(|_| (c, r))
}

/// A session's program in the guest, and where its output goes.
struct Run {
    guest: Guest,
    handle: Handle,
    channel: ChannelId,
    user: Option<String>,
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    stop: CancellationToken,
    machine: String,
}

impl Run {
    /// Sends output to the client; a client that is gone stops the session.
    async fn out(&self, stderr: bool, d: Vec<u8>) -> bool {
        let sent = if stderr {
            self.handle.extended_data(self.channel, 1, d).await.is_ok()
        } else {
            self.handle.data(self.channel, d).await.is_ok()
        };
        if !sent {
            self.stop.cancel();
        }
        sent
    }

    /// A command without a terminal: a background process of the agent
    /// with its stdin open, attached to. The exit code, or `None` when
    /// the session was stopped (the process is killed).
    async fn exec(&self, command: Option<String>, mut input: mpsc::Receiver<Input>) -> Option<i32> {
        let cmd = Command {
            argv: vec![],
            // No command: a shell reading the client's input.
            shell: Some(command.unwrap_or_else(|| "exec /bin/sh".into())),
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            user: self.user.clone(),
            timeout: None,
            stdin_open: true,
        };
        let pid = match self.guest.spawn(cmd).await {
            Ok(p) => p,
            Err(e) => {
                let _ = self
                    .out(
                        true,
                        format!("nullspace: starting the command: {e}\r\n").into_bytes(),
                    )
                    .await;
                return Some(255);
            }
        };
        let (tx, mut rx) = mpsc::channel::<Chunk>(OUTPUT_QUEUE);
        let attach = tokio::spawn({
            let g = self.guest.clone();
            async move { g.attach(pid, tx).await }
        });
        let mut input_open = true;
        loop {
            tokio::select! {
                c = rx.recv() => match c {
                    Some(Chunk::Stdout(d)) => { if !self.out(false, d).await { break; } }
                    Some(Chunk::Stderr(d)) => { if !self.out(true, d).await { break; } }
                    None => break,
                },
                i = input.recv(), if input_open => match i {
                    Some(Input::Data(d)) => {
                        for piece in d.chunks(nullspace_model::agent::MAX_CHUNK) {
                            let _ = self.guest.write_stdin(pid, piece.to_vec(), false).await;
                        }
                    }
                    Some(Input::Eof) | None => {
                        input_open = false;
                        let _ = self.guest.write_stdin(pid, vec![], true).await;
                    }
                    Some(Input::Resize(..)) => {}
                },
                _ = self.stop.cancelled() => break,
            }
        }
        if self.stop.is_cancelled() {
            let _ = self.guest.kill(pid).await;
            attach.abort();
            return None;
        }
        match attach.await {
            Ok(Ok(code)) => code,
            Ok(Err(e)) => {
                tracing::warn!(machine = %self.machine, "ssh: exec stream: {e}");
                Some(255)
            }
            Err(_) => Some(255),
        }
    }

    /// A terminal session (a shell, or `command` in a terminal).
    async fn terminal(
        &self,
        p: PtyReq,
        command: Option<String>,
        mut input: mpsc::Receiver<Input>,
    ) -> Option<i32> {
        let mut env = self.env.clone();
        env.insert("TERM".into(), p.term.clone());
        let spec = PtySpec {
            cmd: command,
            env,
            cwd: self.cwd.clone(),
            user: self.user.clone(),
            cols: p.cols,
            rows: p.rows,
            ..Default::default()
        };
        let info = match self.guest.pty_start(spec).await {
            Ok(i) => i,
            Err(e) => {
                let _ = self
                    .out(
                        true,
                        format!("nullspace: opening a terminal: {e}\r\n").into_bytes(),
                    )
                    .await;
                return Some(255);
            }
        };
        let pid = info.pid;
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(OUTPUT_QUEUE);
        let attached = self.stop.child_token();
        let attach = tokio::spawn({
            let (g, stop) = (self.guest.clone(), attached.clone());
            async move { g.pty_attach(pid, true, tx, stop).await }
        });
        let mut input_open = true;
        loop {
            tokio::select! {
                d = rx.recv() => match d {
                    Some(d) => { if !self.out(false, d).await { break; } }
                    None => break,
                },
                i = input.recv(), if input_open => match i {
                    Some(Input::Data(d)) => {
                        for piece in d.chunks(nullspace_model::agent::MAX_CHUNK) {
                            let _ = self.guest.pty_input(pid, piece.to_vec()).await;
                        }
                    }
                    Some(Input::Resize(c, r)) => {
                        let _ = self.guest.pty_resize(pid, c, r).await;
                    }
                    // A terminal's end of input is the program's to see
                    // (^D); the client's EOF changes nothing.
                    Some(Input::Eof) => {}
                    None => input_open = false,
                },
                _ = self.stop.cancelled() => break,
            }
        }
        if self.stop.is_cancelled() {
            // A hung-up terminal: its session ends.
            attached.cancel();
            let _ = self.guest.pty_kill(pid).await;
            let _ = attach.await;
            return None;
        }
        match attach.await {
            Ok(Ok(code)) => code,
            Ok(Err(e)) => {
                tracing::warn!(machine = %self.machine, "ssh: terminal stream: {e}");
                Some(255)
            }
            Err(_) => Some(255),
        }
    }

    /// The exit status (when the program ended), then EOF and close.
    async fn finish(&self, code: Option<i32>) {
        if let Some(c) = code {
            // A status is 0..=255 on the wire as OpenSSH reports it.
            let status = u32::try_from(c).unwrap_or(255);
            let _ = self.handle.exit_status_request(self.channel, status).await;
        }
        let _ = self.handle.eof(self.channel).await;
        let _ = self.handle.close(self.channel).await;
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::dimensions;

    #[test]
    fn terminal_sizes_are_bounded() {
        assert_eq!(dimensions(80, 24), Some((80, 24)));
        // OpenSSH's 0x0 (stdin not a terminal): a default size.
        assert_eq!(dimensions(0, 0), Some((80, 24)));
        assert_eq!(dimensions(70_000, 24), None);
        assert_eq!(dimensions(5000, 24), None);
    }
}
