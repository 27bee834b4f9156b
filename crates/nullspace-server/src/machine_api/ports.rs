//! Ports and preview URLs: `…/host`, `…/ports/{port}/{preview-url,
//! signed-preview-url, preview-proxy-target, readiness}`, `…/preview-urls`.
//! The rules are `machines::ports`'; the proxy is `crate::preview`.

use std::time::Duration;

use axum::Extension;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use nullspace_model::machine::ports::{
    GrantBody, HostBody, HostInfo, PreviewGrantInfo, PreviewGrantList, PreviewProxyTarget,
    PreviewReadiness, PreviewUrl, ReadinessBody, RevokedGrant,
};
use nullspace_store::{Caller, PreviewGrantRow};
use std::collections::HashMap;

use super::Speak;
use crate::error::{ApiError, ApiResult};
use crate::http::JsonBody;
use crate::machines::ports::{self, TOKEN_QUERY};
use crate::model::iso;
use crate::state::Shared;

fn grant_info(s: &Shared, g: &PreviewGrantRow) -> PreviewGrantInfo {
    use std::sync::atomic::Ordering::Relaxed;
    let u = s.preview_usage.get(&g.id);
    let n = |f: fn(&ports::Usage) -> &std::sync::atomic::AtomicU64| {
        u.as_deref().map_or(0, |u| f(u).load(Relaxed))
    };
    let at = |f: fn(&ports::Usage) -> &std::sync::atomic::AtomicI64| {
        u.as_deref()
            .map(|u| f(u).load(Relaxed))
            .filter(|t| *t > 0)
            .map(iso)
    };
    let (http, ws) = (n(|u| &u.http_requests), n(|u| &u.websocket_connections));
    let last = at(|u| &u.last_used_at);
    PreviewGrantInfo {
        id: g.id.clone(),
        machine_id: g.machine_id.clone(),
        port: g.port,
        auth_mode: g.auth_mode.clone(),
        bootstrap_transport: if g.auth_mode == "proxy" {
            "header"
        } else {
            "query"
        }
        .into(),
        status: ports::status_of(g, ports::now()).into(),
        token_kinds: vec!["http_port".into(), "websocket_port".into()],
        principal_kind: "user".into(),
        issued_at: iso(g.issued_at),
        expires_at: iso(g.expires_at),
        revoked_at: (g.revoked_at != 0).then(|| iso(g.revoked_at)),
        first_used_at: at(|u| &u.first_used_at),
        use_count: http + ws,
        http_request_count: http,
        websocket_connection_count: ws,
        bytes_in_count: n(|u| &u.bytes_in),
        bytes_out_count: n(|u| &u.bytes_out),
        created_at: iso(g.issued_at),
        updated_at: iso(g.revoked_at.max(g.issued_at)),
        last_used_at: last,
    }
}

/// The base URLs of a port (http, ws), without a token: by host name under
/// the preview domain, else by path under the API's own address.
fn bases(s: &Shared, h: &HeaderMap, id: &str, port: u16) -> (String, String, String) {
    let api = h
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost")
        .to_string();
    match s.config.preview_domain.as_deref() {
        Some(domain) => {
            let api_port = api
                .rsplit_once(':')
                .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
                .map(|(_, p)| format!(":{p}"))
                .unwrap_or_default();
            let host = format!(
                "{}.{domain}{api_port}",
                crate::preview::host_label(id, port)
            );
            (
                host.clone(),
                format!("http://{host}/"),
                format!("ws://{host}/"),
            )
        }
        None => (
            api.clone(),
            format!("http://{api}/preview/{id}/{port}/"),
            format!("ws://{api}/preview/{id}/{port}/"),
        ),
    }
}

fn port_of(p: i64) -> ApiResult<u16> {
    ports::check_port(p).map_err(|e| ApiError::invalid(e.to_string()))
}

async fn signed<const F: u8>(
    s: &Shared,
    c: &Caller,
    h: &HeaderMap,
    id: &str,
    port: u16,
    ttl: Duration,
) -> ApiResult<PreviewUrl> {
    let (g, token) = ports::grant(s, c, id, port, ttl, "direct").await.speak(F)?;
    let (_, http, ws) = bases(s, h, id, port);
    Ok(PreviewUrl {
        grant: grant_info(s, &g),
        url: format!("{http}?{TOKEN_QUERY}={token}"),
        websocket_url: format!("{ws}?{TOKEN_QUERY}={token}"),
        access_token_expires_at: iso(g.expires_at),
        access_token_transport: "query".into(),
    })
}

pub async fn host<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    h: HeaderMap,
    JsonBody(b): JsonBody<HostBody>,
) -> ApiResult<Json<HostInfo>> {
    let port = port_of(b.port)?;
    let p = signed::<F>(&s, &c, &h, &id, port, ports::TTL_DEFAULT).await?;
    let (host, _, _) = bases(&s, &h, &id, port);
    Ok(Json(HostInfo {
        host,
        url: p.url,
        websocket_url: p.websocket_url,
        access_token_expires_at: p.access_token_expires_at,
        access_token_transport: p.access_token_transport,
    }))
}

pub async fn preview_url<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((id, port)): Path<(String, i64)>,
    h: HeaderMap,
) -> ApiResult<Json<PreviewUrl>> {
    let port = port_of(port)?;
    Ok(Json(
        signed::<F>(&s, &c, &h, &id, port, ports::TTL_DEFAULT).await?,
    ))
}

pub async fn signed_preview_url<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((id, port)): Path<(String, i64)>,
    h: HeaderMap,
    JsonBody(b): JsonBody<GrantBody>,
) -> ApiResult<Json<PreviewUrl>> {
    let port = port_of(port)?;
    let ttl = ports::ttl(b.expires_in_seconds).speak(F)?;
    Ok(Json(signed::<F>(&s, &c, &h, &id, port, ttl).await?))
}

pub async fn proxy_target<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((id, port)): Path<(String, i64)>,
    h: HeaderMap,
    JsonBody(b): JsonBody<GrantBody>,
) -> ApiResult<Json<PreviewProxyTarget>> {
    let port = port_of(port)?;
    let ttl = ports::ttl(b.expires_in_seconds).speak(F)?;
    let transports = b
        .transports
        .unwrap_or_else(|| vec!["http".into(), "websocket".into()]);
    if let Some(t) = transports
        .iter()
        .find(|t| !["http", "websocket"].contains(&t.as_str()))
    {
        return Err(ApiError::invalid(format!(
            "transports: {t:?} is not http or websocket"
        )));
    }
    let (g, token) = ports::grant(&s, &c, &id, port, ttl, "proxy")
        .await
        .speak(F)?;
    let m = crate::machines::record::load(&s, &c, &id).await.speak(F)?;
    let (_, http, ws) = bases(&s, &h, &id, port);
    let has = |t: &str| transports.iter().any(|x| x == t);
    let hint = b.include_traffic_token_hint != Some(false);
    Ok(Json(PreviewProxyTarget {
        grant: grant_info(&s, &g),
        machine_id: id.clone(),
        port,
        token_header_name: ports::PROXY_TOKEN_HEADER.into(),
        expires_at: iso(g.expires_at),
        token_transport: "header".into(),
        http_url: has("http").then(|| http.clone()),
        websocket_url: has("websocket").then(|| ws.clone()),
        http_token: has("http").then(|| token.clone()),
        websocket_token: has("websocket").then(|| token.clone()),
        // What a proxy in front should pass on (kept if sent, else set).
        required_forwarded_headers: vec!["x-forwarded-host".into(), "x-forwarded-proto".into()],
        traffic_access_required: hint.then_some(!m.doc.access.public),
        traffic_access_header_name: hint.then(|| ports::TRAFFIC_HEADER.into()),
        warnings: vec![],
    }))
}

pub async fn list_grants<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<PreviewGrantList>> {
    let port = match q.get("port") {
        None => None,
        Some(p) => {
            Some(port_of(p.parse().map_err(|_| {
                ApiError::invalid("port must be an integer")
            })?)?)
        }
    };
    let rows = ports::grants(&s, &c, &id, port).await.speak(F)?;
    Ok(Json(PreviewGrantList {
        items: rows.iter().map(|g| grant_info(&s, g)).collect(),
    }))
}

pub async fn revoke_grant<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((id, grant_id)): Path<(String, String)>,
) -> ApiResult<Json<RevokedGrant>> {
    let g = ports::revoke(&s, &c, &id, &grant_id).await.speak(F)?;
    Ok(Json(RevokedGrant {
        success: true,
        grant: grant_info(&s, &g),
    }))
}

pub async fn readiness<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path((id, port)): Path<(String, i64)>,
    JsonBody(b): JsonBody<ReadinessBody>,
) -> ApiResult<Json<PreviewReadiness>> {
    use nullspace_model::agent::ProbeSpec;
    let port = port_of(port)?;
    let kind = b.kind.unwrap_or_else(|| "tcp".into());
    let probe = match kind.as_str() {
        "tcp" => ProbeSpec::Tcp { port, host: None },
        "http" => ProbeSpec::Http {
            port,
            host: None,
            path: b.path.clone().unwrap_or_else(|| "/".into()),
        },
        k => return Err(ApiError::invalid(format!("kind {k:?} is not tcp or http"))),
    };
    let timeout = Duration::from_secs(b.timeout_secs.unwrap_or(30).clamp(1, 600));
    let interval = Duration::from_millis(b.interval_ms.unwrap_or(500).clamp(50, 60_000));
    let r = ports::wait_ready(&s, &c, &id, probe, timeout, interval)
        .await
        .speak(F)?;
    Ok(Json(PreviewReadiness {
        ready: r.ready,
        route_ready: true,
        service_ready: r.ready,
        machine_id: id,
        port,
        kind,
        checked_at: iso(ports::now()),
        elapsed_ms: r.elapsed.as_millis() as u64,
        attempts: r.attempts,
        path: b.path,
        code: (!r.ready).then(|| "port_not_ready".into()),
        error: (!r.ready).then_some(r.detail),
        suggested_action: (!r.ready)
            .then(|| format!("start a server listening on port {port} in the machine")),
    }))
}
