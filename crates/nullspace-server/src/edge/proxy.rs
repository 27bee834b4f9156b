//! One proxied HTTP/1 exchange over a byte stream the caller opened (a
//! tunnel into a guest, a TCP connection to another node): the request
//! sent with hyper's client, the answer streamed back (chunked and SSE
//! included); an upgrade (WebSocket) is answered, then both upgraded
//! streams are joined.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The far side did not speak HTTP/1, or broke the connection.
    #[error("{0}")]
    Upstream(String),
    /// No answer's headers within the bound.
    #[error("no answer within {0:?}")]
    NoAnswer(Duration),
    /// The far side answered 101 to a request that asked no upgrade.
    #[error("switched protocols unasked")]
    UnaskedSwitch,
}

/// Sends `req` over `io` and returns the answer; the answer's headers must
/// come within `response_timeout` (the body streams as long as it flows).
pub async fn exchange<I>(
    io: I,
    mut req: Request<Body>,
    response_timeout: Duration,
) -> Result<Response<Body>, ExchangeError>
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let client_upgrade = is_upgrade(&req)
        .then(|| req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>())
        .flatten();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| ExchangeError::Upstream(e.to_string()))?;
    tokio::spawn(conn.with_upgrades());
    let mut resp = tokio::time::timeout(response_timeout, sender.send_request(req))
        .await
        .map_err(|_| ExchangeError::NoAnswer(response_timeout))?
        .map_err(|e| ExchangeError::Upstream(e.to_string()))?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client) = client_upgrade else {
            return Err(ExchangeError::UnaskedSwitch);
        };
        let upstream = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            if let (Ok(c), Ok(u)) = tokio::join!(client, upstream) {
                let _ =
                    tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(u)).await;
            }
        });
        let (parts, _) = resp.into_parts();
        return Ok(Response::from_parts(parts, Body::empty()));
    }
    Ok(resp.map(Body::new))
}

pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
        && req.headers().contains_key(header::UPGRADE)
}
