//! Hostile API clients against the real server (a child process, no VMs):
//! on every route `/openapi.json` lists, a missing or wrong key, malformed
//! JSON, wrong types, invalid UTF-8, 100k nested arrays and bodies over
//! the limit each get a 4xx with a JSON `code` (never a 5xx), on a
//! keep-alive connection that stays usable; another namespace's ids are
//! "not found"; hundreds of slow or silent connections neither stop the
//! server answering others nor grow its memory past a bound, and are
//! closed after the header and write-stall deadlines; the connection
//! bound holds; heads hyper cannot parse are refused with a 4xx.
//!
//! HTTP is spoken over raw TCP here: the point is what a client that
//! breaks the rules sees, byte for byte.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use nullspace_testkit::server::Server;
use serde_json::Value;

/// One answer: status, headers (names lowercased), body.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    /// The API's error shape: a string `error` and a string `code`.
    fn code(&self) -> String {
        let v = self.json();
        assert!(v["error"].is_string(), "no error message: {v}");
        v["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no code: {v}"))
            .to_string()
    }
}

/// A keep-alive HTTP/1.1 connection.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn open(addr: &str) -> Conn {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        Conn { s, buf: vec![] }
    }

    fn head(method: &str, path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut h = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
        for (n, v) in headers {
            h.push_str(&format!("{n}: {v}\r\n"));
        }
        h.push_str("\r\n");
        h.into_bytes()
    }

    /// Sends a request with a `Content-Length` body (written whole before
    /// anything is read, as simple clients do) and reads the answer.
    fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Resp> {
        let len = body.len().to_string();
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        if !body.is_empty() {
            all.push(("Content-Length", &len));
        }
        // One write: a head then a body in two small writes meets Nagle
        // and delayed ACKs (40 ms a request).
        let mut msg = Self::head(method, path, &all);
        msg.extend_from_slice(body);
        self.s.write_all(&msg)?;
        self.read_response()
    }

    fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 64 << 10];
        let n = self.s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed the connection",
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    fn read_response(&mut self) -> io::Result<Resp> {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            self.fill()?;
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
        self.buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|c| c.parse().ok())
            .expect("status line");
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut r = Resp {
            status,
            headers,
            body: vec![],
        };
        if let Some(len) = r.header("content-length") {
            let len: usize = len.parse().unwrap();
            while self.buf.len() < len {
                self.fill()?;
            }
            r.body = self.buf.drain(..len).collect();
        } else if r.header("transfer-encoding") == Some("chunked") {
            loop {
                let line_end = loop {
                    if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    self.fill()?;
                };
                let size = usize::from_str_radix(
                    String::from_utf8_lossy(&self.buf[..line_end]).trim(),
                    16,
                )
                .unwrap();
                self.buf.drain(..line_end + 2);
                while self.buf.len() < size + 2 {
                    self.fill()?;
                }
                r.body.extend(self.buf.drain(..size));
                self.buf.drain(..2);
                if size == 0 {
                    break;
                }
            }
        }
        Ok(r)
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Every documented operation, with `x` for each path parameter.
fn operations(addr: &str) -> Vec<(String, String)> {
    let mut c = Conn::open(addr);
    let r = c.request("GET", "/openapi.json", &[], b"").unwrap();
    assert_eq!(r.status, 200);
    let doc = r.json();
    let mut ops = vec![];
    for (path, item) in doc["paths"].as_object().unwrap() {
        let concrete = path
            .split('/')
            .map(|s| if s.starts_with('{') { "x" } else { s })
            .collect::<Vec<_>>()
            .join("/");
        for method in item.as_object().unwrap().keys() {
            ops.push((method.to_uppercase(), concrete.clone()));
        }
    }
    assert!(ops.len() > 100, "{} operations", ops.len());
    ops
}

/// What no client may ever see: a 5xx other than the 501 the SDK reads as
/// "not offered"; and any error must be the JSON shape with a code.
fn assert_client_error(r: &Resp, what: &str) {
    assert!(
        r.status < 500 || (r.status == 501 && r.code() == "not_implemented"),
        "{what}: {} {:?}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    if r.status >= 400 {
        r.code();
    }
}

/// Finding 2 and the body shapes: on every route, with a valid key and on
/// one keep-alive connection, malformed JSON, wrong types, invalid UTF-8
/// and 100k nested arrays each get a 4xx with a JSON code (and the next
/// request on the connection is answered: finding 1 for every route).
/// Without a key or with a wrong one: 401 with a code. Framework
/// rejections (bad path or query encoding, a multipart route sent JSON,
/// unknown routes and methods) are JSON too.
#[test]
fn every_route_answers_hostile_bodies_with_json_4xx() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), None);
    let key = server.key("team-a");
    let auth = format!("Bearer {key}");
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let bodies: [(&str, &[u8]); 5] = [
        ("malformed JSON", b"{\"name\": \"x\", "),
        (
            "wrong types",
            b"{\"name\": [1, {\"a\": null}], \"path\": 7, \"tags\": \"no\"}",
        ),
        ("a JSON array", b"[1, 2, 3]"),
        (
            "invalid UTF-8",
            b"{\"name\": \"\xff\xfe\xc3\x28\", \"path\": \"/\xc0\xaf\"}",
        ),
        ("100k nested arrays", deep.as_bytes()),
    ];
    let ops = operations(&server.addr);
    let mut c = Conn::open(&server.addr);
    let mut answered = 0;
    for (method, path) in &ops {
        let public = !path.starts_with("/v1/");
        for (what, body) in &bodies {
            let r = c
                .request(
                    method,
                    path,
                    &[
                        ("Authorization", &auth),
                        ("Content-Type", "application/json"),
                    ],
                    body,
                )
                .unwrap_or_else(|e| panic!("{method} {path} with {what}: {e}"));
            assert_client_error(&r, &format!("{method} {path} with {what}"));
            answered += 1;
        }
        if public {
            continue;
        }
        for (who, header) in [
            ("no key", None),
            ("a wrong key", Some("Bearer ns_not-a-key")),
            ("another scheme", Some("Basic dXNlcjpwYXNz")),
        ] {
            let headers: Vec<(&str, &str)> =
                header.map(|h| ("Authorization", h)).into_iter().collect();
            let r = c
                .request(method, path, &headers, b"{}")
                .unwrap_or_else(|e| panic!("{method} {path} with {who}: {e}"));
            assert_eq!(r.status, 401, "{method} {path} with {who}");
            let code = r.code();
            assert!(
                code == "unauthorized" || code == "missing_api_key",
                "{method} {path} with {who}: {code}"
            );
        }
    }
    eprintln!("{answered} hostile bodies on {} operations", ops.len());

    // The framework's own rejections, before any handler: JSON too.
    let h = [("Authorization", auth.as_str())];
    for (method, path, status, code) in [
        // A path segment that is not UTF-8 once decoded.
        ("GET", "/v1/machines/%FF%FE", 400, "invalid_request"),
        ("GET", "/v1/templates/builds/%C0%AF", 400, "invalid_request"),
        // A query that is not UTF-8 once decoded.
        ("GET", "/v1/machines?limit=%FF", 400, "invalid_request"),
        // A multipart route sent something else.
        (
            "POST",
            "/v1/machines/x/files/batch-write",
            400,
            "invalid_request",
        ),
        ("GET", "/no/such/route", 404, "not_found"),
        ("PATCH", "/healthz", 405, "method_not_allowed"),
        ("PATCH", "/v1/templates/builds", 405, "method_not_allowed"),
    ] {
        let r = c
            .request(method, path, &h, b"{\"not\": \"multipart\"}")
            .unwrap();
        assert_eq!(r.status, status, "{method} {path}: {:?}", r.json());
        assert_eq!(r.code(), code, "{method} {path}");
    }
    // Still the same connection, and the server is well.
    let r = c.request("GET", "/healthz", &[], b"").unwrap();
    assert_eq!(r.status, 200);
    assert!(
        !server.log_text().contains("panicked"),
        "{}",
        server.log_text()
    );
}

/// Finding 1 (a body the handler never reads) and finding 2 (413 as
/// plain text): on one keep-alive connection, a GET with a body, an
/// unauthenticated POST with 1 MiB, a 32 MiB upload to a route that
/// answers 404 at once (written whole before reading, as a simple client
/// does: no broken pipe), and a body just over the 64 MiB limit (a JSON
/// 413) each get their answer, and the next request on the connection
/// is answered. A body far past what is worth reading gets its 413 and
/// `Connection: close`.
#[test]
fn unread_and_oversized_bodies_keep_the_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), None);
    let key = server.key("team-a");
    let auth = format!("Bearer {key}");
    let mut c = Conn::open(&server.addr);
    let next = |c: &mut Conn, what: &str| {
        let r = c
            .request("GET", "/healthz", &[], b"")
            .unwrap_or_else(|e| panic!("the request after {what}: {e}"));
        assert_eq!(r.status, 200, "after {what}");
    };

    let r = c.request("GET", "/healthz", &[], &[b'x'; 4096]).unwrap();
    assert_eq!(r.status, 200);
    next(&mut c, "a GET with a body");

    let r = c
        .request("POST", "/v1/templates/validate", &[], &vec![b' '; 1 << 20])
        .unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(r.code(), "missing_api_key");
    next(&mut c, "an unauthenticated 1 MiB body");

    // Chunked, unread: drained to its last chunk.
    c.s.write_all(b"PUT /v1/nothing HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    for _ in 0..64 {
        c.s.write_all(format!("{:x}\r\n{}\r\n", 1000, "y".repeat(1000)).as_bytes())
            .unwrap();
    }
    c.s.write_all(b"0\r\n\r\n").unwrap();
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.code(), "not_found");
    next(&mut c, "an unread chunked body");

    let big = vec![b'z'; 32 << 20];
    let r = c
        .request(
            "PUT",
            "/v1/machines/mch_00000000000000000000000000/nothing",
            &[("Authorization", &auth)],
            &big,
        )
        .expect("a 32 MiB upload to a 404 route is answered, not a broken pipe");
    assert_eq!(r.status, 404, "{:?}", r.json());
    next(&mut c, "a 32 MiB body to a 404 route");

    let over = vec![b' '; (64 << 20) + (1 << 20)];
    let r = c
        .request(
            "POST",
            "/v1/templates/validate",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            &over,
        )
        .expect("a body just over the limit is answered");
    assert_eq!(r.status, 413);
    assert_eq!(r.code(), "request_too_large");
    assert!(r.json()["error"].as_str().unwrap().contains("64 MiB"));
    next(&mut c, "a JSON body over the limit");
    // A raw body (a file written whole): the framework's own 413, which
    // was plain text.
    let r = c
        .request(
            "PUT",
            "/v1/machines/mch_00000000000000000000000000/file?path=/tmp/a",
            &[("Authorization", &auth)],
            &over,
        )
        .expect("a raw body just over the limit is answered");
    assert_eq!(r.status, 413);
    assert_eq!(r.code(), "request_too_large");
    next(&mut c, "a raw body over the limit");

    // A client waiting for `100 Continue` before its 10 MiB body gets
    // the 401 at once, and `Connection: close` (it sent nothing, and is
    // not invited to send what would be thrown away).
    let mut ask = Conn::open(&server.addr);
    ask.s
        .write_all(
            b"POST /v1/templates/validate HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 10485760\r\n\r\n",
        )
        .unwrap();
    let r = ask.read_response().unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(r.code(), "missing_api_key");
    assert_eq!(r.header("connection"), Some("close"));

    // Far past the limit: read while writing (the server answers before
    // the body ends), then the connection is closed.
    let mut far = Conn::open(&server.addr);
    let declared = 1u64 << 30;
    far.s
        .write_all(
            format!(
                "POST /v1/templates/validate HTTP/1.1\r\nHost: t\r\nAuthorization: {auth}\r\nContent-Length: {declared}\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
    let mut writer = far.s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let chunk = vec![b' '; 1 << 20];
        let mut sent = 0u64;
        while sent < declared && writer.write_all(&chunk).is_ok() {
            sent += chunk.len() as u64;
        }
        sent
    });
    let r = far.read_response().unwrap();
    assert_eq!(r.status, 413);
    assert_eq!(r.code(), "request_too_large");
    assert_eq!(r.header("connection"), Some("close"));
    let sent = sender.join().unwrap();
    assert!(sent < declared, "the server read all {sent} bytes");
    next(&mut c, "another client's 1 GiB body");
}

/// Another namespace's ids look exactly like missing ones: team-b reading,
/// cancelling, retrying or promoting team-a's build, or releasing its
/// name claim, gets the same 404 and code as for an id that never existed.
#[test]
fn another_namespaces_ids_are_not_found() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_with(&tmp.path().join("data"), None, &["--workers", "0"]);
    let a = format!("Bearer {}", server.key("team-a"));
    let b = format!("Bearer {}", server.key("team-b"));
    let mut c = Conn::open(&server.addr);
    let json = ("Content-Type", "application/json");
    let r = c
        .request(
            "POST",
            "/v1/templates/builds",
            &[("Authorization", &a), json],
            br#"{"name":"secret","base_image":"127.0.0.1:1/none/x:1"}"#,
        )
        .unwrap_or_else(|e| panic!("creating a build: {e}\n{}", server.log_text()));
    assert_eq!(r.status, 202, "{:?}", r.json());
    let build = r.json()["build_id"].as_str().unwrap().to_string();
    let r = c
        .request(
            "POST",
            "/v1/templates/claims",
            &[("Authorization", &a), json],
            br#"{"template_ref":"claimed"}"#,
        )
        .unwrap();
    assert_eq!(r.status, 201, "{:?}", r.json());
    let claim = r.json()["claim_token"].as_str().unwrap().to_string();

    let missing = "bld_00000000000000000000000000";
    for (method, tpl, body) in [
        ("GET", "/v1/templates/builds/{}", "{}"),
        ("GET", "/v1/templates/builds/{}/logs", "{}"),
        ("POST", "/v1/templates/builds/{}/cancel", "{}"),
        ("POST", "/v1/templates/builds/{}/retry", "{}"),
        (
            "POST",
            "/v1/templates/builds/{}/promote",
            r#"{"tag":"stable"}"#,
        ),
    ] {
        let theirs = c
            .request(
                method,
                &tpl.replace("{}", &build),
                &[("Authorization", &b), json],
                body.as_bytes(),
            )
            .unwrap();
        let none = c
            .request(
                method,
                &tpl.replace("{}", missing),
                &[("Authorization", &b), json],
                body.as_bytes(),
            )
            .unwrap();
        assert_eq!(theirs.status, 404, "{method} {tpl}: {:?}", theirs.json());
        assert_eq!(
            (theirs.status, theirs.code()),
            (none.status, none.code()),
            "{method} {tpl}"
        );
        // The owner still sees it.
        let own = c
            .request(
                "GET",
                &format!("/v1/templates/builds/{build}"),
                &[("Authorization", &a)],
                b"",
            )
            .unwrap();
        assert_eq!(own.status, 200);
    }
    for r in ["secret", "team-a/secret", "claimed", "team-a/claimed"] {
        let theirs = c
            .request(
                "DELETE",
                &format!("/v1/templates/refs/{r}"),
                &[("Authorization", &b)],
                b"",
            )
            .unwrap();
        assert!(
            theirs.status == 404 || theirs.status == 403,
            "{r}: {:?}",
            theirs.json()
        );
        theirs.code();
    }
    let r = c
        .request(
            "DELETE",
            &format!("/v1/templates/claims/{claim}"),
            &[("Authorization", &b)],
            b"",
        )
        .unwrap();
    assert_eq!(r.status, 404, "{:?}", r.json());
    r.code();
    // The claim is still team-a's.
    let r = c
        .request(
            "DELETE",
            &format!("/v1/templates/claims/{claim}"),
            &[("Authorization", &a)],
            b"",
        )
        .unwrap();
    assert!(r.status < 300, "{:?}", r.body);
}

/// Runs `f` every 100 ms on its own connection until `stop`; returns the
/// slowest answer and how many there were (each must be a 200).
fn prober(
    addr: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(Duration, usize)> {
    std::thread::spawn(move || {
        let mut worst = Duration::ZERO;
        let mut n = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let t = Instant::now();
            // A new connection each time: a fresh client must get in too.
            let mut c = Conn::open(&addr);
            let r = c
                .request("GET", "/healthz", &[], b"")
                .expect("a normal request");
            assert_eq!(r.status, 200);
            if t.elapsed() > Duration::from_millis(300) {
                eprintln!("probe {n}: {:?}", t.elapsed());
            }
            worst = worst.max(t.elapsed());
            n += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        (worst, n)
    })
}

/// Hundreds of slow clients: 300 trickling their headers a byte a second,
/// 100 silent after connecting, and 10 that send requests but never read
/// the answers. Throughout, a normal client's requests are answered within
/// two seconds; the slow ones are closed after the header deadline and the
/// deaf ones after the write stall deadline (the server's descriptors
/// come back to where they were while the clients still hold theirs);
/// the server's RSS grows by less than 64 MiB.
#[test]
fn slow_and_silent_clients_do_not_stop_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &tmp.path().join("data"),
        None,
        &[
            "--header-read-timeout-secs",
            "3",
            "--write-stall-timeout-secs",
            "3",
        ],
    );
    let pid = server.pid().unwrap();
    let before = rss_kib(pid);
    let fds_before = open_fds(pid);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = prober(server.addr.clone(), stop.clone());

    const SLOW: usize = 300;
    const SILENT: usize = 100;
    const DEAF: usize = 10;
    let mut slow: Vec<TcpStream> = (0..SLOW)
        .map(|_| TcpStream::connect(&server.addr).unwrap())
        .collect();
    let silent: Vec<TcpStream> = (0..SILENT)
        .map(|_| TcpStream::connect(&server.addr).unwrap())
        .collect();
    // Never-reading clients: 100 pipelined requests for the 170 KiB
    // document (17 MiB of answers, past any socket buffer) into an 8 KiB
    // receive buffer: the server's writes stall, and only the write
    // stall deadline ends them (the header deadline does not run while an
    // answer is being written).
    let mut deaf = vec![];
    for _ in 0..DEAF {
        let s = TcpStream::connect(&server.addr).unwrap();
        rustix::net::sockopt::set_socket_recv_buffer_size(&s, 4096).unwrap();
        s.set_write_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut w = &s;
        for _ in 0..100 {
            if w.write_all(b"GET /openapi.json HTTP/1.1\r\nHost: t\r\n\r\n")
                .is_err()
            {
                break;
            }
        }
        deaf.push(s);
    }
    let mut during = rss_kib(pid);
    // The most descriptors the server held at once (it accepts the burst
    // from its backlog while the slow clients trickle).
    let mut fds_during = open_fds(pid);
    let head = b"GET /v1/templates HTTP/1.1\r\nHost: t\r\nX-Slow: ";
    for i in 0..6 {
        for s in &mut slow {
            let _ = s.write_all(&head[i..i + 1]);
        }
        for _ in 0..7 {
            std::thread::sleep(Duration::from_millis(100));
            fds_during = fds_during.max(open_fds(pid));
            during = during.max(rss_kib(pid));
        }
    }
    // Past the 3 s deadline: every slow and silent connection is closed.
    std::thread::sleep(Duration::from_secs(2));
    for (i, s) in slow.iter().chain(&silent).enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1024];
        match (&*s).read(&mut b) {
            Ok(0) => {}
            Ok(n) => {
                // hyper may answer a timed-out head with 408 before closing.
                let text = String::from_utf8_lossy(&b[..n]);
                assert!(text.starts_with("HTTP/1.1 408"), "connection {i}: {text}");
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("connection {i} still open after the header deadline: {e}"),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (worst, n) = probe.join().unwrap();
    // The deaf ones go once their writes have stalled for 3 s (how soon
    // they stall depends on how fast the server fills their buffers).
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut fds_after = open_fds(pid);
    while fds_after > fds_before + 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        fds_after = open_fds(pid);
    }
    eprintln!("server descriptors: {fds_before} before, {fds_during} during, {fds_after} after");
    assert!(
        fds_during >= fds_before + SLOW,
        "{fds_during} descriptors during"
    );
    assert!(
        fds_after <= fds_before + 5,
        "{fds_after} descriptors after the deadlines (the deaf clients still connected): {fds_before} before"
    );
    drop(deaf);
    let after = rss_kib(pid);
    eprintln!(
        "RSS before {before} KiB, during {during} KiB, after {after} KiB; {n} probes, slowest {worst:?}"
    );
    assert!(n >= 20, "only {n} normal requests answered");
    // Two seconds: this machine's two cores also run the other tests.
    assert!(
        worst < Duration::from_secs(2),
        "a normal request took {worst:?}"
    );
    assert!(
        during.max(after) < before + (64 << 10),
        "RSS grew from {before} KiB to {during}/{after} KiB"
    );
    let mut c = Conn::open(&server.addr);
    assert_eq!(c.request("GET", "/healthz", &[], b"").unwrap().status, 200);
}

/// The connection bound: with `--max-connections 4`, four idle connections
/// hold every slot and a fifth client waits (in the backlog, not refused)
/// until the header deadline frees one; then it is answered.
#[test]
fn connection_bound_holds_and_frees() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &tmp.path().join("data"),
        None,
        &["--max-connections", "4", "--header-read-timeout-secs", "2"],
    );
    // Let the start-up's own probe connection go.
    std::thread::sleep(Duration::from_millis(300));
    let idle: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(&server.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let mut c = Conn::open(&server.addr);
    let r = c.request("GET", "/healthz", &[], b"").unwrap();
    let waited = t.elapsed();
    assert_eq!(r.status, 200);
    assert!(
        waited > Duration::from_millis(1000) && waited < Duration::from_secs(5),
        "the fifth connection waited {waited:?} (the idle ones hold every slot for 2 s)"
    );
    drop(idle);
}

/// Heads hyper refuses before any route: a 1 MiB header, 500 headers, a
/// request line that is not HTTP. Each gets a 4xx (hyper's own, without a
/// body: the README says so) or a closed connection, never a 5xx, and
/// the server goes on answering.
#[test]
fn malformed_heads_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), None);
    let many: String = (0..500).map(|i| format!("X-H{i}: v\r\n")).collect();
    let heads = [
        format!(
            "GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
            "a".repeat(1 << 20)
        ),
        format!("GET /healthz HTTP/1.1\r\nHost: t\r\n{many}\r\n"),
        "NOT HTTP AT ALL\r\n\r\n".to_string(),
        "GET /\u{0}nul HTTP/1.1\r\nHost: t\r\n\r\n".to_string(),
    ];
    for head in &heads {
        let mut c = Conn::open(&server.addr);
        let _ = c.s.write_all(head.as_bytes());
        match c.read_response() {
            Ok(r) => assert!(
                (400..500).contains(&r.status),
                "{:?}…: {}",
                &head[..20],
                r.status
            ),
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                ),
                "{:?}…: {e}",
                &head[..20]
            ),
        }
    }
    let mut c = Conn::open(&server.addr);
    assert_eq!(c.request("GET", "/healthz", &[], b"").unwrap().status, 200);
}
