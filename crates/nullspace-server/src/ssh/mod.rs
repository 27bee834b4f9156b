//! SSH access to machines: one endpoint on the server (not a port per
//! machine) that a plain OpenSSH client reaches with a short-lived
//! certificate this server's CA signed.
//!
//! ```text
//! POST …/ssh-access ─▶ access::Registry::mint   (certificate + record)
//! ssh -o CertificateFile=… -p PORT <machine id>@HOST [command]
//!   ─▶ server (listener, bounds, deadlines) ─▶ session::Conn (russh Handler)
//!        auth: access::Registry::admit + the machine in the record's namespace, running
//!        exec ─▶ the agent's exec (stdin, stdout, stderr, exit status)
//!        pty  ─▶ the agent's terminals (pty_start/attach/input/resize)
//! ```
//!
//! | module | its one job |
//! |---|---|
//! | [`keys`] | the CA and host keys under `DATA_DIR/ssh/` |
//! | [`access`] | grants: minting certificates, their records, admitting a login |
//! | [`server`] | the listener: connection bounds, the auth deadline, shutdown |
//! | [`session`] | one connection: authentication, exec and pty channels |

pub mod access;
pub mod keys;
pub mod server;
pub mod session;

use std::net::SocketAddr;
use std::sync::OnceLock;

pub use access::{AccessError, AccessRecord, AccessRequest, Grant};
pub use keys::{KeyError, ServerKeys};

/// The server's SSH side: keys, grants, and where the endpoint listens.
pub struct Ssh {
    pub keys: ServerKeys,
    pub grants: access::Registry,
    /// Set once the endpoint listens.
    bound: OnceLock<SocketAddr>,
}

impl Ssh {
    pub fn open(data_dir: &std::path::Path) -> Result<Ssh, KeyError> {
        Ok(Ssh {
            keys: ServerKeys::open(data_dir)?,
            grants: Default::default(),
            bound: OnceLock::new(),
        })
    }

    /// Where the endpoint listens (`None`: it does not).
    pub fn bound(&self) -> Option<SocketAddr> {
        self.bound.get().copied()
    }

    pub(crate) fn set_bound(&self, a: SocketAddr) {
        let _ = self.bound.set(a);
    }
}

/// Why `POST …/ssh-access` minted nothing.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error(transparent)]
    Machine(#[from] crate::machines::MachineError),
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error("this server has no SSH endpoint (it was started with --ssh-listen off)")]
    NoEndpoint,
}

/// Mints SSH access to the caller's machine `id` (which must not have
/// ended) for `req`; the endpoint must be listening.
pub async fn grant(
    state: &crate::state::Shared,
    caller: &nullspace_store::Caller,
    id: &str,
    req: &AccessRequest,
) -> Result<(Grant, SocketAddr), GrantError> {
    let Some(addr) = state.ssh.bound() else {
        return Err(GrantError::NoEndpoint);
    };
    let m = crate::machines::record::load_live(state, caller, id).await?;
    let g = state
        .ssh
        .grants
        .mint(&state.ssh.keys.ca, m.id(), &m.row.namespace, req)?;
    tracing::info!(machine = %m.id(), access = %g.record.access_id, expires_at = g.record.expires_at, "ssh: access granted");
    Ok((g, addr))
}
