//! Opening a machine's WebSocket: the API's URL turned `ws(s)://`, the key
//! as a bearer token (as the SDK sends it), TLS with the platform's trust
//! store (as the CLI's HTTP calls verify), and a refusal read as the API's
//! error body.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::template::ApiError;

/// A byte stream the socket runs over: plain TCP or TLS on it.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub type Socket = WebSocketStream<Box<dyn Io>>;

/// Connecting, TLS and the upgrade together, as the SDK's open timeout.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest frame accepted from the server: output frames carry a
/// guest read (tens of KiB) twice; anything far larger is not a terminal.
const MAX_MESSAGE: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("NULLSPACE_API_URL {url:?} is not a usable URL: {why}")]
    BadUrl { url: String, why: String },
    #[error("cannot reach the server at {url}: {source}")]
    Unreachable { url: String, source: std::io::Error },
    #[error("TLS with {host}: {source}")]
    Tls {
        host: String,
        source: std::io::Error,
    },
    /// The server answered the upgrade with an error (its JSON body).
    #[error("{0}")]
    Refused(ApiError),
    #[error("WebSocket upgrade at {url}: {source}")]
    Handshake {
        url: String,
        source: tungstenite::Error,
    },
}

/// Opens `base` + `path` (path and query, already encoded) as a WebSocket.
pub async fn open(base: &str, key: &str, path: &str) -> Result<Socket, ConnectError> {
    let shown = format!("{base}{path}");
    match tokio::time::timeout(OPEN_TIMEOUT, open_now(base, key, path)).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Unreachable {
            url: shown,
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no WebSocket within {} s", OPEN_TIMEOUT.as_secs()),
            ),
        }),
    }
}

async fn open_now(base: &str, key: &str, path: &str) -> Result<Socket, ConnectError> {
    let bad = |why: String| ConnectError::BadUrl {
        url: base.to_string(),
        why,
    };
    let mut url = reqwest::Url::parse(&format!("{base}{path}")).map_err(|e| bad(e.to_string()))?;
    let tls = match url.scheme() {
        "http" => false,
        "https" => true,
        s => return Err(bad(format!("scheme {s:?} (http or https)"))),
    };
    // An IPv6 literal comes bracketed; connecting and TLS want it bare.
    let host = match url.host_str() {
        Some(h) => h.trim_start_matches('[').trim_end_matches(']').to_string(),
        None => return Err(bad("no host".into())),
    };
    let port = url
        .port_or_known_default()
        .ok_or_else(|| bad("no port".into()))?;
    let shown = url.to_string();
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|source| ConnectError::Unreachable {
            url: base.to_string(),
            source,
        })?;
    // Keystrokes are small writes: send them at once.
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = if tls {
        Box::new(tls_over(tcp, &host).await?)
    } else {
        Box::new(tcp)
    };
    url.set_scheme(if tls { "wss" } else { "ws" })
        .map_err(|()| bad("cannot be a WebSocket URL".into()))?;
    let handshake = |source| ConnectError::Handshake {
        url: shown.clone(),
        source,
    };
    let mut req = url.as_str().into_client_request().map_err(handshake)?;
    let h = req.headers_mut();
    h.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|_| bad("NULLSPACE_API_KEY is not a valid header value".into()))?,
    );
    h.insert(
        "user-agent",
        HeaderValue::from_static(concat!("nullspace-cli/", env!("CARGO_PKG_VERSION"))),
    );
    let config = WebSocketConfig::default().max_message_size(Some(MAX_MESSAGE));
    match tokio_tungstenite::client_async_with_config(req, io, Some(config)).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp.body().as_deref().unwrap_or_default();
            Err(ConnectError::Refused(ApiError::from_body(
                resp.status().as_u16(),
                &String::from_utf8_lossy(body),
            )))
        }
        Err(e) => Err(handshake(e)),
    }
}

async fn tls_over(
    tcp: tokio::net::TcpStream,
    host: &str,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, ConnectError> {
    use rustls_platform_verifier::ConfigVerifierExt as _;
    let fail = |e: &dyn std::fmt::Display| ConnectError::Tls {
        host: host.to_string(),
        source: std::io::Error::other(e.to_string()),
    };
    let config = rustls::ClientConfig::with_platform_verifier().map_err(|e| fail(&e))?;
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| fail(&e))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|source| ConnectError::Tls {
            host: host.to_string(),
            source,
        })
}
