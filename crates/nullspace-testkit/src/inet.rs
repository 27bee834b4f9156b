//! A stand-in "internet" for egress tests: a network namespace the test
//! makes, routed from the host, holding two web hosts on documentation
//! addresses ([`ALLOWED`], [`DENIED`]: policies name them) with a TCP
//! ticker each, and DNS servers (UDP) on [`DNS`] and [`DENIED`] that
//! answer `allowed.test` and `denied.test`. Needs root; one at a time per host
//! (a lock file), torn down on drop.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ALLOWED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
pub const DENIED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const DNS: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);
/// HTTP on both hosts: the body is `hello from <address>`.
pub const HTTP_PORT: u16 = 8080;
/// TCP on both hosts: a line `tick <n>` every 50 ms.
pub const TICK_PORT: u16 = 7001;

const NS: &str = "nstest-inet";
const HOST_IF: &str = "ntinet0";

const SERVERS: &str = r#"
import socket, socketserver, struct, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("hello from %s\n" % self.connection.getsockname()[0]).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

def http():
    ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()

class Tick(socketserver.BaseRequestHandler):
    def handle(self):
        n = 0
        try:
            while True:
                self.request.sendall(b"tick %d\n" % n)
                n += 1
                time.sleep(0.05)
        except OSError:
            pass

def tick():
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer(("0.0.0.0", 7001), Tick).serve_forever()

NAMES = {b"allowed.test": "198.51.100.10", b"denied.test": "203.0.113.10"}

def dns(addr):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, 53))
    while True:
        q, peer = s.recvfrom(512)
        if len(q) < 12:
            continue
        labels, i = [], 12
        while i < len(q) and q[i]:
            labels.append(q[i + 1:i + 1 + q[i]])
            i += 1 + q[i]
        name = b".".join(labels).lower()
        qtype = struct.unpack(">H", q[i + 1:i + 3])[0] if i + 3 <= len(q) else 0
        question = q[12:i + 5]
        addr = NAMES.get(name)
        if addr and qtype == 1:
            ans = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton(addr)
            head = q[:2] + b"\x81\x80" + struct.pack(">HHHH", 1, 1, 0, 0)
        else:
            ans = b""
            rcode = b"\x81\x83" if not addr else b"\x81\x80"
            head = q[:2] + rcode + struct.pack(">HHHH", 1, 0, 0, 0)
        s.sendto(head + question + ans, peer)

for f, a in ((http, ()), (tick, ()), (dns, ("198.51.100.53",)), (dns, ("203.0.113.10",))):
    threading.Thread(target=f, args=a, daemon=True).start()
while True:
    time.sleep(3600)
"#;

fn ip(args: &str) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The running stand-in internet; dropped, it is gone.
pub struct TestInternet {
    servers: Child,
    _lock: std::fs::File,
}

impl TestInternet {
    pub fn start() -> Result<TestInternet, String> {
        let lock = std::fs::File::create("/tmp/nullspace-test-inet.lock")
            .map_err(|e| format!("lock file: {e}"))?;
        lock.lock().map_err(|e| format!("lock: {e}"))?;
        // A leftover of a killed run.
        let _ = ip(&format!("netns del {NS}"));
        let _ = ip(&format!("link del {HOST_IF}"));
        ip(&format!("netns add {NS}"))?;
        let setup = || -> Result<(), String> {
            ip(&format!(
                "link add {HOST_IF} type veth peer name up0 netns {NS}"
            ))?;
            ip(&format!("addr add 198.51.100.1/24 dev {HOST_IF}"))?;
            ip(&format!("addr add 203.0.113.1/24 dev {HOST_IF}"))?;
            ip(&format!("link set {HOST_IF} up"))?;
            for a in [
                "link set lo up",
                "addr add 198.51.100.10/24 dev up0",
                "addr add 198.51.100.53/24 dev up0",
                "addr add 203.0.113.10/24 dev up0",
                "link set up0 up",
                "route add default via 198.51.100.1",
            ] {
                ip(&format!("-n {NS} {a}"))?;
            }
            Ok(())
        };
        if let Err(e) = setup() {
            let _ = ip(&format!("netns del {NS}"));
            return Err(e);
        }
        let servers = Command::new("ip")
            .args(["netns", "exec", NS, "python3", "-c", SERVERS])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("python3 in {NS}: {e}"))?;
        let net = TestInternet {
            servers,
            _lock: lock,
        };
        let t = Instant::now();
        for host in [ALLOWED, DENIED] {
            let a = SocketAddr::from((host, HTTP_PORT));
            while TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_err() {
                if t.elapsed() > Duration::from_secs(10) {
                    return Err(format!("{a} did not answer in {NS}"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(net)
    }
}

impl Drop for TestInternet {
    fn drop(&mut self) {
        let _ = self.servers.kill();
        let _ = self.servers.wait();
        let _ = ip(&format!("netns del {NS}"));
        let _ = ip(&format!("link del {HOST_IF}"));
    }
}
