//! `nullspace template plan --view …` against the real server and a real
//! registry: every view of one request, and a dry-run that says what the
//! server's caches hold, before and after a real build of the same request.

use std::process::Command;

use nullspace_testkit::image::{Compression, ImageSpec, Layer, Layout, TarLayer};
use nullspace_testkit::registry::{Auth, Registry};
use nullspace_testkit::server::Server;
use nullspace_testkit::{Run, nullspace_bin, run};
use serde_json::{Value, json};

struct Env {
    server: Server,
    key: String,
    reg: Registry,
    tmp: tempfile::TempDir,
}

fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), None);
    let key = server.key("team-a");
    Env {
        server,
        key,
        reg: Registry::start(Auth::None),
        tmp,
    }
}

impl Env {
    fn ok(&self, args: &[&str]) -> Run {
        let mut cmd = Command::new(nullspace_bin());
        cmd.arg("template")
            .args(args)
            .env("NULLSPACE_API_URL", &self.server.url)
            .env("NULLSPACE_API_KEY", &self.key);
        let r = run(&mut cmd);
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

    fn json(&self, args: &[&str]) -> Value {
        let r = self.ok(args);
        serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", r.stdout))
    }
}

fn stages<'a>(v: &'a Value, name: &str) -> Vec<&'a Value> {
    v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["stage"] == name)
        .collect()
}

/// An import: each of the image's two layers is "would fetch" before the
/// first build and "cached" after it; the views agree with the plan.
#[test]
fn dry_run_sees_the_layer_cache_fill() {
    let e = env();
    let layer = |name: &str| {
        TarLayer::new()
            .dir("srv", 0o755)
            .file(&format!("srv/{name}"), 0o644, name.as_bytes())
            .into_tar()
    };
    let img = ImageSpec::new(vec![
        Layer::new(layer("a"), Compression::Gzip),
        Layer::new(layer("b"), Compression::Gzip),
    ])
    .config(json!({"Env": ["PATH=/bin"], "Cmd": ["/bin/app"]}))
    .build();
    let layout = e.tmp.path().join("layout");
    Layout::create(&layout).image("v1", &img).finish();
    let image = e.reg.push_layout(&layout, "v1", "team/views");
    let req = ["--from-image", image.as_str(), "--start-cmd", "/bin/app"];
    let with = |view: &[&str]| -> Vec<String> {
        ["plan"]
            .iter()
            .chain(view)
            .chain(req.iter())
            .map(|s| s.to_string())
            .collect()
    };
    fn args(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }

    // The default view is the plan, unchanged.
    let plan = e.json(&args(&with(&[])));
    let source_digest = plan["source_digest"].as_str().unwrap().to_string();

    let cold = e.json(&args(&with(&["--view", "dry-run", "--json"])));
    assert_eq!(cold["view"], "dry-run");
    assert_eq!(cold["would_build"], true, "{cold}");
    let layers = stages(&cold, "layer");
    assert_eq!(layers.len(), 2, "{cold}");
    for l in &layers {
        assert_eq!(
            (&l["action"], &l["cached"]),
            (&json!("run"), &json!(false)),
            "{cold}"
        );
        assert!(l["subject"].as_str().unwrap().starts_with("sha256:"));
    }
    let base = stages(&cold, "resolve_base");
    assert!(
        base[0]["detail"]
            .as_str()
            .unwrap()
            .contains("resolves to sha256:"),
        "{cold}"
    );
    // This server has no build VM: nothing boots, and the dry-run says so.
    assert_eq!(stages(&cold, "snapshot")[0]["action"], "skip", "{cold}");

    let text = e.ok(&args(&with(&["--view", "dry-run"]))).stdout;
    assert!(
        text.starts_with("would build: yes (0 stage(s) cached"),
        "{text}"
    );

    // A real build of the same request fills the layer cache.
    e.ok(&[
        "build",
        "--from-image",
        &image,
        "--start-cmd",
        "/bin/app",
        "--name",
        "views",
    ]);
    let warm = e.json(&args(&with(&["--view", "dry-run", "--json"])));
    let warm_layers = stages(&warm, "layer");
    for (before, after) in layers.iter().zip(&warm_layers) {
        assert_eq!(before["subject"], after["subject"]);
        assert_eq!(
            (&after["action"], &after["cached"]),
            (&json!("cached"), &json!(true)),
            "{warm}"
        );
    }
    assert_eq!(warm["cached_stages"], 2, "{warm}");
    // Imports keep no root filesystem cache: that stage still runs.
    assert_eq!(stages(&warm, "rootfs")[0]["action"], "run", "{warm}");
    let text = e.ok(&args(&with(&["--view", "dry-run"]))).stdout;
    assert!(text.contains("cached   layer"), "{text}");
    // A dry-run only looks: asking twice changes nothing.
    assert_eq!(e.json(&args(&with(&["--view", "dry-run", "--json"]))), warm);

    // skip_cache: the same layers, bypassed.
    let mut skip = with(&["--view", "dry-run", "--json"]);
    skip.push("--skip-cache".into());
    let bypass = e.json(&args(&skip));
    assert!(
        stages(&bypass, "layer")
            .iter()
            .all(|l| l["action"] == "bypass"),
        "{bypass}"
    );

    // The other views of the same plan.
    let deps = e.json(&args(&with(&["--view", "deps", "--json"])));
    let edges: Vec<(String, String)> = deps["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["from"].as_str().unwrap().into(),
                e["to"].as_str().unwrap().into(),
            )
        })
        .collect();
    for (a, b) in [
        ("base", "layers"),
        ("layers", "rootfs"),
        ("rootfs", "vm"),
        ("vm", "start"),
        ("start", "snapshot"),
    ] {
        assert!(edges.contains(&(a.into(), b.into())), "{a} -> {b}: {deps}");
    }
    let text = e.ok(&args(&with(&["--view", "deps"]))).stdout;
    assert!(
        text.contains("base -> layers") && text.contains(&image),
        "{text}"
    );
    let outputs = e.json(&args(&with(&["--view", "outputs", "--json"])));
    let out = |n: &str| {
        outputs["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == n)
            .unwrap_or_else(|| panic!("{n}: {outputs}"))
            .clone()
    };
    assert_eq!(out("source_digest")["digest"], source_digest.as_str());
    assert_eq!(out("rootfs_digest")["known"], "after_build");
    assert_eq!(out("base_manifest_digest")["known"], "at_build_start");
    let steps = e.json(&args(&with(&["--view", "steps", "--json"])));
    assert_eq!(steps["steps"], json!([]), "{steps}");
    assert_eq!(steps["start_cmd"], "/bin/app");

    // The API: an unknown view is a 400 naming the views; /openapi.json
    // documents the parameter.
    let http = reqwest::blocking::Client::new();
    let r = http
        .post(format!("{}/v1/templates/plan?view=graph", e.server.url))
        .bearer_auth(&e.key)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&json!({"base_image": image})).unwrap())
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = serde_json::from_str(&r.text().unwrap()).unwrap();
    assert!(
        body.to_string()
            .contains("not one of plan, deps, dry-run, steps, outputs"),
        "{body}"
    );
    let api: Value = serde_json::from_str(
        &http
            .get(format!("{}/openapi.json", e.server.url))
            .send()
            .unwrap()
            .text()
            .unwrap(),
    )
    .unwrap();
    let params = &api["paths"]["/v1/templates/plan"]["post"]["parameters"];
    assert!(params.to_string().contains("dry-run"), "{params}");
}

/// An engine build: the dry-run computes the final-artifact key the build
/// will use, says "would build" before and "cached" (nothing to build)
/// after a real build of the same request.
#[test]
fn dry_run_flips_to_cached_after_an_engine_build() {
    assert!(
        nullspace_testkit::have("buildah"),
        "buildah is not installed (scripts/deps.sh installs it)"
    );
    let e = env();
    let layout = e.tmp.path().join("demo");
    Layout::create(&layout)
        .image("1", &nullspace_testkit::image::demo_image().unwrap())
        .finish();
    let image = e.reg.push_layout(&layout, "1", "demo/shell");
    let req = [
        "--from-image",
        image.as_str(),
        "--backend",
        "buildah",
        "--set-user",
        "root",
        "--run-cmd",
        "echo ran > /ran.txt",
    ];
    let dry = |e: &Env| {
        let mut a = vec!["plan", "--view", "dry-run", "--json"];
        a.extend_from_slice(&req);
        e.json(&a)
    };
    let cold = dry(&e);
    let fa = stages(&cold, "final_artifact");
    assert_eq!(
        (&cold["would_build"], &fa[0]["action"], &fa[0]["cached"]),
        (&json!(true), &json!("run"), &json!(false)),
        "{cold}"
    );
    let key = fa[0]["subject"].as_str().unwrap().to_string();
    assert!(key.starts_with("sha256:"), "{cold}");
    assert_eq!(stages(&cold, "engine")[0]["action"], "run");

    let mut build = vec!["build", "--name", "eng"];
    build.extend_from_slice(&req);
    e.ok(&build);

    let warm = dry(&e);
    let fa = stages(&warm, "final_artifact");
    assert_eq!(
        (&warm["would_build"], &fa[0]["action"], &fa[0]["cached"]),
        (&json!(false), &json!("cached"), &json!(true)),
        "{warm}"
    );
    // The same key the build stored its artifact under.
    assert_eq!(fa[0]["subject"], key.as_str());
    for s in ["engine", "rootfs", "snapshot"] {
        assert_eq!(stages(&warm, s)[0]["action"], "skip", "{s}: {warm}");
    }
    let mut text = vec!["plan", "--view", "dry-run"];
    text.extend_from_slice(&req);
    let out = e.ok(&text).stdout;
    assert!(out.starts_with("would build: no, cached"), "{out}");
}
