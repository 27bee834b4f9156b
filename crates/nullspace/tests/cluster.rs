//! Many nodes (issue 19): the start-up rules, registration and the lease
//! by the database's clock, a killed node declared dead by a live one, a
//! stopped (SIGSTOP) node fenced when it comes back, and a lone server
//! refused on a store live nodes share. Real Postgres and real servers.

use std::process::Command;
use std::time::{Duration, Instant};

use nullspace_model::node::NodeStatus;
use nullspace_store::{NodeRow, Store};
use nullspace_testkit::server::{Postgres, Server};
use nullspace_testkit::{nullspace_bin, run};

const REGISTRY: &str = "127.0.0.1:5999/nullspace";

fn nodes(pg: &Postgres) -> Vec<NodeRow> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = Store::open(&pg.url).await.unwrap();
        store.nodes().await.unwrap()
    })
}

fn node_of(pg: &Postgres, url: &str) -> NodeRow {
    nodes(pg)
        .into_iter()
        .find(|n| n.url == url)
        .unwrap_or_else(|| panic!("no node at {url}: {:?}", nodes(pg)))
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

/// `nullspace serve` with `args`; it must exit non-zero with one line
/// containing `expect`.
fn refused(args: &[&str], expect: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(nullspace_bin());
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--no-build-vm",
        "--no-base-template",
    ])
    .arg("--data-dir")
    .arg(tmp.path().join("data"))
    .args(args);
    let r = run(&mut cmd);
    assert!(!r.status.success(), "started: {}", r.stderr);
    assert!(r.stderr.contains(expect), "{expect:?} not in: {}", r.stderr);
}

#[test]
fn many_nodes_need_postgres_and_a_registry() {
    refused(
        &["--node-url", "http://127.0.0.2:7101"],
        "many nodes need a shared Postgres store",
    );
    let pg = Postgres::start();
    refused(
        &[
            "--node-url",
            "http://127.0.0.2:7101",
            "--database-url",
            &pg.url,
        ],
        "many nodes need an artifact registry",
    );
    refused(
        &[
            "--node-url",
            "127.0.0.2:7101",
            "--database-url",
            &pg.url,
            "--artifact-registry",
            REGISTRY,
        ],
        "must be an http:// or https:// URL",
    );
}

#[test]
fn nodes_hold_leases_and_a_dead_node_is_declared_and_a_stale_one_fenced() {
    let pg = Postgres::start();
    let tmp = tempfile::tempdir().unwrap();
    let args = [
        "--node-url-self",
        "--artifact-registry",
        REGISTRY,
        "--node-lease-ms",
        "1000",
        "--node-grace-ms",
        "1000",
    ];
    let a = Server::start_with(&tmp.path().join("a"), Some(&pg.url), &args);
    let mut b = Server::start_with(&tmp.path().join("b"), Some(&pg.url), &args);
    // A server listens a moment before it registers.
    wait_for("both registered", Duration::from_secs(10), || {
        nodes(&pg).len() == 2
    });
    let (na, nb) = (node_of(&pg, &a.url), node_of(&pg, &b.url));
    assert_eq!(nodes(&pg).len(), 2);
    for n in [&na, &nb] {
        assert_eq!(n.status, NodeStatus::Ready);
        assert!(n.live);
        assert_eq!(n.epoch, 1);
        assert_eq!(n.labels.arch, std::env::consts::ARCH);
    }
    // Leases are renewed: well after one lease, both still run.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        nodes(&pg)
            .iter()
            .all(|n| n.live && n.status == NodeStatus::Ready)
    );

    // A lone server (no --node-url) on this store is refused, naming them.
    refused(
        &["--database-url", &pg.url],
        "this store is shared by live nodes",
    );

    // B killed: A declares it dead after lease + grace.
    b.kill();
    let t = Instant::now();
    wait_for("B declared dead", Duration::from_secs(15), || {
        node_of(&pg, &b.url).status == NodeStatus::Dead
    });
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1500),
        "declared after {took:?}: too early"
    );
    assert_eq!(node_of(&pg, &a.url).status, NodeStatus::Ready);

    // B starts again: the same node id, a new epoch, ready (it listens a
    // moment before it registers).
    b.start_again();
    wait_for("B registered again", Duration::from_secs(10), || {
        node_of(&pg, &b.url).status == NodeStatus::Ready
    });
    let nb2 = node_of(&pg, &b.url);
    assert_eq!(nb2.id, nb.id);
    assert_eq!(nb2.epoch, nb.epoch + 1);
    assert_eq!(nb2.status, NodeStatus::Ready);

    // B stopped (SIGSTOP) past lease + grace: declared dead; when it runs
    // again it finds itself fenced and refuses new machines.
    let pid = b.pid().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success()
    );
    wait_for("stopped B declared dead", Duration::from_secs(15), || {
        node_of(&pg, &b.url).status == NodeStatus::Dead
    });
    assert!(
        Command::new("kill")
            .args(["-CONT", &pid])
            .status()
            .unwrap()
            .success()
    );
    wait_for("B fenced", Duration::from_secs(10), || {
        b.log_text().contains("this node was fenced")
    });
    let key = b.key("team-a");
    let r = reqwest::blocking::Client::new()
        .post(format!("{}/v1/machines", b.url))
        .bearer_auth(&key)
        .json(&serde_json::json!({"template": "nullspace/base"}))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let body: serde_json::Value = r.json().unwrap();
    assert_eq!(body["code"], "node_fenced", "{body}");
    // A clean stop of A leaves it `stopped`, never declared dead.
    let mut a = a;
    a.terminate(Duration::from_secs(20));
    assert_eq!(node_of(&pg, &a.url).status, NodeStatus::Stopped);
}

/// Prints a log line's measured fields (`ms`, `*_mib`, `chunks`) for the
/// issue's benchmark figures.
fn figures(node: &Server, event: &str) {
    for l in node.log_text().lines().filter(|l| l.contains(event)) {
        let kept: Vec<&str> = l
            .split_whitespace()
            .filter(|w| w.starts_with("ms=") || w.contains("_mib=") || w.starts_with("chunks="))
            .collect();
        eprintln!("[figures] {event}: {}", kept.join(" "));
    }
}

/// The template, built on A with the build VM, and what B and C do with it
/// through SDK 1.0.3: each creates a machine (a cold pull from the
/// registry), runs a command and reads the start command's page.
const BUILD: &str = r#"
import os
from nullspace import Template, wait_for_port
IMAGE = os.environ["NS_IMAGE"]
start = "sh -c 'echo from-a > /tmp/mark; exec httpd -f -p 8080 -h /srv'"
b = Template.build(Template.from_image(IMAGE).set_start_cmd(start, wait_for_port(8080)), name="web")
print("BUILD", b.build_id)
"#;

const CREATE: &str = r#"
import os, threading
from nullspace import Machine
n = int(os.environ.get("NS_CREATES", "1"))
out, errors = [None] * n, []
def one(i):
    try:
        m = Machine.create(template="web")
        r = m.commands.run("cat /tmp/mark")
        assert r.exit_code == 0, r
        out[i] = (m.id, r.stdout.split()[0])
    except Exception as e:
        errors.append(repr(e))
ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
[t.start() for t in ts]
[t.join() for t in ts]
assert not errors, errors
for mid, page in out:
    print("MACHINE", mid, page)
"#;

/// B's machine, driven through another node: exec (streamed), files and a
/// terminal; every request is forwarded to B.
const DRIVE: &str = r#"
import os, time
from nullspace import Machine
m = Machine.connect(os.environ["NS_MACHINE"])
seen = []
r = m.commands.run("echo one; sleep 1; echo two", on_stdout=lambda d: seen.append(d))
assert r.exit_code == 0 and "two" in r.stdout and any("one" in d for d in seen), (r, seen)
m.files.write("/tmp/through.txt", "via-" + os.environ["NS_VIA"])
assert m.files.read("/tmp/through.txt") == "via-" + os.environ["NS_VIA"]
s = m.pty.create_session(cols=80, rows=24)
got = []
import threading
threading.Thread(target=lambda: [got.append(c) for c in s], daemon=True).start()
s.send_input("echo pty-$((6*7))\n")
t = time.time()
while b"pty-42" not in b"".join(got) and time.time() - t < 60:
    time.sleep(0.1)
assert b"pty-42" in b"".join(got), got
m.pty.kill_session(s.session_id)
print("DRIVEN", m.id)
"#;

#[test]
fn a_template_built_on_one_node_is_pulled_once_by_each_other_node() {
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let init = nullspace_vm::init_binary::locate_or_build(&workspace).expect("guest init");
    let pg = Postgres::start();
    let reg = nullspace_testkit::registry::Registry::start(nullspace_testkit::registry::Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let image = reg.push_demo(tmp.path(), "demo/web");
    let artifacts = format!("{}/nullspace", reg.addr);
    let args = [
        "--build-vm",
        "--init-bin",
        init.to_str().unwrap(),
        "--node-url-self",
        "--artifact-registry",
        &artifacts,
        "--node-lease-ms",
        "2000",
        "--node-grace-ms",
        "3000",
    ];
    let a = Server::start_with(&tmp.path().join("a"), Some(&pg.url), &args);
    let key = a.key("team-a");
    let r = nullspace_testkit::server::run_sdk_version(
        nullspace_testkit::server::Sdk::V1_0_3,
        &a,
        &key,
        BUILD,
        &[("NS_IMAGE", &image)],
    );
    assert!(
        r.status.success(),
        "{}\n{}\n{}",
        r.stdout,
        r.stderr,
        a.log_text()
    );
    assert!(
        a.log_text().contains("template published"),
        "{}",
        a.log_text()
    );

    // B and C never see A's data directory: they pull. C takes four
    // concurrent creates; each node pulls once.
    let b = Server::start_with(&tmp.path().join("b"), Some(&pg.url), &args);
    let c = Server::start_with(&tmp.path().join("c"), Some(&pg.url), &args);
    for (node, creates) in [(&b, 1), (&c, 4)] {
        let r = nullspace_testkit::server::run_sdk_version(
            nullspace_testkit::server::Sdk::V1_0_3,
            node,
            &key,
            CREATE,
            &[("NS_CREATES", &creates.to_string())],
        );
        assert!(
            r.status.success(),
            "{}\n{}\n{}",
            r.stdout,
            r.stderr,
            node.log_text()
        );
        let pages: Vec<&str> = r
            .stdout
            .lines()
            .filter_map(|l| l.split_whitespace().nth(2))
            .collect();
        assert_eq!(pages, vec!["from-a"; creates], "{}", r.stdout);
        let pulls = node
            .log_text()
            .matches("template pulled from the artifact registry")
            .count();
        assert_eq!(pulls, 1, "{}", node.log_text());
        figures(node, "template pulled from the artifact registry");
    }
    figures(&a, "template published");
    assert!(
        !b.log_text()
            .contains(&tmp.path().join("a").display().to_string())
    );

    // B's machine driven through A and through C: forwarded to B.
    let r = nullspace_testkit::server::run_sdk_version(
        nullspace_testkit::server::Sdk::V1_0_3,
        &b,
        &key,
        CREATE,
        &[],
    );
    assert!(r.status.success(), "{}\n{}", r.stdout, r.stderr);
    let on_b = r
        .stdout
        .lines()
        .find_map(|l| l.split_whitespace().nth(1))
        .unwrap()
        .to_string();
    for (via, name) in [(&a, "a"), (&c, "c")] {
        let r = nullspace_testkit::server::run_sdk_version(
            nullspace_testkit::server::Sdk::V1_0_3,
            via,
            &key,
            DRIVE,
            &[("NS_MACHINE", &on_b), ("NS_VIA", name)],
        );
        assert!(
            r.status.success() && r.stdout.contains("DRIVEN"),
            "{}\n{}\n{}",
            r.stdout,
            r.stderr,
            via.log_text()
        );
    }

    // With the registry gone, the warm nodes still create; a cold node
    // fails fast with a clear 503.
    drop(reg);
    let d = Server::start_with(&tmp.path().join("d"), Some(&pg.url), &args);
    let t = Instant::now();
    let r = reqwest::blocking::Client::new()
        .post(format!("{}/v1/machines", d.url))
        .bearer_auth(&key)
        .json(&serde_json::json!({"template": "web"}))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let body: serde_json::Value = r.json().unwrap();
    assert_eq!(body["code"], "template_unavailable", "{body}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    let r = nullspace_testkit::server::run_sdk_version(
        nullspace_testkit::server::Sdk::V1_0_3,
        &b,
        &key,
        CREATE,
        &[],
    );
    assert!(r.status.success(), "{}\n{}", r.stdout, r.stderr);

    // B killed (its QEMUs too): its machine, asked through A, is 503 with
    // Retry-After until B is declared dead; then it has ended in `error`,
    // with the reason.
    let mut b = b;
    let qemus = b.qemu_pids();
    b.kill();
    for p in qemus {
        let _ = Command::new("kill")
            .args(["-KILL", &p.to_string()])
            .status();
    }
    let http = reqwest::blocking::Client::new();
    let get = || {
        http.get(format!("{}/v1/machines/{on_b}", a.url))
            .bearer_auth(&key)
            .send()
            .unwrap()
    };
    let r = get();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().unwrap();
    assert_eq!(body["code"], "machine_unavailable", "{body}");
    let t = Instant::now();
    let mut last = serde_json::Value::Null;
    // An ended machine reads as not found, naming its status and reason.
    let ended = |v: &serde_json::Value| {
        v["code"] == "machine_not_found"
            && v["error"]
                .as_str()
                .is_some_and(|m| m.contains("is error") && m.contains("declared dead"))
    };
    while !ended(&last) && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(200));
        last = get().json().unwrap();
    }
    assert!(ended(&last), "{last}\n{}", a.log_text());
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert_eq!(node_of(&pg, &b.url).status, NodeStatus::Dead);
}
