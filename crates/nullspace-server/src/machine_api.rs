//! Handlers of the machine API. Each is instantiated twice, for
//! `/v1/machines` (1.0.3) and `/v1/sandboxes` (0.1.9): the const parameter
//! is the [`Flavor`] (see `http::routes`, the one route table). The logic
//! is in [`crate::machines`]; here are parameters, status codes and the
//! WebSocket exec channel.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine as _;
use nullspace_store::Caller;
use serde_json::{Map, Value};

use crate::error::{ApiError, ApiResult};
use crate::guest::Chunk;
use crate::http::JsonBody;
use crate::machine_model::*;
use crate::machines::{self, ListQuery};
use crate::runtime::Live;
use crate::state::Shared;

pub const MACHINE: u8 = 0;
pub const SANDBOX: u8 = 1;

const fn flavor(f: u8) -> Flavor {
    if f == SANDBOX {
        Flavor::Sandbox
    } else {
        Flavor::Machine
    }
}

fn idempotency_key(h: &HeaderMap) -> ApiResult<Option<String>> {
    match h.get("idempotency-key") {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim().to_string()))
            .map_err(|_| ApiError::invalid("Idempotency-Key must be visible ASCII")),
    }
}

fn json_status<T: serde::Serialize>(status: StatusCode, v: T) -> Response {
    (status, Json(v)).into_response()
}

/// `fields=a,b`: only those keys of an object.
fn project(v: Value, fields: Option<&String>) -> Value {
    let Some(fields) = fields else { return v };
    let keep: Vec<&str> = fields
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(k, _)| keep.contains(&k.as_str()))
                .collect(),
        ),
        other => other,
    }
}

fn uint<T: std::str::FromStr>(q: &HashMap<String, String>, k: &str) -> ApiResult<Option<T>> {
    q.get(k)
        .map(|v| {
            v.parse::<T>()
                .map_err(|_| ApiError::invalid(format!("{k} must be a non-negative integer")))
        })
        .transpose()
}

fn json_object(q: &HashMap<String, String>, k: &str) -> ApiResult<Option<Map<String, Value>>> {
    q.get(k)
        .map(|v| {
            serde_json::from_str::<Map<String, Value>>(v)
                .map_err(|_| ApiError::invalid(format!("{k} must be a JSON object")))
        })
        .transpose()
}

// ---- machines ---------------------------------------------------------

pub async fn create<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    headers: HeaderMap,
    JsonBody(b): JsonBody<CreateMachineBody>,
) -> ApiResult<Response> {
    let key = idempotency_key(&headers)?;
    let m = machines::create(&s, &c, flavor(F), b, key).await?;
    Ok(json_status(StatusCode::CREATED, m))
}

pub async fn list<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let query = ListQuery {
        limit: uint::<i64>(&q, "limit")?,
        next_token: q.get("next_token").cloned().filter(|t| !t.is_empty()),
        states: q
            .get("state")
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default(),
        template: q.get("template").cloned().filter(|t| !t.is_empty()),
        metadata: json_object(&q, "metadata")?,
    };
    let page = machines::list(&s, &c, flavor(F), query).await?;
    if q.contains_key("fields") {
        let items: Vec<Value> = page
            .items
            .into_iter()
            .map(|m| project(serde_json::to_value(m).unwrap_or_default(), q.get("fields")))
            .collect();
        // The page with projected items (only the asked-for keys).
        #[derive(serde::Serialize)]
        struct Projected {
            items: Vec<Value>,
            has_next: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            next_token: Option<String>,
        }
        return Ok(Json(Projected {
            items,
            has_next: page.has_next,
            next_token: page.next_token,
        })
        .into_response());
    }
    Ok(Json(page).into_response())
}

pub async fn get<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let m = machines::get(&s, &c, flavor(F), &id).await?;
    let v = serde_json::to_value(m).map_err(ApiError::internal)?;
    Ok(Json(project(v, q.get("fields"))).into_response())
}

pub async fn destroy<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<Destroyed>> {
    machines::destroy(&s, &c, flavor(F), &id).await.map(Json)
}

pub async fn exec<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<ExecBody>,
) -> ApiResult<Json<ExecReply>> {
    machines::exec(&s, &c, flavor(F), &id, b).await.map(Json)
}

pub async fn processes<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<ProcessEntry>>> {
    machines::processes(&s, &c, flavor(F), &id).await.map(Json)
}

fn pid_of(raw: &str) -> ApiResult<u32> {
    raw.parse::<u32>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ApiError::invalid(format!("pid {raw:?} must be a positive integer")))
}

pub async fn process_logs<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((id, pid)): Path<(String, String)>,
) -> ApiResult<Json<ProcessLogs>> {
    machines::process_logs(&s, &c, flavor(F), &id, pid_of(&pid)?)
        .await
        .map(Json)
}

pub async fn kill_process<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((id, pid)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    machines::kill_process(&s, &c, flavor(F), &id, pid_of(&pid)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- files ------------------------------------------------------------

pub async fn files_write<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<WriteFileBody>,
) -> ApiResult<Json<FileInfo>> {
    let data = match b.encoding.as_deref().unwrap_or("utf8") {
        "utf8" | "utf-8" | "text" => b.content.into_bytes(),
        "base64" => base64::engine::general_purpose::STANDARD
            .decode(b.content.as_bytes())
            .map_err(|e| ApiError::invalid(format!("content is not valid base64: {e}")))?,
        o => {
            return Err(ApiError::invalid(format!(
                "encoding {o:?} must be utf8 or base64"
            )));
        }
    };
    machines::write_file(&s, &c, flavor(F), &id, &b.path, data, b.user.as_deref())
        .await
        .map(Json)
}

pub async fn files_read<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<PathBody>,
) -> ApiResult<Json<FileContent>> {
    let data = machines::read_file(&s, &c, flavor(F), &id, &b.path, b.user.as_deref()).await?;
    let content = match b.encoding.as_deref().unwrap_or("utf8") {
        "base64" => base64::engine::general_purpose::STANDARD.encode(&data),
        _ => machines::lossy(&data),
    };
    Ok(Json(FileContent { content }))
}

pub async fn files_info<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<PathBody>,
) -> ApiResult<Json<FileInfo>> {
    machines::stat_file(&s, &c, flavor(F), &id, &b.path, b.user.as_deref())
        .await
        .map(Json)
}

pub async fn files_exists<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<PathBody>,
) -> ApiResult<Json<Exists>> {
    match machines::stat_file(&s, &c, flavor(F), &id, &b.path, b.user.as_deref()).await {
        Ok(_) => Ok(Json(Exists { exists: true })),
        Err(e) if e.code == "file_not_found" => Ok(Json(Exists { exists: false })),
        Err(e) => Err(e),
    }
}

pub async fn files_list<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Vec<FileInfo>>> {
    let path = q.get("path").map(String::as_str).unwrap_or("/");
    let depth = uint::<u32>(&q, "depth")?.unwrap_or(1);
    machines::list_files(
        &s,
        &c,
        flavor(F),
        &id,
        path,
        depth,
        q.get("user").map(String::as_str),
    )
    .await
    .map(Json)
}

fn path_param(q: &HashMap<String, String>) -> ApiResult<&str> {
    q.get("path")
        .map(String::as_str)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::invalid("the path query parameter is required"))
}

pub async fn file_get<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let data = machines::read_file(
        &s,
        &c,
        flavor(F),
        &id,
        path_param(&q)?,
        q.get("user").map(String::as_str),
    )
    .await?;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from(data),
    )
        .into_response())
}

pub async fn file_put<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    machines::write_file(
        &s,
        &c,
        flavor(F),
        &id,
        path_param(&q)?,
        body.to_vec(),
        q.get("user").map(String::as_str),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- lifecycle --------------------------------------------------------

pub async fn create_snapshot<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let key = idempotency_key(&headers)?;
    let v = machines::create_snapshot(&s, &c, flavor(F), &id, key).await?;
    Ok(json_status(StatusCode::CREATED, v))
}

pub async fn hibernate<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<SnapshotInfo>> {
    machines::hibernate(&s, &c, flavor(F), &id).await.map(Json)
}

pub async fn resume<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<MachineInfo>> {
    machines::resume(&s, &c, flavor(F), &id).await.map(Json)
}

pub async fn fork<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let key = idempotency_key(&headers)?;
    let m = machines::fork(&s, &c, flavor(F), &id, key).await?;
    Ok(json_status(StatusCode::CREATED, m))
}

pub async fn set_timeout<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<TimeoutBody>,
) -> ApiResult<Json<TimeoutLease>> {
    machines::set_timeout(&s, &c, flavor(F), &id, b)
        .await
        .map(Json)
}

// ---- snapshots --------------------------------------------------------

pub async fn snapshot_get(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<SnapshotInfo>> {
    machines::snapshot_get(&s, &c, &id, None).await.map(Json)
}

pub async fn snapshot_list(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Vec<SnapshotInfo>>> {
    let (machine, f) = match (q.get("machine_id"), q.get("sandbox_id")) {
        (Some(m), _) => (Some(m.as_str()), Some(Flavor::Machine)),
        (None, Some(m)) => (Some(m.as_str()), Some(Flavor::Sandbox)),
        (None, None) => (None, None),
    };
    let metadata = json_object(&q, "metadata")?;
    machines::snapshot_list(&s, &c, machine, f, metadata.as_ref())
        .await
        .map(Json)
}

pub async fn snapshot_delete(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    machines::snapshot_delete(&s, &c, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

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
    match q.get("channel").map(String::as_str) {
        Some("exec") => {}
        other => {
            return Err(machines::not_implemented(format!(
                "channel {other:?}: this server serves the exec channel only (channel=exec)"
            )));
        }
    }
    // Errors before the upgrade are ordinary HTTP answers.
    let (_, doc, live) = machines::running(&s, &c, f, &id).await?;
    Ok(upgrade
        .max_message_size(1 << 20)
        .on_upgrade(move |socket| exec_channel(socket, f, id, doc, live)))
}

/// Turns byte chunks into text without splitting a UTF-8 character.
#[derive(Default)]
pub struct Utf8Carry(Vec<u8>);

impl Utf8Carry {
    pub fn push(&mut self, d: &[u8]) -> String {
        self.0.extend_from_slice(d);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.0) {
                Ok(s) => {
                    out.push_str(s);
                    self.0.clear();
                    return out;
                }
                Err(e) => {
                    let ok = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.0[..ok]).unwrap_or_default());
                    match e.error_len() {
                        // An incomplete character at the end: wait for more.
                        None => {
                            self.0.drain(..ok);
                            return out;
                        }
                        Some(n) => {
                            out.push('\u{FFFD}');
                            self.0.drain(..ok + n);
                        }
                    }
                }
            }
        }
    }
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.0).into_owned();
        self.0.clear();
        s
    }
}

/// Commands streaming at once on one exec channel.
const MAX_STREAMS: usize = 32;

async fn exec_channel(socket: WebSocket, f: Flavor, id: String, doc: MachineDoc, live: Arc<Live>) {
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
                    .map_err(|e| ApiError::invalid(format!("exec_start: {e}")))
                    .and_then(|b| machines::command(&doc, &live, &b));
                let cmd = match cmd {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = out_tx
                            .send(ExecEvent::Error {
                                id: rid,
                                message: e.message,
                            })
                            .await;
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
    let r = machines::exec_streaming(&live, f, &id, cmd, tx).await;
    let _ = fwd.await;
    let msg = match r {
        Ok(done) => ExecEvent::ExecExit {
            id: rid,
            pid: done.pid.unwrap_or(0),
            exit_code: done.exit_code(),
        },
        Err(e) => ExecEvent::Error {
            id: rid,
            message: e.message,
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
