//! Host side of the guest agent (protocol: see `nullspace-init`'s
//! `agent.rs`): newline-delimited JSON over the VM's virtio-serial socket.

use crate::VmError;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct AgentClient {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    /// Run `argv` directly, or (when empty) `cmd` under `/bin/sh -c`.
    pub argv: Vec<String>,
    pub cmd: Option<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    pub stdin: Option<Vec<u8>>,
    /// Killed (process group) after this long in the guest.
    pub timeout: Option<Duration>,
}

impl ExecRequest {
    pub fn shell(cmd: &str) -> Self {
        ExecRequest {
            cmd: Some(cmd.to_string()),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecOutput {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).to_string()
    }
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

pub enum Stream {
    Stdout,
    Stderr,
}

impl AgentClient {
    /// Connects to the VM's agent socket (QEMU is the server).
    pub fn connect(path: &Path, limit: Duration) -> Result<AgentClient, VmError> {
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
        let writer = s.try_clone().map_err(VmError::io("agent socket"))?;
        Ok(AgentClient {
            path: path.to_path_buf(),
            reader: BufReader::new(s),
            writer,
            next_id: 1,
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    fn send(&mut self, mut req: Value) -> Result<u64, VmError> {
        let id = self.next_id;
        self.next_id += 1;
        req["id"] = json!(id);
        let mut line = req.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| VmError::Agent(format!("send: {e}")))?;
        Ok(id)
    }

    /// Next reply line for `id` before `deadline` (other ids are stale
    /// replies from before a reconnect and are skipped).
    fn recv(&mut self, id: u64, deadline: Instant) -> Result<Value, VmError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(VmError::Agent(
                    "timed out waiting for the guest agent".into(),
                ));
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(VmError::io("agent socket"))?;
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return Err(VmError::Agent("agent connection closed".into())),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    // A partial line stays in `line`; BufReader keeps nothing, so
                    // continue only if nothing was read.
                    if line.is_empty() {
                        continue;
                    }
                    return Err(VmError::Agent("timed out mid-line".into()));
                }
                Err(e) => return Err(VmError::Agent(format!("recv: {e}"))),
            }
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v.get("id").and_then(Value::as_u64) == Some(id) {
                return Ok(v);
            }
        }
    }

    /// A request with one `ok` reply.
    pub fn call(&mut self, req: Value, limit: Duration) -> Result<Value, VmError> {
        let deadline = Instant::now() + limit;
        let id = self.send(req)?;
        let v = self.recv(id, deadline)?;
        match v.get("type").and_then(Value::as_str) {
            Some("ok") => Ok(v),
            Some("error") => Err(VmError::Agent(
                v.get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("error")
                    .to_string(),
            )),
            _ => Err(VmError::Agent(format!("unexpected reply {v}"))),
        }
    }

    pub fn ping(&mut self, limit: Duration) -> Result<(), VmError> {
        self.call(json!({"op": "ping"}), limit).map(|_| ())
    }

    /// `{start: {pid, started_unix_ms, running, exit_code, signal, spawn_error, output}, uptime_ms, hostname}`.
    pub fn info(&mut self, limit: Duration) -> Result<Value, VmError> {
        self.call(json!({"op": "info"}), limit)
    }

    /// Runs a command, calling `on_output` for each chunk as it streams.
    pub fn exec_streaming(
        &mut self,
        req: &ExecRequest,
        limit: Duration,
        on_output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutput, VmError> {
        let deadline = Instant::now() + limit;
        let mut r = json!({"op": "exec", "env": req.env});
        if req.argv.is_empty() {
            r["cmd"] = json!(
                req.cmd
                    .clone()
                    .ok_or_else(|| VmError::Agent("exec: no argv or cmd".into()))?
            );
        } else {
            r["argv"] = json!(req.argv);
        }
        if let Some(c) = &req.cwd {
            r["cwd"] = json!(c);
        }
        if let Some(u) = &req.user {
            r["user"] = json!(u);
        }
        if let Some(s) = &req.stdin {
            r["stdin"] = json!(B64.encode(s));
        }
        if let Some(t) = req.timeout {
            r["timeout_ms"] = json!(t.as_millis() as u64);
        }
        let id = self.send(r)?;
        let mut out = ExecOutput::default();
        loop {
            let v = self.recv(id, deadline)?;
            let data = || {
                B64.decode(v.get("data").and_then(Value::as_str).unwrap_or(""))
                    .map_err(|e| VmError::Agent(format!("bad base64: {e}")))
            };
            match v.get("type").and_then(Value::as_str) {
                Some("stdout") => {
                    let d = data()?;
                    on_output(Stream::Stdout, &d);
                    out.stdout.extend(d);
                }
                Some("stderr") => {
                    let d = data()?;
                    on_output(Stream::Stderr, &d);
                    out.stderr.extend(d);
                }
                Some("exit") => {
                    out.code = v.get("code").and_then(Value::as_i64).map(|c| c as i32);
                    out.signal = v.get("signal").and_then(Value::as_i64).map(|c| c as i32);
                    out.timed_out = v.get("timed_out").and_then(Value::as_bool).unwrap_or(false);
                    return Ok(out);
                }
                Some("error") => {
                    return Err(VmError::Agent(
                        v.get("message")
                            .and_then(Value::as_str)
                            .unwrap_or("exec failed")
                            .to_string(),
                    ));
                }
                _ => {}
            }
        }
    }

    pub fn exec(&mut self, req: &ExecRequest, limit: Duration) -> Result<ExecOutput, VmError> {
        self.exec_streaming(req, limit, &mut |_, _| {})
    }

    /// `sh -c cmd` with the template's defaults.
    pub fn sh(&mut self, cmd: &str, limit: Duration) -> Result<ExecOutput, VmError> {
        self.exec(&ExecRequest::shell(cmd), limit)
    }

    pub fn write_file(
        &mut self,
        path: &str,
        data: &[u8],
        mode: u32,
        limit: Duration,
    ) -> Result<(), VmError> {
        self.call(
            json!({"op": "write_file", "path": path, "data": B64.encode(data), "mode": mode}),
            limit,
        )
        .map(|_| ())
    }

    /// Writes `data` in chunks of at most 4 MiB (the agent's lines stay
    /// small), then sets exactly `mode` (not reduced by the guest umask).
    pub fn write_file_exact(
        &mut self,
        path: &str,
        data: &[u8],
        mode: u32,
        limit: Duration,
    ) -> Result<(), VmError> {
        const CHUNK: usize = 4 << 20;
        let mut off = 0;
        loop {
            let end = (off + CHUNK).min(data.len());
            self.call(
                json!({"op": "write_file", "path": path, "data": B64.encode(&data[off..end]),
                       "mode": mode, "append": off > 0, "exact_mode": true}),
                limit,
            )?;
            off = end;
            if off >= data.len() {
                return Ok(());
            }
        }
    }

    /// Replaces the guest's runtime defaults (env, user, workdir: used by the
    /// start command and every later exec, also in restored sandboxes) and
    /// starts `cmd` as the supervised start command (reported by `info`).
    /// Returns its pid. For a VM booted with `GuestConfig::defer_start`.
    pub fn start(
        &mut self,
        cmd: Option<&str>,
        env: &BTreeMap<String, String>,
        user: Option<&str>,
        workdir: Option<&str>,
        limit: Duration,
    ) -> Result<Option<u32>, VmError> {
        let v = self.call(
            json!({"op": "start", "cmd": cmd, "env": env, "user": user, "workdir": workdir}),
            limit,
        )?;
        Ok(v.get("pid").and_then(Value::as_u64).map(|p| p as u32))
    }

    /// Sets the guest's wall clock (`CLOCK_REALTIME`) to `time`. Returns the
    /// guest's previous wall clock.
    pub fn set_time(
        &mut self,
        time: std::time::SystemTime,
        limit: Duration,
    ) -> Result<std::time::SystemTime, VmError> {
        let ns = time
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| VmError::Agent(format!("set_time: {e}")))?
            .as_nanos() as u64;
        let v = self.call(json!({"op": "set_time", "unix_ns": ns}), limit)?;
        let prev = v
            .get("previous_unix_ns")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        Ok(std::time::UNIX_EPOCH + Duration::from_nanos(prev))
    }

    pub fn read_file(&mut self, path: &str, limit: Duration) -> Result<Vec<u8>, VmError> {
        let v = self.call(json!({"op": "read_file", "path": path}), limit)?;
        B64.decode(v.get("data").and_then(Value::as_str).unwrap_or(""))
            .map_err(|e| VmError::Agent(format!("bad base64: {e}")))
    }

    /// One probe attempt in the guest: `(ready, detail)`.
    pub fn probe_once(
        &mut self,
        probe: Value,
        attempt_limit: Duration,
    ) -> Result<(bool, String), VmError> {
        let v = self.call(
            json!({"op": "probe", "probe": probe, "timeout_ms": attempt_limit.as_millis() as u64}),
            attempt_limit + Duration::from_secs(10),
        )?;
        Ok((
            v.get("ready").and_then(Value::as_bool).unwrap_or(false),
            v.get("detail")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        ))
    }
}
