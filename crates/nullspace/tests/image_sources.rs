//! `nullspace image inspect|pull` against a real registry on loopback and
//! local layouts/archives, with images written by the testkit.

use std::path::Path;
use std::process::Command;

use nullspace_testkit::image::{self, Compression, ImageSpec, Layer, Layout, TarLayer};
use nullspace_testkit::registry::{Auth, PASSWORD, Registry, USER};
use nullspace_testkit::{nullspace, run};
use serde_json::{Value, json};

fn app_image() -> image::BuiltImage {
    app_image_with(Compression::Zstd)
}

/// umoci 0.4.7 cannot unpack zstd layers and refuses malformed Env entries:
/// images for cross-checks with it use gzip and a clean Env.
fn app_image_with(top_compression: Compression) -> image::BuiltImage {
    let umoci_compatible = top_compression != Compression::Zstd;
    let base = TarLayer::new()
        .dir("etc", 0o755)
        .file("etc/os-release", 0o644, b"ID=testkit\n")
        .dir("bin", 0o755)
        .file("bin/app", 0o755, b"#!/bin/sh\necho app\n")
        .into_tar();
    let top = TarLayer::new()
        .dir("srv", 0o755)
        .file_owned("srv/data.txt", 0o640, 1000, 1000, 1_700_000_000, b"payload")
        .into_tar();
    let mut env = vec!["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello world"];
    if !umoci_compatible {
        env.push("BROKEN");
    }
    ImageSpec::new(vec![
        Layer::new(base, Compression::Gzip),
        Layer::new(top, top_compression),
    ])
    .config(json!({
        "Env": env,
        // umoci resolves names against the image's /etc/passwd and does
        // not trim; the zstd variant tests trimming and names.
        "User": if umoci_compatible { "1000:50" } else { " 1000:staff " },
        "WorkingDir": "/srv",
        "Entrypoint": ["/bin/app"],
        "Cmd": ["--name", "it's here", ""],
        "Labels": {"org.example.team": "core"},
        "ExposedPorts": {"8080/tcp": {}},
        "Volumes": {"/data": {}},
        "Healthcheck": {"Test": ["CMD-SHELL", "test -f /tmp/ready"], "Interval": 1000000000},
        "StopSignal": "SIGINT",
    }))
    .build()
}

fn img_layer_type(img: &image::BuiltImage, i: usize) -> String {
    let m: Value = serde_json::from_slice(&img.manifest_bytes).unwrap();
    m["layers"][i]["mediaType"].as_str().unwrap().to_string()
}

fn write_single(dir: &Path, tag: &str, img: &image::BuiltImage) {
    Layout::create(dir).image(tag, img).finish();
}

fn inspect_json(args: &[&str]) -> Value {
    let mut all = vec!["image", "inspect", "--json"];
    all.extend_from_slice(args);
    let r = nullspace(&all);
    r.ok();
    serde_json::from_str(&r.stdout).expect("inspect --json output")
}

fn assert_app_report(v: &Value, img: &image::BuiltImage) {
    assert_eq!(v["image"]["manifest_digest"], img.manifest_digest);
    assert_eq!(v["image"]["config_digest"], img.config_digest);
    assert_eq!(v["image"]["platform"]["os"], "linux");
    assert_eq!(v["image"]["platform"]["architecture"], "amd64");
    let layers = v["image"]["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    assert_eq!(
        layers[0]["media_type"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    assert_eq!(layers[1]["media_type"], img_layer_type(img, 1));
    assert_eq!(layers[0]["digest"], img.layer_digests()[0]);
    let rt = &v["runtime"];
    assert_eq!(rt["env"]["GREETING"], "hello world");
    assert!(rt["env"].get("BROKEN").is_none());
    let expected_user =
        if rt["env"].get("PATH").is_some() && img_layer_type(img, 1).ends_with("zstd") {
            "1000:staff"
        } else {
            "1000:50"
        };
    assert_eq!(rt["user"], expected_user);
    assert_eq!(rt["workdir"], "/srv");
    assert_eq!(rt["start_cmd"], "/bin/app --name 'it'\\''s here' ''");
    assert_eq!(rt["ready_cmd"], "test -f /tmp/ready");
    assert_eq!(v["oci"]["labels"]["org.example.team"], "core");
    assert_eq!(v["oci"]["exposed_ports"], json!(["8080/tcp"]));
    assert_eq!(v["oci"]["volumes"], json!(["/data"]));
    assert!(
        v.to_string().find("SIGINT").is_none(),
        "stop signal is not imported"
    );
}

#[test]
fn anonymous_registry_inspect_and_pull_pass_skopeo_and_umoci() {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let img = app_image_with(Compression::Gzip);
    write_single(&tmp.path().join("src"), "v1", &img);
    let r = reg.push_layout(&tmp.path().join("src"), "v1", "team/app");

    let v = inspect_json(&[&r]);
    assert_app_report(&v, &img);
    // docker:// prefix and a digest reference name the same image.
    let v = inspect_json(&[&format!("docker://{r}")]);
    assert_eq!(v["image"]["manifest_digest"], img.manifest_digest);
    let by_digest = format!("{}/team/app@{}", reg.addr, img.manifest_digest);
    let v = inspect_json(&[&by_digest]);
    assert_eq!(v["image"]["manifest_digest"], img.manifest_digest);

    let out = tmp.path().join("pulled");
    nullspace(&["image", "pull", &r, "--output", out.to_str().unwrap()]).ok();
    let sk = run(Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci:{}:v1", out.display())));
    sk.ok();
    let sk: Value = serde_json::from_str(&sk.stdout).unwrap();
    assert_eq!(sk["Digest"], img.manifest_digest);
    assert_eq!(sk["Layers"].as_array().unwrap().len(), 2);

    let bundle = tmp.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--rootless", "--image"])
        .arg(format!("{}:v1", out.display()))
        .arg(&bundle))
    .ok();
    assert_eq!(
        std::fs::read(bundle.join("rootfs/srv/data.txt")).unwrap(),
        b"payload"
    );
    assert_eq!(
        std::fs::read(bundle.join("rootfs/etc/os-release")).unwrap(),
        b"ID=testkit\n"
    );

    // The pulled layout is itself a source.
    let v = inspect_json(&[&format!("oci:{}:v1", out.display())]);
    assert_app_report(&v, &img);
}

#[test]
fn basic_auth_registry_needs_credentials_from_flags_stdin_or_docker_config() {
    let reg = Registry::start(Auth::Basic);
    let tmp = tempfile::tempdir().unwrap();
    let img = app_image();
    write_single(&tmp.path().join("src"), "v1", &img);
    let r = reg.push_layout(&tmp.path().join("src"), "v1", "private/app");

    let anon = nullspace(&["image", "inspect", &r]);
    assert!(!anon.status.success());
    assert!(
        anon.stderr.contains(&r) && anon.stderr.to_lowercase().contains("auth"),
        "{}",
        anon.stderr
    );
    assert_eq!(
        anon.stderr.trim().lines().count(),
        1,
        "one-line error: {}",
        anon.stderr
    );

    // --password-stdin
    let mut child = Command::new(nullspace_testkit::nullspace_bin())
        .args([
            "image",
            "inspect",
            "--json",
            "--username",
            USER,
            "--password-stdin",
            &r,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    writeln!(child.stdin.take().unwrap(), "{PASSWORD}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["image"]["manifest_digest"], img.manifest_digest);

    // Wrong password is refused.
    let bad = run(Command::new(nullspace_testkit::nullspace_bin())
        .args(["image", "inspect", &r, "--username", USER])
        .env("NULLSPACE_REGISTRY_PASSWORD", "wrong"));
    assert!(!bad.status.success());
    assert!(
        !bad.stderr.contains("wrong"),
        "password echoed: {}",
        bad.stderr
    );

    // ~/.docker/config.json (via DOCKER_CONFIG).
    let cfgdir = tmp.path().join("docker");
    std::fs::create_dir_all(&cfgdir).unwrap();
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    std::fs::write(
        cfgdir.join("config.json"),
        json!({"auths": {reg.addr.clone(): {"auth": auth}}}).to_string(),
    )
    .unwrap();
    let out = tmp.path().join("pulled");
    run(Command::new(nullspace_testkit::nullspace_bin())
        .args(["image", "pull", &r, "--output", out.to_str().unwrap()])
        .env("DOCKER_CONFIG", &cfgdir))
    .ok();
    assert!(out.join("index.json").exists());
}

#[test]
fn token_auth_registry_via_www_authenticate_challenge() {
    let reg = Registry::start(Auth::Token);
    let tmp = tempfile::tempdir().unwrap();
    let img = app_image();
    write_single(&tmp.path().join("src"), "v1", &img);
    let r = reg.push_layout(&tmp.path().join("src"), "v1", "tok/app");

    let anon = nullspace(&["image", "inspect", &r]);
    assert!(!anon.status.success(), "anonymous pull must be refused");

    let out = tmp.path().join("pulled");
    run(Command::new(nullspace_testkit::nullspace_bin())
        .args([
            "image",
            "pull",
            &r,
            "--output",
            out.to_str().unwrap(),
            "--username",
            USER,
        ])
        .env("NULLSPACE_REGISTRY_PASSWORD", PASSWORD))
    .ok();
    let v = inspect_json(&[&format!("oci:{}", out.display())]);
    assert_app_report(&v, &img);
}

fn platform_image(os: &str, arch: &str, variant: Option<&str>, marker: &str) -> image::BuiltImage {
    let tar = TarLayer::new()
        .file("marker", 0o644, marker.as_bytes())
        .into_tar();
    ImageSpec::new(vec![Layer::new(tar, Compression::Gzip)])
        .platform(os, arch, variant)
        .config(json!({"Env": [format!("MARKER={marker}")]}))
        .build()
}

#[test]
fn multi_platform_index_from_registry_prefers_exact_variant() {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let imgs = [
        platform_image("linux", "arm64", Some("v8"), "arm64v8"),
        platform_image("linux", "amd64", None, "amd64"),
        platform_image("linux", "amd64", Some("v3"), "amd64v3"),
        platform_image("linux", "amd64", Some("v1"), "amd64v1"),
        platform_image("linux", "s390x", None, "s390x"),
    ];
    let refs: Vec<&image::BuiltImage> = imgs.iter().collect();
    let src = tmp.path().join("src");
    let (layout, index_digest) = Layout::create(&src).index("multi", &refs);
    layout.finish();
    let r = reg.push_layout(&tmp.path().join("src"), "multi", "multi/app");

    let v = inspect_json(&[&r]);
    assert_eq!(v["image"]["index_digest"], index_digest);
    assert_eq!(v["runtime"]["env"]["MARKER"], "amd64v1");
    assert_eq!(v["image"]["platform"]["variant"], "v1");

    let v = inspect_json(&["--platform", "linux/arm64", &r]);
    assert_eq!(v["runtime"]["env"]["MARKER"], "arm64v8");
    let v = inspect_json(&["--platform", "linux/amd64/v3", &r]);
    assert_eq!(v["runtime"]["env"]["MARKER"], "amd64v3");

    let e = nullspace(&["image", "inspect", "--platform", "linux/riscv64", &r]);
    assert!(!e.status.success());
    assert!(
        e.stderr.contains("no manifest for linux/riscv64")
            && e.stderr.contains("linux/arm64/v8")
            && e.stderr.contains("linux/s390x"),
        "{}",
        e.stderr
    );
    let e = nullspace(&["image", "inspect", "--platform", "windows/amd64", &r]);
    assert!(
        !e.status.success() && e.stderr.contains("only linux"),
        "{}",
        e.stderr
    );
}

#[test]
fn os_features_manifest_is_rejected_from_an_index() {
    let tmp = tempfile::tempdir().unwrap();
    let img = platform_image("linux", "amd64", None, "feat");
    let mut d = img.descriptor();
    d["platform"]["os.features"] = json!(["win32k"]);
    let ldir = tmp.path().join("l");
    let layout = Layout::create(&ldir);
    for (dg, data) in &img.blobs {
        layout.blob(dg, data);
    }
    layout.blob(&img.manifest_digest, &img.manifest_bytes);
    let idx = serde_json::to_vec(
        &json!({"schemaVersion": 2, "mediaType": image::OCI_INDEX, "manifests": [d]}),
    )
    .unwrap();
    let layout = layout.raw("feat", image::OCI_INDEX, &idx);
    layout.finish();
    let e = nullspace(&[
        "image",
        "inspect",
        &format!("oci:{}:feat", tmp.path().join("l").display()),
    ]);
    assert!(!e.status.success());
    assert!(e.stderr.contains("os.features win32k"), "{}", e.stderr);
}

#[test]
fn digest_mismatch_from_registry_storage_fails_and_leaves_no_output() {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let img = app_image();
    write_single(&tmp.path().join("src"), "v1", &img);
    let r = reg.push_layout(&tmp.path().join("src"), "v1", "corrupt/app");
    // Corrupt the registry's copy of layer 1 in place (same length).
    let layer = &img.layer_digests()[1];
    let p = reg.blob_data_path(layer);
    let mut data = std::fs::read(&p).unwrap();
    let last = data.len() - 1;
    data[last] ^= 0xff;
    std::fs::write(&p, &data).unwrap();

    let out = tmp.path().join("pulled");
    let e = nullspace(&["image", "pull", &r, "--output", out.to_str().unwrap()]);
    assert!(!e.status.success());
    assert!(
        e.stderr.contains(layer) && e.stderr.contains("digest mismatch"),
        "{}",
        e.stderr
    );
    assert_eq!(e.stderr.trim().lines().count(), 1, "{}", e.stderr);
    assert!(!out.exists(), "partial output left behind");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "temporary files left: {leftovers:?}");
}

#[test]
fn size_mismatch_in_layout_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let img = app_image();
    let dir = tmp.path().join("l");
    write_single(&dir, "v1", &img);
    // Append a byte to the config blob: size no longer matches.
    let hex = &img.config_digest[7..];
    let p = dir.join("blobs/sha256").join(hex);
    let mut data = std::fs::read(&p).unwrap();
    data.push(b' ');
    std::fs::write(&p, data).unwrap();
    let e = nullspace(&["image", "inspect", &format!("oci:{}:v1", dir.display())]);
    assert!(!e.status.success());
    assert!(
        e.stderr.contains(&format!("config {}", img.config_digest))
            && e.stderr.contains("size mismatch"),
        "{}",
        e.stderr
    );
}

#[test]
fn malformed_digest_never_reaches_the_filesystem() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("l");
    // A file the hostile digest would point at if it were used as a path.
    let target = tmp.path().join("stolen");
    std::fs::write(&target, b"secret").unwrap();
    let img = app_image();
    let evil = format!("sha256:../../../{}", "stolen");
    let m: Value = serde_json::from_slice(&img.manifest_bytes).unwrap();
    let mut m2 = m.clone();
    m2["layers"][0]["digest"] = json!(evil);
    let bytes = serde_json::to_vec(&m2).unwrap();
    let layout = Layout::create(&dir);
    for (dg, data) in &img.blobs {
        layout.blob(dg, data);
    }
    layout.raw("evil", image::OCI_MANIFEST, &bytes).finish();
    let e = nullspace(&[
        "image",
        "pull",
        &format!("oci:{}:evil", dir.display()),
        "--output",
        tmp.path().join("o").to_str().unwrap(),
    ]);
    assert!(!e.status.success());
    assert!(e.stderr.contains("malformed"), "{}", e.stderr);
    assert!(!tmp.path().join("o").exists());

    // In index.json itself.
    let idx = std::fs::read_to_string(dir.join("index.json")).unwrap();
    let digest = serde_json::from_str::<Value>(&idx).unwrap()["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::write(
        dir.join("index.json"),
        idx.replace(&digest, "sha256:../../stolen"),
    )
    .unwrap();
    let e = nullspace(&["image", "inspect", &format!("oci:{}", dir.display())]);
    assert!(
        !e.status.success() && e.stderr.contains("malformed"),
        "{}",
        e.stderr
    );
}

#[test]
fn index_manifest_confusion_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let img = app_image();
    let m: Value = serde_json::from_slice(&img.manifest_bytes).unwrap();
    // A manifest that also carries `manifests` pointing elsewhere.
    let mut both = m.clone();
    both["manifests"] = json!([platform_image("linux", "amd64", None, "x").descriptor()]);
    let dir = tmp.path().join("l");
    let layout = Layout::create(&dir);
    for (dg, data) in &img.blobs {
        layout.blob(dg, data);
    }
    let layout = layout.raw(
        "both",
        image::OCI_MANIFEST,
        &serde_json::to_vec(&both).unwrap(),
    );
    // An index served where the referrer said "manifest".
    let idx = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": image::OCI_INDEX, "manifests": [img.descriptor()]})).unwrap();
    let layout = layout.raw("liar", image::OCI_MANIFEST, &idx);
    layout.blob(&img.manifest_digest, &img.manifest_bytes);
    layout.finish();
    let e = nullspace(&["image", "inspect", &format!("oci:{}:both", dir.display())]);
    assert!(
        !e.status.success() && e.stderr.contains("ambiguous"),
        "{}",
        e.stderr
    );
    let e = nullspace(&["image", "inspect", &format!("oci:{}:liar", dir.display())]);
    assert!(
        !e.status.success() && e.stderr.contains("disagrees"),
        "{}",
        e.stderr
    );
}

#[test]
fn oci_archive_and_docker_archives_old_and_new() {
    let tmp = tempfile::tempdir().unwrap();
    let img = app_image_with(Compression::Gzip);
    let dir = tmp.path().join("l");
    write_single(&dir, "v1", &img);
    let archive = tmp.path().join("image.oci.tar");
    image::tar_dir(&dir, &archive);
    let v = inspect_json(&[&format!("oci-archive:{}:v1", archive.display())]);
    assert_app_report(&v, &img);
    let v = inspect_json(&[&format!("oci-archive:{}", archive.display())]);
    assert_eq!(v["image"]["manifest_digest"], img.manifest_digest);

    for new_format in [false, true] {
        let da = tmp.path().join(format!("docker-{new_format}.tar"));
        image::docker_archive(&da, "example/app:1.0", &img, new_format);
        let v = inspect_json(&[&format!("docker-archive:{}:example/app:1.0", da.display())]);
        assert_eq!(v["image"]["config_digest"], img.config_digest);
        assert_eq!(
            v["runtime"]["start_cmd"],
            "/bin/app --name 'it'\\''s here' ''"
        );
        let out = tmp.path().join(format!("pulled-{new_format}"));
        nullspace(&[
            "image",
            "pull",
            &format!("docker-archive:{}", da.display()),
            "--output",
            out.to_str().unwrap(),
        ])
        .ok();
        run(Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci:{}", out.display())))
        .ok();
        let bundle = tmp.path().join(format!("bundle-{new_format}"));
        run(Command::new("umoci")
            .args(["unpack", "--rootless", "--image"])
            .arg(format!("{}:latest", out.display()))
            .arg(&bundle))
        .ok();
        assert_eq!(
            std::fs::read(bundle.join("rootfs/srv/data.txt")).unwrap(),
            b"payload"
        );
    }
    // Cross-check: skopeo reads our docker-archive the same way.
    let da = tmp.path().join("docker-false.tar");
    let sk = run(Command::new("skopeo")
        .arg("inspect")
        .arg(format!("docker-archive:{}", da.display())));
    sk.ok();
}

#[test]
fn bad_input_errors_are_one_line_and_leave_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    for (src, needle) in [
        ("oci:/nonexistent/layout", "not a directory"),
        ("Invalid_Ref::", "invalid reference"),
        ("dir:/tmp/x", "not supported"),
        ("oci-archive:/nonexistent.tar", "No such file"),
    ] {
        let e = nullspace(&["image", "pull", src, "--output", out.to_str().unwrap()]);
        assert!(!e.status.success(), "{src}");
        assert!(e.stderr.contains(needle), "{src}: {}", e.stderr);
        assert_eq!(e.stderr.trim().lines().count(), 1, "{src}: {}", e.stderr);
        assert!(!out.exists());
    }
    // A non-empty output directory is refused, and left as it was.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep"), b"x").unwrap();
    let img = app_image();
    write_single(&tmp.path().join("l"), "v1", &img);
    let e = nullspace(&[
        "image",
        "pull",
        &format!("oci:{}", tmp.path().join("l").display()),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(
        !e.status.success() && e.stderr.contains("not empty"),
        "{}",
        e.stderr
    );
    assert_eq!(std::fs::read(out.join("keep")).unwrap(), b"x");
}

#[test]
fn docker_manifest_list_and_schema2_from_registry() {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let docker = |arch: &str, marker: &str| {
        let tar = TarLayer::new()
            .file("marker", 0o644, marker.as_bytes())
            .into_tar();
        ImageSpec::new(vec![Layer::new(tar, Compression::Gzip)])
            .platform("linux", arch, None)
            .config(json!({"Env": [format!("MARKER={marker}")], "Cmd": ["/bin/true"]}))
            .docker()
            .build()
    };
    let amd = docker("amd64", "docker-amd64");
    let arm = docker("arm64", "docker-arm64");
    let src = tmp.path().join("src");
    let (layout, list_digest) = Layout::create(&src).index("list", &[&arm, &amd]);
    layout.finish();
    let r = reg.push_layout(&src, "list", "docker/app");

    let v = inspect_json(&[&r]);
    assert_eq!(v["image"]["index_digest"], list_digest);
    assert_eq!(v["image"]["manifest_digest"], amd.manifest_digest);
    assert_eq!(v["image"]["manifest_media_type"], image::DOCKER_MANIFEST);
    assert_eq!(v["image"]["layers"][0]["media_type"], image::DOCKER_LAYER);
    assert_eq!(v["runtime"]["env"]["MARKER"], "docker-amd64");

    // A schema2 manifest by digest, and its pull rewritten as OCI for umoci.
    let by_digest = format!("{}/docker/app@{}", reg.addr, arm.manifest_digest);
    let v = inspect_json(&["--platform", "linux/arm64", &by_digest]);
    assert_eq!(v["runtime"]["env"]["MARKER"], "docker-arm64");
    let out = tmp.path().join("pulled");
    let p = nullspace(&["image", "pull", &r, "--output", out.to_str().unwrap()]);
    p.ok();
    assert!(p.stdout.contains("rewritten as OCI"), "{}", p.stdout);
    let v = inspect_json(&[&format!("oci:{}", out.display())]);
    assert_eq!(v["image"]["manifest_media_type"], image::OCI_MANIFEST);
    assert_eq!(
        v["image"]["config_digest"], amd.config_digest,
        "blobs are unchanged"
    );
    let bundle = tmp.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--rootless", "--image"])
        .arg(format!("{}:list", out.display()))
        .arg(&bundle))
    .ok();
    assert_eq!(
        std::fs::read(bundle.join("rootfs/marker")).unwrap(),
        b"docker-amd64"
    );
}
