//! `ns-guest-fixture PORT [HANG_PORT]`: what the port and preview tests run
//! inside a machine (built static, like the guest init, and put into a
//! test template's image). On PORT, one thread per connection:
//! - `GET /` a small HTML page (`<h1 id="greeting">`, filled in by a script
//!   that fetches `/api/greeting`, so a browser test sees both requests);
//! - `GET /api/greeting` a text answer;
//! - `GET /bytes?n=N` N bytes of a repeating pattern, `Content-Length` set;
//! - `GET /sse` three server-sent events, 200 ms apart, chunked;
//! - `GET /ws` a WebSocket that echoes every message.
//!
//! On HANG_PORT it accepts connections and never answers.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

const PAGE: &str = r#"<!doctype html>
<html><head><title>nullspace preview</title></head>
<body><h1 id="greeting">loading</h1>
<script>
fetch("api/greeting").then(r => r.text()).then(t => {
  document.getElementById("greeting").textContent = t;
});
</script></body></html>
"#;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port: u16 = args.get(1).and_then(|p| p.parse().ok()).unwrap_or(8000);
    if let Some(hang) = args.get(2).and_then(|p| p.parse::<u16>().ok()) {
        std::thread::spawn(move || {
            let l = TcpListener::bind(("0.0.0.0", hang)).expect("bind the hang port");
            let mut held = Vec::new();
            for s in l.incoming().flatten() {
                held.push(s);
            }
        });
    }
    let l = TcpListener::bind(("0.0.0.0", port)).expect("bind");
    for s in l.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = serve(s);
        });
    }
}

fn serve(s: TcpStream) -> std::io::Result<()> {
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        headers.push(h);
    }
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut w = s;
    match path {
        "/" | "/index.html" => reply(&mut w, "text/html", PAGE.as_bytes()),
        "/api/greeting" => reply(&mut w, "text/plain", b"hello from the machine"),
        "/bytes" => {
            let n: u64 = query
                .strip_prefix("n=")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
            )?;
            let block: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
            let mut left = n;
            while left > 0 {
                let k = left.min(block.len() as u64) as usize;
                w.write_all(&block[..k])?;
                left -= k as u64;
            }
            Ok(())
        }
        "/sse" => {
            write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            )?;
            for i in 1..=3 {
                let ev = format!("data: tick {i}\n\n");
                write!(w, "{:x}\r\n{ev}\r\n", ev.len())?;
                w.flush()?;
                std::thread::sleep(Duration::from_millis(200));
            }
            write!(w, "0\r\n\r\n")
        }
        "/ws" => {
            // Replay the request head to the library's handshake.
            let head = format!("{line}{}\r\n", headers.concat());
            let mut ws = tungstenite::accept(Prefixed {
                head: head.into_bytes(),
                at: 0,
                inner: w,
            })
            .map_err(|e| std::io::Error::other(e.to_string()))?;
            loop {
                match ws.read() {
                    Ok(m) if m.is_text() || m.is_binary() => ws
                        .send(m)
                        .map_err(|e| std::io::Error::other(e.to_string()))?,
                    Ok(m) if m.is_close() => return Ok(()),
                    Ok(_) => {}
                    Err(_) => return Ok(()),
                }
            }
        }
        _ => {
            let body = format!("no page {path}");
            write!(
                w,
                "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        }
    }
}

fn reply(w: &mut TcpStream, kind: &str, body: &[u8]) -> std::io::Result<()> {
    write!(
        w,
        "HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    w.write_all(body)
}

/// A stream that first reads back bytes already consumed.
struct Prefixed {
    head: Vec<u8>,
    at: usize,
    inner: TcpStream,
}

impl Read for Prefixed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at < self.head.len() {
            let n = buf.len().min(self.head.len() - self.at);
            buf[..n].copy_from_slice(&self.head[self.at..self.at + n]);
            self.at += n;
            return Ok(n);
        }
        self.inner.read(buf)
    }
}

impl Write for Prefixed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
