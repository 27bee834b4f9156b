//! A hostile guest agent, played by this test on the agent's socket (a real
//! hostile guest would need a replaced guest binary): it answers `hello`
//! properly, then meets a `metrics` request with an endless line, a flood
//! of replies, stream data it has no credit for, deep nesting, an endless
//! error message, or silence. Each time the host's client fails that call
//! with a clear one-line error (or takes the first valid answer), never
//! holds more than its stated bound, and the process lives on.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nullspace_model::agent::{Event, GuestMetrics, PROTOCOL_VERSION, Reply, Request, to_line};
use nullspace_vm::{AgentClient, Limits, VmError};

fn status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
}

/// What the hostile agent does once the host's metrics request arrived.
type Misbehave = Box<dyn FnOnce(&mut UnixStream, u64) + Send>;

/// A socket path with a hostile agent behind it: `hello` is answered
/// (protocol spoken), the first request after it gets `misbehave`, and
/// the agent then drains what the host sends until it hangs up.
fn hostile_agent(name: &str, misbehave: Misbehave) -> PathBuf {
    let path = std::env::temp_dir().join(format!("ns-hostile-{}-{name}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let hello: Request = serde_json::from_str(&line).unwrap();
        let _ = s.write_all(&to_line(&Reply {
            id: hello.id,
            event: Event::Hello {
                protocol: PROTOCOL_VERSION,
                agent: "hostile".into(),
            },
        }));
        line.clear();
        r.read_line(&mut line).unwrap();
        let req: Request = serde_json::from_str(&line).unwrap();
        misbehave(&mut s, req.id);
        // Keep reading (acks, cancels) until the host hangs up.
        std::thread::spawn(move || while r.read_line(&mut line).is_ok_and(|n| n > 0) {});
    });
    path
}

/// Connects to a hostile agent, asks for metrics within `limit`, and
/// reports the call's result with the host's peak RSS growth (KiB).
fn metrics_from(
    name: &str,
    limit: Duration,
    misbehave: Misbehave,
) -> (AgentClient, Result<GuestMetrics, VmError>, u64) {
    let path = hostile_agent(name, misbehave);
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let rss0 = status_kb("VmRSS:");
    let a = AgentClient::connect(&path, Duration::from_secs(10)).unwrap();
    let t = Instant::now();
    let r = a.metrics(None, limit);
    let grew = status_kb("VmHWM:").saturating_sub(rss0);
    let _ = std::fs::remove_file(&path);
    let shown = match &r {
        Ok(m) => format!("ok {m:?}"),
        Err(e) => e.to_string(),
    };
    eprintln!(
        "[figures] hostile agent, {name}: {:?}, peak RSS +{grew} KiB: {}",
        t.elapsed(),
        &shown[..shown.len().min(300)]
    );
    assert!(
        shown.len() < 2048 && !shown.contains('\n'),
        "{name}: the error is one short line ({} bytes)",
        shown.len()
    );
    (a, r, grew)
}

fn metrics_reply(id: u64, cpu: f64) -> Vec<u8> {
    to_line(&Reply {
        id,
        event: Event::Metrics(GuestMetrics {
            cpu_percent: cpu,
            cpu_count: 2,
            mem_used_bytes: 1 << 40,
            mem_total_bytes: 1 << 30,
            ..Default::default()
        }),
    })
}

#[test]
fn a_hostile_agent_gets_clear_errors_and_bounded_memory() {
    let bound_kib = (Limits::default().memory_bound(1) >> 10) as u64;
    let slack_kib = 8 << 10; // allocator and thread stacks
    let t = Duration::from_secs(20);

    // 1. An endless reply line (64 MiB, no newline): the connection drops
    //    at the line limit, nothing like it is buffered.
    let (a, r, grew) = metrics_from(
        "endless-line",
        t,
        Box::new(|s, id| {
            let head = format!("{{\"id\":{id},\"type\":\"metrics\",\"cpu_percent\":1");
            let _ = s.write_all(head.as_bytes());
            let digits = vec![b'7'; 1 << 20];
            for _ in 0..64 {
                if s.write_all(&digits).is_err() {
                    return; // the host hung up
                }
            }
        }),
    );
    let e = r.unwrap_err();
    assert!(
        e.to_string().contains("line longer than 1048576 bytes"),
        "{e}"
    );
    assert!(grew < bound_kib + slack_kib, "+{grew} KiB");
    assert!(a.closed().is_some(), "the connection is dropped");
    assert!(a.ping(t).unwrap_err().to_string().contains("longer than"));

    // 2. A flood of replies (for the request, for ids nobody asked, and
    //    garbage): the first valid answer is taken (its figures made
    //    plausible), the rest ignored without being held.
    let (a, r, grew) = metrics_from(
        "reply-flood",
        t,
        Box::new(|s, id| {
            let _ = s.write_all(&metrics_reply(id, 1e300));
            let junk = [
                metrics_reply(id, 50.0),
                metrics_reply(id + 1_000_000, 50.0),
                b"not json at all\n".to_vec(),
                format!("{{\"id\":{id},\"type\":\"bogus\"}}\n").into_bytes(),
            ]
            .concat();
            let end = Instant::now() + Duration::from_secs(3);
            while Instant::now() < end && s.write_all(&junk).is_ok() {}
        }),
    );
    let m = r.unwrap();
    assert_eq!(m.cpu_percent, 100.0, "clamped");
    assert_eq!(m.mem_used_bytes, m.mem_total_bytes, "used within total");
    assert!(grew < bound_kib + slack_kib, "+{grew} KiB");
    assert_eq!(a.agent_version().as_deref(), Some("hostile"));
    std::thread::sleep(Duration::from_secs(3));
    assert!(a.closed().is_none(), "a flood of stale replies is ignored");

    // 3. Stream data the host gave no credit for, in place of the answer:
    //    the request fails (flow control), the bytes are not kept, and the
    //    error does not echo them.
    let (_a, r, grew) = metrics_from(
        "uncredited-stream",
        t,
        Box::new(|s, id| {
            let chunk = to_line(&Reply {
                id,
                event: Event::Stdout {
                    data: vec![b'x'; 256 << 10],
                },
            });
            for _ in 0..256 {
                if s.write_all(&chunk).is_err() {
                    return;
                }
            }
        }),
    );
    let e = r.unwrap_err();
    assert!(
        e.to_string().contains("metrics: unexpected reply Stdout"),
        "{e}"
    );
    assert!(grew < bound_kib + slack_kib, "+{grew} KiB");

    // 4. A reply nested a million levels deep: refused by the parser's
    //    depth limit (no stack overflow in the reader thread).
    let (_a, r, grew) = metrics_from(
        "deep-nesting",
        t,
        Box::new(|s, id| {
            let mut l = format!("{{\"id\":{id},\"type\":\"metrics\",\"cpu_percent\":").into_bytes();
            l.extend(std::iter::repeat_n(b'[', 1_000_000));
            l.push(b'\n');
            let _ = s.write_all(&l);
        }),
    );
    let e = r.unwrap_err();
    assert!(
        e.to_string()
            .contains("unexpected reply from the guest agent"),
        "{e}"
    );
    assert!(grew < bound_kib + slack_kib, "+{grew} KiB");

    // 5. An error whose message fills a whole line: the host's error keeps
    //    a clipped one line of it.
    let (_a, r, _) = metrics_from(
        "huge-error",
        t,
        Box::new(|s, id| {
            let _ = s.write_all(&to_line(&Reply {
                id,
                event: Event::error(
                    nullspace_model::agent::ErrorCode::Other,
                    "e".repeat(900 << 10),
                ),
            }));
        }),
    );
    let e = r.unwrap_err();
    assert!(e.to_string().contains("…"), "clipped, marked: {e}");

    // 6. Silence: the call ends at its deadline, saying so.
    let (_a, r, _) = metrics_from(
        "silence",
        Duration::from_secs(1),
        Box::new(|_, _| std::thread::sleep(Duration::from_secs(5))),
    );
    let e = r.unwrap_err();
    assert!(
        e.to_string()
            .contains("metrics: timed out waiting for the guest agent"),
        "{e}"
    );
}
