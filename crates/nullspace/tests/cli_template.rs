//! `nullspace template …` against the real server (`nullspace serve`) and a
//! real registry on loopback, with an image written by the testkit.

use std::process::Command;

use nullspace_testkit::image::{Compression, ImageSpec, Layer, Layout, TarLayer};
use nullspace_testkit::registry::{Auth, Registry};
use nullspace_testkit::server::Server;
use nullspace_testkit::{Run, nullspace_bin, run};
use serde_json::{Value, json};

/// A server with a key for namespace `team-a`, and a registry holding one
/// small image.
struct Env {
    server: Server,
    key: String,
    _reg: Registry,
    image: String,
    _tmp: tempfile::TempDir,
}

fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), None);
    let key = server.key("team-a");
    assert!(key.len() > 10, "no API key printed");
    let reg = Registry::start(Auth::None);
    let layer = TarLayer::new()
        .dir("etc", 0o755)
        .file("etc/os-release", 0o644, b"ID=testkit\n")
        .dir("bin", 0o755)
        .file("bin/app", 0o755, b"#!/bin/sh\necho app\n")
        .into_tar();
    let img = ImageSpec::new(vec![Layer::new(layer, Compression::Gzip)])
        .config(json!({"Env": ["PATH=/usr/bin:/bin", "GREETING=hi"], "WorkingDir": "/srv", "Cmd": ["/bin/app"]}))
        .build();
    let layout = tmp.path().join("layout");
    Layout::create(&layout).image("v1", &img).finish();
    let image = reg.push_layout(&layout, "v1", "team/app");
    Env {
        server,
        key,
        _reg: reg,
        image,
        _tmp: tmp,
    }
}

impl Env {
    fn cli_with_key(&self, key: &str, args: &[&str]) -> Run {
        let mut cmd = Command::new(nullspace_bin());
        cmd.args(["template"])
            .args(args)
            .env("NULLSPACE_API_URL", &self.server.url)
            .env("NULLSPACE_API_KEY", key)
            .env_remove("NULLSPACE_BASE_URL")
            .env_remove("NULLSPACE_REGISTRY_USERNAME")
            .env_remove("NULLSPACE_REGISTRY_PASSWORD");
        run(&mut cmd)
    }

    fn cli(&self, args: &[&str]) -> Run {
        self.cli_with_key(&self.key, args)
    }

    /// Runs a command that must succeed, with the server log on failure.
    fn ok(&self, args: &[&str]) -> Run {
        let r = self.cli(args);
        assert!(
            r.status.success(),
            "nullspace template {args:?} failed ({}):\nstdout: {}\nstderr: {}\nserver log: {}",
            r.status,
            r.stdout,
            r.stderr,
            self.server.log_text()
        );
        r
    }

    fn ok_json(&self, args: &[&str]) -> Value {
        let r = self.ok(args);
        serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", r.stdout))
    }

    /// Starts a background build and returns its id.
    fn background(&self, name: &str, extra: &[&str]) -> String {
        let mut args = vec![
            "build",
            "--from-image",
            &self.image,
            "--name",
            name,
            "--background",
        ];
        args.extend_from_slice(extra);
        let r = self.ok(&args);
        let id = r.stdout.trim().to_string();
        assert!(
            id.starts_with("tb_") && !id.contains('\n'),
            "build id on stdout: {:?}",
            r.stdout
        );
        id
    }
}

/// The one-line error contract: exit 1, a single `error: …` line on stderr.
fn assert_one_line_error(r: &Run, needle: &str) {
    assert_eq!(
        r.status.code(),
        Some(1),
        "stdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one stderr line expected: {:?}", r.stderr);
    assert!(lines[0].starts_with("error: "), "{:?}", lines[0]);
    assert!(
        lines[0].contains(needle),
        "{:?} does not contain {needle:?}",
        lines[0]
    );
}

#[test]
fn blocking_build_then_manage_the_template() {
    let e = env();
    let r = e.ok(&[
        "build",
        "--from-image",
        &e.image,
        "--name",
        "app",
        "--tag",
        "v1",
    ]);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(
        lines.first().is_some_and(|l| l.starts_with("==> ")),
        "start entry first: {}",
        r.stdout
    );
    let end = lines.iter().rposition(|l| l.starts_with("==> ")).unwrap();
    assert!(end > 0, "an end entry after the start: {}", r.stdout);
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with("ready: team-a/app:v1 (template tmpl_"),
        "final line: {}",
        r.stdout
    );

    // The build shows up in the template's history.
    let builds = e.ok_json(&["builds", "app", "--json"]);
    let list = builds["builds"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{builds}");
    assert_eq!(list[0]["status"], "ready");
    assert_eq!(list[0]["source_type"], "oci_import");
    let text = e.ok(&["builds", "app", "--status", "ready"]).stdout;
    assert!(
        text.contains(list[0]["build_id"].as_str().unwrap()) && text.contains("ready"),
        "{text}"
    );
    let none = e.ok(&["builds", "app", "--status", "error"]).stdout;
    assert!(none.trim().is_empty(), "{none}");

    // list / get / exists
    let all = e.ok_json(&["list", "--json"]);
    assert!(
        all.as_array()
            .unwrap()
            .iter()
            .any(|t| t["canonical_ref"] == "team-a/app:v1"),
        "{all}"
    );
    assert!(e.ok(&["list"]).stdout.contains("team-a/app:v1"));
    let info = e.ok_json(&["get", "app", "--json"]);
    assert_eq!(info["name"], "app");
    assert_eq!(info["tags"], json!(["v1"]));
    let tmpl_id = info["id"].as_str().unwrap().to_string();
    // A namespaced ref travels as one percent-encoded segment.
    assert_eq!(
        e.ok_json(&["get", "team-a/app:v1", "--json"])["id"],
        tmpl_id.as_str()
    );
    assert_eq!(
        e.ok_json(&["exists", "app"]),
        json!({"template_ref": "app", "exists": true})
    );
    assert_eq!(
        e.ok_json(&["exists", "nope"]),
        json!({"template_ref": "nope", "exists": false})
    );
    let fields = e.ok_json(&["get", "app", "--fields", "id,name"]);
    assert_eq!(fields, json!({"id": tmpl_id, "name": "app"}));

    // tags
    let assigned = e.ok_json(&["tag", "assign", "app", "stable", "prod", "--json"]);
    let tags: Vec<&str> = assigned["tags"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        tags.contains(&"stable") && tags.contains(&"prod") && tags.contains(&"v1"),
        "{assigned}"
    );
    let listed = e.ok_json(&["tag", "list", "app", "--json"]);
    assert_eq!(listed.as_array().unwrap().len(), 3, "{listed}");
    assert!(e.ok(&["tag", "list", "app"]).stdout.contains("stable"));
    e.ok(&["tag", "remove", "app", "prod"]);
    let listed = e.ok_json(&["tag", "list", "app", "--json"]);
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["tag"].as_str())
        .collect();
    assert!(
        !names.contains(&"prod") && names.contains(&"stable"),
        "{listed}"
    );

    // rename: the old name still resolves (an alias) to the same template.
    let renamed = e.ok_json(&["rename", "app", "app2", "--json"]);
    assert_eq!(renamed["name"], "app2");
    assert_eq!(renamed["id"], tmpl_id.as_str());
    assert_eq!(e.ok_json(&["get", "app", "--json"])["id"], tmpl_id.as_str());
    assert_eq!(e.ok_json(&["get", "app2", "--json"])["name"], "app2");

    // delete
    assert!(e.ok(&["delete", "app2"]).stdout.contains("deleted app2"));
    assert_eq!(e.ok_json(&["exists", "app2"])["exists"], false);
    let r = e.cli(&["get", "app2"]);
    assert_one_line_error(&r, "(code template_not_found)");
}

#[test]
fn background_build_wait_status_logs_cancel_promote_retry() {
    let e = env();
    let id = e.background("bg", &["--tag", "one"]);

    let w = e.ok(&["wait", &id, "--poll-interval-ms", "50"]);
    assert!(
        w.stdout
            .lines()
            .next()
            .is_some_and(|l| l.starts_with("==> ")),
        "{}",
        w.stdout
    );
    assert!(
        w.stdout
            .lines()
            .last()
            .unwrap()
            .starts_with("ready: team-a/bg:one (template tmpl_"),
        "{}",
        w.stdout
    );

    // build-status: the whole log from 0, then only the tail from an offset.
    let full = e.ok_json(&["build-status", &id]);
    assert_eq!(full["build"]["build_id"], id.as_str());
    assert_eq!(full["build"]["status"], "ready");
    let n = full["entries"].as_array().unwrap().len() as u64;
    assert!(n >= 2, "{full}");
    assert_eq!(full["next_offset"], n);
    let tail = e.ok_json(&["build-status", &id, "--offset", &(n - 1).to_string()]);
    assert_eq!(tail["entries"].as_array().unwrap().len(), 1, "{tail}");
    assert_eq!(tail["entries"][0]["kind"], "end");
    assert_eq!(tail["next_offset"], n);

    // wait from an offset prints only the rest.
    let w2 = e.ok(&[
        "wait",
        &id,
        "--offset",
        &(n - 1).to_string(),
        "--log-format",
        "jsonl",
    ]);
    let first: Value = serde_json::from_str(w2.stdout.lines().next().unwrap()).unwrap();
    assert_eq!(first["kind"], "end");
    assert_eq!(first["offset"], n - 1);

    // logs: replay and follow both end on their own on a finished build.
    let replay = e.ok(&["logs", &id, "--json"]);
    let entries: Vec<Value> = replay
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(entries.len() as u64, n);
    assert_eq!(entries[0]["kind"], "start");
    assert_eq!(entries.last().unwrap()["kind"], "end");
    let follow = e.ok(&["logs", &id, "--follow"]);
    assert_eq!(
        follow
            .stdout
            .lines()
            .filter(|l| l.starts_with("==> "))
            .count(),
        2,
        "{}",
        follow.stdout
    );
    let from = e.ok(&["logs", &id, "--offset", &(n - 1).to_string(), "--json"]);
    assert_eq!(from.stdout.lines().count(), 1, "{}", from.stdout);

    // cancel of a finished build changes nothing, twice.
    for _ in 0..2 {
        let c = e.ok_json(&["cancel", &id, "--reason", "late", "--json"]);
        assert_eq!(c["build"]["status"], "ready", "{c}");
    }
    assert_eq!(
        e.ok(&["cancel", &id]).stdout.trim(),
        format!("build {id}: ready")
    );

    // promote
    let p = e.ok_json(&["promote", &id, "--tag", "golden", "--json"]);
    assert!(
        p["tags"].as_array().unwrap().contains(&json!("golden")),
        "{p}"
    );
    let tags = e.ok_json(&["tag", "list", "bg", "--json"]);
    let golden = tags
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tag"] == "golden")
        .expect("golden tag");
    assert_eq!(golden["build_id"], id.as_str());

    // retry: a new attempt that points back at the old one.
    let rec = e.ok_json(&["retry", &id, "--tag", "again", "--json"]);
    let new_id = rec["build_id"].as_str().unwrap().to_string();
    assert_ne!(new_id, id);
    assert_eq!(rec["retry_of_build_id"], id.as_str());
    let done = e.ok_json(&["wait", &new_id, "--json", "--poll-interval-ms", "50"]);
    assert_eq!(done["status"], "ready");
    assert_eq!(done["tags"], json!(["again"]));
    let history = e.ok_json(&["builds", "bg", "--json", "--limit", "1"]);
    assert_eq!(history["builds"].as_array().unwrap().len(), 1);
    assert!(
        history["next_cursor"].is_string(),
        "two builds, page of one: {history}"
    );
    let cursor = history["next_cursor"].as_str().unwrap();
    let page2 = e.ok_json(&["builds", "bg", "--json", "--limit", "1", "--cursor", cursor]);
    assert_eq!(page2["builds"][0]["build_id"], id.as_str(), "{page2}");
}

#[test]
fn blocking_build_json_and_failures() {
    let e = env();
    // --json: the log goes to stderr, stdout is the final record.
    let r = e.ok(&[
        "build",
        "--from-image",
        &e.image,
        "--name",
        "j",
        "--json",
        "--ready-port",
        "8080",
        "--start-cmd",
        "/bin/app",
    ]);
    let rec: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(rec["status"], "ready");
    assert_eq!(rec["name"], "j");
    assert_eq!(rec["runtime_defaults"]["start_cmd"], "/bin/app");
    assert_eq!(rec["runtime_defaults"]["readiness"]["kind"], "tcp");
    assert!(
        r.stderr.lines().any(|l| l.starts_with("==> ")),
        "{}",
        r.stderr
    );

    // quiet: only the result line.
    let q = e.ok(&[
        "build",
        "--from-image",
        &e.image,
        "--name",
        "q",
        "--log-format",
        "quiet",
    ]);
    assert_eq!(q.stdout.lines().count(), 1, "{}", q.stdout);
    assert!(
        q.stdout.starts_with("ready: team-a/q:default"),
        "{}",
        q.stdout
    );

    // A missing image: the stream's error entry becomes the one-line error.
    let missing = e.image.replace(":v1", ":missing");
    let r = e.cli(&[
        "build",
        "--from-image",
        &missing,
        "--name",
        "bad",
        "--log-format",
        "quiet",
    ]);
    assert_one_line_error(&r, "(code build_error, phase ");
    let r = e.cli(&[
        "build",
        "--from-image",
        &missing,
        "--name",
        "bad2",
        "--background",
    ]);
    let id = r.stdout.trim().to_string();
    assert!(r.status.success(), "{}", r.stderr);
    let w = e.cli(&["wait", &id, "--log-format", "quiet"]);
    assert_one_line_error(&w, "(code build_error, phase ");

    // An unknown build id.
    let r = e.cli(&["build-status", "tb_doesnotexist"]);
    assert_one_line_error(&r, "(code template_build_not_found)");
}

#[test]
fn validate_plan_and_dry_run() {
    let e = env();
    let ok = e.ok(&["validate", "--from-image", &e.image, "--name", "v"]);
    assert_eq!(ok.stdout.lines().next(), Some("valid"), "{}", ok.stdout);

    // Server-side validation: an empty tag.
    let r = e.cli(&["validate", "--from-image", &e.image, "--tag", ""]);
    assert_eq!(r.status.code(), Some(1));
    assert!(r.stdout.starts_with("invalid"), "{}", r.stdout);
    assert!(r.stdout.contains("[invalid_tags]"), "{}", r.stdout);
    assert!(
        r.stderr
            .contains("the build request is invalid (1 error(s))"),
        "{}",
        r.stderr
    );
    let r = e.cli(&[
        "validate",
        "--json",
        "--from-image",
        &e.image,
        "--tag",
        "",
        "--set-runtime-env",
        "1BAD=x",
    ]);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["valid"], false);
    let codes: Vec<&str> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["code"].as_str())
        .collect();
    assert!(
        codes.contains(&"invalid_tags") && codes.contains(&"invalid_env"),
        "{v}"
    );

    // Client-side, as the SDK: probes only target the sandbox's localhost.
    let r = e.cli(&[
        "validate",
        "--from-image",
        &e.image,
        "--ready-url",
        "https://example.com:1/",
    ]);
    assert_one_line_error(&r, "--ready-url \"https://example.com:1/\": only http://");
    let r = e.cli(&[
        "validate",
        "--from-image",
        &e.image,
        "--ready-url",
        "http://example.com:1/",
    ]);
    assert_one_line_error(&r, "localhost");

    // plan
    let plan = e.ok_json(&[
        "plan",
        "--from-image",
        &e.image,
        "--run-cmd",
        "echo hi",
        "--set-workdir",
        "/w",
    ]);
    assert!(plan["build_plan"].is_object(), "{plan}");
    assert_eq!(plan["source_type"], "declarative");
    assert_eq!(plan["requires_base_image_auth"], false);

    // --dry-run: the request as sent, secrets and passwords redacted; no
    // server needed (no API key either).
    let mut cmd = Command::new(nullspace_bin());
    cmd.args([
        "template",
        "build",
        "--dry-run",
        "--from-image",
        "r.example/x:1",
        "--name",
        "d",
        "--build-secret",
        "x=SUPERSECRET",
        "--registry-username",
        "u",
        "--registry-password",
        "PASSW0RD",
        "--apt-install",
        "curl,git",
        "--run-cmd",
        "echo one",
        "--run-user",
        "app",
        "--backend",
        "buildkit",
    ])
    .env_remove("NULLSPACE_API_URL")
    .env_remove("NULLSPACE_API_KEY");
    let r = run(&mut cmd);
    assert!(r.status.success(), "{}", r.stderr);
    assert!(
        !r.stdout.contains("SUPERSECRET") && !r.stdout.contains("PASSW0RD"),
        "{}",
        r.stdout
    );
    let out: Value = serde_json::from_str(&r.stdout).unwrap();
    let body = &out["request"];
    assert_eq!(
        body["build_secrets"],
        json!([{"id": "x", "value": "<redacted>", "source": "value"}])
    );
    assert_eq!(
        body["base_image_auth"],
        json!({"kind": "basic", "username": "u", "password": "<redacted>"})
    );
    assert_eq!(
        body["steps"],
        json!([{"action": "apt_install", "packages": ["curl", "git"]}, {"action": "run", "command": "echo one", "user": "app"}])
    );
    assert_eq!(body["build_config"], json!({"vcpus": 2, "memory_mib": 512}));
    assert_eq!(body["build_backend"], "buildkit");
    // ...and the plan the model derives from it, computed locally: the
    // steps numbered from 1, the engine route, the digests a build records.
    let plan = &out["plan"];
    assert_eq!(plan["source_type"], "declarative", "{plan}");
    assert_eq!(plan["build_backend"], "buildkit");
    assert_eq!(plan["build_plan"]["route"], "engine");
    assert_eq!(
        plan["build_plan"]["run_steps"],
        json!([{"index": 2, "action": "run", "command": "echo one", "user": "app"}])
    );
    assert!(
        plan["source_digest"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:")),
        "{plan}"
    );
    assert_eq!(plan["requires_base_image_auth"], true);
    assert_eq!(plan["build_plan"]["secret_ids"], json!(["x"]));
    // An invalid request is reported, not printed as if it would build.
    let mut cmd = Command::new(nullspace_bin());
    cmd.args([
        "template",
        "build",
        "--dry-run",
        "--from-image",
        "r.example/x:1",
        "--set-runtime-env",
        "1BAD=x",
    ])
    .env_remove("NULLSPACE_API_URL")
    .env_remove("NULLSPACE_API_KEY");
    let r = run(&mut cmd);
    assert_eq!(r.status.code(), Some(1), "{}", r.stderr);
    let out: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(out["errors"][0]["code"], "invalid_env", "{out}");

    // --background cannot be combined with --dry-run.
    let r = e.cli(&["build", "--from-image", "x", "--background", "--dry-run"]);
    assert_eq!(r.status.code(), Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("cannot be used with"), "{}", r.stderr);
}

#[test]
fn auth_and_configuration_errors() {
    let e = env();
    let r = e.cli_with_key("ns_not-a-real-key", &["list"]);
    assert_one_line_error(&r, "(code unauthorized)");
    let r = e.cli_with_key("ns_not-a-real-key", &["exists", "app"]);
    assert_one_line_error(&r, "(code unauthorized)");

    let r = run(Command::new(nullspace_bin())
        .args(["template", "list"])
        .env_remove("NULLSPACE_API_URL")
        .env_remove("NULLSPACE_BASE_URL")
        .env("NULLSPACE_API_KEY", &e.key));
    assert_one_line_error(&r, "NULLSPACE_API_URL is not set");
    let r = run(Command::new(nullspace_bin())
        .args(["template", "list"])
        .env("NULLSPACE_API_URL", &e.server.url)
        .env_remove("NULLSPACE_API_KEY"));
    assert_one_line_error(&r, "NULLSPACE_API_KEY is not set");
}

#[test]
fn declarative_build_through_the_dockerfile_engine_from_the_cli() {
    assert!(
        nullspace_testkit::have("buildah"),
        "buildah is not installed (scripts/deps.sh installs it)"
    );
    let e = env();
    // A base with a shell: the busybox demo image (its default user is
    // `app`, so the steps switch to root first, as Docker semantics need).
    let layout = e._tmp.path().join("demo");
    Layout::create(&layout)
        .image("1", &nullspace_testkit::image::demo_image().unwrap())
        .finish();
    let image = e._reg.push_layout(&layout, "1", "demo/shell");
    let out = e.ok(&[
        "build",
        "--from-image",
        &image,
        "--name",
        "decl",
        "--backend",
        "buildah",
        "--set-user",
        "root",
        "--run-cmd",
        "echo ran > /ran.txt",
        "--make-dir",
        "/data",
        "--set-workdir",
        "/data",
        "--set-runtime-env",
        "MODE=prod",
        "--start-cmd",
        "sleep 1000",
        "--json",
    ]);
    let rec: Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|err| panic!("{err}: {}", out.stdout));
    let rec = if rec.get("build").is_some() {
        rec["build"].clone()
    } else {
        rec
    };
    assert_eq!(rec["status"], "ready", "{rec}");
    assert!(
        rec["engine"]
            .as_str()
            .unwrap_or_default()
            .starts_with("buildah"),
        "{rec}"
    );
    let rd = &rec["runtime_defaults"];
    assert_eq!(rd["default_workdir"], "/data", "{rd}");
    assert_eq!(rd["default_user"], "root", "{rd}");
    assert_eq!(rd["start_cmd"], "sleep 1000", "{rd}");
    assert!(
        rd["default_env_keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k == "MODE"),
        "{rd}"
    );
    // plan shows the rendered Dockerfile the engine ran.
    let plan = e.ok_json(&[
        "plan",
        "--from-image",
        &image,
        "--backend",
        "buildah",
        "--run-cmd",
        "echo ran > /ran.txt",
        "--make-dir",
        "/data",
    ]);
    let df = plan["build_plan"]["dockerfile"]
        .as_str()
        .unwrap_or_default();
    assert!(
        df.contains("RUN mkdir -p /data") && df.contains("echo ran > /ran.txt"),
        "{plan}"
    );
}
