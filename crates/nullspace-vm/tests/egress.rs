//! Egress policies ([`nullspace_vm::net`]) on a restored machine, against
//! a stand-in internet in a namespace the test makes: TCP, UDP (DNS),
//! ICMP and the resolver path are allowed or refused by destination, a
//! change stops an established connection, and the namespace goes with
//! the machine. Needs root.

mod support;

use nullspace_model::machine::egress::{EgressMode, EgressPolicy};
use nullspace_testkit::inet::{self, TestInternet};
use nullspace_vm::AgentClient;
use nullspace_vm::machine::{self, MachineSpec};
use nullspace_vm::net::{HostNet, MachineNet};
use std::time::{Duration, Instant};
use support::{fixture, serial};

const T: Duration = Duration::from_secs(60);

fn run(agent: &AgentClient, cmd: &str) -> (bool, String) {
    let out = agent.sh(cmd, T).unwrap();
    (
        out.success(),
        format!(
            "{}{}",
            out.stdout_str(),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// (Debian's busybox wget crashes with `-T`: `timeout` bounds it.)
/// What the guest reaches now: (http allowed host, http denied host,
/// dns direct to each, resolver path, ping of each).
fn reach(agent: &AgentClient) -> Vec<(String, bool)> {
    let (a, d) = (inet::ALLOWED, inet::DENIED);
    let p = inet::HTTP_PORT;
    [
        ("http allowed", format!("wget -q -O - http://{a}:{p}/")),
        ("http denied", format!("wget -q -O - http://{d}:{p}/")),
        (
            "udp dns allowed",
            format!("nslookup allowed.test {}", inet::DNS),
        ),
        ("udp dns denied", format!("nslookup allowed.test {d}")),
        ("resolver", "nslookup allowed.test".to_string()),
        ("icmp allowed", format!("ping -c 1 -W 2 {a}")),
        ("icmp denied", format!("ping -c 1 -W 2 {d}")),
    ]
    .into_iter()
    .map(|(what, cmd)| {
        let (ok, out) = run(agent, &format!("timeout 8 {cmd} 2>&1"));
        if what.starts_with("http") && ok {
            assert!(out.contains("hello from"), "{what}: {out}");
        }
        if !ok {
            eprintln!("{what}: {}", out.trim());
        }
        (what.to_string(), ok)
    })
    .collect()
}

fn expect(agent: &AgentClient, want: &[bool], when: &str) {
    let got = reach(agent);
    let seen: Vec<bool> = got.iter().map(|(_, ok)| *ok).collect();
    assert_eq!(seen, want, "{when}: {got:?}");
}

fn custom(allow: &[&str]) -> EgressPolicy {
    EgressPolicy {
        mode: EgressMode::Custom,
        allow_cidrs: allow.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[test]
fn egress_policies_hold_for_every_protocol_and_apply_at_once() {
    let _s = serial();
    let _inet = TestInternet::start().expect("the test internet");
    let f = fixture("egress");
    let snap = support::template(f, "egress-tpl");
    assert!(snap.meta.vm.nic, "every template has a NIC");
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let host = HostNet::init(work.path(), Some(inet::DNS)).expect("host networking");
    let spec = MachineSpec {
        dir: work.path().join("m1"),
        timeout: T,
        nice: 0,
        net: Some(host.clone()),
    };
    // The machine's directory and namespace go even if an assertion fails.
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = machine::remove_dir(&self.0);
        }
    }
    let _cleanup = Cleanup(spec.dir.clone());
    let t = Instant::now();
    let r = machine::restore(&snap, &spec, &nullspace_vm::CancellationToken::new()).unwrap();
    eprintln!("[timing] restore with a namespace: {:?}", t.elapsed());
    let ns = MachineNet::of_dir(&spec.dir, host.resolver()).expect("its namespace");
    let agent = &r.agent;

    // A new machine's namespace denies everything until told otherwise.
    expect(
        agent,
        &[false, false, false, false, false, false, false],
        "at restore",
    );
    let apply = |p: EgressPolicy| {
        let t = Instant::now();
        ns.apply(&p.check().unwrap()).unwrap();
        t.elapsed()
    };
    let took = apply(EgressPolicy::allow_all());
    eprintln!("[timing] policy change: {took:?}");
    expect(
        agent,
        &[true, true, true, true, true, true, true],
        "allow_all",
    );
    apply(custom(&["198.51.100.0/24"]));
    expect(
        agent,
        &[true, false, true, false, true, true, false],
        "allow 198.51.100.0/24",
    );
    // Refused at once (ICMP admin-prohibited), not after a timeout.
    let t = Instant::now();
    let (ok, out) = run(
        agent,
        &format!("timeout 5 wget -q -O - http://{}:8080/ 2>&1", inet::DENIED),
    );
    assert!(!ok && t.elapsed() < Duration::from_secs(3), "{out}");

    // An established stream stops within a second of the change.
    run(
        agent,
        &format!(
            "nc {} {} > /tmp/ticks 2>/dev/null & sleep 1",
            inet::ALLOWED,
            inet::TICK_PORT
        ),
    );
    let lines = || {
        run(agent, "wc -l < /tmp/ticks")
            .1
            .trim()
            .parse::<u64>()
            .unwrap_or(0)
    };
    assert!(lines() > 5, "the ticker streams");
    apply(custom(&["203.0.113.0/24"]));
    std::thread::sleep(Duration::from_secs(1));
    let n1 = lines();
    std::thread::sleep(Duration::from_secs(1));
    let n2 = lines();
    assert_eq!(
        n1, n2,
        "the stream went on after its destination was denied"
    );
    expect(
        agent,
        &[false, true, false, true, true, false, true],
        "allow 203.0.113.0/24",
    );
    apply(EgressPolicy::deny_all());
    expect(
        agent,
        &[false, false, false, false, false, false, false],
        "deny_all (the resolver too)",
    );

    // The namespace goes with the machine.
    let name = ns.name().to_string();
    assert!(std::path::Path::new("/run/netns").join(&name).exists());
    drop(r);
    machine::remove_dir(&spec.dir).unwrap();
    assert!(!std::path::Path::new("/run/netns").join(&name).exists());
}
