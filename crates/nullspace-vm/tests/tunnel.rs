//! Tunnels into a real guest (QEMU, TCG here): a download through busybox
//! httpd arrives whole, an echo sees the host's end of input, a closed port
//! is refused by name, and the guest bounds how many are open.

mod support;

use nullspace_model::agent::{ErrorCode, MAX_TUNNELS};
use nullspace_vm::{AgentClient, ExecRequest, Vm, VmError};
use sha2::Digest;
use std::time::{Duration, Instant};
use support::{boot, fixture, serial};

const T: Duration = Duration::from_secs(60);

fn read_all(agent: &AgentClient, port: u16, request: &[u8]) -> Vec<u8> {
    let (mut r, w) = agent.open_tunnel(port, T).unwrap();
    w.send(request, false, T).unwrap();
    let mut got = Vec::new();
    while let Some(d) = r.recv(T).unwrap() {
        got.extend_from_slice(&d);
    }
    got
}

/// Retries `open_tunnel` until the guest's server listens.
fn wait_listening(agent: &AgentClient, port: u16) {
    let t = Instant::now();
    loop {
        match agent.open_tunnel(port, T) {
            Ok(_) => return,
            Err(e) => assert!(t.elapsed() < T, "port {port} never listened: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn tunnels_carry_a_download_and_an_echo_and_are_bounded() {
    let _s = serial();
    let mut vm = boot(fixture("nullspace-vm-tunnel"), "tunnel", 2);
    let agent = vm.agent().clone();

    match agent.open_tunnel(9, T) {
        Err(VmError::Guest { code, message, .. }) => {
            assert_eq!(code, ErrorCode::ConnectionRefused, "{message}");
            assert!(message.contains("port 9"), "{message}");
        }
        Err(e) => panic!("a closed port: {e}"),
        Ok(_) => panic!("a closed port accepted a tunnel"),
    }

    // A 3 MiB file through httpd: more than the stream window, so the
    // credit flow runs many times.
    let setup = "mkdir -p /tmp/www && head -c 3145728 /dev/urandom > /tmp/www/blob && \
                 sha256sum /tmp/www/blob | cut -d' ' -f1";
    let sum = agent.sh(setup, T).unwrap().stdout_str().trim().to_string();
    agent
        .exec_background(&ExecRequest::shell("httpd -f -p 8080 -h /tmp/www"), None, T)
        .unwrap();
    wait_listening(&agent, 8080);
    let t = Instant::now();
    let resp = read_all(&agent, 8080, b"GET /blob HTTP/1.0\r\nHost: x\r\n\r\n");
    let took = t.elapsed();
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header");
    let head = String::from_utf8_lossy(&resp[..split]).to_string();
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    let body = &resp[split + 4..];
    assert_eq!(body.len(), 3 << 20, "{head}");
    assert_eq!(hex::encode(sha2::Sha256::digest(body)), sum);
    eprintln!(
        "[tunnel] 3 MiB in {took:?} ({:.1} MiB/s, TCG)",
        3.0 / took.as_secs_f64()
    );

    // An echo: the host's end of input reaches the guest's server, whose
    // close ends the tunnel.
    agent
        .exec_background(&ExecRequest::shell("nc -l -p 8081 -e cat"), None, T)
        .unwrap();
    let t = Instant::now();
    let (mut r, w) = loop {
        match agent.open_tunnel(8081, T) {
            Ok(x) => break x,
            Err(e) => assert!(t.elapsed() < T, "nc never listened: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    w.send(b"ping through the agent\n", true, T).unwrap();
    let mut got = Vec::new();
    while let Some(d) = r.recv(T).unwrap() {
        got.extend_from_slice(&d);
    }
    assert_eq!(got, b"ping through the agent\n");
    // Writing after the guest closed is an error, not a hang.
    assert!(w.send(b"late", false, T).is_err());

    // The guest's bound: one more than MAX_TUNNELS is busy; dropping the
    // readers frees the slots.
    let mut open = Vec::new();
    for _ in 0..MAX_TUNNELS {
        open.push(
            agent
                .open_tunnel(8080, T)
                .expect("a tunnel under the bound"),
        );
    }
    match agent.open_tunnel(8080, T) {
        Err(VmError::Guest { code, .. }) => assert_eq!(code, ErrorCode::Busy),
        Err(e) => panic!("over the bound: {e}"),
        Ok(_) => panic!("more than {MAX_TUNNELS} tunnels were opened"),
    }
    open.clear();
    let t = Instant::now();
    while agent.open_tunnel(8080, T).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "slots not freed");
        std::thread::sleep(Duration::from_millis(100));
    }
}
