//! E2B's SDK dialect, served beside the Nullspace API on the same
//! listener, so the unmodified `e2b` Python SDK (2.x) drives nullspace
//! machines with `E2B_API_URL` and `E2B_SANDBOX_URL` both set to this
//! server. A sandbox is a machine: the same one is visible through both
//! APIs, and every operation calls the primitives of [`crate::machines`].
//!
//! Two planes, told apart by where a request goes:
//!
//! - the control plane (`/sandboxes…`, `/v2/sandboxes…`), authenticated by
//!   `X-API-KEY` = a nullspace API key, isolated by its namespace;
//! - the data plane (E2B's in-sandbox daemon "envd": `/health`, `/files`,
//!   `/process.Process/*`, `/filesystem.Filesystem/*`), routed by the
//!   `E2b-Sandbox-Id` header every SDK call carries and authenticated by
//!   the sandbox's `X-Access-Token` (its `envdAccessToken`).
//!
//! | module | its one job |
//! |---|---|
//! | [`auth`] | `X-API-KEY`; the envd gate: sandbox by header, access token, user |
//! | [`errors`] | E2B's REST error shape and Connect's error codes |
//! | [`shapes`] | the control plane's JSON models, from a machine's view |
//! | [`control`] | the control plane's handlers |
//! | [`connect`] | the Connect protocol's framing (unary, envelopes, end of stream) |
//! | [`process`] | `process.Process`: commands and terminals |
//! | [`started`] | what each Start asked for, for `List` and tags |
//! | [`filesystem`] | `filesystem.Filesystem`: stat, list, mkdir, move, remove, watches |
//! | [`files`] | `/files` upload and download, `/health` |
//!
//! Users: without an `Authorization` header (or with E2B's default user
//! `user`) commands and files run as the template's runtime user; `root`
//! and any other name run as that user in the guest.

pub mod auth;
pub mod connect;
pub mod control;
pub mod errors;
pub mod files;
pub mod filesystem;
pub mod process;
pub mod shapes;
pub mod started;

use axum::Router;
use axum::middleware;
use axum::routing::{any, get, post};

use crate::state::Shared;

/// The envd version advertised: the highest whose features the SDK gates
/// on are served here (octet-stream uploads, `close_stdin`, recursive
/// watches). File metadata (0.6.2) and watch entries (0.6.3) are not, so
/// the SDK refuses them itself with its own message.
pub const ENVD_VERSION: &str = "0.5.7";
/// The port envd listens on in an E2B sandbox (`E2b-Sandbox-Port`).
pub const ENVD_PORT: u16 = 49983;
/// The code interpreter's port: not offered.
pub const CODE_INTERPRETER_PORT: u16 = 49999;

/// Both planes' routes, merged into the server's router.
pub fn routes(state: Shared) -> Router<Shared> {
    let envd = Router::new()
        .route("/health", get(files::health))
        .route("/files", get(files::download).post(files::upload))
        .route("/process.Process/{method}", post(process::rpc))
        .route("/filesystem.Filesystem/{method}", post(filesystem::rpc))
        // The code interpreter's routes (reached with E2b-Sandbox-Port
        // 49999, which the gate refuses first).
        .route("/execute", any(files::code_interpreter))
        .route("/contexts", any(files::code_interpreter))
        .route("/contexts/{*rest}", any(files::code_interpreter))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::envd_gate,
        ));
    control::routes(state).merge(envd)
}
