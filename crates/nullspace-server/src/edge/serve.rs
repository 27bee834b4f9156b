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
