//! The `connect` and `send` ops: TCP connections from the host to a port on
//! the guest's loopback, carried over the agent port (the protocol's
//! "Tunnels"). How previews reach a server in a guest with no network.
//!
//! A `connect` request's thread owns the reading side; `send` requests
//! write through the table below. The table also lets `cancel` close a
//! connection at once rather than at the next read timeout.

use crate::agent::{Failure, Outcome, Resp};
use nullspace_model::agent::{ErrorCode, Event, MAX_CHUNK, MAX_TUNNELS, OUTPUT_CHUNK};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// How long a connect waits for the guest's server to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the reader looks up from a quiet connection to see whether the
/// host still wants it (a new session ends every tunnel).
const READ_TICK: Duration = Duration::from_millis(500);
/// A guest server that stops reading fails the host's `send` after this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Tunnels open or opening.
static OPEN: AtomicUsize = AtomicUsize::new(0);

/// Open connections by the id of the `connect` request that opened them.
fn table() -> &'static Mutex<HashMap<u64, Arc<TcpStream>>> {
    static T: OnceLock<Mutex<HashMap<u64, Arc<TcpStream>>>> = OnceLock::new();
    T.get_or_init(Default::default)
}

fn open(port: u16) -> std::io::Result<TcpStream> {
    let v4 = SocketAddr::from(([127, 0, 0, 1], port));
    match TcpStream::connect_timeout(&v4, CONNECT_TIMEOUT) {
        // A server bound to ::1 only.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => TcpStream::connect_timeout(
            &SocketAddr::from(([0u16, 0, 0, 0, 0, 0, 0, 1], port)),
            CONNECT_TIMEOUT,
        )
        .map_err(|_| e),
        r => r,
    }
}

/// The `connect` op: opens the connection, then streams what the guest
/// side sends until it closes, the host cancels or the session ends.
pub fn connect(resp: &Resp, id: u64, port: u16) -> Outcome {
    if port == 0 {
        return Err(Failure::bad("connect: port 0"));
    }
    // The slot is taken before the (up to 5 s) connect, outside the lock.
    if OPEN.fetch_add(1, Ordering::SeqCst) >= MAX_TUNNELS {
        OPEN.fetch_sub(1, Ordering::SeqCst);
        return Err(Failure::new(
            ErrorCode::Busy,
            format!("{MAX_TUNNELS} connections into this machine are open; retry later"),
        ));
    }
    let out = open(port)
        .map_err(|e| Failure::io(&format!("port {port}"), e))
        .and_then(|s| {
            let stream = Arc::new(s);
            table().lock().unwrap().insert(id, stream.clone());
            let out = pump(resp, &stream);
            table().lock().unwrap().remove(&id);
            let _ = stream.shutdown(Shutdown::Both);
            out
        });
    OPEN.fetch_sub(1, Ordering::SeqCst);
    out
}

fn pump(resp: &Resp, stream: &TcpStream) -> Outcome {
    let _ = stream.set_nodelay(true);
    stream
        .set_read_timeout(Some(READ_TICK))
        .map_err(|e| Failure::io("tunnel", e))?;
    stream
        .set_write_timeout(Some(WRITE_TIMEOUT))
        .map_err(|e| Failure::io("tunnel", e))?;
    if !resp.send(Event::Connected) {
        return Ok(Event::Closed);
    }
    let mut buf = vec![0u8; OUTPUT_CHUNK];
    let mut r = stream;
    loop {
        if !resp.live() {
            return Ok(Event::Closed);
        }
        match r.read(&mut buf) {
            Ok(0) => return Ok(Event::Closed),
            Ok(n) => {
                if !resp.send_stream(Event::Received {
                    data: buf[..n].to_vec(),
                }) {
                    return Ok(Event::Closed);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            // Reset by the guest's server, or shut down by `close`.
            Err(e) => return Err(Failure::io("tunnel", e)),
        }
    }
}

/// The `send` op: writes to `target`'s connection (all of it, or an error).
pub fn send(target: u64, data: &[u8], eof: bool) -> Outcome {
    if data.len() > MAX_CHUNK {
        return Err(Failure::bad(format!(
            "send: {} bytes, at most {MAX_CHUNK} per request",
            data.len()
        )));
    }
    let stream = table()
        .lock()
        .unwrap()
        .get(&target)
        .cloned()
        .ok_or_else(|| {
            Failure::new(
                ErrorCode::NotFound,
                format!("send: no open connection for request {target}"),
            )
        })?;
    let mut w = &*stream;
    w.write_all(data).map_err(|e| Failure::io("tunnel", e))?;
    if eof {
        let _ = stream.shutdown(Shutdown::Write);
    }
    Ok(Event::Written {
        bytes: data.len() as u64,
    })
}

/// Closes `target`'s connection if it is a tunnel (on `cancel`): its reader
/// wakes at once.
pub fn close(target: u64) {
    if let Some(s) = table().lock().unwrap().get(&target) {
        let _ = s.shutdown(Shutdown::Both);
    }
}
