//! `filesystem.Filesystem`: stat, list with depth, mkdir, move, remove
//! through the machine's file operations ([`crate::machines::files`],
//! [`crate::machines::file_ops`]), and directory watches on the guest's
//! watch stream: `WatchDir` streamed, and the polled watchers
//! (`CreateWatcher`, `GetWatcherEvents`, `RemoveWatcher`) that the sync
//! SDK uses, their events buffered here within bounds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use nullspace_model::agent::{WatchEvent, WatchKind, WatchSpec};
use nullspace_model::machine::FileInfo;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::auth::Envd;
use super::connect::{self, message};
use super::errors::RpcError;
use crate::guest::WatchUpdate;
use crate::machines::commands::running;
use crate::machines::{MachineError, file_ops, files};
use crate::state::Shared;

/// Polled watchers open at once on this server.
const MAX_WATCHERS: usize = 1024;
/// Events a polled watcher keeps between polls; older ones are dropped.
const MAX_PENDING: usize = 10_000;

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct Req {
    path: String,
    depth: Option<u32>,
    source: String,
    destination: String,
    recursive: bool,
    watcher_id: String,
}

/// `POST /filesystem.Filesystem/{method}`.
pub async fn rpc(
    State(s): State<Shared>,
    Extension(e): Extension<Envd>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let r: Req = match connect::request(&headers, &body) {
        Ok(r) => r,
        Err(err) if method == "WatchDir" => return connect::stream_error(err),
        Err(err) => return connect::unary::<Value>(Err(err)),
    };
    match method.as_str() {
        "WatchDir" => watch_dir(&s, &e, &headers, r)
            .await
            .unwrap_or_else(connect::stream_error),
        "Stat" => connect::unary(stat(&s, &e, &r).await),
        "ListDir" => connect::unary(list_dir(&s, &e, &r).await),
        "MakeDir" => connect::unary(make_dir(&s, &e, &r).await),
        "Move" => connect::unary(move_(&s, &e, &r).await),
        "Remove" => connect::unary(remove(&s, &e, &r).await),
        "CreateWatcher" => connect::unary(create_watcher(&s, &e, &r).await),
        "GetWatcherEvents" => connect::unary(watcher_events(&e, &r)),
        "RemoveWatcher" => connect::unary(remove_watcher(&e, &r)),
        m => connect::unary::<Value>(Err(RpcError::new(
            "unimplemented",
            format!("filesystem.Filesystem/{m} is not a method nullspace serves"),
        ))),
    }
}

/// E2B's `EntryInfo` (proto3 JSON: int64 size as a string, the type by
/// name); `None` for what E2B has no type for (sockets, devices).
fn entry(f: FileInfo) -> Option<Value> {
    let kind = match f.r#type.as_deref() {
        Some("file") => "FILE_TYPE_FILE",
        Some("dir") => "FILE_TYPE_DIRECTORY",
        Some("symlink") => "FILE_TYPE_SYMLINK",
        _ if f.is_dir => "FILE_TYPE_DIRECTORY",
        _ => return None,
    };
    let mode = f
        .mode
        .as_deref()
        .and_then(|m| nullspace_model::machine_files::parse_mode(m).ok())
        .unwrap_or(0);
    let mut v = json!({
        "name": f.name,
        "type": kind,
        "path": f.path,
        "size": f.size.to_string(),
        "mode": mode,
        "permissions": f.permissions.unwrap_or_default(),
        "owner": f.owner.unwrap_or_default(),
        "group": f.group.unwrap_or_default(),
        "modifiedTime": f.modified_time.unwrap_or_default(),
    });
    if let Some(t) = f.symlink_target {
        v["symlinkTarget"] = json!(t);
    }
    Some(v)
}

fn one(f: FileInfo) -> Value {
    json!({"entry": entry(f).unwrap_or(json!({}))})
}

async fn stat(s: &Shared, e: &Envd, r: &Req) -> Result<Value, RpcError> {
    let path = e.path(&r.path);
    let f = files::stat_file(s, &e.caller, &e.id, &path, e.user.as_deref()).await?;
    Ok(one(f))
}

async fn list_dir(s: &Shared, e: &Envd, r: &Req) -> Result<Value, RpcError> {
    let path = e.path(&r.path);
    let depth = r.depth.unwrap_or(1).max(1);
    let all = files::list_files(s, &e.caller, &e.id, &path, depth, e.user.as_deref()).await?;
    let entries: Vec<Value> = all.into_iter().filter_map(entry).collect();
    Ok(json!({"entries": entries}))
}

async fn make_dir(s: &Shared, e: &Envd, r: &Req) -> Result<Value, RpcError> {
    let path = e.path(&r.path);
    let user = e.user.as_deref();
    if !file_ops::make_dir(s, &e.caller, &e.id, &path, user).await? {
        return Err(RpcError::new(
            "already_exists",
            format!("directory {path} already exists"),
        ));
    }
    let f = files::stat_file(s, &e.caller, &e.id, &path, user).await?;
    Ok(one(f))
}

async fn move_(s: &Shared, e: &Envd, r: &Req) -> Result<Value, RpcError> {
    let (from, to) = (e.path(&r.source), e.path(&r.destination));
    let f = file_ops::rename(s, &e.caller, &e.id, &from, &to, e.user.as_deref()).await?;
    Ok(one(f))
}

async fn remove(s: &Shared, e: &Envd, r: &Req) -> Result<Value, RpcError> {
    let path = e.path(&r.path);
    file_ops::remove(s, &e.caller, &e.id, &path, e.user.as_deref()).await?;
    Ok(json!({}))
}

fn event_type(k: WatchKind) -> &'static str {
    match k {
        WatchKind::Create => "EVENT_TYPE_CREATE",
        WatchKind::Write => "EVENT_TYPE_WRITE",
        WatchKind::Remove => "EVENT_TYPE_REMOVE",
        WatchKind::Rename => "EVENT_TYPE_RENAME",
        WatchKind::Chmod => "EVENT_TYPE_CHMOD",
    }
}

fn fs_event(ev: &WatchEvent) -> Value {
    json!({"name": ev.name, "type": event_type(ev.kind)})
}

/// Starts the guest's watch of `r.path`; its updates arrive on the
/// returned receiver until `stop` is cancelled.
async fn start_watch(
    s: &Shared,
    e: &Envd,
    r: &Req,
    stop: CancellationToken,
) -> Result<mpsc::Receiver<WatchUpdate>, RpcError> {
    let path = crate::machines::rules::file_path("path", &e.path(&r.path), e.user.as_deref())?;
    let (_, live) = running(s, &e.caller, &e.id).await?;
    // A missing directory is `not_found` before the stream starts.
    let st = live
        .guest
        .stat(&path, e.user.as_deref())
        .await
        .map_err(|err| RpcError::from(MachineError::guest(&e.id, err)))?;
    if !st.is_dir {
        return Err(RpcError::invalid(format!("path {path} is not a directory")));
    }
    let spec = WatchSpec {
        path,
        recursive: r.recursive,
        user: e.user.clone(),
    };
    let (tx, rx) = mpsc::channel(64);
    let guest = live.guest.clone();
    tokio::spawn(async move {
        let _ = guest.watch(spec, tx, stop).await;
    });
    Ok(rx)
}

async fn watch_dir(
    s: &Shared,
    e: &Envd,
    headers: &HeaderMap,
    r: Req,
) -> Result<Response, RpcError> {
    let stop = CancellationToken::new();
    let mut rx = start_watch(s, e, &r, stop.clone()).await?;
    let keepalive = connect::keepalive(headers);
    let (tx, resp) = connect::stream();
    tokio::spawn(async move {
        let _guard = stop.clone().drop_guard();
        if tx.send(message(&json!({"start": {}}))).await.is_err() {
            return;
        }
        loop {
            let out: Vec<Bytes> = tokio::select! {
                u = rx.recv() => match u {
                    Some(WatchUpdate::Events(evs, _)) => evs
                        .iter()
                        .map(|ev| message(&json!({"filesystem": fs_event(ev)})))
                        .collect(),
                    Some(WatchUpdate::Started) => vec![],
                    None => break,
                },
                _ = tokio::time::sleep(keepalive) => vec![message(&json!({"keepalive": {}}))],
                _ = tx.closed() => return,
            };
            for b in out {
                if tx.send(b).await.is_err() {
                    return;
                }
            }
        }
        let _ = tx.send(connect::end(None)).await;
    });
    Ok(resp)
}

/// A polled watcher: its sandbox, what it gathered, and its stop.
struct Watcher {
    sandbox: String,
    pending: Arc<Mutex<Vec<Value>>>,
    stop: CancellationToken,
}

fn watchers() -> &'static Mutex<HashMap<String, Watcher>> {
    static W: OnceLock<Mutex<HashMap<String, Watcher>>> = OnceLock::new();
    W.get_or_init(Default::default)
}

async fn create_watcher(s: &Shared, e: &Envd, r: &Req) -> Result<Value, RpcError> {
    if watchers().lock().map(|w| w.len()).unwrap_or(0) >= MAX_WATCHERS {
        return Err(RpcError::new(
            "resource_exhausted",
            format!("{MAX_WATCHERS} watchers are open on this server; remove one first"),
        ));
    }
    let stop = CancellationToken::new();
    let mut rx = start_watch(s, e, r, stop.clone()).await?;
    // Set up before answering: later changes are all seen.
    match rx.recv().await {
        Some(WatchUpdate::Started) | Some(WatchUpdate::Events(..)) => {}
        None => {
            return Err(RpcError::new(
                "internal",
                format!("the watch of {} ended before it started", r.path),
            ));
        }
    }
    let id = format!("w_{}", crate::machines::ports::new_secret());
    let pending = Arc::new(Mutex::new(Vec::new()));
    let sink = pending.clone();
    let gone = id.clone();
    tokio::spawn(async move {
        while let Some(u) = rx.recv().await {
            if let WatchUpdate::Events(evs, _) = u
                && let Ok(mut p) = sink.lock()
            {
                p.extend(evs.iter().map(fs_event));
                let over = p.len().saturating_sub(MAX_PENDING);
                p.drain(..over);
            }
        }
        // The watch ended (its directory or its machine went away).
        if let Ok(mut w) = watchers().lock() {
            w.remove(&gone);
        }
    });
    if let Ok(mut w) = watchers().lock() {
        w.insert(
            id.clone(),
            Watcher {
                sandbox: e.id.clone(),
                pending,
                stop,
            },
        );
    }
    Ok(json!({"watcherId": id}))
}

fn watcher_events(e: &Envd, r: &Req) -> Result<Value, RpcError> {
    let w = watchers()
        .lock()
        .map_err(|_| RpcError::new("internal", "watchers lock"))?;
    let Some(found) = w.get(&r.watcher_id).filter(|w| w.sandbox == e.id) else {
        return Err(RpcError::not_found(format!(
            "watcher {:?} not found",
            r.watcher_id
        )));
    };
    let events = std::mem::take(
        &mut *found
            .pending
            .lock()
            .map_err(|_| RpcError::new("internal", "watcher lock"))?,
    );
    Ok(json!({"events": events}))
}

fn remove_watcher(e: &Envd, r: &Req) -> Result<Value, RpcError> {
    let mut w = watchers()
        .lock()
        .map_err(|_| RpcError::new("internal", "watchers lock"))?;
    match w.get(&r.watcher_id) {
        Some(found) if found.sandbox == e.id => {
            found.stop.cancel();
            w.remove(&r.watcher_id);
            Ok(json!({}))
        }
        _ => Err(RpcError::not_found(format!(
            "watcher {:?} not found",
            r.watcher_id
        ))),
    }
}
