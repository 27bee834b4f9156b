//! `process.Process`: E2B's commands and terminals on a machine's guest.
//! Start spawns a background process (stdin kept open when asked) and
//! streams its output from the guest's buffers, so nothing between the
//! spawn and the attach is lost; Connect follows a running one from now
//! on. Closing a stream does not kill its process; `Connect-Timeout-Ms`
//! of Start is the command's lifetime (E2B's semantics: `timeout=0` for a
//! daemon). E2B's SDK runs commands as `/bin/bash -l -c LINE`: a guest
//! without bash runs LINE under `/bin/sh -c`.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use nullspace_model::agent::PtySpec;
use nullspace_model::machine::ExecBody;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::auth::Envd;
use super::connect::{self, message};
use super::errors::RpcError;
use super::started::{self, Started};
use crate::guest::{Chunk, GuestError};
use crate::machines::MachineError;
use crate::machines::commands::{command, running};
use crate::runtime::Live;
use crate::state::Shared;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ProcessConfig {
    cmd: String,
    args: Vec<String>,
    envs: BTreeMap<String, String>,
    cwd: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Size {
    cols: u16,
    rows: u16,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Pty {
    size: Option<Size>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StartRequest {
    process: ProcessConfig,
    pty: Option<Pty>,
    stdin: Option<bool>,
    tag: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Selector {
    pid: Option<u32>,
    tag: Option<String>,
}

impl Selector {
    fn pid(&self, e: &Envd) -> Result<u32, RpcError> {
        match (self.pid, &self.tag) {
            (Some(p), _) => Ok(p),
            (None, Some(t)) => started::by_tag(&e.id, t).ok_or_else(|| {
                RpcError::not_found(format!(
                    "process with tag {t:?} not found in sandbox {}",
                    e.id
                ))
            }),
            (None, None) => Err(RpcError::invalid("process: a pid or a tag is required")),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Input {
    stdin: Option<String>,
    pty: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Selected {
    process: Selector,
    input: Option<Input>,
    pty: Option<Pty>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StreamInputMessage {
    start: Option<Selected>,
    data: Option<Selected>,
}

/// `POST /process.Process/{method}`.
pub async fn rpc(
    State(s): State<Shared>,
    Extension(e): Extension<Envd>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match method.as_str() {
        "Start" => start(&s, &e, &headers, &body)
            .await
            .unwrap_or_else(connect::stream_error),
        "Connect" => attach(&s, &e, &headers, &body)
            .await
            .unwrap_or_else(connect::stream_error),
        "StreamInput" => stream_input(&s, &e, &body).await,
        "List" => connect::unary(list(&s, &e).await),
        "SendInput" => connect::unary(send_input(&s, &e, &headers, &body).await),
        "SendSignal" => connect::unary(send_signal(&s, &e, &headers, &body).await),
        "CloseStdin" => connect::unary(close_stdin(&s, &e, &headers, &body).await),
        "Update" => connect::unary(update(&s, &e, &headers, &body).await),
        m => connect::unary::<Value>(Err(RpcError::new(
            "unimplemented",
            format!("process.Process/{m} is not a method nullspace serves"),
        ))),
    }
}

fn guest_err(e: &Envd, err: GuestError) -> RpcError {
    MachineError::guest(&e.id, err).into()
}

async fn live(s: &Shared, e: &Envd) -> Result<std::sync::Arc<Live>, RpcError> {
    Ok(running(s, &e.caller, &e.id).await?.1)
}

/// `/bin/bash -l -c LINE` (what the SDK sends) as a shell line when the
/// guest has no bash.
async fn shell_line(live: &Live, p: &ProcessConfig) -> Option<String> {
    let bash = matches!(p.cmd.as_str(), "/bin/bash" | "bash");
    let line = match p.args.as_slice() {
        [l, c, line] if l == "-l" && c == "-c" => line,
        [c, line] if c == "-c" => line,
        _ => return None,
    };
    if !bash || live.guest.stat("/bin/bash", None).await.is_ok() {
        return None;
    }
    Some(line.clone())
}

/// What the stream of a process sends before its end.
enum Out {
    Chunk(Chunk),
    Pty(Vec<u8>),
}

fn data_event(o: Out) -> Bytes {
    let (k, d) = match o {
        Out::Chunk(Chunk::Stdout(d)) => ("stdout", d),
        Out::Chunk(Chunk::Stderr(d)) => ("stderr", d),
        Out::Pty(d) => ("pty", d),
    };
    message(&json!({"event": {"data": {k: B64.encode(d)}}}))
}

fn end_event(code: i32) -> Bytes {
    // proto3 JSON omits a zero exit code.
    let mut end = json!({"exited": true, "status": format!("exit status {code}")});
    if code != 0 {
        end["exitCode"] = json!(code);
    }
    message(&json!({"event": {"end": end}}))
}

/// Sends the start event, the output as it comes (a keepalive after each
/// silent `keepalive`), then the end event and the end of the stream. A
/// client that goes away stops the guest stream (not the process).
async fn pump(
    e: Envd,
    tx: mpsc::Sender<Bytes>,
    pid: u32,
    keepalive: Duration,
    mut rx: mpsc::Receiver<Out>,
    done: tokio::task::JoinHandle<Result<Option<i32>, GuestError>>,
    stop: CancellationToken,
) {
    let start = message(&json!({"event": {"start": {"pid": pid}}}));
    if tx.send(start).await.is_err() {
        stop.cancel();
        return;
    }
    loop {
        let next = tokio::select! {
            o = rx.recv() => match o {
                Some(o) => data_event(o),
                None => break,
            },
            _ = tokio::time::sleep(keepalive) => message(&json!({"event": {"keepalive": {}}})),
            _ = tx.closed() => {
                stop.cancel();
                return;
            }
        };
        if tx.send(next).await.is_err() {
            stop.cancel();
            return;
        }
    }
    let last = match done.await {
        Ok(Ok(Some(code))) => {
            started::forget(&e.id, pid);
            let _ = tx.send(end_event(code)).await;
            connect::end(None)
        }
        // Stopped (the machine was snapshotted): no end event.
        Ok(Ok(None)) => connect::end(None),
        Ok(Err(err)) => connect::end(Some(&guest_err(&e, err))),
        Err(j) => connect::end(Some(&RpcError::new(
            "internal",
            format!("process stream: {j}"),
        ))),
    };
    let _ = tx.send(last).await;
}

/// Streams process `pid`'s output (`replay`: its buffers first) or, for a
/// terminal, its session's.
fn follow(
    e: &Envd,
    headers: &HeaderMap,
    live: std::sync::Arc<Live>,
    pid: u32,
    pty: bool,
    replay: bool,
) -> Response {
    let (tx, resp) = connect::stream();
    let (otx, orx) = mpsc::channel::<Out>(16);
    let stop = CancellationToken::new();
    let guest = live.guest.clone();
    let stop2 = stop.clone();
    let done = if pty {
        let (ptx, mut prx) = mpsc::channel::<Vec<u8>>(16);
        tokio::spawn(async move {
            while let Some(d) = prx.recv().await {
                if otx.send(Out::Pty(d)).await.is_err() {
                    break;
                }
            }
        });
        tokio::spawn(async move { guest.pty_attach(pid, replay, ptx, stop2).await })
    } else {
        let (ctx, mut crx) = mpsc::channel::<Chunk>(16);
        tokio::spawn(async move {
            while let Some(c) = crx.recv().await {
                if otx.send(Out::Chunk(c)).await.is_err() {
                    break;
                }
            }
        });
        tokio::spawn(async move { guest.follow(pid, replay, ctx, stop2).await })
    };
    tokio::spawn(pump(
        e.clone(),
        tx,
        pid,
        connect::keepalive(headers),
        orx,
        done,
        stop,
    ));
    resp
}

async fn start(
    s: &Shared,
    e: &Envd,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, RpcError> {
    let r: StartRequest = connect::request(headers, body)?;
    let (m, live) = running(s, &e.caller, &e.id).await?;
    let mut config = json!({"cmd": r.process.cmd, "args": r.process.args, "envs": r.process.envs});
    if let Some(c) = &r.process.cwd {
        config["cwd"] = json!(c);
    }
    let started = Started {
        config,
        tag: r.tag.clone(),
    };
    let cwd = r
        .process
        .cwd
        .as_deref()
        .filter(|c| !c.is_empty())
        .map(|c| e.path(c));
    if let Some(p) = r.pty {
        let size = p.size.unwrap_or_default();
        let bash_login =
            r.process.cmd == "/bin/bash" && live.guest.stat("/bin/bash", None).await.is_err();
        let spec = PtySpec {
            // Without bash the user's own shell (the guest's default).
            argv: if bash_login || r.process.cmd.is_empty() {
                vec![]
            } else {
                std::iter::once(r.process.cmd.clone())
                    .chain(r.process.args.iter().cloned())
                    .collect()
            },
            env: r.process.envs.clone(),
            cwd: cwd.or_else(|| m.doc.cwd.clone()),
            user: e.user.clone(),
            cols: if size.cols == 0 { 80 } else { size.cols },
            rows: if size.rows == 0 { 24 } else { size.rows },
            ..Default::default()
        };
        crate::machines::rules::envs("envs", &spec.env)?;
        let info = live
            .guest
            .pty_start(spec)
            .await
            .map_err(|err| guest_err(e, err))?;
        started::remember(&e.id, info.pid, started);
        return Ok(follow(e, headers, live, info.pid, true, true));
    }
    let line = shell_line(&live, &r.process).await;
    let timeout_secs = connect::timeout(headers).map(|t| t.as_millis().div_ceil(1000) as u64);
    let b = ExecBody {
        command: line.clone().unwrap_or_else(|| r.process.cmd.clone()),
        args: if line.is_some() {
            vec![]
        } else {
            r.process.args.clone()
        },
        shell: Some(line.is_some()),
        envs: Some(r.process.envs.clone()),
        cwd,
        user: e.user.clone(),
        timeout_secs: Some(timeout_secs.unwrap_or(0)),
        background: Some(true),
    };
    let mut cmd = command(&m, &live, &b)?;
    cmd.stdin_open = r.stdin.unwrap_or(true);
    let pid = live
        .guest
        .spawn(cmd)
        .await
        .map_err(|err| guest_err(e, err))?;
    started::remember(&e.id, pid, started);
    Ok(follow(e, headers, live, pid, false, true))
}

/// Whether `pid` is a running terminal session (else a process).
async fn is_pty(live: &Live, pid: u32) -> bool {
    live.guest
        .pty_list()
        .await
        .is_ok_and(|l| l.iter().any(|p| p.pid == pid && p.running))
}

async fn attach(
    s: &Shared,
    e: &Envd,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, RpcError> {
    let r: Selected = connect::request(headers, body)?;
    let pid = r.process.pid(e)?;
    let live = live(s, e).await?;
    if is_pty(&live, pid).await {
        return Ok(follow(e, headers, live, pid, true, false));
    }
    running_process(&live, e, pid).await?;
    Ok(follow(e, headers, live, pid, false, false))
}

/// `not_found` unless `pid` is a running process of the guest's.
async fn running_process(live: &Live, e: &Envd, pid: u32) -> Result<(), RpcError> {
    let ps = live
        .guest
        .processes()
        .await
        .map_err(|err| guest_err(e, err))?;
    if !ps.iter().any(|p| p.pid == pid && p.running) {
        return Err(RpcError::not_found(format!(
            "process with pid {pid} not found in sandbox {}",
            e.id
        )));
    }
    Ok(())
}

async fn list(s: &Shared, e: &Envd) -> Result<Value, RpcError> {
    let live = live(s, e).await?;
    let ps = live
        .guest
        .processes()
        .await
        .map_err(|err| guest_err(e, err))?;
    let ptys = live.guest.pty_list().await.unwrap_or_default();
    let mut out: Vec<Value> = ps
        .iter()
        .filter(|p| p.running)
        .map(|p| started::info(&e.id, p.pid, &p.command))
        .collect();
    out.extend(
        ptys.iter()
            .filter(|p| p.running)
            .map(|p| started::info(&e.id, p.pid, &p.command)),
    );
    Ok(json!({"processes": out}))
}

fn b64(what: &str, s: &str) -> Result<Vec<u8>, RpcError> {
    B64.decode(s)
        .map_err(|err| RpcError::invalid(format!("{what}: not base64: {err}")))
}

async fn input(live: &Live, e: &Envd, pid: u32, i: &Input) -> Result<(), RpcError> {
    if let Some(d) = &i.pty {
        live.guest
            .pty_input(pid, b64("input.pty", d)?)
            .await
            .map_err(|err| guest_err(e, err))?;
    }
    if let Some(d) = &i.stdin {
        live.guest
            .write_stdin(pid, b64("input.stdin", d)?, false)
            .await
            .map_err(|err| guest_err(e, err))?;
    }
    Ok(())
}

async fn send_input(
    s: &Shared,
    e: &Envd,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Value, RpcError> {
    let r: Selected = connect::request(headers, body)?;
    let pid = r.process.pid(e)?;
    let live = live(s, e).await?;
    input(&live, e, pid, &r.input.unwrap_or_default()).await?;
    Ok(json!({}))
}

/// Client streaming: the whole body is read (HTTP/1.1 is half duplex
/// here), then each input is written in order; one `{}` answers.
async fn stream_input(s: &Shared, e: &Envd, body: &[u8]) -> Response {
    let r = async {
        let mut pid = None;
        let live = live(s, e).await?;
        for m in connect::envelopes(body)? {
            let m: StreamInputMessage = connect::decode(&m)?;
            if let Some(st) = m.start {
                pid = Some(st.process.pid(e)?);
            }
            if let Some(d) = m.data {
                let pid = pid.ok_or_else(|| RpcError::invalid("StreamInput: data before start"))?;
                input(&live, e, pid, &d.input.unwrap_or_default()).await?;
            }
        }
        Ok::<_, RpcError>(())
    }
    .await;
    let (tx, resp) = connect::stream();
    let out = match r {
        Ok(()) => vec![message(&json!({})), connect::end(None)],
        Err(err) => vec![connect::end(Some(&err))],
    };
    tokio::spawn(async move {
        for b in out {
            let _ = tx.send(b).await;
        }
    });
    resp
}

async fn send_signal(
    s: &Shared,
    e: &Envd,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Value, RpcError> {
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Req {
        process: Selector,
        signal: Value,
    }
    let r: Req = connect::request(headers, body)?;
    let pid = r.process.pid(e)?;
    // SIGKILL and SIGTERM (the SDK's two) both end the process group.
    let known = matches!(
        &r.signal,
        Value::String(s) if s == "SIGNAL_SIGKILL" || s == "SIGNAL_SIGTERM"
    ) || matches!(&r.signal, Value::Number(n) if n.as_u64() == Some(9) || n.as_u64() == Some(15));
    if !known {
        return Err(RpcError::invalid(format!(
            "signal {}: only SIGNAL_SIGKILL and SIGNAL_SIGTERM are sent",
            r.signal
        )));
    }
    let live = live(s, e).await?;
    if is_pty(&live, pid).await {
        live.guest
            .pty_kill(pid)
            .await
            .map_err(|err| guest_err(e, err))?;
        return Ok(json!({}));
    }
    // A process that has ended is not found (the SDK's kill says False),
    // though the guest still keeps its output.
    running_process(&live, e, pid).await?;
    live.guest
        .kill(pid)
        .await
        .map_err(|err| guest_err(e, err))?;
    Ok(json!({}))
}

async fn close_stdin(
    s: &Shared,
    e: &Envd,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Value, RpcError> {
    let r: Selected = connect::request(headers, body)?;
    let pid = r.process.pid(e)?;
    let live = live(s, e).await?;
    live.guest
        .write_stdin(pid, vec![], true)
        .await
        .map_err(|err| guest_err(e, err))?;
    Ok(json!({}))
}

async fn update(s: &Shared, e: &Envd, headers: &HeaderMap, body: &[u8]) -> Result<Value, RpcError> {
    let r: Selected = connect::request(headers, body)?;
    let pid = r.process.pid(e)?;
    let Some(size) = r.pty.and_then(|p| p.size) else {
        return Ok(json!({}));
    };
    nullspace_model::agent::pty::check_size(size.cols, size.rows).map_err(RpcError::invalid)?;
    let live = live(s, e).await?;
    live.guest
        .pty_resize(pid, size.cols, size.rows)
        .await
        .map_err(|err| guest_err(e, err))?;
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nullspace_store::Caller;

    fn envd() -> Envd {
        Envd {
            id: "mch_p".into(),
            caller: Caller {
                key_id: "k".into(),
                namespace: "n".into(),
            },
            user: None,
            cwd: None,
        }
    }

    /// The envelopes' JSON (flags 0) and whether the last is end-of-stream.
    async fn drain(mut rx: mpsc::Receiver<Bytes>) -> (Vec<Value>, bool) {
        let mut msgs = vec![];
        let mut ended = false;
        while let Some(b) = rx.recv().await {
            let v: Value = serde_json::from_slice(&b[5..]).unwrap();
            if b[0] == 0x02 {
                ended = true;
                assert_eq!(v, json!({}), "end of stream without an error");
            } else {
                assert!(!ended, "a message after the end of stream");
                msgs.push(v);
            }
        }
        (msgs, ended)
    }

    #[tokio::test]
    async fn a_stream_starts_sends_output_and_keepalives_then_ends_with_the_exit() {
        let (tx, rx) = mpsc::channel(64);
        let (otx, orx) = mpsc::channel(4);
        let done = tokio::spawn(async {
            tokio::time::sleep(Duration::from_millis(250)).await;
            Ok(Some(3))
        });
        let producer = tokio::spawn(async move {
            otx.send(Out::Chunk(Chunk::Stdout(b"hi\n".to_vec())))
                .await
                .unwrap();
            // Silent for several keepalive periods, then the process ends.
            tokio::time::sleep(Duration::from_millis(250)).await;
        });
        let stop = CancellationToken::new();
        pump(
            envd(),
            tx,
            7,
            Duration::from_millis(60),
            orx,
            done,
            stop.clone(),
        )
        .await;
        producer.await.unwrap();
        let (msgs, ended) = drain(rx).await;
        assert!(ended);
        assert_eq!(msgs[0], json!({"event": {"start": {"pid": 7}}}));
        assert_eq!(msgs[1], json!({"event": {"data": {"stdout": "aGkK"}}}));
        let keepalives = msgs
            .iter()
            .filter(|m| **m == json!({"event": {"keepalive": {}}}))
            .count();
        assert!(keepalives >= 2, "{msgs:?}");
        let end = &msgs.last().unwrap()["event"]["end"];
        assert_eq!(end["exitCode"], 3);
        assert_eq!(end["exited"], true);
        assert!(!stop.is_cancelled(), "an ended process needs no stop");
    }

    #[tokio::test]
    async fn a_zero_exit_code_is_omitted_and_a_gone_client_stops_the_guest_stream() {
        let b = end_event(0);
        let v: Value = serde_json::from_slice(&b[5..]).unwrap();
        assert!(v["event"]["end"].get("exitCode").is_none(), "{v}");
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let (_otx, orx) = mpsc::channel(1);
        let done = tokio::spawn(async { Ok(None) });
        let stop = CancellationToken::new();
        pump(
            envd(),
            tx,
            1,
            Duration::from_secs(60),
            orx,
            done,
            stop.clone(),
        )
        .await;
        assert!(stop.is_cancelled(), "the guest stream was not stopped");
    }
}
