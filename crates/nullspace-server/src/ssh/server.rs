//! The SSH endpoint's listener: accepts connections up to
//! [`MAX_CONNECTIONS`], gives each [`AUTH_DEADLINE`] to authenticate, and
//! ends every connection (and so every session) when the server stops.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use russh::server::Config;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::session::{Conn, Limits};
use crate::state::Shared;

/// Connections open at once; more are closed as they arrive.
pub const MAX_CONNECTIONS: usize = 256;
/// A connection that has not authenticated by then is closed.
pub const AUTH_DEADLINE: Duration = Duration::from_secs(30);
/// Sessions (exec or shell channels) at once, over all connections.
pub const MAX_SESSIONS: usize = 256;
/// Sessions at once on one connection.
pub const MAX_SESSIONS_PER_CONNECTION: usize = 8;

fn config(state: &Shared) -> Config {
    use russh::MethodKind;
    Config {
        server_id: russh::SshId::Standard("SSH-2.0-nullspace".into()),
        methods: (&[MethodKind::PublicKey][..]).into(),
        // Refusals take this long whatever failed (no timing oracle);
        // OpenSSH's first probe (`none`) is answered at once.
        auth_rejection_time: Duration::from_millis(500),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![state.ssh.keys.host.clone()],
        max_auth_attempts: 6,
        inactivity_timeout: Some(Duration::from_secs(3600)),
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 4,
        nodelay: true,
        ..Default::default()
    }
}

/// Binds `addr` (the endpoint's address is then in `state.ssh.bound()`).
pub async fn bind(state: &Shared, addr: &str) -> std::io::Result<TcpListener> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("SSH endpoint on {addr}: {e}")))?;
    let a = l.local_addr()?;
    state.ssh.set_bound(a);
    tracing::info!(addr = %a, "SSH endpoint listening");
    Ok(l)
}

/// Serves `listener` until the server shuts down; then every connection
/// is closed and waited for.
pub async fn run(state: Shared, listener: TcpListener) {
    let config = Arc::new(config(&state));
    let conns = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let sessions = Arc::new(Semaphore::new(MAX_SESSIONS));
    let stop = state.shutdown.clone();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let (socket, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: wait, do not spin.
                    tracing::warn!("ssh: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while tasks.try_join_next().is_some() {}
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "ssh: refused: {MAX_CONNECTIONS} connections are open");
            drop(socket);
            continue;
        };
        let _ = socket.set_nodelay(true);
        let limits = Limits {
            sessions: sessions.clone(),
            per_connection: MAX_SESSIONS_PER_CONNECTION,
        };
        tasks.spawn(connection(
            state.clone(),
            config.clone(),
            socket,
            peer,
            limits,
            stop.child_token(),
            permit,
        ));
    }
    drop(listener);
    while tasks.join_next().await.is_some() {}
}

async fn connection(
    state: Shared,
    config: Arc<Config>,
    socket: tokio::net::TcpStream,
    peer: SocketAddr,
    limits: Limits,
    stop: CancellationToken,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    let authed = Arc::new(AtomicBool::new(false));
    let conn = Conn::new(state, peer, limits, authed.clone(), stop.clone());
    let deadline = tokio::time::Instant::now() + AUTH_DEADLINE;
    // The version exchange is inside `run_stream`: a peer that says
    // nothing is dropped at the deadline too.
    let running = tokio::select! {
        r = tokio::time::timeout_at(deadline, russh::server::run_stream(config, socket, conn)) => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(%peer, "ssh: connection setup: {e}");
                return;
            }
            Err(_) => {
                tracing::info!(%peer, "ssh: closed: no authentication within {AUTH_DEADLINE:?}");
                return;
            }
        },
        _ = stop.cancelled() => return,
    };
    let handle = running.handle();
    tokio::pin!(running);
    let watch = async {
        tokio::time::sleep_until(deadline).await;
        if authed.load(Ordering::Acquire) {
            std::future::pending::<()>().await;
        }
    };
    let bye = |why: &str| {
        let handle = handle.clone();
        let why = why.to_string();
        // Bounded: a session stuck on a full queue must not hold the stop.
        async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                handle.disconnect(russh::Disconnect::ByApplication, why, String::new()),
            )
            .await;
        }
    };
    let ended = tokio::select! {
        r = &mut running => {
            if let Err(e) = r {
                tracing::debug!(%peer, "ssh: connection ended: {e}");
            }
            true
        }
        _ = watch => {
            tracing::info!(%peer, "ssh: closed: no authentication within {AUTH_DEADLINE:?}");
            bye("authentication timed out").await;
            false
        }
        _ = stop.cancelled() => {
            bye("the server is stopping").await;
            false
        }
    };
    // Sessions of this connection end with it.
    stop.cancel();
    // The session task stops once it sent the disconnect; do not wait on a
    // peer that never reads.
    if !ended {
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut running).await;
    }
}
