//! The accept loop (in place of `axum::serve`, which has neither a header
//! deadline nor a connection bound): hundreds of clients that trickle
//! their headers, or never read, must not keep the server from answering
//! others.
//!
//! - Each connection holds a slot of a semaphore of `max_connections`; the
//!   slot lives in the connection's socket, so an upgraded WebSocket keeps
//!   it. With every slot taken, new connections wait in the listen backlog.
//! - A write the client does not take for `write_stall_timeout` fails,
//!   ending the connection (or WebSocket) and freeing its slot.
//! - hyper's `header_read_timeout` (with a timer: without one it is never
//!   armed) closes a connection whose request head is not complete in
//!   time, and an idle keep-alive connection after the same time.
//! - At `stop`, no more connections are accepted; open ones finish their
//!   requests (hyper's graceful shutdown) and this returns when all closed.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::HttpLimits;

/// A connection's socket, holding its slot until it is dropped (by hyper,
/// or by the WebSocket it was upgraded to), and failing a write that
/// makes no progress for `stall` (a client that never reads would
/// otherwise hold its slot for as long as it stays connected).
struct Counted {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    stall: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Counted {
    /// `Pending` from a write: armed once, the deadline fails the write.
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let stall = self.stall;
        let deadline = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {stall:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progress<T>(&mut self, r: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => self.pending(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.progress(r, cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.progress(r, cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.stream).poll_flush(cx);
        self.progress(r, cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Connections the kernel completes and queues before the accept loop
/// takes them (std's and tokio's `bind` use 128: a burst of a few hundred
/// clients then has SYNs dropped, and each retried a second later).
pub const BACKLOG: u32 = 1024;

/// Listens on `addr` (`host:port`; the first address it resolves to) with
/// a [`BACKLOG`]-deep queue.
pub async fn bind(addr: &str) -> io::Result<TcpListener> {
    let mut last = io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{addr} resolves to no address"),
    );
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As std's bind: a restarted server may take its port at once.
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(BACKLOG)) {
            Ok(l) => return Ok(l),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Serves `app` on `listener` within `limits` until `stop` completes, then
/// until every connection has closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    stop: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Every connection task holds a receiver: `closed()` on the sender
    // completes once all are gone.
    let (open_tx, open_rx) = watch::channel(());
    let stopping = tokio_util::sync::CancellationToken::new();
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut stop = std::pin::pin!(stop);
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
            _ = &mut stop => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let io = TokioIo::new(Counted {
            stream,
            _slot: slot,
            stall: limits.write_stall_timeout,
            stalled: None,
        });
        let conn = http1
            .serve_connection(io, TowerToHyperService::new(app.clone()))
            .with_upgrades();
        let stopping = stopping.clone();
        let open = open_rx.clone();
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::trace!("connection ended: {e}");
                    }
                }
                _ = stopping.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(open);
        });
    }
    drop(listener);
    stopping.cancel();
    drop(open_rx);
    open_tx.closed().await;
    Ok(())
}

/// A failed accept: the peer's own failure is skipped; anything else (out
/// of file descriptors) is logged and retried after a pause, as axum does.
async fn accept_failed(e: io::Error) {
    use io::ErrorKind as K;
    if matches!(
        e.kind(),
        K::ConnectionRefused | K::ConnectionAborted | K::ConnectionReset
    ) {
        return;
    }
    tracing::error!("accepting a connection: {e}");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::ws::{Message, WebSocketUpgrade};
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A WebSocket whose client never reads holds the only connection
    /// slot while the server floods it; the write stall deadline ends it,
    /// and the next client is answered. Without the deadline that client
    /// would wait for as long as the silent one stays connected.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_websocket_never_read_is_ended_and_frees_its_slot() {
        let app = Router::new().route("/ok", get(|| async { "ok" })).route(
            "/flood",
            get(|ws: WebSocketUpgrade| async move {
                ws.on_upgrade(|mut s| async move {
                    let frame = vec![0u8; 64 << 10];
                    while s.send(Message::Binary(frame.clone().into())).await.is_ok() {}
                })
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = HttpLimits {
            max_connections: 1,
            header_read_timeout: Duration::from_secs(30),
            write_stall_timeout: Duration::from_millis(500),
            drain_max_bytes: 0,
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, app, limits, async move {
            let _ = stop_rx.await;
        }));

        let mut deaf = TcpStream::connect(addr).await.unwrap();
        deaf.write_all(
            b"GET /flood HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
        // The upgrade's answer arrives; after that, nothing is read.
        let mut head = [0u8; 12];
        deaf.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 101");

        let started = std::time::Instant::now();
        let mut next = TcpStream::connect(addr).await.unwrap();
        next.write_all(b"GET /ok HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(20), next.read_to_string(&mut answer))
            .await
            .expect("the next client is answered once the deaf one is ended")
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            started.elapsed() >= Duration::from_millis(400),
            "answered after {:?}: the slot was not held",
            started.elapsed()
        );
        drop(deaf);
        let _ = stop_tx.send(());
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server stops once its connections are gone")
            .unwrap()
            .unwrap();
    }
}
