//! `POST /v1/machines/{id}/ssh-access` at the edge: the request in the
//! SDK's shape, the grant ([`crate::ssh::grant`]) and where the endpoint is
//! reached (`--ssh-public-host`, else the host the client reached the API
//! at).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::{Extension, Json};
use nullspace_model::machine::ssh::{SshAccessBody, SshAccessReply};
use nullspace_store::Caller;

use super::{dialect, flavor};
use crate::error::{ApiError, ApiResult};
use crate::http::JsonBody;
use crate::model::iso;
use crate::ssh::{AccessRequest, GrantError};
use crate::state::Shared;

/// `POST …/ssh-access`.
pub async fn ssh_access<const F: u8>(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(b): JsonBody<SshAccessBody>,
) -> ApiResult<Json<SshAccessReply>> {
    let req = AccessRequest {
        public_key: b.public_key,
        user: b.user.filter(|u| !u.trim().is_empty()),
        ttl_seconds: b.ttl_seconds,
        expires_in_minutes: b.expires_in_minutes,
    };
    let (g, addr) = crate::ssh::grant(&s, &c, &id, &req)
        .await
        .map_err(|e| match e {
            GrantError::Machine(e) => dialect(flavor(F), e),
            GrantError::Access(e) => ApiError::invalid(e.to_string()),
            e @ GrantError::NoEndpoint => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ssh_unavailable",
                e.to_string(),
            ),
        })?;
    let host = s
        .config
        .ssh_public_host
        .clone()
        .or_else(|| request_host(&headers))
        .unwrap_or_else(|| addr.ip().to_string());
    let login = g.record.machine_id.clone();
    let command = format!(
        "ssh -i ~/.ssh/id_ed25519 -o CertificateFile=~/.ssh/id_ed25519-cert.pub -p {} {login}@{host}",
        addr.port()
    );
    Ok(Json(SshAccessReply {
        host,
        port: addr.port(),
        user: login,
        expires_at: iso(g.record.expires_at as i64 * 1000),
        access_id: g.record.access_id,
        certificate: g.certificate,
        command,
        host_key: s.ssh.keys.host_public(),
        user_ca: s.ssh.keys.ca_public(),
        guest_user: g.record.user,
    }))
}

/// The host part of the request's `Host` (no port; an IPv6 literal
/// without its brackets), when it is a plausible host name.
fn request_host(h: &HeaderMap) -> Option<String> {
    let v = h
        .get("x-forwarded-host")
        .or_else(|| h.get(header::HOST))?
        .to_str()
        .ok()?
        .trim();
    let host = if let Some(rest) = v.strip_prefix('[') {
        rest.split(']').next()?
    } else {
        v.rsplit_once(':').map_or(v, |(h, _)| h)
    };
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'_'));
    ok.then(|| host.to_string())
}

#[cfg(test)]
mod tests {
    use super::request_host;
    use axum::http::HeaderMap;

    #[test]
    fn the_host_comes_without_its_port() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert("host", v.parse().unwrap());
            request_host(&m)
        };
        assert_eq!(h("127.0.0.1:8080").as_deref(), Some("127.0.0.1"));
        assert_eq!(h("example.org").as_deref(), Some("example.org"));
        assert_eq!(h("[::1]:8080").as_deref(), Some("::1"));
        assert_eq!(h("a b:1"), None);
    }
}
