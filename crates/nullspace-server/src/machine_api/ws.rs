//! The machine's WebSocket (`GET …/ws`). Channels: `exec` (streamed
//! commands), `pty` and none (`file_watch`) in [`super::pty`]; the others
//! answer `not_implemented` before the upgrade.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Extension;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use nullspace_store::Caller;
use serde_json::Value;

use super::{Speak, dialect, flavor, not_implemented};
use crate::error::{ApiError, ApiResult};
use crate::guest::Chunk;
use crate::machine_model::*;
use crate::machines::commands;
use crate::machines::record::Machine;
use crate::runtime::Live;
use crate::state::Shared;

// ---- the exec channel -------------------------------------------------

/// `GET …/ws?channel=exec`: the WebSocket the SDK streams commands over.
///
/// Client: `exec_start {id, command, args, timeout_secs, cwd?, envs?,
/// shell?}` or `exec_connect {id, pid}`. Server: `exec_started {id, pid}`,
/// `exec_stdout`/`exec_stderr {id, pid, data}` as output arrives,
/// `exec_exit {id, pid, exit_code}`, or `error {id, message}`.
pub async fn ws<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let f = flavor(F);
    // A plain GET gets the API's JSON error, not the extractor's text.
    let upgrade = upgrade.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("this endpoint is a WebSocket: {e}"),
        )
    })?;
    let channel = q.get("channel").map(String::as_str);
    if !matches!(channel, Some("exec" | "pty") | None) {
        return Err(not_implemented(format!(
            "channel {channel:?}: this server serves channel=exec, channel=pty and file_watch without a channel"
        )));
    }
    // Errors before the upgrade are ordinary HTTP answers.
    let (m, live) = commands::running(&s, &c, &id).await.speak(F)?;
    let upgrade = upgrade.max_message_size(1 << 20);
    match channel {
        Some("pty") => {
            let g = live.guest.clone();
            return Ok(upgrade.on_upgrade(move |socket| super::pty::pty_channel(socket, g)));
        }
        None => {
            let g = live.guest.clone();
            return Ok(upgrade.on_upgrade(move |socket| super::pty::watch_channel(socket, g, None)));
        }
        _ => {}
    }
    Ok(upgrade.on_upgrade(move |socket| exec_channel(socket, f, id, m, live)))
}

pub use nullspace_model::utf8::Utf8Carry;

/// Commands streaming at once on one exec channel.
const MAX_STREAMS: usize = 32;

async fn exec_channel(socket: WebSocket, f: Flavor, id: String, m: Machine, live: Arc<Live>) {
    use futures_util::{SinkExt, StreamExt};
    let (mut sink, mut stream) = socket.split();
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<ExecEvent>(256);
    // One writer: every exec of the connection sends through it.
    let writer = tokio::spawn(async move {
        while let Some(e) = out_rx.recv().await {
            let text = serde_json::to_string(&e).unwrap_or_default();
            if sink.send(Message::Text(text.into())).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(msg) = stream.next().await {
        let text = match msg {
            Ok(Message::Text(t)) => t.to_string(),
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        let req: Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(e) => {
                let _ = out_tx
                    .send(ExecEvent::Error {
                        id: Value::Null,
                        message: format!("not JSON: {e}"),
                    })
                    .await;
                continue;
            }
        };
        let rid = req.get("id").cloned().unwrap_or(Value::Null);
        while tasks.try_join_next().is_some() {}
        if tasks.len() >= MAX_STREAMS {
            let _ = out_tx
                .send(ExecEvent::Error {
                    id: rid,
                    message: format!("at most {MAX_STREAMS} commands stream on one connection"),
                })
                .await;
            continue;
        }
        match req.get("type").and_then(Value::as_str) {
            Some("exec_start") => {
                let cmd = serde_json::from_value::<ExecBody>(req.clone())
                    .map_err(|e| format!("exec_start: {e}"))
                    .and_then(|b| {
                        commands::command(&m, &live, &b).map_err(|e| dialect(f, e).message)
                    });
                let cmd = match cmd {
                    Ok(c) => c,
                    Err(message) => {
                        let _ = out_tx.send(ExecEvent::Error { id: rid, message }).await;
                        continue;
                    }
                };
                tasks.spawn(stream_exec(
                    live.clone(),
                    f,
                    id.clone(),
                    rid,
                    cmd,
                    out_tx.clone(),
                ));
            }
            Some("exec_connect") => {
                let Some(pid) = req.get("pid").and_then(Value::as_u64).map(|p| p as u32) else {
                    let _ = out_tx
                        .send(ExecEvent::Error {
                            id: rid,
                            message: "exec_connect needs a pid".into(),
                        })
                        .await;
                    continue;
                };
                tasks.spawn(stream_attach(live.clone(), rid, pid, out_tx.clone()));
            }
            other => {
                let _ = out_tx
                    .send(ExecEvent::Error {
                        id: rid,
                        message: format!("unknown message type {other:?}"),
                    })
                    .await;
            }
        }
    }
    // The client is gone: stop streaming (commands run on to their timeout).
    tasks.abort_all();
    drop(out_tx);
    let _ = writer.await;
}

/// Forwards chunks to the client as `exec_stdout`/`exec_stderr`.
async fn forward(
    mut rx: tokio::sync::mpsc::Receiver<Chunk>,
    out: tokio::sync::mpsc::Sender<ExecEvent>,
    rid: Value,
    pid: u32,
) {
    let event = |stdout: bool, data: String| {
        let id = rid.clone();
        if stdout {
            ExecEvent::ExecStdout { id, pid, data }
        } else {
            ExecEvent::ExecStderr { id, pid, data }
        }
    };
    let (mut o, mut e) = (Utf8Carry::default(), Utf8Carry::default());
    while let Some(c) = rx.recv().await {
        let (stdout, data) = match &c {
            Chunk::Stdout(d) => (true, o.push(d)),
            Chunk::Stderr(d) => (false, e.push(d)),
        };
        if !data.is_empty() && out.send(event(stdout, data)).await.is_err() {
            return;
        }
    }
    for (stdout, rest) in [(true, o.finish()), (false, e.finish())] {
        if !rest.is_empty() {
            let _ = out.send(event(stdout, rest)).await;
        }
    }
}

async fn stream_exec(
    live: Arc<Live>,
    f: Flavor,
    id: String,
    rid: Value,
    cmd: crate::guest::Command,
    out: tokio::sync::mpsc::Sender<ExecEvent>,
) {
    // A background process streamed by attaching to it, when the guest
    // can; else the command runs in the foreground with its output streamed.
    if let Ok(pid) = live.guest.spawn(cmd.clone()).await {
        return stream_attach(live, rid, pid, out).await;
    }
    let _ = out
        .send(ExecEvent::ExecStarted {
            id: rid.clone(),
            pid: 0,
        })
        .await;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let fwd = tokio::spawn(forward(rx, out.clone(), rid.clone(), 0));
    let r = commands::exec_streaming(&live, &id, cmd, tx).await;
    let _ = fwd.await;
    let msg = match r {
        Ok(done) => ExecEvent::ExecExit {
            id: rid,
            pid: done.pid.unwrap_or(0),
            exit_code: done.exit_code(),
        },
        Err(e) => ExecEvent::Error {
            id: rid,
            message: dialect(f, e).message,
        },
    };
    let _ = out.send(msg).await;
}

async fn stream_attach(
    live: Arc<Live>,
    rid: Value,
    pid: u32,
    out: tokio::sync::mpsc::Sender<ExecEvent>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let _ = out
        .send(ExecEvent::ExecStarted {
            id: rid.clone(),
            pid,
        })
        .await;
    let fwd = tokio::spawn(forward(rx, out.clone(), rid.clone(), pid));
    let r = live.guest.attach(pid, tx).await;
    let _ = fwd.await;
    let msg = match r {
        Ok(code) => ExecEvent::ExecExit {
            id: rid,
            pid,
            exit_code: code.unwrap_or(-1),
        },
        Err(e) => ExecEvent::Error {
            id: rid,
            message: e.to_string(),
        },
    };
    let _ = out.send(msg).await;
}

#[cfg(test)]
mod tests {
    use super::Utf8Carry;

    #[test]
    fn utf8_chunks_keep_characters_whole() {
        let s = "héllo wörld ✓";
        let b = s.as_bytes();
        for cut in 0..b.len() {
            let mut c = Utf8Carry::default();
            let mut out = c.push(&b[..cut]);
            out.push_str(&c.push(&b[cut..]));
            out.push_str(&c.finish());
            assert_eq!(out, s, "cut at {cut}");
        }
        let mut c = Utf8Carry::default();
        assert_eq!(c.push(b"a\xffb"), "a\u{FFFD}b");
    }
}
