//! The preview proxy: HTTP and WebSocket requests for a port inside a
//! machine, from outside it, with no address the guest must route.
//!
//! Two ways to address a port:
//! - by host name, `{port}-{id}.{domain}` (the id's `_` written `-`, as a
//!   host name may not hold `_`), with `--preview-domain` (default
//!   `localhost`: browsers and curl resolve any name under it to loopback);
//! - by path, `/preview/{id}/{port}/…` under the API's own address, for
//!   setups without wildcard DNS (the prefix is stripped before the guest
//!   sees the request).
//!
//! Each request is checked by `machines::ports::admit` and goes over a
//! fresh tunnel through the machine's agent ([`bridge`], see
//! `docs/ARCHITECTURE.md` for why a tunnel and not a network forward),
//! sent by [`forward`]. A request that came with a signed URL's token gets
//! it as a cookie, so the page's own later requests pass too.

pub mod bridge;
pub mod forward;

use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::machines::ports::{self, Presented, Refusal};
use crate::machines::record::Machine;
use crate::state::Shared;
use nullspace_model::machine::MachineStatus;

/// Why a proxied request failed (the proxy's own answers, JSON like the API's).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("machine {0:?} not found")]
    NotFound(String),
    #[error("machine {0} is {1}; previews reach running machines only")]
    NotRunning(String, MachineStatus),
    #[error("machine {0} runs on another node ({1})")]
    OtherNode(String, String),
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("{0}")]
    BadRequest(String),
    #[error("port {0} in the machine does not accept connections: {1}")]
    Unreachable(u16, String),
    /// The machine's connection bound (`nullspace_model::agent::MAX_TUNNELS`).
    #[error("{0}")]
    Busy(String),
    #[error("port {0} in the machine did not answer within {1:?}")]
    NoAnswer(u16, Duration),
    #[error("port {0} in the machine answered badly: {1}")]
    Upstream(u16, String),
    #[error("{0}")]
    Internal(String),
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            ProxyError::NotFound(_) => (StatusCode::NOT_FOUND, "machine_not_found"),
            ProxyError::NotRunning(..) => (StatusCode::CONFLICT, "machine_not_ready"),
            ProxyError::OtherNode(..) => (StatusCode::CONFLICT, "machine_conflict"),
            ProxyError::Refused(Refusal::Private(_)) => {
                (StatusCode::UNAUTHORIZED, "traffic_access_required")
            }
            ProxyError::Refused(_) => (StatusCode::FORBIDDEN, "preview_access_denied"),
            ProxyError::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            ProxyError::Unreachable(..) | ProxyError::Upstream(..) => {
                (StatusCode::BAD_GATEWAY, "port_unreachable")
            }
            ProxyError::NoAnswer(..) => (StatusCode::GATEWAY_TIMEOUT, "port_timeout"),
            ProxyError::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "too_many_connections"),
            ProxyError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError::new(status, code, self.to_string()).into_response()
    }
}

/// The host label of a port: `{port}-{id with '-' for '_'}`.
pub fn host_label(id: &str, port: u16) -> String {
    format!("{port}-{}", id.replace('_', "-"))
}

/// The machine and port a `Host` header addresses under `domain`.
pub fn target_of_host(host: &str, domain: &str) -> Option<(String, u16)> {
    let name = host.rsplit_once(':').map_or(host, |(n, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            n
        } else {
            host
        }
    });
    let label = name
        .to_ascii_lowercase()
        .strip_suffix(&format!(".{}", domain.to_ascii_lowercase()))?
        .to_string();
    let (port, id) = label.split_once('-')?;
    let port: u16 = port.parse().ok()?;
    // Ids are `prefix_hex`: the one '-' left stands for the '_'.
    let id = id.replacen('-', "_", 1);
    crate::machines::record::plausible_id(&id).then_some((id, port))
}

/// `?query` as the client sent it (still valid in a header value), or "".
fn query_suffix(req: &Request) -> String {
    req.uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default()
}

/// The path-addressed proxy's routes (any method): `/preview/{id}/{port}`
/// (redirected to `…/`), `…/` and everything under it.
pub fn routes() -> axum::Router<Shared> {
    use axum::routing::any;
    axum::Router::new()
        .route("/preview/{id}/{port}", any(to_path_root))
        .route("/preview/{id}/{port}/", any(by_path_root))
        .route("/preview/{id}/{port}/{*rest}", any(by_path))
}

/// Middleware before the API: requests whose Host names a port go to the
/// proxy, never to the API's routes.
pub async fn by_host(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let target = state.config.preview_domain.as_deref().and_then(|d| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| target_of_host(h, d))
    });
    match target {
        None => next.run(req).await,
        Some((id, port)) => {
            let pq = req
                .uri()
                .path_and_query()
                .map_or("/".to_string(), |p| p.as_str().to_string());
            serve(&state, &id, port, pq, "/", req).await
        }
    }
}

/// `/preview/{id}/{port}/{*rest}`.
pub async fn by_path(
    State(state): State<Shared>,
    Path((id, port, _)): Path<(String, u16, String)>,
    req: Request,
) -> Response {
    // The rest of the path as sent (not percent-decoded): the guest's app
    // decodes it itself.
    let rest = req.uri().path().splitn(5, '/').nth(4).unwrap_or("");
    let query = query_suffix(&req);
    let pq = format!("/{rest}{query}");
    let prefix = format!("/preview/{id}/{port}/");
    serve(&state, &id, port, pq, &prefix, req).await
}

/// `/preview/{id}/{port}`: redirected to `…/` (the app's relative links
/// resolve under the prefix only from there).
pub async fn to_path_root(Path((id, port)): Path<(String, u16)>, req: Request) -> Response {
    if !crate::machines::record::plausible_id(&id) {
        return ProxyError::NotFound(id).into_response();
    }
    let query = query_suffix(&req);
    axum::response::Redirect::permanent(&format!("/preview/{id}/{port}/{query}")).into_response()
}

/// `/preview/{id}/{port}/`: the app's root.
pub async fn by_path_root(
    State(state): State<Shared>,
    Path((id, port)): Path<(String, u16)>,
    req: Request,
) -> Response {
    let query = query_suffix(&req);
    let prefix = format!("/preview/{id}/{port}/");
    serve(&state, &id, port, format!("/{query}"), &prefix, req).await
}

async fn serve(
    state: &Shared,
    id: &str,
    port: u16,
    path_and_query: String,
    cookie_path: &str,
    req: Request,
) -> Response {
    match proxy(state, id, port, path_and_query, cookie_path, req).await {
        Ok(mut r) => {
            // The guest's answer, whatever its status: not the API's to reshape.
            r.extensions_mut().insert(crate::edge::errors::Relayed);
            r
        }
        Err(e) => {
            tracing::debug!(machine = id, port, "preview refused: {e}");
            e.into_response()
        }
    }
}

/// Machine `id`'s record, whatever its namespace (the token decides).
async fn machine(state: &Shared, id: &str) -> Result<Machine, ProxyError> {
    let row = state
        .store
        .machine(id)
        .await
        .map_err(|e| ProxyError::Internal(e.to_string()))?
        .ok_or_else(|| ProxyError::NotFound(id.to_string()))?;
    Machine::from_row(row).map_err(|e| ProxyError::Internal(e.to_string()))
}

async fn proxy(
    state: &Shared,
    id: &str,
    port: u16,
    path_and_query: String,
    cookie_path: &str,
    req: Request,
) -> Result<Response, ProxyError> {
    let port =
        ports::check_port(i64::from(port)).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
    if !crate::machines::record::plausible_id(id) {
        return Err(ProxyError::NotFound(id.to_string()));
    }
    let m = machine(state, id).await?;
    let presented = presented(&req);
    let via_query = presented.1;
    let grant = ports::admit(state, &m, &m.doc.access, port, &presented.0).await?;
    // A paused machine with auto_resume wakes for its visitors as for its
    // owner's commands (the request was admitted: the token is the
    // credential, so the resume acts for the machine's namespace).
    let m = if m.status() == MachineStatus::Paused && m.doc.auto_resume {
        let owner = nullspace_store::Caller {
            key_id: String::new(),
            namespace: m.row.namespace.clone(),
        };
        crate::machines::pause::resume(state, &owner, id)
            .await
            .map_err(|e| ProxyError::Internal(format!("resuming machine {id}: {e}")))?;
        machine(state, id).await?
    } else {
        m
    };
    if m.status() != MachineStatus::Running {
        return Err(ProxyError::NotRunning(id.to_string(), m.status()));
    }
    if m.row.node_id != state.machines.node_id {
        return Err(ProxyError::OtherNode(id.to_string(), m.row.node_id.clone()));
    }
    let live = state
        .machines
        .get(id)
        .ok_or_else(|| ProxyError::NotRunning(id.to_string(), m.status()))?;
    let (path_and_query, token) = take_query_token(&path_and_query);
    if let Some(u) = &grant {
        u.record(crate::edge::proxy::is_upgrade(&req));
    }
    let mut resp = forward::forward(
        &live.guest,
        port,
        req,
        forward::Rewrite { path_and_query },
        state.config.preview_response_timeout,
        grant.clone(),
    )
    .await?;
    // A signed URL's token becomes a cookie for the page's later requests.
    if let (Some(_), true, Some(t)) = (grant, via_query, token)
        && let Ok(v) = HeaderValue::from_str(&format!(
            "{}={t}; Path={cookie_path}; HttpOnly; SameSite=Lax",
            ports::TOKEN_COOKIE
        ))
    {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    Ok(resp)
}

/// The credentials a request carries, and whether the preview token came
/// in the query (a signed URL).
fn presented(req: &Request) -> (Presented, bool) {
    let h = req.headers();
    let get = |n: &str| {
        h.get(n)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.trim().to_string())
    };
    let query = req
        .uri()
        .query()
        .and_then(|q| query_value(q, ports::TOKEN_QUERY));
    let cookie = h
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            c.trim()
                .strip_prefix(&format!("{}=", ports::TOKEN_COOKIE))
                .map(str::to_string)
        });
    let via_query = query.is_some();
    (
        Presented {
            traffic_token: get(ports::TRAFFIC_HEADER),
            preview_token: query.or_else(|| get(ports::PROXY_TOKEN_HEADER)).or(cookie),
        },
        via_query,
    )
}

fn query_value(q: &str, key: &str) -> Option<String> {
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then(|| v.to_string())
    })
}

/// The path without the `edge_token` query parameter, and that token.
fn take_query_token(pq: &str) -> (String, Option<String>) {
    let Some((path, q)) = pq.split_once('?') else {
        return (pq.to_string(), None);
    };
    let mut token = None;
    let kept: Vec<&str> = q
        .split('&')
        .filter(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            if k == ports::TOKEN_QUERY {
                token = Some(v.to_string());
                false
            } else {
                true
            }
        })
        .collect();
    if kept.is_empty() {
        (path.to_string(), token)
    } else {
        (format!("{path}?{}", kept.join("&")), token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_address_ports() {
        let id = "mch_0123456789abcdef01234567";
        let label = host_label(id, 3000);
        assert_eq!(label, "3000-mch-0123456789abcdef01234567");
        for host in [
            format!("{label}.localhost:8080"),
            format!("{label}.LOCALHOST"),
        ] {
            assert_eq!(
                target_of_host(&host, "localhost"),
                Some((id.to_string(), 3000)),
                "{host}"
            );
        }
        assert_eq!(target_of_host("localhost:8080", "localhost"), None);
        assert_eq!(
            target_of_host(&format!("{label}.example.com"), "localhost"),
            None
        );
        assert_eq!(target_of_host("x-mch-1.localhost", "localhost"), None);
        assert_eq!(target_of_host("99999-mch-1.localhost", "localhost"), None);
    }

    #[test]
    fn the_query_token_is_taken_out() {
        assert_eq!(
            take_query_token("/a?edge_token=T&b=1"),
            ("/a?b=1".to_string(), Some("T".to_string()))
        );
        assert_eq!(
            take_query_token("/a?edge_token=T"),
            ("/a".to_string(), Some("T".to_string()))
        );
        assert_eq!(take_query_token("/a?b=2"), ("/a?b=2".to_string(), None));
    }
}
