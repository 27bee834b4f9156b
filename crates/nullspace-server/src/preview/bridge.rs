//! A tunnel into a guest as an async byte stream: what the HTTP client
//! side of the proxy (hyper) reads and writes. One blocking thread follows
//! the guest's side (the agent client is synchronous); a task carries the
//! other direction, one acknowledged `send` at a time.

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};
use tokio_util::sync::CancellationToken;

use crate::guest::{Guest, GuestError};
use crate::machines::ports::Usage;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Buffered bytes per direction between the proxy and the tunnel.
const BUF: usize = 256 << 10;
/// A tunnel with nothing moving for this long is closed.
const IDLE_MAX: Duration = Duration::from_secs(3600);
/// How long one `send` may wait for the guest's server to take the bytes.
const SEND_LIMIT: Duration = Duration::from_secs(60);
/// After the proxy's side ended its input (hyper half-closes once it knows
/// the connection ends with this answer), how long the guest's side may be
/// silent before the tunnel is closed. Not a cap on the answer: a long
/// download keeps it open while bytes flow.
const DRAIN_IDLE: Duration = Duration::from_secs(30);

/// Opens a connection to `port` in the guest; the tunnel closes when the
/// returned stream is dropped (or the guest's side closes).
/// Bytes moved are added to `usage` (a preview grant's), if given.
pub async fn open(
    guest: &Guest,
    port: u16,
    usage: Option<Arc<Usage>>,
) -> Result<DuplexStream, GuestError> {
    let stop = CancellationToken::new();
    let (mut reader, writer) = guest.open_tunnel(port, stop.clone()).await?;
    let (ours, theirs) = tokio::io::duplex(BUF);
    let (mut rd, mut wr) = tokio::io::split(theirs);
    let rt = tokio::runtime::Handle::current();
    let guest_side = stop.clone();
    let out_usage = usage.clone();
    // When the guest side last sent (ms since `t0`), for the drain.
    let t0 = std::time::Instant::now();
    let active = Arc::new(AtomicU64::new(0));
    let seen = active.clone();
    tokio::task::spawn_blocking(move || {
        loop {
            match reader.recv(IDLE_MAX) {
                Ok(Some(d)) => {
                    seen.store(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
                    if let Some(u) = &out_usage {
                        u.bytes_out.fetch_add(d.len() as u64, Ordering::Relaxed);
                    }
                    if rt.block_on(wr.write_all(&d)).is_err() {
                        break;
                    }
                }
                Ok(None) => {
                    let _ = rt.block_on(wr.shutdown());
                    break;
                }
                Err(_) => break,
            }
        }
        // Dropping the reader closes the guest's side; the other direction
        // has nowhere to go either.
        guest_side.cancel();
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; BUF / 4];
        loop {
            let n = tokio::select! {
                _ = stop.cancelled() => return,
                n = rd.read(&mut buf) => n,
            };
            let (data, eof) = match n {
                Ok(0) | Err(_) => (Vec::new(), true),
                Ok(n) => (buf[..n].to_vec(), false),
            };
            if let Some(u) = &usage {
                u.bytes_in.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            let w = writer.clone();
            let sent = tokio::task::spawn_blocking(move || w.send(&data, eof, SEND_LIMIT)).await;
            if !matches!(sent, Ok(Ok(()))) {
                stop.cancel();
                return;
            }
            if eof {
                break;
            }
        }
        // Input ended: the guest may still answer, while it keeps sending.
        active.fetch_max(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let quiet = t0.elapsed().as_millis() as u64 - active.load(Ordering::Relaxed);
            if quiet > DRAIN_IDLE.as_millis() as u64 {
                stop.cancel();
                return;
            }
        }
    });
    Ok(ours)
}
