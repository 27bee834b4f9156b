//! One proxied request into a guest: its headers made fit for the guest's
//! app, then exchanged over a fresh tunnel (`edge::proxy::exchange`).

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, header};

use crate::edge::proxy::ExchangeError;

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
    crate::edge::proxy::exchange(io, req, response_timeout)
        .await
        .map_err(|e| match e {
            ExchangeError::NoAnswer(t) => ProxyError::NoAnswer(port, t),
            ExchangeError::UnaskedSwitch => {
                ProxyError::Upstream(port, "the guest's server switched protocols unasked".into())
            }
            ExchangeError::Upstream(m) => ProxyError::Upstream(port, m),
        })
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
