//! Lifecycle event handlers: `GET …/lifecycle` (filters, paging) and the
//! `…/lifecycle/ws` stream (a `subscribe` message; `subscribed`; stored
//! events after the client's cursor, then new ones as they are recorded).

use std::collections::HashMap;

use axum::Extension;
use axum::Json;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use nullspace_model::machine::lifecycle::{
    LifecycleClientFrame, LifecycleEventList, LifecycleQuery, LifecycleServerFrame,
    LifecycleSubscribe, LifecycleSubscription, ReconnectMode, event_seq,
};
use nullspace_store::Caller;

use super::Speak;
use crate::error::{ApiError, ApiResult};
use crate::machines::{events, record};
use crate::state::Shared;

/// Parses one query value, naming the parameter when it is wrong.
fn word<T: std::str::FromStr>(q: &HashMap<String, String>, k: &str) -> ApiResult<Option<T>>
where
    T::Err: std::fmt::Display,
{
    q.get(k)
        .map(|v| {
            v.parse::<T>()
                .map_err(|e| ApiError::invalid(format!("query parameter {k}: {e}")))
        })
        .transpose()
}

pub async fn lifecycle_events<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<LifecycleEventList>> {
    let lq = LifecycleQuery {
        offset: word(&q, "offset")?,
        limit: word(&q, "limit")?,
        order: word(&q, "order")?,
        operation: word(&q, "operation")?,
        status: word(&q, "status")?,
        from: q.get("from").cloned(),
        to: q.get("to").cloned(),
        audience: word(&q, "audience")?,
    };
    events::list(&s, &c, &id, lq).await.speak(F).map(Json)
}

/// `GET …/lifecycle/ws`.
pub async fn lifecycle_ws<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let upgrade = upgrade.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("this endpoint is a WebSocket: {e}"),
        )
    })?;
    // The machine must be the caller's (an ended one still has events).
    record::load(&s, &c, &id).await.speak(F)?;
    Ok(upgrade
        .max_message_size(64 << 10)
        .on_upgrade(move |socket| stream(socket, s, c, id)))
}

async fn send(ws: &mut WebSocket, f: &LifecycleServerFrame) -> bool {
    let text = serde_json::to_string(f).unwrap_or_default();
    ws.send(Message::Text(text.into())).await.is_ok()
}

async fn fail(ws: &mut WebSocket, message: String) {
    send(ws, &LifecycleServerFrame::Error { message }).await;
    let _ = ws.send(Message::Close(None)).await;
}

async fn stream(mut ws: WebSocket, s: Shared, c: Caller, id: String) {
    // The first message is the subscription.
    let sub: LifecycleSubscribe = loop {
        match ws.recv().await {
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<LifecycleClientFrame>(&t) {
                Ok(LifecycleClientFrame::Subscribe(sub)) => break sub,
                Err(e) => return fail(&mut ws, format!("expected a subscribe message: {e}")).await,
            },
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            _ => return,
        }
    };
    if sub.machine_id.as_deref().is_some_and(|m| m != id) {
        return fail(&mut ws, format!("this stream serves machine {id} only")).await;
    }
    let live_only = sub.live_only.unwrap_or(false) && sub.after_event_id.is_none();
    let mut cursor = match &sub.after_event_id {
        Some(e) => match event_seq(e) {
            Some(n) => n,
            None => return fail(&mut ws, format!("after_event_id {e:?} names no event")).await,
        },
        None if live_only => match events::head(&s).await {
            Ok(n) => n,
            Err(e) => return fail(&mut ws, e.to_string()).await,
        },
        None => 0,
    };
    let subscribed = LifecycleServerFrame::Subscribed {
        subscription: LifecycleSubscription {
            machine_id: Some(id.clone()),
            snapshot_id: sub.snapshot_id.clone(),
            operation: sub.operation,
            audience: sub.audience,
        },
        reconnect_mode: if live_only {
            ReconnectMode::LiveOnly
        } else {
            ReconnectMode::Replay
        },
    };
    if !send(&mut ws, &subscribed).await {
        return;
    }
    // The replay: at most replay_limit of the newest events after the
    // cursor (the SDK's default is 100), then everything new.
    let replay = sub.replay_limit.unwrap_or(100).clamp(1, events::PAGE_MAX);
    let mut first = true;
    loop {
        let batch = match events::after(
            &s,
            &c,
            &id,
            sub.operation,
            sub.status,
            cursor,
            events::PAGE_MAX,
        )
        .await
        {
            Ok(b) => b,
            Err(e) => return fail(&mut ws, e.to_string()).await,
        };
        let skip = if first {
            batch.len().saturating_sub(replay as usize)
        } else {
            0
        };
        first = false;
        let full = batch.len() as u64 == events::PAGE_MAX;
        for e in batch.into_iter().skip(skip) {
            cursor = cursor.max(e.seq);
            let f = LifecycleServerFrame::Event {
                event: Box::new(events::info(e)),
            };
            if !send(&mut ws, &f).await {
                return;
            }
        }
        if full {
            continue;
        }
        // Wait for the next poll, or for the client to go away.
        tokio::select! {
            _ = tokio::time::sleep(events::FOLLOW_EVERY) => {}
            m = ws.recv() => match m {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}
