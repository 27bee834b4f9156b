//! Dockerfile builds with the real buildah of this machine, from a base
//! image the tests write themselves (the testkit's busybox demo image in a
//! local registry), each result imported by the same importer as every
//! other image and checked in the ext4.
//!
//! The builds run one at a time in one test (shared 2-core machines; one
//! registry, one engine state directory, so the base image is pulled once
//! and the layer cache is exercised), each scenario timed on stderr.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nullspace_build::context::{self, ContextEntry, EntrySource, EntryType};
use nullspace_build::engine::{Buildah, DockerfileEngine, EngineBuild, EngineConfig, EngineError};
use nullspace_build::import::{ImportOptions, import};
use nullspace_build::render::{RenderInput, render};
use nullspace_build::template::TemplateMeta;
use nullspace_oci::layout::NoProgress;
use nullspace_oci::{Image, SourceRef};
use nullspace_testkit::image::{BuiltImage, Layout, demo_image, sha256};
use nullspace_testkit::registry::{Auth, Registry};
use nullspace_testkit::tree::{self, Tree};

struct Env {
    base: String,
    state: tempfile::TempDir,
    _reg: Registry,
}

fn setup() -> Env {
    let reg = Registry::start(Auth::None);
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("demo");
    Layout::create(&layout)
        .image("1", &with_history(demo_image().unwrap()))
        .finish();
    let base = reg.push_layout(&layout, "1", "demo");
    Env {
        base,
        state: tempfile::tempdir().unwrap(),
        _reg: reg,
    }
}

/// buildah 1.28 refuses a base image whose config has no `history` ("history
/// lists 0 non-empty layers, but we have 2 layers on disk"); the demo image
/// is written without one, so give it one entry per layer.
fn with_history(mut img: BuiltImage) -> BuiltImage {
    let mut config: serde_json::Value = serde_json::from_slice(&img.config_bytes).unwrap();
    let n = config["rootfs"]["diff_ids"].as_array().unwrap().len();
    config["history"] = (0..n)
        .map(|i| serde_json::json!({"created": "2024-01-01T00:00:00Z", "created_by": format!("layer {i}")}))
        .collect();
    img.blobs.remove(&img.config_digest);
    img.config_bytes = serde_json::to_vec(&config).unwrap();
    img.config_digest = sha256(&img.config_bytes);
    img.blobs
        .insert(img.config_digest.clone(), img.config_bytes.clone());
    let mut manifest: serde_json::Value = serde_json::from_slice(&img.manifest_bytes).unwrap();
    manifest["config"]["digest"] = img.config_digest.clone().into();
    manifest["config"]["size"] = img.config_bytes.len().into();
    img.manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    img.manifest_digest = sha256(&img.manifest_bytes);
    img
}

#[test]
fn buildah_end_to_end() {
    let env = setup();
    multi_stage_target_build_args_dockerignore(&env);
    secrets_reach_run_mounts_and_are_never_persisted(&env);
    no_network_build(&env);
    declarative_steps_end_to_end(&env);
}

fn engine_in(state: &Path, secret_root: Option<&Path>) -> Buildah {
    let mut cfg = EngineConfig::new(state);
    if let Some(s) = secret_root {
        cfg.secret_root = s.to_path_buf();
    }
    Buildah::new(&cfg).expect("buildah is installed (scripts/deps.sh)")
}

struct Built {
    tree: Tree,
    meta: TemplateMeta,
    logs: Vec<String>,
    _dir: tempfile::TempDir,
}

fn hash(data: &[u8]) -> Option<String> {
    Some(sha256(data).trim_start_matches("sha256:").to_string())
}

/// Builds, then imports the layout and reads the ext4 back.
fn build_and_import(
    name: &str,
    engine: &Buildah,
    ctx: &Path,
    configure: impl FnOnce(&mut EngineBuild<'_>),
) -> Result<Built, (EngineError, Vec<String>)> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("layout");
    let logs = std::cell::RefCell::new(vec![]);
    let log = |l: &str| logs.borrow_mut().push(l.to_string());
    let mut b = EngineBuild::new(ctx, &out, &log);
    configure(&mut b);
    let start = Instant::now();
    let r = engine.build(&b);
    let build_s = start.elapsed().as_secs_f64();
    drop(b);
    let logs = logs.into_inner();
    let output = match r {
        Ok(o) => o,
        Err(e) => {
            eprintln!("[{name}] buildah build failed after {build_s:.1}s: {e}");
            return Err((e, logs));
        }
    };
    assert_eq!(output.engine, "buildah");
    assert_eq!(output.version, engine.version());
    let start = Instant::now();
    let image = Image::resolve(
        &SourceRef::parse(&output.reference).unwrap(),
        &Default::default(),
    )
    .unwrap();
    let tdir = dir.path().join("template");
    let meta = import(&image, &tdir, &ImportOptions::default(), &NoProgress).unwrap();
    let tree = tree::from_ext4(&tdir.join("rootfs.ext4")).unwrap();
    eprintln!(
        "[{name}] buildah {build_s:.1}s, import {:.1}s",
        start.elapsed().as_secs_f64()
    );
    Ok(Built {
        tree,
        meta,
        logs,
        _dir: dir,
    })
}

fn write(dir: &Path, files: &[(&str, &str)]) {
    for (p, c) in files {
        let p = dir.join(p);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, c).unwrap();
    }
}

/// A local directory → a build context the way the CLI sends it.
fn local_context(files: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    write(&src, files);
    let ctx = t.path().join("ctx");
    fs::create_dir(&ctx).unwrap();
    let scanned = context::scan_local(&src).unwrap();
    context::copy_local(&src, &scanned, &ctx).unwrap();
    (t, ctx)
}

fn multi_stage_target_build_args_dockerignore(env: &Env) {
    let dockerfile = "\
ARG BASE
FROM $BASE AS build
USER root
ARG MSG=none
RUN mkdir /out && echo \"$MSG\" > /out/greeting
COPY . /ctx/
FROM ${BASE} AS final
USER root
COPY --from=build /out/greeting /greeting
COPY --from=build /ctx /ctx
RUN echo final > /final
EXPOSE 9000
FROM final AS extra
RUN echo extra > /extra
";
    let (_t, ctx) = local_context(&[
        ("Dockerfile", dockerfile),
        (".dockerignore", "ignored.txt\nsub/*.tmp\n"),
        ("kept.txt", "kept\n"),
        ("ignored.txt", "should not be sent\n"),
        ("sub/a.tmp", "tmp\n"),
        ("sub/b.txt", "b\n"),
    ]);
    assert!(!ctx.join("ignored.txt").exists());
    let e = engine_in(env.state.path(), None);
    let built = build_and_import("multi-stage --target", &e, &ctx, |b| {
        b.build_args.insert("BASE".into(), env.base.clone());
        b.build_args.insert("MSG".into(), "hello world".into());
        b.target = Some("final".into());
    })
    .unwrap();
    let t = &built.tree;
    assert_eq!(t["greeting"].hash, hash(b"hello world\n"));
    assert_eq!(t["final"].hash, hash(b"final\n"));
    assert!(!t.contains_key("extra"), "--target stops at final");
    assert_eq!(t["ctx/kept.txt"].hash, hash(b"kept\n"));
    assert!(t.contains_key("ctx/sub/b.txt"));
    assert!(!t.contains_key("ctx/ignored.txt"), ".dockerignore");
    assert!(!t.contains_key("ctx/sub/a.tmp"), ".dockerignore");
    assert!(t.contains_key("bin/busybox"), "the base image's files");
    assert!(t.contains_key("srv/index.html"), "the base's top layer");
    // (etc/hostname, whited out in the base, comes back empty: RUN under
    // chroot isolation creates its bind-mount targets, as Docker does.)
    // Runtime defaults from the built config: USER root overrides app.
    assert_eq!(built.meta.runtime.user.as_deref(), Some("root"));
    assert_eq!(built.meta.runtime.workdir.as_deref(), Some("/srv"));

    // The whole Dockerfile (no target) reaches `extra`; the layer cache is
    // reused for the shared stages.
    let built = build_and_import("multi-stage cached", &e, &ctx, |b| {
        b.build_args.insert("BASE".into(), env.base.clone());
        b.build_args.insert("MSG".into(), "hello world".into());
    })
    .unwrap();
    assert!(built.tree.contains_key("extra"));
    assert!(
        built.logs.iter().any(|l| l.contains("Using cache")),
        "layer cache used: {:?}",
        built.logs
    );
}

fn secrets_reach_run_mounts_and_are_never_persisted(env: &Env) {
    const SECRET: &str = "s3cr3t-token-value";
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let e = engine_in(env.state.path(), Some(shm.path()));
    let dockerfile = format!(
        "FROM {}\nUSER root\nRUN --mount=type=secret,id=tok cat /run/secrets/tok > /secret-copy && echo \"token is $(cat /run/secrets/tok)\"\n",
        env.base
    );
    let (_t, ctx) = local_context(&[("Dockerfile", &dockerfile)]);
    let built = build_and_import("secret", &e, &ctx, |b| {
        b.secrets.push(("tok".into(), SECRET.into()));
    })
    .unwrap();
    // In the image by the Dockerfile's choice.
    assert_eq!(built.tree["secret-copy"].hash, hash(SECRET.as_bytes()));
    // Logs are scrubbed; the echo did print it.
    assert!(
        built.logs.iter().any(|l| l.contains("token is ***")),
        "{:?}",
        built.logs
    );
    assert!(!built.logs.iter().any(|l| l.contains(SECRET)));
    // The private tmpfs directory is gone.
    assert_eq!(fs::read_dir(shm.path()).unwrap().count(), 0);
    // Nothing under the context (nullspace's other input) has it either.
    assert!(!grep_dir(&ctx, SECRET.as_bytes()));

    // A failing build: its error (the tail of the output) is scrubbed too,
    // and the secret files are still removed.
    let dockerfile = format!(
        "FROM {}\nUSER root\nRUN --mount=type=secret,id=tok echo \"leak $(cat /run/secrets/tok)\"; exit 3\n",
        env.base
    );
    let (_t2, ctx2) = local_context(&[("Dockerfile", &dockerfile)]);
    let (err, logs) = build_and_import("secret failing", &e, &ctx2, |b| {
        b.secrets.push(("tok".into(), SECRET.into()));
    })
    .err()
    .unwrap();
    let msg = err.to_string();
    assert!(msg.contains("buildah build failed"), "{msg}");
    assert!(msg.contains("leak ***"), "{msg}");
    assert!(!msg.contains(SECRET) && !logs.iter().any(|l| l.contains(SECRET)));
    assert_eq!(fs::read_dir(shm.path()).unwrap().count(), 0);
}

fn grep_dir(dir: &Path, needle: &[u8]) -> bool {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let m = fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            if grep_dir(&p, needle) {
                return true;
            }
        } else if m.is_file() {
            let data = fs::read(&p).unwrap();
            if data.windows(needle.len()).any(|w| w == needle) {
                return true;
            }
        }
    }
    false
}

/// A loopback HTTP server answering every request with `ok`.
fn http_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
        }
    });
    port
}

fn no_network_build(env: &Env) {
    let port = http_server();
    let e = engine_in(env.state.path(), None);
    let dockerfile = format!(
        "FROM {}\nUSER root\nARG PORT\nRUN wget -q -O /fetched http://127.0.0.1:$PORT/\n",
        env.base
    );
    let (_t, ctx) = local_context(&[("Dockerfile", &dockerfile)]);
    // With network the loopback server answers (the test means something).
    let built = build_and_import("network on", &e, &ctx, |b| {
        b.build_args.insert("PORT".into(), port.to_string());
    })
    .unwrap();
    assert_eq!(built.tree["fetched"].hash, hash(b"ok\n"));
    // Without: the build has a network namespace of its own.
    let (err, logs) = build_and_import("network off", &e, &ctx, |b| {
        b.build_args.insert("PORT".into(), port.to_string());
        b.network = false;
    })
    .err()
    .unwrap();
    assert!(
        matches!(err, EngineError::Failed { ref step, .. } if step == "build"),
        "{err}"
    );
    assert!(
        logs.iter().any(|l| l.contains("wget")),
        "the RUN ran and failed: {logs:?}"
    );
}

#[test]
fn heredoc_is_refused_before_building() {
    let state = tempfile::tempdir().unwrap();
    let e = engine_in(state.path(), None);
    let dockerfile = "FROM 127.0.0.1:1/none:1\nRUN <<EOF\necho hi\nEOF\n";
    let (_t, ctx) = local_context(&[("Dockerfile", dockerfile)]);
    let (err, _) = build_and_import("heredoc", &e, &ctx, |_| {}).err().unwrap();
    assert_eq!(
        err.to_string(),
        "Dockerfile line 2: heredocs (RUN <<…) are not supported by buildah 1.28; use the buildkit engine or a RUN/COPY without a heredoc"
    );
}

#[test]
fn dockerfile_path_and_escape_checks() {
    let state = tempfile::tempdir().unwrap();
    let e = engine_in(state.path(), None);
    let (_t, ctx) = local_context(&[("docker/app.Dockerfile", "FROM scratch\n")]);
    for bad in ["../Dockerfile", "/etc/passwd", "Dockerfile"] {
        let (err, _) = build_and_import("bad path", &e, &ctx, |b| b.dockerfile = bad)
            .err()
            .unwrap();
        assert!(matches!(err, EngineError::Invalid { .. }), "{bad}: {err}");
    }
}

fn declarative_steps_end_to_end(env: &Env) {
    let e = engine_in(env.state.path(), None);
    // The demo base runs as `app`; `su` (run_cmd with a user) needs root.
    let steps = serde_json::json!([
        {"action":"user","user":"root"},
        {"action":"make_dir","path":"/tmp","mode":"1777"},
        {"action":"copy","sources":["builder-context/step-0/src-0/app"],"dst":"/opt/app","user":"app","mode":"0750"},
        {"action":"copy_items","items":[{"sources":["builder-context/step-1/src-0/it's here.txt"],"dst":"/opt/with space/"}]},
        {"action":"run","command":"echo \"$BUILD_ONLY from $(whoami)\" > /tmp/whoami-app","user":"app"},
        {"action":"run","command":"echo \"$BUILD_ONLY\" > /build-env && cp /tmp/whoami-app /whoami"},
        {"action":"make_dir","path":"/data/sub dir","mode":"0700"},
        {"action":"make_symlink","target":"/data","path":"/d"},
        {"action":"workdir","path":"/opt/app"},
        {"action":"user","user":"app"},
    ]);
    let steps = nullspace_model::build::step::parse_all(steps.as_array().unwrap()).unwrap();
    let build_envs = BTreeMap::from([("BUILD_ONLY".to_string(), "b$1 'x'".to_string())]);
    let runtime_envs = BTreeMap::from([("MODE".to_string(), "prod".to_string())]);
    let rendered = render(&RenderInput {
        base_image: &env.base,
        steps: &steps,
        build_envs: &build_envs,
        runtime_envs: &runtime_envs,
    })
    .unwrap();
    eprintln!("{}", rendered.dockerfile);
    let t = tempfile::tempdir().unwrap();
    let ctx = t.path().join("ctx");
    fs::create_dir(&ctx).unwrap();
    context::materialize(
        &ctx,
        &[
            ContextEntry {
                path: "builder-context/step-0/src-0/app/run.sh".into(),
                entry_type: EntryType::File,
                mode: 0o755,
                source: Some(EntrySource::Bytes(b"#!/bin/sh\necho run\n".to_vec())),
            },
            ContextEntry {
                path: "builder-context/step-1/src-0/it's here.txt".into(),
                entry_type: EntryType::File,
                mode: 0o644,
                source: Some(EntrySource::Bytes(b"quoted\n".to_vec())),
            },
            ContextEntry {
                path: "Dockerfile".into(),
                entry_type: EntryType::File,
                mode: 0o644,
                source: Some(EntrySource::Bytes(rendered.dockerfile.clone().into_bytes())),
            },
        ],
    )
    .unwrap();
    let built = build_and_import("declarative", &e, &ctx, |_| {}).unwrap();
    let tr = &built.tree;
    let run = &tr["opt/app/run.sh"];
    assert_eq!((run.uid, run.mode), (1000, 0o750), "--chown/--chmod");
    assert_eq!(tr["opt/with space/it's here.txt"].hash, hash(b"quoted\n"));
    assert_eq!(
        tr["build-env"].hash,
        hash(b"b$1 'x'\n"),
        "build env during RUN"
    );
    assert_eq!(
        tr["whoami"].hash,
        hash(b"b$1 'x' from app\n"),
        "run as user"
    );
    assert_eq!(tr["data/sub dir"].mode, 0o700);
    assert_eq!(tr["tmp"].mode, 0o1777);
    assert_eq!(tr["d"].target.as_deref(), Some("/data"));
    let rt = &built.meta.runtime;
    assert_eq!(rt.workdir.as_deref(), Some("/opt/app"));
    assert_eq!(rt.user.as_deref(), Some("app"));
    assert_eq!(rt.env.get("MODE").map(String::as_str), Some("prod"));
    assert!(
        !rt.env.contains_key("BUILD_ONLY"),
        "build envs are not persisted"
    );
    assert_eq!(
        rt.env.get("GREETING").map(String::as_str),
        Some("hello"),
        "the image's own env stays"
    );
}
