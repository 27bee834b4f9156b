//! The machine's terminals and directory watches at the edge: the pty
//! routes (`GET/DELETE …/pty[/{sid}]`, `POST …/pty/{sid}/resize`) and the
//! SDK's terminal and directory-watch sockets of one machine's guest:
//! `…/ws?channel=pty` (frames of [`nullspace_model::terminal`]: start or
//! connect, then input, resize, kill; output and the exit), `file_watch`
//! on `…/ws` without a channel, and what the pty routes answer.
//!
//! A socket's streams end with it (an attached terminal detaches and goes
//! on in the guest; a watch stops). Memory per socket is bounded: frames
//! to the client wait in a channel of [`OUT_FRAMES`], and a full channel
//! holds the guest back through the agent's flow control.

use axum::extract::ws::{Message, WebSocket};
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use nullspace_model::agent::pty::check_size;
use nullspace_model::agent::{PtyInfo, PtySpec, WatchSpec};
use nullspace_model::terminal::{
    FileWatchRequest, PtyEvent, PtyRequest, PtySessionInfo, WatchFrame,
};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use nullspace_model::terminal::ResizeBody;
use nullspace_store::Caller;

use super::Speak;
use super::ws::Utf8Carry;
use crate::error::{ApiError, ApiResult};
use crate::guest::{Guest, GuestError, WatchUpdate};
use crate::http::JsonBody;
use crate::machines::commands;
use crate::machines::{MachineError, MachineResult};
use crate::state::Shared;

/// Frames waiting for a slow client, per socket.
pub const OUT_FRAMES: usize = 64;
/// Watches on one socket.
pub const MAX_WATCHES_PER_SOCKET: usize = 8;

// ---- the pty routes ------------------------------------------------------

/// The machine's guest, when the machine runs.
async fn guest_of(s: &Shared, c: &Caller, id: &str) -> MachineResult<Guest> {
    let (_, live) = commands::running(s, c, id).await?;
    Ok(live.guest.clone())
}

/// `GET …/pty`.
pub async fn pty_list<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<PtySessionInfo>>> {
    let g = guest_of(&s, &c, &id).await.speak(F)?;
    let r = list(&g).await.map_err(|e| MachineError::guest(&id, e));
    Ok(Json(r.speak(F)?))
}

/// `GET …/pty/{sid}`.
pub async fn pty_get<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((id, sid)): Path<(String, String)>,
) -> ApiResult<Json<PtySessionInfo>> {
    let g = guest_of(&s, &c, &id).await.speak(F)?;
    let r = get(&g, &sid).await.map_err(|e| MachineError::guest(&id, e));
    Ok(Json(r.speak(F)?))
}

/// `DELETE …/pty/{sid}`.
pub async fn pty_kill<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((id, sid)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let g = guest_of(&s, &c, &id).await.speak(F)?;
    kill(&g, &sid)
        .await
        .map_err(|e| MachineError::guest(&id, e))
        .speak(F)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST …/pty/{sid}/resize`.
pub async fn pty_resize<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((id, sid)): Path<(String, String)>,
    JsonBody(b): JsonBody<ResizeBody>,
) -> ApiResult<Json<PtySessionInfo>> {
    check_size(b.cols, b.rows).map_err(ApiError::invalid)?;
    let g = guest_of(&s, &c, &id).await.speak(F)?;
    let r = resize(&g, &sid, b.cols, b.rows)
        .await
        .map_err(|e| MachineError::guest(&id, e));
    Ok(Json(r.speak(F)?))
}

// ---- the guest calls behind them -----------------------------------------

/// A session as `GET …/pty` lists it.
pub fn session_info(p: &PtyInfo) -> PtySessionInfo {
    PtySessionInfo {
        session_id: p.session.clone(),
        pid: p.pid,
        cols: p.cols,
        rows: p.rows,
        exec_id: String::new(),
    }
}

/// `GET …/pty`: the running sessions.
pub async fn list(guest: &Guest) -> Result<Vec<PtySessionInfo>, GuestError> {
    Ok(guest
        .pty_list()
        .await?
        .iter()
        .filter(|p| p.running)
        .map(session_info)
        .collect())
}

/// `GET …/pty/{sid}`.
pub async fn get(guest: &Guest, sid: &str) -> Result<PtySessionInfo, GuestError> {
    Ok(session_info(&guest.pty_find(Some(sid), None).await?))
}

/// `DELETE …/pty/{sid}`.
pub async fn kill(guest: &Guest, sid: &str) -> Result<(), GuestError> {
    let p = guest.pty_find(Some(sid), None).await?;
    guest.pty_kill(p.pid).await
}

/// `POST …/pty/{sid}/resize`.
pub async fn resize(
    guest: &Guest,
    sid: &str,
    cols: u16,
    rows: u16,
) -> Result<PtySessionInfo, GuestError> {
    check_size(cols, rows).map_err(GuestError::Failed)?;
    let p = guest.pty_find(Some(sid), None).await?;
    Ok(session_info(&guest.pty_resize(p.pid, cols, rows).await?))
}

fn error_code(e: &GuestError) -> &'static str {
    match e {
        GuestError::NotFound(_) => "pty_not_found",
        GuestError::Unsupported(_) => "not_implemented",
        GuestError::Gone(_) => "machine_unavailable",
        GuestError::Timeout(_) => "timeout",
        GuestError::Denied(_) => "permission_denied",
        GuestError::Refused { .. } | GuestError::Failed(_) => "pty_error",
    }
}

/// Sends frames from a channel to the socket; ends with the channel.
fn writer<T: serde::Serialize + Send + 'static>(
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
) -> (mpsc::Sender<T>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<T>(OUT_FRAMES);
    let task = tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            let text = serde_json::to_string(&f).unwrap_or_default();
            if sink.send(Message::Text(text.into())).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    (tx, task)
}

/// The session a pty socket serves.
struct Attached {
    id: Value,
    session: String,
    pid: u32,
}

/// `…/ws?channel=pty`.
pub async fn pty_channel(socket: WebSocket, guest: Guest) {
    let (sink, mut stream) = socket.split();
    let (out, writer) = writer::<PtyEvent>(sink);
    let stop = CancellationToken::new();
    let mut attached: Option<Attached> = None;
    let err = |id: &Value, code: &str, message: String| PtyEvent::Error {
        id: id.clone(),
        message,
        code: code.into(),
    };
    while let Some(msg) = tokio::select! {
        m = stream.next() => m,
        // The session ended: the exit frame is out, the socket closes.
        _ = stop.cancelled() => None,
    } {
        let text = match msg {
            Ok(Message::Text(t)) => t.to_string(),
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        let req: PtyRequest = match serde_json::from_str(&text) {
            Ok(r) => r,
            Err(e) => {
                let id = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v.get("id").cloned())
                    .unwrap_or(Value::Null);
                let _ = out
                    .send(err(&id, "invalid_request", format!("pty frame: {e}")))
                    .await;
                continue;
            }
        };
        // One session per socket: a second start or connect is refused.
        if let (Some(_), PtyRequest::PtyStart { id, .. } | PtyRequest::PtyConnect { id, .. }) =
            (&attached, &req)
        {
            let _ = out
                .send(err(
                    id,
                    "invalid_request",
                    "this socket already serves a session".into(),
                ))
                .await;
            continue;
        }
        let r = match req {
            PtyRequest::PtyStart {
                id,
                cols,
                rows,
                cwd,
                envs,
                user,
                cmd,
            } => {
                if let Err(m) = check_size(cols, rows) {
                    let _ = out.send(err(&id, "invalid_request", m)).await;
                    continue;
                }
                let spec = PtySpec {
                    cwd,
                    env: envs.unwrap_or_default(),
                    user,
                    cmd,
                    cols,
                    rows,
                    ..Default::default()
                };
                match guest.pty_start(spec).await {
                    Ok(p) => Ok((id, p)),
                    Err(e) => Err((id, e)),
                }
            }
            PtyRequest::PtyConnect {
                id,
                session_id,
                pid,
            } => {
                if session_id.is_some() == pid.is_some() {
                    let _ = out
                        .send(err(
                            &id,
                            "invalid_request",
                            "pty_connect needs exactly one of session_id and pid".into(),
                        ))
                        .await;
                    continue;
                }
                match guest.pty_find(session_id.as_deref(), pid).await {
                    Ok(p) => Ok((id, p)),
                    Err(e) => Err((id, e)),
                }
            }
            PtyRequest::PtyInput {
                id,
                session_id,
                data_base64,
                data,
            } => {
                let bytes = match (data_base64, data) {
                    (Some(b), None) => base64::engine::general_purpose::STANDARD
                        .decode(b)
                        .map_err(|e| e.to_string()),
                    (None, Some(t)) => Ok(t.into_bytes()),
                    _ => Err("pty_input needs exactly one of data_base64 and data".into()),
                };
                let r = match (bytes, target(&attached, &session_id)) {
                    (Err(m), _) | (_, Err(m)) => Err(GuestError::Failed(m)),
                    (Ok(b), Ok(pid)) => guest.pty_input(pid, b).await,
                };
                if let Err(e) = r {
                    let _ = out.send(err(&id, error_code(&e), e.to_string())).await;
                }
                continue;
            }
            PtyRequest::PtyResize {
                id,
                session_id,
                cols,
                rows,
            } => {
                let r = match (check_size(cols, rows), target(&attached, &session_id)) {
                    (Err(m), _) | (_, Err(m)) => Err(GuestError::Failed(m)),
                    (Ok(()), Ok(pid)) => guest.pty_resize(pid, cols, rows).await.map(|_| ()),
                };
                if let Err(e) = r {
                    let _ = out.send(err(&id, error_code(&e), e.to_string())).await;
                }
                continue;
            }
            PtyRequest::PtyKill { id, session_id } => {
                let r = match target(&attached, &session_id) {
                    Err(m) => Err(GuestError::Failed(m)),
                    Ok(pid) => guest.pty_kill(pid).await,
                };
                if let Err(e) = r {
                    let _ = out.send(err(&id, error_code(&e), e.to_string())).await;
                }
                continue;
            }
        };
        match r {
            Err((id, e)) => {
                let _ = out.send(err(&id, error_code(&e), e.to_string())).await;
            }
            Ok((id, p)) => {
                let _ = out
                    .send(PtyEvent::PtyStarted {
                        id: id.clone(),
                        session_id: p.session.clone(),
                        pid: p.pid,
                        cols: p.cols,
                        rows: p.rows,
                    })
                    .await;
                let a = Attached {
                    id,
                    session: p.session,
                    pid: p.pid,
                };
                tokio::spawn(stream_output(
                    guest.clone(),
                    a.id.clone(),
                    a.session.clone(),
                    a.pid,
                    out.clone(),
                    stop.clone(),
                ));
                attached = Some(a);
            }
        }
    }
    // The client is gone (or the session ended): detach.
    stop.cancel();
    drop(out);
    let _ = writer.await;
}

/// The pid a frame's `session_id` names: the socket's session.
fn target(attached: &Option<Attached>, session_id: &str) -> Result<u32, String> {
    match attached {
        Some(a) if a.session == session_id => Ok(a.pid),
        Some(a) => Err(format!(
            "this socket serves session {}, not {session_id}",
            a.session
        )),
        None => Err("start or connect a session first".into()),
    }
}

/// Forwards a session's output as `pty_output`, then its `pty_exited`;
/// cancels `stop` at the end (the socket then closes).
async fn stream_output(
    guest: Guest,
    id: Value,
    session: String,
    pid: u32,
    out: mpsc::Sender<PtyEvent>,
    stop: CancellationToken,
) {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(OUT_FRAMES);
    let attach = tokio::spawn({
        let (guest, stop) = (guest.clone(), stop.clone());
        async move { guest.pty_attach(pid, true, tx, stop).await }
    });
    let mut text = Utf8Carry::default();
    while let Some(d) = rx.recv().await {
        let frame = PtyEvent::PtyOutput {
            id: id.clone(),
            session_id: session.clone(),
            data: text.push(&d),
            data_base64: base64::engine::general_purpose::STANDARD.encode(&d),
        };
        if out.send(frame).await.is_err() {
            stop.cancel();
            break;
        }
    }
    let end = match attach.await {
        Ok(Ok(Some(code))) => Some(PtyEvent::PtyExited {
            id,
            session_id: session,
            exit_code: code,
        }),
        Ok(Ok(None)) => None,
        Ok(Err(e)) => Some(PtyEvent::Error {
            id,
            message: e.to_string(),
            code: error_code(&e).into(),
        }),
        Err(e) => Some(PtyEvent::Error {
            id,
            message: format!("terminal stream: {e}"),
            code: "pty_error".into(),
        }),
    };
    if let Some(f) = end {
        let _ = out.send(f).await;
    }
    stop.cancel();
}

/// `…/ws` without a channel: `file_watch` frames, each a watch until the
/// socket closes, its `timeout_secs` passes or the directory goes away.
pub async fn watch_channel(socket: WebSocket, guest: Guest, user: Option<String>) {
    let (sink, mut stream) = socket.split();
    let (out, writer) = writer::<WatchFrame>(sink);
    let stop = CancellationToken::new();
    let mut watches = tokio::task::JoinSet::new();
    while let Some(msg) = stream.next().await {
        let text = match msg {
            Ok(Message::Text(t)) => t.to_string(),
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        let req = match serde_json::from_str::<FileWatchRequest>(&text) {
            Ok(r) => r,
            Err(e) => {
                let id = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v.get("id").cloned())
                    .unwrap_or(Value::Null);
                let _ = out
                    .send(WatchFrame::Error {
                        id,
                        message: format!("this socket serves file_watch frames: {e}"),
                    })
                    .await;
                continue;
            }
        };
        while watches.try_join_next().is_some() {}
        if watches.len() >= MAX_WATCHES_PER_SOCKET {
            let _ = out
                .send(WatchFrame::Error {
                    id: req.id,
                    message: format!("at most {MAX_WATCHES_PER_SOCKET} watches on one socket"),
                })
                .await;
            continue;
        }
        let as_user = req.user.or_else(|| user.clone());
        let path = match crate::machines::rules::file_path_or_relative(
            "path",
            &req.path,
            as_user.as_deref(),
        ) {
            Ok(p) => p,
            Err(e) => {
                let message = format!("file_watch: {e}");
                let _ = out
                    .send(WatchFrame::Error {
                        id: req.id,
                        message,
                    })
                    .await;
                continue;
            }
        };
        let spec = WatchSpec {
            path,
            recursive: req.recursive,
            user: as_user,
        };
        let limit = req
            .timeout_secs
            .filter(|t| t.is_finite() && *t > 0.0)
            .map(|t| std::time::Duration::from_secs_f64(t.min(7.0 * 86_400.0)));
        watches.spawn(run_watch(
            guest.clone(),
            req.id,
            spec,
            limit,
            out.clone(),
            stop.child_token(),
        ));
    }
    stop.cancel();
    while watches.join_next().await.is_some() {}
    drop(out);
    let _ = writer.await;
}

async fn run_watch(
    guest: Guest,
    id: Value,
    spec: WatchSpec,
    limit: Option<std::time::Duration>,
    out: mpsc::Sender<WatchFrame>,
    stop: CancellationToken,
) {
    let (tx, mut rx) = mpsc::channel::<WatchUpdate>(OUT_FRAMES);
    let w = tokio::spawn({
        let (guest, stop) = (guest.clone(), stop.clone());
        async move { guest.watch(spec, tx, stop).await }
    });
    if let Some(t) = limit {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(t) => stop.cancel(),
                _ = stop.cancelled() => {}
            }
        });
    }
    while let Some(u) = rx.recv().await {
        let frames = match u {
            WatchUpdate::Started => vec![WatchFrame::FileWatchStarted { id: id.clone() }],
            WatchUpdate::Events(events, dropped) => {
                if dropped > 0 {
                    tracing::debug!("watch {id}: {dropped} changes dropped by the guest");
                }
                events
                    .into_iter()
                    .map(|e| WatchFrame::FileEvent {
                        id: id.clone(),
                        event: e.kind.as_str().into(),
                        name: e.name,
                        path: e.path,
                    })
                    .collect()
            }
        };
        for f in frames {
            if out.send(f).await.is_err() {
                stop.cancel();
            }
        }
    }
    let end = match w.await {
        Ok(Ok(None)) => None,
        Ok(Ok(Some(reason))) => Some(reason),
        Ok(Err(e)) => Some(e.to_string()),
        Err(e) => Some(format!("watch: {e}")),
    };
    if let Some(message) = end {
        let _ = out.send(WatchFrame::Error { id, message }).await;
    }
}
