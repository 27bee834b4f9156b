//! Who may use which plane: the control plane's `X-API-KEY` (a nullspace
//! API key: its namespace owns the sandboxes), and the data plane's gate:
//! the sandbox named by `E2b-Sandbox-Id`, its port, its access token and
//! the Unix user `Authorization: Basic` names.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use nullspace_model::machine::MachineStatus;
use nullspace_store::Caller;

use super::errors::{RestError, RpcError};
use super::{CODE_INTERPRETER_PORT, ENVD_PORT};
use crate::machines::record::Machine;
use crate::state::Shared;

pub const SANDBOX_ID: &str = "e2b-sandbox-id";
pub const SANDBOX_PORT: &str = "e2b-sandbox-port";
pub const ACCESS_TOKEN: &str = "x-access-token";

/// The `envdAccessToken` of sandbox `id`: derived from the server's
/// signing key, so it is stored nowhere and survives restarts.
pub fn envd_token(state: &Shared, id: &str) -> String {
    state.signing_key.derive(&label(id))
}

fn label(id: &str) -> String {
    format!("e2b-envd-access\0{id}")
}

/// Middleware of the control plane: `X-API-KEY` is a nullspace API key.
pub async fn api_key(State(state): State<Shared>, mut req: Request, next: Next) -> Response {
    let key = req
        .headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_string);
    let Some(key) = key else {
        return RestError::new(StatusCode::UNAUTHORIZED, "X-API-KEY header is required")
            .into_response();
    };
    match state.store.authenticate(&key).await {
        Ok(Some(caller)) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Ok(None) => RestError::new(
            StatusCode::UNAUTHORIZED,
            "the API key in X-API-KEY is not valid",
        )
        .into_response(),
        Err(e) => RestError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// What a data-plane handler knows of its request.
#[derive(Debug, Clone)]
pub struct Envd {
    pub id: String,
    /// The namespace that owns the sandbox (the token proved access).
    pub caller: Caller,
    /// `None`: the template's runtime user.
    pub user: Option<String>,
    /// The machine's working directory: relative paths resolve against it.
    pub cwd: Option<String>,
}

impl Envd {
    /// A path as the guest takes it: relative ones against the user's
    /// home (root's) or the machine's working directory.
    pub fn path(&self, p: &str) -> String {
        if p.starts_with('/') {
            return p.to_string();
        }
        let base = match self.user.as_deref() {
            Some("root") => "/root",
            _ => self.cwd.as_deref().unwrap_or("/"),
        };
        let p = p.trim_start_matches("./");
        if p.is_empty() || p == "." {
            base.to_string()
        } else {
            format!("{}/{p}", base.trim_end_matches('/'))
        }
    }
}

/// The user an envd request names: `Authorization: Basic base64("name:")`
/// (the SDK's `user=`), or the `username` query parameter of `/files`.
/// E2B's default user `user` is the template's runtime user.
pub fn user_of(headers: &HeaderMap, query_user: Option<&str>) -> Option<String> {
    let from_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok())
        .map(|s| s.split(':').next().unwrap_or_default().to_string());
    from_header
        .or_else(|| query_user.map(str::to_string))
        .filter(|u| !u.is_empty() && u != "user")
}

fn is_rpc(req: &Request) -> bool {
    req.uri().path().contains(".Process/") || req.uri().path().contains(".Filesystem/")
}

/// A refusal in the shape the route's client reads.
fn refuse(rpc: bool, status: StatusCode, message: String) -> Response {
    if rpc {
        RpcError::from_status(status, message).into_response()
    } else {
        RestError::new(status, message).into_response()
    }
}

/// Middleware of the data plane: the sandbox by header, its port, its
/// token (every route but `/health`).
pub async fn envd_gate(State(state): State<Shared>, mut req: Request, next: Next) -> Response {
    let rpc = is_rpc(&req);
    let headers = req.headers();
    let Some(id) = headers
        .get(SANDBOX_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
    else {
        return refuse(
            rpc,
            StatusCode::BAD_REQUEST,
            format!(
                "{}: the E2b-Sandbox-Id header is required on the sandbox API",
                req.uri().path()
            ),
        );
    };
    let port = headers
        .get(SANDBOX_PORT)
        .and_then(|v| v.to_str().ok())
        .map(|p| p.parse::<u16>().unwrap_or(0))
        .unwrap_or(ENVD_PORT);
    if port == CODE_INTERPRETER_PORT {
        return refuse(
            rpc,
            StatusCode::NOT_IMPLEMENTED,
            format!("port {port} (E2B's code interpreter) is not offered by nullspace"),
        );
    }
    if port != ENVD_PORT {
        return refuse(
            rpc,
            StatusCode::BAD_GATEWAY,
            format!(
                "The sandbox {id} is running but port {port} is not open: only envd ({ENVD_PORT}) is served"
            ),
        );
    }
    let health = req.uri().path() == "/health";
    if !health {
        let ok = headers
            .get(ACCESS_TOKEN)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| state.signing_key.check_derived(&label(&id), t));
        if !ok {
            return refuse(
                rpc,
                StatusCode::UNAUTHORIZED,
                format!(
                    "unauthorized access, the X-Access-Token of sandbox {id} is missing or wrong"
                ),
            );
        }
    }
    let not_found = || {
        RestError::new(
            StatusCode::BAD_GATEWAY,
            format!("The sandbox {id} was not found"),
        )
        .into_response()
    };
    // An id no machine could have is not looked up.
    if !crate::machines::record::plausible_id(&id) {
        return not_found();
    }
    let row = match state.store.machine(&id).await {
        Ok(Some(r)) => r,
        Ok(None) => return not_found(),
        Err(e) => return refuse(rpc, StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let Ok(m) = Machine::from_row(row) else {
        return not_found();
    };
    // A paused sandbox is not running: the SDK's probe says so.
    if m.status() != MachineStatus::Running
        && !(m.status() == MachineStatus::Paused && m.doc.auto_resume && !health)
    {
        return not_found();
    }
    let user = user_of(req.headers(), None);
    let envd = Envd {
        caller: Caller {
            key_id: "e2b-envd".into(),
            namespace: m.row.namespace.clone(),
        },
        cwd: m.doc.cwd.clone(),
        id,
        user,
    };
    req.extensions_mut().insert(envd);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envd(user: Option<&str>, cwd: Option<&str>) -> Envd {
        Envd {
            id: "mch_1".into(),
            caller: Caller {
                key_id: "k".into(),
                namespace: "n".into(),
            },
            user: user.map(str::to_string),
            cwd: cwd.map(str::to_string),
        }
    }

    #[test]
    fn relative_paths_resolve_against_the_users_home_or_the_workdir() {
        assert_eq!(envd(None, Some("/srv")).path("a/b.txt"), "/srv/a/b.txt");
        assert_eq!(envd(None, Some("/srv/")).path("./a"), "/srv/a");
        assert_eq!(envd(None, None).path("."), "/");
        assert_eq!(envd(Some("root"), Some("/srv")).path("x"), "/root/x");
        assert_eq!(envd(None, Some("/srv")).path("/etc/hosts"), "/etc/hosts");
    }

    #[test]
    fn the_user_comes_from_basic_auth_and_e2bs_default_is_the_templates() {
        let mut h = HeaderMap::new();
        assert_eq!(user_of(&h, None), None);
        assert_eq!(user_of(&h, Some("app")), Some("app".into()));
        h.insert(header::AUTHORIZATION, "Basic cm9vdDo=".parse().unwrap());
        assert_eq!(user_of(&h, Some("app")), Some("root".into()));
        h.insert(header::AUTHORIZATION, "Basic dXNlcjo=".parse().unwrap());
        assert_eq!(user_of(&h, None), None, "E2B's `user`");
        h.insert(header::AUTHORIZATION, "Basic !!!".parse().unwrap());
        assert_eq!(user_of(&h, None), None, "garbage names no user");
    }
}
