//! Any node serves any request: one for a live machine another node owns
//! (`/v1/machines/{id}/…`, `/v1/sandboxes/{id}/…`) is sent to that node
//! as it came, with the caller's own credentials (the owner authenticates
//! it against the shared key table, so no trust is added), and its answer
//! streamed back: plain HTTP, SSE, and WebSocket upgrades (exec, pty,
//! watch). A forwarded request carries `Nullspace-Forwarded-By`, and is
//! never forwarded again. An owner whose lease ran out answers 503 with
//! `Retry-After`.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::state::Shared;

/// Set on a forwarded request: the node that sent it.
pub const FORWARDED_BY: &str = "nullspace-forwarded-by";

/// The owner's answer must begin within this (an exec answers when its
/// command ends; the SDK's own timeout is the real bound).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3600);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// What a client is told to wait before it retries an owner that is down.
const RETRY_AFTER_SECS: &str = "5";

/// The machine id a path addresses, for the machine routes of both dialects.
fn machine_of(path: &str) -> Option<&str> {
    let rest = path
        .strip_prefix("/v1/machines/")
        .or_else(|| path.strip_prefix("/v1/sandboxes/"))?;
    let id = rest.split('/').next()?;
    crate::machines::record::plausible_id(id).then_some(id)
}

/// The layer: passes a request through unless it addresses a live machine
/// of another node (only in a cluster, and never a forwarded request).
pub async fn to_owner(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let Some(me) = state.cluster.get().cloned() else {
        return next.run(req).await;
    };
    if req.headers().contains_key(FORWARDED_BY) {
        return next.run(req).await;
    }
    let Some(id) = machine_of(req.uri().path()).map(str::to_string) else {
        return next.run(req).await;
    };
    let row = match state.store.machine(&id).await {
        Ok(Some(r)) if r.node_id != me.node_id && !r.status.is_final() => r,
        // Ours, ended, unknown, or the store unreachable: the handler
        // answers (with its own not-found and errors).
        _ => return next.run(req).await,
    };
    let owner = match state.store.node(&row.node_id).await {
        Ok(Some(n)) if n.live => n,
        Ok(Some(n)) => {
            return unavailable(format!(
                "machine {id} runs on node {} ({}), which is {} and does not answer; retry later",
                n.id,
                n.url,
                if n.live { "live" } else { n.status.as_str() }
            ));
        }
        Ok(None) => {
            return unavailable(format!(
                "machine {id} runs on node {}, which is not registered (it was started without --node-url)",
                row.node_id
            ));
        }
        Err(e) => return unavailable(format!("finding the node of machine {id}: {e}")),
    };
    match forward(&owner.url, &me.node_id, req).await {
        Ok(r) => r,
        Err(why) => unavailable(format!(
            "machine {id} runs on node {} ({}): {why}; retry later",
            owner.id, owner.url
        )),
    }
}

fn unavailable(message: String) -> Response {
    let mut r = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "machine_unavailable",
        message,
    )
    .into_response();
    r.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_static(RETRY_AFTER_SECS),
    );
    r
}

async fn forward(url: &str, me: &str, mut req: Request) -> Result<Response, String> {
    let authority = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("its URL {url} is not http:// (TLS between nodes is not offered)"))?
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let io = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&authority))
        .await
        .map_err(|_| format!("no connection within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| format!("connecting: {e}"))?;
    let _ = io.set_nodelay(true);
    let h = req.headers_mut();
    h.insert(
        FORWARDED_BY,
        HeaderValue::from_str(me).map_err(|e| e.to_string())?,
    );
    if let Ok(v) = HeaderValue::from_str(&authority) {
        h.insert(header::HOST, v);
    }
    crate::edge::proxy::exchange(io, req, RESPONSE_TIMEOUT)
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_paths() {
        let id = "mch_0123456789abcdef01234567";
        assert_eq!(machine_of(&format!("/v1/machines/{id}/exec")), Some(id));
        assert_eq!(machine_of(&format!("/v1/sandboxes/{id}")), Some(id));
        assert_eq!(machine_of("/v1/machines"), None);
        assert_eq!(machine_of("/v1/templates/x"), None);
        assert_eq!(machine_of("/v1/machines/../etc"), None);
    }
}
