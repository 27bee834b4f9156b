//! Dockerfile and declarative builds through the server with the machine's
//! Dockerfile engine (buildah), driven by the published SDK and raw HTTP.
//! Each result is imported into an ext4 rootfs whose files are checked here.

use std::io::Read;
use std::path::{Path, PathBuf};

use nullspace_testkit::registry::{Auth, Registry};
use nullspace_testkit::server::{Server, run_sdk};
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
    let r = run_sdk(server, key, &script, &[]);
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
    let r = run_sdk(
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
