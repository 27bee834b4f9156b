//! The template API, served for real and driven by the published Python SDK
//! (`nullspace-sdk==0.1.9`, unpatched) and raw HTTP: the same suite on the
//! embedded SQLite store and on a Postgres started here. Then what no
//! client can see: secrets on disk and in the database, restarts.

use std::io::Read;
use std::path::Path;
use std::process::Command;

use nullspace_testkit::registry::{Auth, PASSWORD, Registry, USER};
use nullspace_testkit::run;
use nullspace_testkit::server::{Postgres, Server, run_sdk};

const SUITE: &str = include_str!("sdk/api_suite.py");
const VALIDATION: &str = include_str!("sdk/validation.py");

/// Every file under `dir` that contains `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(mut f) = std::fs::File::open(&p) {
                let mut buf = Vec::new();
                let _ = f.read_to_end(&mut buf);
                if buf.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    hits.push(p.display().to_string());
                }
            }
        }
    }
    hits
}

fn suite(database_url: Option<&str>) {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(Auth::None);
    let private = Registry::start(Auth::Basic);
    let image = reg.push_demo(tmp.path(), "demo/app");
    let private_image = private.push_demo(tmp.path(), "private/app");
    let data = tmp.path().join("data");
    let server = Server::start(&data, database_url);
    let key_a = server.key("team-a");
    let key_b = server.key("team-b");
    let secret = "NS-SECRET-VALUE-7f3a9c";

    let env = [
        ("NS_KEY_B", key_b.as_str()),
        ("NS_IMAGE", image.as_str()),
        ("NS_PRIVATE_IMAGE", private_image.as_str()),
        ("NS_PRIVATE_USER", USER),
        ("NS_PRIVATE_PASSWORD", PASSWORD),
        ("NS_SECRET", secret),
    ];
    let r = run_sdk(&server, &key_a, SUITE, &env);
    assert!(
        r.status.success() && r.stdout.trim_end().ends_with("SUITE OK"),
        "SDK suite failed:\n{}\n{}\nserver log:\n{}",
        r.stdout,
        r.stderr,
        server.log_text()
    );
    let r = run_sdk(&server, &key_a, VALIDATION, &env);
    assert!(
        r.status.success() && r.stdout.contains("VALIDATION OK"),
        "{}\n{}",
        r.stdout,
        r.stderr
    );

    // Credentials and secrets reached the server (the private build used the
    // password) but are nowhere under its data directory or in its log...
    for needle in [PASSWORD, secret] {
        let hits = files_containing(&data, needle);
        assert!(hits.is_empty(), "{needle:?} persisted in {hits:?}");
        assert!(!server.log_text().contains(needle), "{needle:?} logged");
    }
    // ...nor in the shared database.
    if let Some(url) = database_url {
        let dump = run(Command::new("runuser").args([
            "-u",
            "postgres",
            "--",
            "pg_dump",
            "--data-only",
            url,
        ]));
        dump.ok();
        assert!(dump.stdout.contains("tb_"), "the dump holds the builds");
        for needle in [PASSWORD, secret] {
            assert!(
                !dump.stdout.contains(needle),
                "{needle:?} in the Postgres dump"
            );
        }
    }
}

#[test]
fn api_suite_on_sqlite() {
    suite(None);
}

#[test]
fn api_suite_on_postgres() {
    let pg = Postgres::start();
    suite(Some(&pg.url));
}

const BACKGROUND: &str = r#"
import os
from nullspace import Template
auth = {"username": os.environ["NS_USER"], "password": os.environ["NS_PASS"]} if os.environ.get("NS_USER") else {}
h = Template.build_in_background(Template.from_image(os.environ["NS_IMAGE"], **auth), name=os.environ["NS_NAME"])
print(h.build_id)
"#;

const WAIT: &str = r#"
import os, time
from nullspace import TemplateBuild
from nullspace.errors import BuildError
h = TemplateBuild.connect(os.environ["NS_BUILD"])
want = os.environ.get("NS_WANT_STATUS")
if want:  # poll until the build reaches a given (non-terminal) status
    for _ in range(200):
        if h.get_status().build.status.value == want:
            print("STATUS", want); break
        time.sleep(0.05)
    raise SystemExit(0)
try:
    final = h.wait_until_terminal(poll_interval=0.1)
    print("FINAL", final.build.status.value, len(final.entries))
except BuildError as e:
    print("ERROR", getattr(e.phase, "value", e.phase), e.retryable, e.build_id)
"#;

/// A registry address that accepts connections and never answers.
fn tarpit() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming().flatten() {
            held.push(c);
        }
    });
    addr
}

#[test]
fn cancel_stops_a_running_build() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), None);
    let key = server.key("team-a");
    let image = format!("{}/stuck/app:1", tarpit());
    let r = run_sdk(
        &server,
        &key,
        BACKGROUND,
        &[("NS_IMAGE", &image), ("NS_NAME", "stuck")],
    );
    r.ok();
    let id = r.stdout.trim().to_string();
    let r = run_sdk(
        &server,
        &key,
        WAIT,
        &[("NS_BUILD", &id), ("NS_WANT_STATUS", "building")],
    );
    assert!(
        r.stdout.contains("STATUS building"),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    let started = std::time::Instant::now();
    let r = run_sdk(
        &server,
        &key,
        "import os\nfrom nullspace import TemplateBuild\nh = TemplateBuild.connect(os.environ['NS_BUILD'])\nh.cancel(reason='stop')\nseen = []\nf = h.wait_until_terminal(poll_interval=0.05, on_log_entry=seen.append)\nprint('FINAL', f.build.status.value, f.build.cancellation_reason, [e.kind.value for e in seen][-1])",
        &[("NS_BUILD", &id)],
    );
    assert!(
        r.stdout.contains("FINAL cancelled stop cancelled"),
        "{}\n{}\n{}",
        r.stdout,
        r.stderr,
        server.log_text()
    );
    // The import was blocked in a network read with minutes of timeout left:
    // the cancel did not wait for it.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn queued_builds_survive_a_crash_and_running_ones_with_credentials_are_marked_interrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(Auth::None);
    let image = reg.push_demo(tmp.path(), "demo/app");
    let data = tmp.path().join("data");

    // 1. A server with no workers queues the build; it crashes; a new server
    //    runs the queued build from the durable queue.
    let mut server = Server::start_with(&data, None, &["--workers", "0"]);
    let key = server.key("team-a");
    let r = run_sdk(
        &server,
        &key,
        BACKGROUND,
        &[("NS_IMAGE", &image), ("NS_NAME", "queued")],
    );
    r.ok();
    let queued = r.stdout.trim().to_string();
    server.kill();
    server.args = vec![];
    server.restart();
    let r = run_sdk(&server, &key, WAIT, &[("NS_BUILD", &queued)]);
    assert!(
        r.stdout.contains("FINAL ready"),
        "{}\n{}\n{}",
        r.stdout,
        r.stderr,
        server.log_text()
    );

    // 2. A build stuck on a registry that accepts and never answers (a real
    //    tarpit on loopback), with request-time credentials (which live only
    //    in the server's memory), is running when the server is killed:
    //    after the restart it is an error with phase `interrupted`, never
    //    `building` (the restarted server finds the dead server's run
    //    directory unlocked, so it does not wait for the lease to expire).
    let stuck_image = format!("{}/stuck/app:1", tarpit());
    let r = run_sdk(
        &server,
        &key,
        BACKGROUND,
        &[
            ("NS_IMAGE", &stuck_image),
            ("NS_NAME", "stuck"),
            ("NS_USER", "u"),
            ("NS_PASS", "p"),
        ],
    );
    r.ok();
    let stuck = r.stdout.trim().to_string();
    let r = run_sdk(
        &server,
        &key,
        WAIT,
        &[("NS_BUILD", &stuck), ("NS_WANT_STATUS", "building")],
    );
    assert!(
        r.stdout.contains("STATUS building"),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    server.restart();
    let r = run_sdk(&server, &key, WAIT, &[("NS_BUILD", &stuck)]);
    assert!(
        r.stdout.contains("ERROR interrupted True"),
        "{}\n{}\n{}",
        r.stdout,
        r.stderr,
        server.log_text()
    );
    // The logs written before the crash survived it.
    let r = run_sdk(
        &server,
        &key,
        "import os\nfrom nullspace import TemplateBuild\nprint([e.kind.value for e in TemplateBuild.connect(os.environ['NS_BUILD']).logs()])",
        &[("NS_BUILD", &stuck)],
    );
    assert!(
        r.stdout.contains("'start'") && r.stdout.contains("'error'"),
        "{}",
        r.stdout
    );
}
