//! The guest agent on the virtio-serial port `nullspace.agent`.
//!
//! Protocol: newline-delimited JSON, one object per line, both directions
//! (byte fields are base64, so a line never contains a raw newline). Every
//! request carries a numeric `id` and an `op`; every reply line carries the
//! same `id` and a `type`:
//!
//! | op | fields | replies |
//! |---|---|---|
//! | `ping` | | `ok` |
//! | `info` | | `ok {start:{pid, started_unix_ms, running, exit_code, signal, spawn_error, output}, uptime_ms, hostname}` |
//! | `exec` | `argv: [..]` or `cmd: "sh line"`, `env`, `cwd`, `user`, `stdin` (b64), `timeout_ms` | `stdout`/`stderr {data}`* then `exit {code, signal, timed_out}` |
//! | `write_file` | `path`, `data` (b64), `mode`, `append`, `exact_mode` (chmod to `mode`, ignoring the umask) | `ok {bytes}` |
//! | `read_file` | `path` | `ok {data}` |
//! | `start` | `cmd` (optional), `env`, `user`, `workdir`: replace the runtime defaults, then start `cmd` as the supervised start command (what `info` reports) | `ok {pid}` |
//! | `probe` | `probe: {kind: tcp|http|command, port, host, path, cmd}`, `timeout_ms` | `ok {ready, detail}` |
//! | `set_time` | `unix_ns`: sets `CLOCK_REALTIME` (the host sends its time after a restore) | `ok {previous_unix_ns}` |
//!
//! Failures are `error {message}`. Lines are self-delimiting, so after the
//! host drops the connection (or a snapshot is restored behind a new QEMU
//! and a new socket) the next good line resynchronises: the guest keeps the
//! port open, treats EOF/POLLHUP as "host gone", discards any partial line
//! and waits for the host to come back.

use crate::b64;
use crate::procs::{self, Exit, State};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Out = Arc<Mutex<File>>;

fn send(out: &Out, v: Value) {
    let mut line = v.to_string();
    line.push('\n');
    let mut f = out.lock().unwrap();
    if let Err(e) = f.write_all(line.as_bytes()) {
        crate::log(&format!("agent write: {e}"));
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
                unsafe {
                    let mut t: libc::termios = std::mem::zeroed();
                    if libc::tcgetattr(f.as_raw_fd(), &mut t) == 0 {
                        libc::cfmakeraw(&mut t);
                        libc::tcsetattr(f.as_raw_fd(), libc::TCSANOW, &t);
                    }
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
    let out: Out = Arc::new(Mutex::new(port.try_clone().expect("dup agent port")));
    let mut input = port;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let mut pfd = libc::pollfd {
            fd: input.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let r = unsafe { libc::poll(&mut pfd, 1, 1000) };
        if r <= 0 {
            continue;
        }
        if pfd.revents & libc::POLLIN == 0 {
            // POLLHUP: no host connected. Drop any partial request.
            buf.clear();
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        match input.read(&mut chunk) {
            Ok(0) => {
                buf.clear();
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                while let Some(i) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=i).collect();
                    handle_line(&state, &out, &line);
                }
                if buf.len() > 64 << 20 {
                    buf.clear();
                }
            }
            Err(e) => {
                crate::log(&format!("agent read: {e}"));
                buf.clear();
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn handle_line(state: &State, out: &Out, line: &[u8]) {
    let req: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(_) => return, // resync garbage (e.g. half a line from an old session)
    };
    let id = req.get("id").cloned().unwrap_or(Value::Null);
    let op = req
        .get("op")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let (state, out) = (state.clone(), out.clone());
    let run = move || {
        let res = match op.as_str() {
            "ping" => Ok(json!({"pong": true})),
            "info" => Ok(info(&state)),
            "exec" => exec(&state, &out, &id, &req).map(|_| Value::Null),
            "write_file" => write_file(&req),
            "read_file" => read_file(&req),
            "probe" => probe(&state, &req),
            "start" => start(&state, &req),
            "set_time" => set_time(&req),
            other => Err(format!("unknown op {other:?}")),
        };
        match res {
            Ok(Value::Null) => {}
            Ok(mut v) => {
                v["id"] = id;
                v["type"] = json!("ok");
                send(&out, v);
            }
            Err(m) => send(&out, json!({"id": id, "type": "error", "message": m})),
        }
    };
    std::thread::spawn(run);
}

fn info(state: &State) -> Value {
    let st = state.start.lock().unwrap();
    let (code, signal) = match st.exit {
        Some(Exit::Code(c)) => (json!(c), Value::Null),
        Some(Exit::Signal(s)) => (Value::Null, json!(s)),
        None => (Value::Null, Value::Null),
    };
    let output: Vec<u8> = st.output.iter().copied().collect();
    json!({
        "start": {
            "configured": st.configured,
            "pid": st.pid,
            "started_unix_ms": st.started_unix_ms as u64,
            "running": st.pid.is_some() && st.exit.is_none(),
            "exit_code": code,
            "signal": signal,
            "spawn_error": st.spawn_error,
            "output": String::from_utf8_lossy(&output),
        },
        "uptime_ms": state.boot.elapsed().as_millis() as u64,
        "hostname": state.cfg.hostname,
    })
}

/// The `set_time` op: a restored snapshot's wall clock continues from the
/// snapshot's time, so the host sends its own.
fn set_time(req: &Value) -> Result<Value, String> {
    let ns = req
        .get("unix_ns")
        .and_then(Value::as_u64)
        .ok_or("set_time needs unix_ns")?;
    let mut prev = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: plain syscalls on valid, initialised timespecs.
    let r = unsafe {
        libc::clock_gettime(libc::CLOCK_REALTIME, &mut prev);
        libc::clock_settime(libc::CLOCK_REALTIME, &ts)
    };
    if r != 0 {
        return Err(format!(
            "clock_settime: {}",
            std::io::Error::last_os_error()
        ));
    }
    let prev_ns = prev.tv_sec as u64 * 1_000_000_000 + prev.tv_nsec as u64;
    Ok(json!({"previous_unix_ns": prev_ns}))
}

/// The `start` op: new runtime defaults (for the start command and every
/// later exec, including in restored sandboxes), then the start command.
fn start(state: &State, req: &Value) -> Result<Value, String> {
    let opt = |k: &str| {
        req.get(k)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    if let Some(u) = opt("user") {
        crate::users::resolve(Some(&u))?;
    }
    {
        let mut d = state.defaults.lock().unwrap();
        d.env = str_map(req.get("env"));
        d.user = opt("user");
        d.workdir = opt("workdir");
    }
    match opt("cmd") {
        Some(cmd) => {
            let pid = procs::start_command(state, &cmd)?;
            crate::log(&format!("start command running as pid {pid}"));
            Ok(json!({"pid": pid}))
        }
        None => Ok(json!({"pid": null})),
    }
}

fn str_map(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn argv_of(req: &Value) -> Result<Vec<String>, String> {
    if let Some(a) = req.get("argv").and_then(Value::as_array) {
        return a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| "argv must be strings".to_string())
            })
            .collect();
    }
    if let Some(c) = req.get("cmd").and_then(Value::as_str) {
        return Ok(vec!["/bin/sh".into(), "-c".into(), c.into()]);
    }
    Err("exec needs argv or cmd".into())
}

/// Runs a process to completion, streaming its output as `stdout`/`stderr`
/// lines, then one `exit` line.
fn exec(state: &State, out: &Out, id: &Value, req: &Value) -> Result<(), String> {
    let stdin_data = match req.get("stdin").and_then(Value::as_str) {
        Some(s) => Some(b64::decode(s)?),
        None => None,
    };
    let spec = procs::Spec {
        argv: argv_of(req)?,
        env: str_map(req.get("env")),
        cwd: req.get("cwd").and_then(Value::as_str).map(str::to_string),
        user: req.get("user").and_then(Value::as_str),
        stdin: stdin_data.is_some(),
        new_session: false,
        capture: true,
    };
    let mut sp = procs::spawn(state, spec)?;
    let pid = sp.child.id() as i32;
    if let (Some(data), Some(mut w)) = (stdin_data, sp.child.stdin.take()) {
        std::thread::spawn(move || {
            let _ = w.write_all(&data);
        });
    }
    let done = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for (name, r) in [
        (
            "stdout",
            sp.child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ),
        (
            "stderr",
            sp.child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ),
    ] {
        let Some(mut r) = r else { continue };
        let (out, id, done) = (out.clone(), id.clone(), done.clone());
        readers.push(std::thread::spawn(move || {
            let mut b = vec![0u8; 32 * 1024];
            loop {
                match r.read(&mut b) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if done.load(Ordering::SeqCst) {
                            return;
                        }
                        send(
                            &out,
                            json!({"id": id, "type": name, "data": b64::encode(&b[..n])}),
                        );
                    }
                }
            }
        }));
    }
    let timeout = req
        .get("timeout_ms")
        .and_then(Value::as_u64)
        .map(Duration::from_millis);
    let mut timed_out = false;
    let exit = match timeout {
        Some(t) => match sp.exit.recv_timeout(t) {
            Ok(e) => e,
            Err(_) => {
                timed_out = true;
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                    libc::kill(pid, libc::SIGKILL);
                }
                sp.exit.recv().map_err(|e| e.to_string())?
            }
        },
        None => sp.exit.recv().map_err(|e| e.to_string())?,
    };
    // Drain the pipes; a background grandchild may hold them open, so bound
    // the wait.
    let t = Instant::now();
    for r in readers {
        while !r.is_finished() && t.elapsed() < Duration::from_millis(500) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    done.store(true, Ordering::SeqCst);
    let (code, signal) = match exit {
        Exit::Code(c) => (json!(c), Value::Null),
        Exit::Signal(s) => (Value::Null, json!(s)),
    };
    send(
        out,
        json!({"id": id, "type": "exit", "code": code, "signal": signal, "timed_out": timed_out}),
    );
    Ok(())
}

fn req_str<'a>(req: &'a Value, k: &str) -> Result<&'a str, String> {
    req.get(k)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("missing {k}"))
}

fn write_file(req: &Value) -> Result<Value, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = req_str(req, "path")?;
    let data = b64::decode(req_str(req, "data")?)?;
    let append = req.get("append").and_then(Value::as_bool).unwrap_or(false);
    let mode = req.get("mode").and_then(Value::as_u64).unwrap_or(0o644) as u32;
    if let Some(parent) = std::path::Path::new(path).parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let mut f = File::options()
        .write(true)
        .create(true)
        .append(append)
        .truncate(!append)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("{path}: {e}"))?;
    f.write_all(&data).map_err(|e| format!("{path}: {e}"))?;
    if req.get("exact_mode").and_then(Value::as_bool) == Some(true) {
        // The mode as given, not reduced by the umask (and also on an
        // existing file).
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
            .map_err(|e| format!("chmod {path}: {e}"))?;
    }
    Ok(json!({"bytes": data.len()}))
}

fn read_file(req: &Value) -> Result<Value, String> {
    let path = req_str(req, "path")?;
    let data = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    if data.len() > 32 << 20 {
        return Err(format!("{path}: larger than 32 MiB"));
    }
    Ok(json!({"data": b64::encode(&data)}))
}

/// One readiness check (the host owns interval, grace and overall timeout).
fn probe(state: &State, req: &Value) -> Result<Value, String> {
    let p = req.get("probe").ok_or("missing probe")?;
    let kind = p.get("kind").and_then(Value::as_str).unwrap_or("");
    let limit = Duration::from_millis(
        req.get("timeout_ms")
            .and_then(Value::as_u64)
            .unwrap_or(2000),
    );
    let host = p.get("host").and_then(Value::as_str).unwrap_or("127.0.0.1");
    let port = p.get("port").and_then(Value::as_u64).unwrap_or(0) as u16;
    let (ready, detail) = match kind {
        "tcp" => match connect(host, port, limit) {
            Ok(_) => (true, format!("{host}:{port} accepts connections")),
            Err(e) => (false, format!("{host}:{port}: {e}")),
        },
        "http" => {
            let path = p.get("path").and_then(Value::as_str).unwrap_or("/");
            http_get(host, port, path, limit)
        }
        "command" => {
            let cmd = p
                .get("cmd")
                .and_then(Value::as_str)
                .ok_or("command probe needs cmd")?;
            let spec = procs::Spec {
                argv: vec!["/bin/sh".into(), "-c".into(), cmd.into()],
                env: BTreeMap::new(),
                cwd: None,
                user: None,
                stdin: false,
                new_session: false,
                capture: false,
            };
            let sp = procs::spawn(state, spec)?;
            let pid = sp.child.id() as i32;
            drop(sp.child); // output went to /dev/null
            match sp.exit.recv_timeout(limit) {
                Ok(Exit::Code(0)) => (true, "exit 0".into()),
                Ok(e) => (false, format!("{e:?}")),
                Err(_) => {
                    unsafe {
                        libc::kill(-pid, libc::SIGKILL);
                    }
                    (false, "probe command timed out".into())
                }
            }
        }
        other => return Err(format!("unknown probe kind {other:?}")),
    };
    Ok(json!({"ready": ready, "detail": detail}))
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
