//! Ports of machines: who may reach a port inside a machine, and preview
//! grants (signed, expiring, revocable access to one port).
//!
//! A request for port P of machine M is let through when
//! 1. it carries M's traffic access token (`x-nullspace-traffic-access-token`), or
//! 2. it carries a preview token (`edge_token` query, the
//!    `x-nullspace-preview-proxy-token` header, or the cookie the proxy set
//!    from either) that this server signed for M and P, unexpired, whose
//!    grant is not revoked, or
//! 3. it carries no token and M was created public
//!    (`network.allow_public_traffic`, the SDK's default).
//!
//! A token that fails is refused even for a public machine: a revoked or
//! expired URL says so rather than quietly working. Grants are rows of
//! their own (`nullspace_store::previews`), checked on every request, so a
//! revocation takes effect at once. The proxy itself is the edge's
//! (`crate::preview`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nullspace_store::{Caller, PreviewGrantRow};
use serde::{Deserialize, Serialize};

use super::record::{self, Machine};
use super::{MachineError, MachineResult};
use crate::state::Shared;

pub const TRAFFIC_HEADER: &str = "x-nullspace-traffic-access-token";
pub const PROXY_TOKEN_HEADER: &str = "x-nullspace-preview-proxy-token";
pub const TOKEN_QUERY: &str = "edge_token";
pub const TOKEN_COOKIE: &str = "ns_preview";
/// Lifetime of a grant when the request names none, and its bounds (the
/// SDK documents 60 s to 24 h).
pub const TTL_DEFAULT: Duration = Duration::from_secs(3600);
pub const TTL_MIN: Duration = Duration::from_secs(60);
pub const TTL_MAX: Duration = Duration::from_secs(24 * 3600);
/// Usable grants one machine may hold at once.
pub const LIVE_GRANTS_MAX: i64 = 256;

/// How a machine's ports may be reached (part of its record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortAccess {
    /// Reachable without a token.
    pub public: bool,
    /// The machine's traffic access token (header value).
    pub traffic_token: String,
}

impl Default for PortAccess {
    /// Records written before ports existed: public, as the SDK's default,
    /// with a token nobody holds.
    fn default() -> Self {
        PortAccess {
            public: true,
            traffic_token: new_secret(),
        }
    }
}

/// 32 random bytes, hex.
pub fn new_secret() -> String {
    use rand::Rng as _;
    let b: [u8; 32] = rand::rng().random();
    hex::encode(b)
}

/// The claims of a preview token: grant, machine, port, expiry (epoch ms).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Claims {
    g: String,
    m: String,
    p: u16,
    exp: i64,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A guest port a preview may name: 1–65535, but not 22 (SSH has its own
/// access) nor 5900–5999 (desktops), as the SDK documents.
pub fn check_port(port: i64) -> MachineResult<u16> {
    match port {
        22 => Err(MachineError::Invalid(
            "port 22 is reserved for SSH access (create_ssh_access)".into(),
        )),
        5900..=5999 => Err(MachineError::Invalid(format!(
            "port {port} is in 5900-5999, reserved for desktops"
        ))),
        1..=65535 => Ok(port as u16),
        _ => Err(MachineError::Invalid(format!(
            "port {port} is not a TCP port (1-65535)"
        ))),
    }
}

/// A grant lifetime from a request's `expires_in_seconds`.
pub fn ttl(expires_in_seconds: Option<i64>) -> MachineResult<Duration> {
    match expires_in_seconds {
        None => Ok(TTL_DEFAULT),
        Some(s) if s < TTL_MIN.as_secs() as i64 || s > TTL_MAX.as_secs() as i64 => {
            Err(MachineError::Invalid(format!(
                "expires_in_seconds {s} is outside {}..={}",
                TTL_MIN.as_secs(),
                TTL_MAX.as_secs()
            )))
        }
        Some(s) => Ok(Duration::from_secs(s as u64)),
    }
}

/// A new grant for `port` of the caller's machine, and its token.
pub async fn grant(
    state: &Shared,
    c: &Caller,
    id: &str,
    port: u16,
    ttl: Duration,
    auth_mode: &str,
) -> MachineResult<(PreviewGrantRow, String)> {
    let m = record::load_live(state, c, id).await?;
    let now = now_ms();
    if state.store.live_preview_grants(id, now).await? >= LIVE_GRANTS_MAX {
        return Err(MachineError::conflict(
            "too_many_preview_grants",
            format!(
                "machine {id} holds {LIVE_GRANTS_MAX} usable preview grants; revoke some first"
            ),
        ));
    }
    let row = PreviewGrantRow {
        id: nullspace_store::new_id("pg_"),
        namespace: m.row.namespace.clone(),
        machine_id: id.to_string(),
        port,
        auth_mode: auth_mode.to_string(),
        issued_at: now,
        expires_at: now + ttl.as_millis() as i64,
        revoked_at: 0,
    };
    state.store.insert_preview_grant(&row).await?;
    let token = state.signing_key.seal(&Claims {
        g: row.id.clone(),
        m: id.to_string(),
        p: port,
        exp: row.expires_at,
    });
    Ok((row, token))
}

/// The caller's machine's grants (of one port, or all).
pub async fn grants(
    state: &Shared,
    c: &Caller,
    id: &str,
    port: Option<u16>,
) -> MachineResult<Vec<PreviewGrantRow>> {
    record::load(state, c, id).await?;
    Ok(state.store.preview_grants(id, port).await?)
}

/// Revokes one of the caller's machine's grants (again is not an error);
/// the grant as it now stands.
pub async fn revoke(
    state: &Shared,
    c: &Caller,
    id: &str,
    grant_id: &str,
) -> MachineResult<PreviewGrantRow> {
    record::load(state, c, id).await?;
    let not_found = || MachineError::GrantNotFound(grant_id.to_string());
    let g = state
        .store
        .preview_grant(grant_id)
        .await?
        .filter(|g| g.machine_id == id && g.namespace == c.namespace)
        .ok_or_else(not_found)?;
    state.store.revoke_preview_grant(&g.id, now_ms()).await?;
    Ok(state.store.preview_grant(&g.id).await?.unwrap_or(g))
}

/// The credentials a proxied request carries.
#[derive(Debug, Default)]
pub struct Presented {
    pub traffic_token: Option<String>,
    /// From the query, the proxy header or the cookie (first found).
    pub preview_token: Option<String>,
}

/// Why a proxied request is refused (401/403 at the edge).
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(
        "machine {0} is private: send its {TRAFFIC_HEADER} header, or use a signed preview URL"
    )]
    Private(String),
    #[error("the traffic access token does not match machine {0}")]
    WrongTrafficToken(String),
    #[error("preview token refused: {0}")]
    BadToken(String),
    #[error("preview grant {grant} was revoked")]
    Revoked { grant: String },
    #[error("preview grant {grant} expired; ask for a new URL")]
    Expired { grant: String },
    #[error("preview grant {grant} is for {granted}, not port {port} of machine {machine}")]
    OtherTarget {
        grant: String,
        granted: String,
        port: u16,
        machine: String,
    },
}

/// Checks a proxied request for `port` of `m` (any namespace: the token is
/// the credential). `Ok` names the grant used, if any, with its usage.
pub async fn admit(
    state: &Shared,
    m: &Machine,
    access: &PortAccess,
    port: u16,
    presented: &Presented,
) -> Result<Option<Arc<Usage>>, Refusal> {
    use subtle_eq as eq;
    let id = m.id();
    if let Some(t) = &presented.traffic_token {
        return if eq(t.as_bytes(), access.traffic_token.as_bytes()) {
            Ok(None)
        } else {
            Err(Refusal::WrongTrafficToken(id.to_string()))
        };
    }
    let Some(token) = &presented.preview_token else {
        return if access.public {
            Ok(None)
        } else {
            Err(Refusal::Private(id.to_string()))
        };
    };
    let claims: Claims = state
        .signing_key
        .unseal(token)
        .map_err(|e| Refusal::BadToken(e.to_string()))?;
    if claims.m != id || claims.p != port {
        return Err(Refusal::OtherTarget {
            grant: claims.g,
            granted: format!("port {} of machine {}", claims.p, claims.m),
            port,
            machine: id.to_string(),
        });
    }
    let now = now_ms();
    if now >= claims.exp {
        return Err(Refusal::Expired { grant: claims.g });
    }
    let row = state
        .store
        .preview_grant(&claims.g)
        .await
        .map_err(|e| Refusal::BadToken(format!("grant lookup: {e}")))?
        .filter(|g| g.machine_id == id && g.namespace == m.row.namespace)
        .ok_or_else(|| Refusal::Revoked {
            grant: claims.g.clone(),
        })?;
    if row.revoked_at != 0 {
        return Err(Refusal::Revoked { grant: row.id });
    }
    if now >= row.expires_at {
        return Err(Refusal::Expired { grant: row.id });
    }
    Ok(Some(state.preview_usage.of(&row.id, row.expires_at)))
}

/// Constant-time equality of two secrets (lengths are not secret).
fn subtle_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A grant's status word at `now` (the SDK's `active|expired|revoked`).
pub fn status_of(g: &PreviewGrantRow, now: i64) -> &'static str {
    if g.revoked_at != 0 {
        "revoked"
    } else if now >= g.expires_at {
        "expired"
    } else {
        "active"
    }
}

pub fn now() -> i64 {
    now_ms()
}

/// How much a grant was used (since this server started: counters live
/// in memory, the grant itself in the store).
#[derive(Debug, Default)]
pub struct Usage {
    pub http_requests: AtomicU64,
    pub websocket_connections: AtomicU64,
    /// Bytes from the client to the guest, and back.
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Epoch ms (0: never).
    pub first_used_at: AtomicI64,
    pub last_used_at: AtomicI64,
    /// The grant's expiry: entries of expired grants are pruned.
    expires_at: i64,
}

impl Usage {
    pub fn record(&self, websocket: bool) {
        let now = now_ms();
        let _ = self
            .first_used_at
            .compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst);
        self.last_used_at.store(now, Ordering::SeqCst);
        if websocket {
            &self.websocket_connections
        } else {
            &self.http_requests
        }
        .fetch_add(1, Ordering::SeqCst);
    }
}

/// Usage by grant id.
#[derive(Debug, Default)]
pub struct UsageTable(std::sync::Mutex<HashMap<String, Arc<Usage>>>);

/// Entries kept before expired grants' are pruned.
const USAGE_PRUNE_AT: usize = 10_000;

impl UsageTable {
    /// The grant's counters, made on first use.
    pub fn of(&self, grant: &str, expires_at: i64) -> Arc<Usage> {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if t.len() >= USAGE_PRUNE_AT && !t.contains_key(grant) {
            let now = now_ms();
            t.retain(|_, u| u.expires_at > now);
        }
        t.entry(grant.to_string())
            .or_insert_with(|| {
                Arc::new(Usage {
                    expires_at,
                    ..Default::default()
                })
            })
            .clone()
    }

    /// The grant's counters if it was used.
    pub fn get(&self, grant: &str) -> Option<Arc<Usage>> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(grant)
            .cloned()
    }
}

/// What [`wait_ready`] saw.
pub struct Readiness {
    pub ready: bool,
    pub attempts: u32,
    pub elapsed: Duration,
    /// The last check's words (why not ready).
    pub detail: String,
}

/// Checks `probe` in the caller's running machine every `interval` until
/// it passes or `timeout` passes.
pub async fn wait_ready(
    state: &Shared,
    c: &Caller,
    id: &str,
    probe: nullspace_model::agent::ProbeSpec,
    timeout: Duration,
    interval: Duration,
) -> MachineResult<Readiness> {
    let (_, live) = super::commands::running(state, c, id).await?;
    let t = std::time::Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let left = timeout.saturating_sub(t.elapsed());
        let (ready, detail) = live
            .guest
            .probe(
                probe.clone(),
                left.clamp(Duration::from_millis(200), Duration::from_secs(5)),
            )
            .await
            .map_err(|err| MachineError::Guest {
                id: id.to_string(),
                err,
            })?;
        if ready || t.elapsed() + interval > timeout {
            return Ok(Readiness {
                ready,
                attempts,
                elapsed: t.elapsed(),
                detail,
            });
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_lifetimes_follow_the_sdk_rules() {
        assert_eq!(check_port(3000).unwrap(), 3000);
        for bad in [0, 22, 5900, 5999, 65536, -1] {
            let e = check_port(bad).unwrap_err().to_string();
            assert!(e.contains(&bad.to_string()), "{e}");
        }
        assert_eq!(ttl(None).unwrap(), TTL_DEFAULT);
        assert_eq!(ttl(Some(60)).unwrap(), Duration::from_secs(60));
        assert!(ttl(Some(59)).is_err());
        assert!(ttl(Some(86_401)).is_err());
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(subtle_eq(b"abc", b"abc"));
        assert!(!subtle_eq(b"abc", b"abd"));
        assert!(!subtle_eq(b"abc", b"ab"));
    }
}
