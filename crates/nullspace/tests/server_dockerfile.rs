//! Dockerfile and declarative builds through the server with the machine's
//! Dockerfile engine (buildah), driven by the published SDK (0.1.9 and
//! 1.0.3) and raw HTTP.
//! Each result is imported into an ext4 rootfs whose files are checked here.

use std::io::Read;
use std::path::{Path, PathBuf};

use nullspace_testkit::registry::{Auth, Registry};
use nullspace_testkit::server::{Sdk, Server, run_sdk_version};
use nullspace_testkit::tree;

const SUITE: &str = include_str!("sdk/dockerfile_suite.py");

/// The rootfs of a ready build, found through its artifact manifest.
fn rootfs_of(data: &Path, record_artifact: &str) -> PathBuf {
    let hex = record_artifact.strip_prefix("sha256:").unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("artifacts/sha256").join(hex)).unwrap())
            .unwrap();
    let rootfs = manifest["rootfs"]
        .as_str()
        .unwrap()
        .strip_prefix("sha256:")
        .unwrap()
        .to_string();
    data.join("artifacts/sha256").join(rootfs)
}

fn artifact_of(server: &Server, key: &str, build_id: &str) -> String {
    let script = format!(
        "import httpx, os\nr = httpx.get(os.environ['NULLSPACE_API_URL'] + '/v1/templates/builds/{build_id}', headers={{'Authorization': 'Bearer ' + os.environ['NULLSPACE_API_KEY']}})\nprint(r.json()['build']['artifact_ids'][0])"
    );
    let r = run_sdk_version(Sdk::V0_1_9, server, key, &script, &[]);
    r.ok();
    r.stdout.trim().to_string()
}

fn read(tree_img: &Path, path: &str) -> Vec<u8> {
    let fs = mkext4::reader::Fs::open(std::fs::File::open(tree_img).unwrap()).unwrap();
    fs.read_file(fs.resolve(path).unwrap_or_else(|e| panic!("{path}: {e}")))
        .unwrap()
}

fn files_containing(dir: &Path, needle: &str, skip: &[PathBuf]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if skip.iter().any(|s| d.starts_with(s)) {
            continue;
        }
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if skip.iter().any(|s| p.starts_with(s)) {
                continue;
            }
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

#[test]
fn dockerfile_and_declarative_builds_with_the_machine_engine() {
    dockerfile_suite(Sdk::V0_1_9);
}

#[test]
fn dockerfile_and_declarative_builds_with_sdk_1_0() {
    dockerfile_suite(Sdk::V1_0_3);
}

fn dockerfile_suite(sdk: Sdk) {
    assert!(
        nullspace_testkit::have("buildah"),
        "buildah is not installed (scripts/deps.sh installs it)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(Auth::None);
    let image = reg.push_demo(tmp.path(), "demo/base");
    let data = tmp.path().join("data");
    let server = Server::start(&data, None);
    let key = server.key("team-a");
    let secret = "NS-BUILD-SECRET-91c2e7";
    let r = run_sdk_version(
        sdk,
        &server,
        &key,
        SUITE,
        &[("NS_IMAGE", &image), ("NS_SECRET", secret)],
    );
    assert!(
        r.status.success() && r.stdout.contains("DOCKERFILE OK"),
        "{}\n{}\nserver log:\n{}",
        r.stdout,
        r.stderr,
        server.log_text()
    );
    let value = |k: &str| {
        r.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k} ")))
            .unwrap_or_else(|| panic!("{k} missing in {}", r.stdout))
            .to_string()
    };
    eprintln!("cache timing: {}", value("CACHE"));

    let img = rootfs_of(&data, &artifact_of(&server, &key, &value("DF_BUILD")));
    assert_eq!(read(&img, "/built.txt"), b"built plain\n");

    let img = rootfs_of(&data, &artifact_of(&server, &key, &value("CTX_BUILD")));
    assert_eq!(
        read(&img, "/opt/processed.txt"),
        b"hello from the context\n"
    );
    assert_eq!(read(&img, "/etc/app/settings.toml"), b"x = 1\n");
    let t = tree::from_ext4(&img).unwrap();
    assert!(
        !t.contains_key("etc/app/ignored.key"),
        ".dockerignore was not honoured"
    );

    let secret_img = rootfs_of(&data, &artifact_of(&server, &key, &value("SECRET_BUILD")));
    assert_eq!(
        read(&secret_img, "/secret-copy"),
        secret.as_bytes(),
        "the secret reached the build"
    );
    // Outside the image content itself (the template rootfs, and the
    // engine's layer storage holding that image's layers), the secret is
    // nowhere: not in the database, logs, definitions, work or temp dirs.
    let skip = [data.join("artifacts/sha256"), data.join("engines")];
    let hits = files_containing(&data, secret, &skip);
    assert!(hits.is_empty(), "secret persisted in {hits:?}");
    assert!(!server.log_text().contains(secret));

    let img = rootfs_of(&data, &artifact_of(&server, &key, &value("DECL_BUILD")));
    assert_eq!(read(&img, "/etc/app/app.conf"), b"key = value\n");
    assert_eq!(read(&img, "/ran.txt"), b"ran\n");
    let t = tree::from_ext4(&img).unwrap();
    assert_eq!(t["etc/app/app.conf"].mode, 0o640);
    assert_eq!(t["data"].mode, 0o700);
}

const DIGESTS: &str = r#"
import os, tempfile, time
import httpx
from nullspace import Template, TemplateBuild
from nullspace.errors import BuildError
IMAGE = os.environ["NS_IMAGE"]
URL, KEY = os.environ["NULLSPACE_API_URL"], os.environ["NULLSPACE_API_KEY"]

def record(build_id, terminal=True):
    while True:
        b = TemplateBuild.connect(build_id).get_status().build
        if not terminal or b.status.value in ("ready", "error", "cancelled"):
            return b
        time.sleep(0.25)

def same(kind, plan, rec):
    got = (rec.source_digest, rec.dockerfile_digest, rec.context_digest)
    want = (plan.source_digest, plan.dockerfile_digest,
            plan.context_manifest.context_digest if plan.context_manifest else None)
    assert got == want, (kind, got, want)
    assert rec.source_digest and rec.source_digest.startswith("sha256:"), (kind, rec.source_digest)
    print("SAME", kind, rec.status.value, rec.source_type.value,
          "dockerfile" if rec.dockerfile_digest else "-", "context" if rec.context_digest else "-",
          "|", rec.error or "")

# OCI import.
b = Template.from_image(IMAGE).set_start_cmd("sleep 1000")
h = Template.build_in_background(b, name="dig-oci")
same("oci_import", Template.plan(b, name="dig-oci"), record(h.build_id))

# Dockerfile text, no context.
# (The demo image runs as `app`; RUN keeps the image's USER.)
b = Template.from_dockerfile_content(f"FROM {IMAGE}\nUSER root\nRUN echo hi > /hi\n")
h = Template.build_in_background(b, name="dig-df")
same("dockerfile", Template.plan(b, name="dig-df"), record(h.build_id))

# A Dockerfile with a context directory: plan sends the files inline, the
# build uploads them as blobs; the context digest is the same.
ctx = tempfile.mkdtemp()
os.makedirs(os.path.join(ctx, "src"))
for n in ("a.txt", "b.txt"):
    with open(os.path.join(ctx, "src", n), "w") as f:
        f.write("hello " + n + "\n")
with open(os.path.join(ctx, "Dockerfile"), "w") as f:
    f.write(f"FROM {IMAGE}\nCOPY src /src\n")
b = Template.from_dockerfile(os.path.join(ctx, "Dockerfile"))
h = Template.build_in_background(b, name="dig-ctx")
p = Template.plan(b, name="dig-ctx")
assert p.context_manifest and p.context_manifest.file_count == 2, p.context_manifest
same("context_upload", p, record(h.build_id))

# Declarative steps with an uploaded context (the SDK default, native: this
# server has no build VM, so it fails in prepare; the digests are recorded
# when the build is created).
cfg = tempfile.mkdtemp()
with open(os.path.join(cfg, "config.toml"), "w") as f:
    f.write("answer = 42\n")
b = (Template.from_image(IMAGE).set_file_context(cfg).copy("config.toml", "/etc/app/")
     .run_cmd("echo ran > /ran").set_runtime_envs({"MODE": "prod"}))
p = Template.plan(b, name="dig-decl")
h = Template.build_in_background(b, name="dig-decl")
rec = record(h.build_id)
assert rec.status.value == "error" and rec.failure_phase == "prepare", rec
same("declarative", p, rec)

# The same declarative request on the Dockerfile engine (raw HTTP: the SDK
# only names native|buildkit), built for real.
body = {"base_image": IMAGE, "name": "dig-decl-engine", "build_backend": "buildah",
        "steps": [{"action": "user", "user": "root"}, {"action": "make_dir", "path": "/data", "mode": "0700"}, {"action": "run", "command": "echo ran > /ran"}],
        "runtime_config": {"default_envs": {"MODE": "prod"}}}
hdr = {"Authorization": f"Bearer {KEY}"}
plan = httpx.post(URL + "/v1/templates/plan", json=body, headers=hdr).json()
created = httpx.post(URL + "/v1/templates/builds", json=body, headers=hdr).json()
rec = record(created["build_id"])
assert rec.status.value == "ready", rec.error
assert (rec.source_digest, rec.dockerfile_digest, rec.context_digest) == (plan["source_digest"], plan["dockerfile_digest"], None), (rec, plan)
assert plan["build_plan"]["steps"][1] == {"action": "make_dir", "path": "/data", "mode": "0700"}, plan["build_plan"]
print("SAME declarative_engine", rec.status.value)
print("DIGESTS OK")
"#;

/// `POST /v1/templates/plan` and the build record of the same request show
/// the same source, Dockerfile and context digests (one function computes
/// them): an OCI import, a Dockerfile, a Dockerfile with an uploaded
/// context (inline in the plan, blobs in the build) and declarative steps
/// with an uploaded context.
#[test]
fn plan_and_build_record_the_same_digests() {
    assert!(
        nullspace_testkit::have("buildah"),
        "buildah is not installed (scripts/deps.sh installs it)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(Auth::None);
    let image = reg.push_demo(tmp.path(), "demo/digests");
    let server = Server::start(&tmp.path().join("data"), None);
    let key = server.key("team-a");
    // Both SDKs, one after the other on the same server (the second
    // run's engine builds are final-artifact cache hits: same digests).
    for sdk in Sdk::ALL {
        let r = run_sdk_version(sdk, &server, &key, DIGESTS, &[("NS_IMAGE", &image)]);
        assert!(
            r.status.success() && r.stdout.contains("DIGESTS OK"),
            "SDK {}:\n{}\n{}\nserver log:\n{}",
            sdk.version(),
            r.stdout,
            r.stderr,
            server.log_text()
        );
        for line in [
            "SAME oci_import ready oci_import - -",
            "SAME dockerfile ready dockerfile dockerfile -",
            "SAME context_upload ready dockerfile dockerfile context",
            "SAME declarative error declarative - context",
            "SAME declarative_engine ready",
        ] {
            assert!(
                r.stdout.contains(line),
                "SDK {} {line}: {}",
                sdk.version(),
                r.stdout
            );
        }
    }
}
