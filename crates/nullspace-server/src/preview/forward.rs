//! One proxied request: sent over a fresh tunnel with hyper's HTTP/1
//! client, the answer streamed back (chunked and SSE included); an
//! upgrade (WebSocket) is answered, then both upgraded streams are joined.

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;

use super::ProxyError;
use crate::guest::Guest;

/// What the proxy changes in a request before it goes to the guest.
pub struct Rewrite {
    /// The path to send instead (path addressing strips its prefix).
    pub path_and_query: String,
}

/// Headers that carry nullspace's credentials: never forwarded.
const OURS: &[&str] = &[
    crate::machines::ports::TRAFFIC_HEADER,
    crate::machines::ports::PROXY_TOKEN_HEADER,
    "authorization",
];

pub async fn forward(
    guest: &Guest,
    port: u16,
    mut req: Request<Body>,
    rewrite: Rewrite,
    response_timeout: Duration,
    usage: Option<std::sync::Arc<crate::machines::ports::Usage>>,
) -> Result<Response<Body>, ProxyError> {
    let client_upgrade = is_upgrade(&req)
        .then(|| req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>())
        .flatten();
    *req.uri_mut() = rewrite
        .path_and_query
        .parse()
        .map_err(|_| ProxyError::BadRequest("the request path does not parse".into()))?;
    for h in OURS {
        req.headers_mut().remove(*h);
    }
    strip_cookie(req.headers_mut());
    // A proxy in front may have set these already (the proxy target's
    // `required_forwarded_headers`); else they say what this hop saw.
    if !req.headers().contains_key("x-forwarded-host")
        && let Some(host) = req.headers().get(header::HOST).cloned()
    {
        req.headers_mut().insert("x-forwarded-host", host);
    }
    if !req.headers().contains_key("x-forwarded-proto") {
        req.headers_mut()
            .insert("x-forwarded-proto", HeaderValue::from_static("http"));
    }
    let io = super::bridge::open(guest, port, usage)
        .await
        .map_err(|e| match e {
            crate::guest::GuestError::Refused {
                code: nullspace_model::agent::ErrorCode::Busy,
                message,
            } => ProxyError::Busy(message),
            e => ProxyError::Unreachable(port, e.to_string()),
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| ProxyError::Upstream(port, e.to_string()))?;
    tokio::spawn(conn.with_upgrades());
    let mut resp = tokio::time::timeout(response_timeout, sender.send_request(req))
        .await
        .map_err(|_| ProxyError::NoAnswer(port, response_timeout))?
        .map_err(|e| ProxyError::Upstream(port, e.to_string()))?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client) = client_upgrade else {
            return Err(ProxyError::Upstream(
                port,
                "the guest's server switched protocols unasked".into(),
            ));
        };
        let upstream = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            if let (Ok(c), Ok(u)) = tokio::join!(client, upstream) {
                let _ =
                    tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(u)).await;
            }
        });
        let (parts, _) = resp.into_parts();
        return Ok(Response::from_parts(parts, Body::empty()));
    }
    Ok(resp.map(Body::new))
}

pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
        && req.headers().contains_key(header::UPGRADE)
}

/// Removes the proxy's own cookie from what the guest's app sees.
fn strip_cookie(h: &mut axum::http::HeaderMap) {
    let Some(v) = h.get(header::COOKIE).and_then(|v| v.to_str().ok()) else {
        return;
    };
    let prefix = format!("{}=", crate::machines::ports::TOKEN_COOKIE);
    let kept: Vec<&str> = v
        .split(';')
        .map(str::trim)
        .filter(|c| !c.starts_with(&prefix))
        .collect();
    if kept.is_empty() {
        h.remove(header::COOKIE);
    } else if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
        h.insert(header::COOKIE, v);
    }
}
