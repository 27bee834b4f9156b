//! The build lifecycle of the real server (buildah for Dockerfile builds, a
//! real registry, a real Postgres): leases survive other processes opening
//! the store, crashes and SIGTERM are recovered exactly once, cancel ends
//! every process of a build within 2 s, the final-artifact cache never
//! serves a moved tag, and `nullspace gc` removes only what nothing
//! references. Process checks are scoped to this test's server (its
//! descendants) and to processes rooted or running in this test's temp dir.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nullspace_testkit::image::{Compression, ImageSpec, Layer, Layout, TarLayer};
use nullspace_testkit::nullspace;
use nullspace_testkit::registry::{Auth, Registry};
use nullspace_testkit::server::{Postgres, Server};
use nullspace_vm::process::{ProcessRecord, tree};
use serde_json::{Value, json};

/// The API over plain HTTP (the SDK drives the same endpoints in the
/// suites; here the test needs raw records and entries, fast).
struct Api {
    url: String,
    key: String,
    http: reqwest::blocking::Client,
}

impl Api {
    fn new(server: &Server, key: &str) -> Api {
        Api {
            url: server.url.clone(),
            key: key.to_string(),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
        }
    }

    fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.key);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().unwrap();
        let status = resp.status();
        let text = resp.text().unwrap();
        assert!(status.is_success(), "{path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// Starts a Dockerfile build with the machine's engine; its id.
    fn start(&self, name: &str, dockerfile: &str) -> String {
        let r = self.call(
            reqwest::Method::POST,
            "/v1/templates/builds",
            Some(json!({"name": name, "dockerfile": dockerfile, "build_backend": "buildah"})),
        );
        r["build_id"].as_str().unwrap().to_string()
    }

    fn status(&self, id: &str) -> (Value, Vec<Value>) {
        let r = self.call(
            reqwest::Method::GET,
            &format!("/v1/templates/builds/{id}?offset=0"),
            None,
        );
        (
            r["build"].clone(),
            r["entries"].as_array().cloned().unwrap_or_default(),
        )
    }

    fn wait_for(
        &self,
        id: &str,
        limit: Duration,
        done: impl Fn(&Value, &[Value]) -> bool,
    ) -> (Value, Vec<Value>) {
        let deadline = Instant::now() + limit;
        loop {
            let (b, e) = self.status(id);
            if done(&b, &e) {
                return (b, e);
            }
            assert!(
                Instant::now() < deadline,
                "build {id} after {limit:?}: {b}\n{e:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_terminal(&self, id: &str) -> (Value, Vec<Value>) {
        self.wait_for(id, Duration::from_secs(600), |b, _| {
            matches!(b["status"].as_str(), Some("ready" | "error" | "cancelled"))
        })
    }
}

fn messages(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["kind"].as_str().unwrap_or(""),
                e["message"].as_str().unwrap_or("")
            )
        })
        .collect()
}

/// Processes running inside `dir` (root, cwd or command line under it),
/// other than the servers themselves (`nullspace serve`): catches a build's
/// processes even if they left the server's tree.
fn processes_in(dir: &Path) -> Vec<ProcessRecord> {
    let needle = dir.canonicalize().unwrap_or(dir.to_path_buf());
    let me = std::process::id();
    let is_server = |r: &ProcessRecord| r.cmdline.get(1).is_some_and(|a| a == "serve");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            let link = |n: &str| std::fs::read_link(format!("/proc/{pid}/{n}")).ok();
            let inside = |p: Option<PathBuf>| {
                p.is_some_and(|p| p.starts_with(&needle) && p != Path::new("/"))
            };
            inside(link("root"))
                || inside(link("cwd"))
                || std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle.to_str().unwrap()))
        })
        .filter_map(ProcessRecord::of)
        .filter(|r| !is_server(r))
        .collect()
}

/// The server's descendants (not the server itself).
fn children_of(server: &Server) -> Vec<ProcessRecord> {
    let pid = server.pid().expect("server running");
    tree(pid)
        .into_iter()
        .filter(|p| *p != pid)
        .filter_map(ProcessRecord::of)
        .collect()
}

fn needs_buildah() {
    assert!(
        nullspace_testkit::have("buildah"),
        "buildah is not installed (scripts/deps.sh installs it)"
    );
}

const SLEEPY: &str = "USER root\nRUN echo start && sleep 12 && echo slept > /slept.txt\n";

/// A build keeps running and ends `ready` while `nullspace keys create` and
/// a second server open the same store: neither changes a live build.
fn live_build_survives_other_openers(database_url: Option<&str>) {
    needs_buildah();
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(Auth::None);
    let image = reg.push_demo(tmp.path(), "demo/base");
    let data = tmp.path().join("data");
    let server = Server::start(&data, database_url);
    let key = server.key("team-a");
    let api = Api::new(&server, &key);
    let id = api.start("sleepy", &format!("FROM {image}\n{SLEEPY}"));
    api.wait_for(&id, Duration::from_secs(300), |_, e| {
        e.iter().any(|x| x["message"].as_str() == Some("start"))
    });
    // The CLI opens the data directory and the database...
    let created = server.key("team-b");
    assert!(created.starts_with("ns_"), "{created}");
    // ...and so does a second server (same data directory for SQLite; its
    // own for Postgres, as on another machine), with workers of its own.
    let other_data = if database_url.is_some() {
        tmp.path().join("data-b")
    } else {
        data.clone()
    };
    let second = Server::start(&other_data, database_url);
    std::thread::sleep(Duration::from_secs(2));
    let (b, _) = api.status(&id);
    assert_eq!(b["status"], "building", "{b}");
    let (b, e) = api.wait_terminal(&id);
    assert_eq!(
        b["status"],
        "ready",
        "{b}\n{:#?}\n{}",
        messages(&e),
        server.log_text()
    );
    let m = messages(&e);
    assert!(
        !m.iter()
            .any(|l| l.contains("queued again") || l.contains("interrupted")),
        "{m:#?}"
    );
    assert_eq!(
        m.iter().filter(|l| l.contains("started")).count(),
        1,
        "{m:#?}"
    );
    drop(second);
}

#[test]
fn a_live_build_survives_keys_create_and_a_second_server_on_sqlite() {
    live_build_survives_other_openers(None);
}

#[test]
fn a_live_build_survives_keys_create_and_a_second_server_on_postgres() {
    let pg = Postgres::start();
    live_build_survives_other_openers(Some(&pg.url));
}

/// SIGKILL mid-build: the restarted server ends what the dead one left,
/// re-queues the build exactly once, and runs it to `ready`; nothing stays
/// `building`.
#[test]
fn a_build_of_a_killed_server_is_requeued_once_and_finishes() {
    needs_buildah();
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(Auth::None);
    let image = reg.push_demo(tmp.path(), "demo/base");
    let data = tmp.path().join("data");
    let mut server = Server::start_with(&data, None, &["--build-lease-secs", "4"]);
    let key = server.key("team-a");
    let api = Api::new(&server, &key);
    let id = api.start("crash", &format!("FROM {image}\n{SLEEPY}"));
    api.wait_for(&id, Duration::from_secs(300), |_, e| {
        e.iter().any(|x| x["message"].as_str() == Some("start"))
    });
    let left: Vec<ProcessRecord> = children_of(&server);
    assert!(!left.is_empty(), "the build runs processes");
    server.kill();
    server.start_again();
    let (b, e) = api.wait_terminal(&id);
    let m = messages(&e);
    assert_eq!(b["status"], "ready", "{b}\n{m:#?}\n{}", server.log_text());
    assert_eq!(
        m.iter().filter(|l| l.contains("queued again")).count(),
        1,
        "re-queued exactly once: {m:#?}"
    );
    assert!(m.iter().any(|l| l.contains("(attempt 2)")), "{m:#?}");
    // The first attempt's processes are gone (PR_SET_PDEATHSIG, or the
    // restarted server's reaper).
    assert!(!left.iter().any(ProcessRecord::is_running), "{left:?}");
    // Nothing stays building.
    let page = api.call(
        reqwest::Method::GET,
        "/v1/templates/refs/crash/builds?status=building",
        None,
    );
    assert_eq!(page["builds"].as_array().map(Vec::len), Some(0), "{page}");
}

/// Two servers on one Postgres, each with its own data directory (two
/// machines): the one running a build is killed; the other recovers it
/// once its lease expires, exactly once, and runs it to `ready`.
#[test]
fn another_server_recovers_a_dead_servers_build_when_its_lease_expires() {
    needs_buildah();
    let tmp = tempfile::tempdir().unwrap();
    let pg = Postgres::start();
    let reg = Registry::start(Auth::None);
    let image = reg.push_demo(tmp.path(), "demo/base");
    let lease = ["--build-lease-secs", "4"];
    // B takes no work until A holds the build.
    let mut a = Server::start_with(&tmp.path().join("a"), Some(&pg.url), &lease);
    let key = a.key("team-a");
    let api_a = Api::new(&a, &key);
    let id = api_a.start("dies", &format!("FROM {image}\n{SLEEPY}"));
    api_a.wait_for(&id, Duration::from_secs(300), |_, e| {
        e.iter().any(|x| x["message"].as_str() == Some("start"))
    });
    let b = Server::start_with(&tmp.path().join("b"), Some(&pg.url), &lease);
    let api_b = Api::new(&b, &key);
    let killed = Instant::now();
    a.kill();
    let (rec, e) = api_b.wait_terminal(&id);
    let m = messages(&e);
    assert_eq!(rec["status"], "ready", "{rec}\n{m:#?}\n{}", b.log_text());
    let requeues: Vec<_> = m.iter().filter(|l| l.contains("queued again")).collect();
    assert_eq!(requeues.len(), 1, "{m:#?}");
    assert!(requeues[0].contains("stopped renewing its lease"), "{m:#?}");
    eprintln!(
        "recovered and rebuilt {} ms after the kill",
        killed.elapsed().as_millis()
    );
}

/// Cancel during a Dockerfile `RUN sleep 60`: every process of the build
/// ends within 2 s of the request, and the `cancelled` entry is the last.
#[test]
fn cancel_during_a_dockerfile_run_ends_every_process_within_2_s() {
    needs_buildah();
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(Auth::None);
    let image = reg.push_demo(tmp.path(), "demo/base");
    let data = tmp.path().join("data");
    let server = Server::start(&data, None);
    let key = server.key("team-a");
    let api = Api::new(&server, &key);
    let id = api.start(
        "cancel",
        &format!("FROM {image}\nUSER root\nRUN echo go && sleep 60\n"),
    );
    api.wait_for(&id, Duration::from_secs(300), |_, e| {
        e.iter().any(|x| x["message"].as_str() == Some("go"))
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !children_of(&server)
        .iter()
        .any(|p| p.cmdline.first().is_some_and(|c| c.ends_with("sleep")))
    {
        assert!(
            Instant::now() < deadline,
            "no sleep process: {:?}",
            children_of(&server)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = children_of(&server);
    let asked = Instant::now();
    api.call(
        reqwest::Method::POST,
        &format!("/v1/templates/builds/{id}/cancel"),
        Some(json!({"reason": "stop"})),
    );
    let mut gone_after = None;
    while asked.elapsed() < Duration::from_secs(5) {
        if children_of(&server).is_empty()
            && processes_in(tmp.path()).is_empty()
            && !before.iter().any(ProcessRecord::is_running)
        {
            gone_after = Some(asked.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let gone_after = gone_after.unwrap_or_else(|| {
        panic!(
            "still running 5 s after the cancel: {:?} {:?}",
            children_of(&server),
            processes_in(tmp.path())
        )
    });
    eprintln!(
        "cancel: every process gone {} ms after the request",
        gone_after.as_millis()
    );
    assert!(gone_after < Duration::from_secs(2), "{gone_after:?}");
    let (b, e) = api.wait_terminal(&id);
    assert_eq!(b["status"], "cancelled", "{b}");
    assert_eq!(b["cancellation_reason"], "stop");
    // Nothing follows the terminal entry, even a while later.
    std::thread::sleep(Duration::from_secs(1));
    let (_, e2) = api.status(&id);
    assert_eq!(e2.len(), e.len());
    assert_eq!(
        e2.last().unwrap()["kind"],
        "cancelled",
        "{:#?}",
        messages(&e2)
    );
}

/// SIGTERM during a build: the server stops it, hands it back (re-queued:
/// it has no request-time credentials) and exits with no child process
/// left; the next server runs it.
#[test]
fn sigterm_during_a_build_leaves_no_child_process() {
    needs_buildah();
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(Auth::None);
    let image = reg.push_demo(tmp.path(), "demo/base");
    let data = tmp.path().join("data");
    let mut server = Server::start(&data, None);
    let key = server.key("team-a");
    let api = Api::new(&server, &key);
    let id = api.start("term", &format!("FROM {image}\n{SLEEPY}"));
    api.wait_for(&id, Duration::from_secs(300), |_, e| {
        e.iter().any(|x| x["message"].as_str() == Some("start"))
    });
    let kids = children_of(&server);
    assert!(!kids.is_empty());
    let t = Instant::now();
    let status = server.terminate(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit: {status:?}\n{}",
        server.log_text()
    );
    eprintln!(
        "SIGTERM: server exited after {} ms",
        t.elapsed().as_millis()
    );
    assert!(
        !kids.iter().any(ProcessRecord::is_running),
        "left running: {kids:?}"
    );
    assert!(
        processes_in(tmp.path()).is_empty(),
        "{:?}",
        processes_in(tmp.path())
    );
    assert!(
        !data.join("run").read_dir().unwrap().any(|_| true),
        "run/ not released"
    );
    server.start_again();
    let (b, e) = api.wait_terminal(&id);
    let m = messages(&e);
    assert_eq!(b["status"], "ready", "{b}\n{m:#?}");
    assert_eq!(
        m.iter()
            .filter(|l| l.contains("the server stopped; the build is queued again"))
            .count(),
        1,
        "{m:#?}"
    );
}

/// A busybox image whose `/marker.txt` says `marker`.
fn marker_image(dir: &Path, marker: &str) -> PathBuf {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static");
    let mut base = TarLayer::new()
        .dir("bin", 0o755)
        .file("bin/busybox", 0o755, &busybox)
        .dir("root", 0o700)
        .file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
    for applet in ["sh", "cp", "cat", "echo", "sleep"] {
        base = base.symlink(&format!("bin/{applet}"), "busybox");
    }
    let img = ImageSpec::new(vec![
        Layer::new(base.into_tar(), Compression::Gzip),
        Layer::new(
            TarLayer::new()
                .file("marker.txt", 0o644, marker.as_bytes())
                .into_tar(),
            Compression::Gzip,
        ),
    ])
    .config(json!({"Env": ["PATH=/bin"]}))
    .build();
    let layout = dir.join(format!("layout-{marker}"));
    Layout::create(&layout).image("1", &img).finish();
    layout
}

fn rootfs_file(data: &Path, build: &Value, path: &str) -> Vec<u8> {
    let art = build["artifact_ids"][0].as_str().unwrap();
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(data.join("artifacts/sha256").join(&art[7..])).unwrap(),
    )
    .unwrap();
    let rootfs = data
        .join("artifacts/sha256")
        .join(&manifest["rootfs"].as_str().unwrap()[7..]);
    let fs = mkext4::reader::Fs::open(std::fs::File::open(rootfs).unwrap()).unwrap();
    fs.read_file(fs.resolve(path).unwrap()).unwrap()
}

/// Push, build, build again (a hit), re-push another image under the same
/// tag, build again: a miss, built from the new image.
#[test]
fn a_moved_tag_is_not_served_from_the_final_artifact_cache() {
    needs_buildah();
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(Auth::None);
    let image = reg.push_layout(&marker_image(tmp.path(), "one"), "1", "moving/base");
    let data = tmp.path().join("data");
    let server = Server::start(&data, None);
    let key = server.key("team-a");
    let api = Api::new(&server, &key);
    let df = format!("FROM {image}\nRUN cp /marker.txt /copy.txt\n");
    let cache = |b: &Value| {
        (
            b["cache_summary"]["final_artifact_hits"].as_i64(),
            b["cache_summary"]["final_artifact_misses"].as_i64(),
        )
    };
    let (b1, _) = api.wait_terminal(&api.start("moving", &df));
    assert_eq!(b1["status"], "ready", "{b1}");
    assert_eq!(cache(&b1), (Some(0), Some(1)));
    assert_eq!(rootfs_file(&data, &b1, "/copy.txt"), b"one");
    let (b2, _) = api.wait_terminal(&api.start("moving", &df));
    assert_eq!(cache(&b2), (Some(1), Some(0)), "the same inputs hit: {b2}");
    // The tag moves.
    reg.push_layout(&marker_image(tmp.path(), "two"), "1", "moving/base");
    let (b3, e3) = api.wait_terminal(&api.start("moving", &df));
    assert_eq!(b3["status"], "ready", "{b3}");
    assert_eq!(
        cache(&b3),
        (Some(0), Some(1)),
        "a moved tag missed: {:#?}",
        messages(&e3)
    );
    assert_eq!(rootfs_file(&data, &b3, "/copy.txt"), b"two");
}

fn gc(data: &Path, extra: &[&str]) -> (Vec<String>, String) {
    let mut args = vec!["gc", "--data-dir", data.to_str().unwrap()];
    args.extend_from_slice(extra);
    let r = nullspace(&args);
    r.ok();
    (r.stdout.lines().map(str::to_string).collect(), r.stderr)
}

/// Two templates; one deleted; `nullspace gc` removes that one's artifacts
/// (and its cache entry, and old leftovers) and nothing the other needs:
/// the other still builds from the cache, from a complete artifact.
#[test]
fn gc_removes_what_nothing_references_and_nothing_that_something_does() {
    needs_buildah();
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(Auth::None);
    let image = reg.push_demo(tmp.path(), "demo/base");
    let data = tmp.path().join("data");
    let server = Server::start_with(&data, None, &["--gc-interval-secs", "0"]);
    let key = server.key("team-a");
    let api = Api::new(&server, &key);
    let df = |what: &str| format!("FROM {image}\nUSER root\nRUN echo {what} > /what.txt\n");
    let (keep, _) = api.wait_terminal(&api.start("keep", &df("keep")));
    let (gone, _) = api.wait_terminal(&api.start("gone", &df("gone")));
    assert_eq!(
        (keep["status"].as_str(), gone["status"].as_str()),
        (Some("ready"), Some("ready"))
    );
    let files = |b: &Value| -> Vec<PathBuf> {
        let art = b["artifact_ids"][0].as_str().unwrap();
        let manifest: Value = serde_json::from_slice(
            &std::fs::read(data.join("artifacts/sha256").join(&art[7..])).unwrap(),
        )
        .unwrap();
        [art, manifest["rootfs"].as_str().unwrap()]
            .iter()
            .map(|d| data.join("artifacts/sha256").join(&d[7..]))
            .collect()
    };
    let keep_files = files(&keep);
    let gone_files = files(&gone);
    // Leftovers of a crashed run, however young: a spool nobody holds, the
    // work directory of a build that is not live.
    let stale_tmp = data.join("artifacts/tmp/put-deadbeef");
    std::fs::write(&stale_tmp, b"partial").unwrap();
    let stale_work = data.join("work/tb_0123456789abcdef01234567.1");
    std::fs::create_dir_all(&stale_work).unwrap();
    // A spool a live writer holds (its flock) is no leftover.
    let held_tmp = data.join("artifacts/tmp/blob-held");
    std::fs::write(&held_tmp, b"in flight").unwrap();
    let held = std::fs::File::open(&held_tmp).unwrap();
    held.lock().unwrap();
    // Each build leased what it stored until its record referenced it;
    // both ended, so their leases keep nothing now.
    let leases = data.join("artifacts/leases");
    for b in [&keep, &gone] {
        assert!(
            leases.join(b["build_id"].as_str().unwrap()).is_dir(),
            "no lease of {b}"
        );
    }
    api.call(reqwest::Method::DELETE, "/v1/templates/refs/gone", None);

    // A dry run lists, with sizes, and removes nothing.
    let (dry, _) = gc(&data, &["--dry-run"]);
    let listed = |p: &Path| dry.iter().any(|l| l.contains(p.to_str().unwrap()));
    assert!(gone_files.iter().all(|p| listed(p)), "{dry:#?}");
    assert!(!keep_files.iter().any(|p| listed(p)), "{dry:#?}");
    assert!(listed(&stale_tmp) && listed(&stale_work), "{dry:#?}");
    assert!(!listed(&held_tmp), "{dry:#?}");
    for b in [&keep, &gone] {
        let id = b["build_id"].as_str().unwrap();
        assert!(
            dry.iter()
                .any(|l| l.starts_with("would remove lease") && l.contains(id)),
            "{dry:#?}"
        );
    }
    assert!(
        dry.iter()
            .any(|l| l.starts_with("would remove cache_entry")),
        "{dry:#?}"
    );
    let rootfs_line = dry
        .iter()
        .find(|l| l.contains(gone_files[1].to_str().unwrap()))
        .unwrap();
    assert!(!rootfs_line.contains("(0 bytes)"), "{rootfs_line}");
    assert!(gone_files.iter().all(|p| p.exists()) && stale_tmp.exists());

    let (done, _) = gc(&data, &[]);
    assert!(done.last().unwrap().starts_with("removed"), "{done:#?}");
    assert!(!gone_files.iter().any(|p| p.exists()), "{done:#?}");
    assert!(keep_files.iter().all(|p| p.exists()), "{done:#?}");
    assert!(!stale_tmp.exists() && !stale_work.exists());
    assert!(held_tmp.exists(), "a held spool was collected");
    drop(held);
    assert_eq!(std::fs::read_dir(&leases).unwrap().count(), 0, "{done:#?}");
    let (g, _) = api.status(gone["build_id"].as_str().unwrap());
    assert_eq!(g["artifact_availability"]["status"], "unavailable", "{g}");

    // The kept template still builds from the cache, from artifacts that
    // are all there; the deleted one builds anew.
    let (k2, _) = api.wait_terminal(&api.start("keep", &df("keep")));
    assert_eq!(k2["cache_summary"]["final_artifact_hits"], 1, "{k2}");
    assert_eq!(rootfs_file(&data, &k2, "/what.txt"), b"keep\n");
    let (g2, _) = api.wait_terminal(&api.start("gone", &df("gone")));
    assert_eq!(g2["status"], "ready");
    assert_eq!(g2["cache_summary"]["final_artifact_hits"], 0, "{g2}");
    assert_eq!(rootfs_file(&data, &g2, "/what.txt"), b"gone\n");
    // A second collection finds nothing more to take from live templates.
    let (again, _) = gc(&data, &["--dry-run"]);
    assert!(
        !again
            .iter()
            .any(|l| keep_files.iter().any(|p| l.contains(p.to_str().unwrap()))),
        "{again:#?}"
    );
}

/// A cancel sent to server B for a build running on server A (one
/// Postgres) reaches A: A's processes for it end within 2 s and the build
/// ends `cancelled`, its last entry the terminal one.
#[test]
fn a_cancel_sent_to_another_server_reaches_the_owner() {
    needs_buildah();
    let tmp = tempfile::tempdir().unwrap();
    let pg = Postgres::start();
    let reg = Registry::start(Auth::None);
    let image = reg.push_demo(tmp.path(), "demo/base");
    let a = Server::start(&tmp.path().join("a"), Some(&pg.url));
    let key = a.key("team-a");
    let api_a = Api::new(&a, &key);
    let id = api_a.start(
        "remote",
        &format!("FROM {image}\nUSER root\nRUN echo go && sleep 60\n"),
    );
    api_a.wait_for(&id, Duration::from_secs(300), |_, e| {
        e.iter().any(|x| x["message"].as_str() == Some("go"))
    });
    let b = Server::start_with(&tmp.path().join("b"), Some(&pg.url), &["--workers", "0"]);
    let api_b = Api::new(&b, &key);
    let before = children_of(&a);
    assert!(!before.is_empty());
    let asked = Instant::now();
    api_b.call(
        reqwest::Method::POST,
        &format!("/v1/templates/builds/{id}/cancel"),
        Some(json!({"reason": "from b"})),
    );
    while (before.iter().any(ProcessRecord::is_running) || !children_of(&a).is_empty())
        && asked.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let gone_after = asked.elapsed();
    eprintln!(
        "cross-server cancel: the owner's processes gone {} ms after the request",
        gone_after.as_millis()
    );
    assert!(
        gone_after < Duration::from_secs(2),
        "{gone_after:?}: {:?}",
        children_of(&a)
    );
    let (rec, e) = api_b.wait_terminal(&id);
    assert_eq!(rec["status"], "cancelled", "{rec}");
    assert_eq!(rec["cancellation_reason"], "from b");
    assert_eq!(
        e.last().unwrap()["kind"],
        "cancelled",
        "{:#?}",
        messages(&e)
    );
}

/// A server frozen (SIGSTOP) past its lease loses its build to another
/// server, which re-queues and finishes it; thawed, the stale server's
/// worker finds its lease gone, stops, and writes nothing: one re-queue,
/// one `end`, the new owner's result.
#[test]
fn a_stale_server_that_lost_its_lease_writes_nothing() {
    needs_buildah();
    let tmp = tempfile::tempdir().unwrap();
    let pg = Postgres::start();
    let reg = Registry::start(Auth::None);
    let image = reg.push_demo(tmp.path(), "demo/base");
    let lease = ["--build-lease-secs", "3"];
    let a = Server::start_with(&tmp.path().join("a"), Some(&pg.url), &lease);
    let key = a.key("team-a");
    let api_a = Api::new(&a, &key);
    let id = api_a.start("stale", &format!("FROM {image}\n{SLEEPY}"));
    api_a.wait_for(&id, Duration::from_secs(300), |_, e| {
        e.iter().any(|x| x["message"].as_str() == Some("start"))
    });
    let a_pid = a.pid().unwrap().to_string();
    nullspace_testkit::run(std::process::Command::new("kill").args(["-STOP", &a_pid])).ok();
    let b = Server::start_with(&tmp.path().join("b"), Some(&pg.url), &lease);
    let api_b = Api::new(&b, &key);
    // B recovers the build and starts it again (attempt 2).
    api_b.wait_for(&id, Duration::from_secs(120), |_, e| {
        e.iter().any(|x| {
            x["message"]
                .as_str()
                .is_some_and(|m| m.contains("(attempt 2)"))
        })
    });
    nullspace_testkit::run(std::process::Command::new("kill").args(["-CONT", &a_pid])).ok();
    let (rec, e) = api_b.wait_terminal(&id);
    let m = messages(&e);
    assert_eq!(rec["status"], "ready", "{rec}\n{m:#?}");
    assert_eq!(
        m.iter().filter(|l| l.contains("queued again")).count(),
        1,
        "{m:#?}"
    );
    assert_eq!(e.iter().filter(|x| x["kind"] == "end").count(), 1, "{m:#?}");
    // A noticed, and its late result changed nothing.
    let deadline = Instant::now() + Duration::from_secs(30);
    // (Either its monitor stopped the worker, or the worker's final write
    // was refused: both say another server owns the build.)
    while !a.log_text().contains("another server") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(a.log_text().contains("another server"), "{}", a.log_text());
    std::thread::sleep(Duration::from_secs(1));
    let (after, e2) = api_b.status(&id);
    assert_eq!(
        e2.len(),
        e.len(),
        "entries after the end: {:#?}",
        messages(&e2)
    );
    assert_eq!(after["updated_at"], rec["updated_at"]);
}
