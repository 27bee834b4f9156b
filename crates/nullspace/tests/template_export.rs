//! `nullspace template export` against real servers (`--build-vm`): a
//! template built from the embedded demo image with native steps and a
//! start command, exported through the API. The archive passes `skopeo
//! inspect`; `umoci unpack` gives the tree of the template's disk (as
//! `ext4_read` reads it: modes, owners, links, xattrs); two servers with
//! their own data directories export the same bytes; a push to a real
//! `docker-registry` imported again with `nullspace image import` gives
//! the same tree.

use std::path::{Path, PathBuf};
use std::process::Command;

use nullspace_testkit::export_tree;
use nullspace_testkit::registry::{Auth, Registry};
use nullspace_testkit::server::Server;
use nullspace_testkit::{Run, nullspace_bin, run};

const START: &str = "exec httpd -f -p 8080 -h /srv";

fn cli(server: &Server, key: &str, args: &[&str]) -> Run {
    let mut cmd = Command::new(nullspace_bin());
    cmd.args(args)
        .env("NULLSPACE_API_URL", &server.url)
        .env("NULLSPACE_API_KEY", key)
        .env_remove("NULLSPACE_BASE_URL")
        .env_remove("NULLSPACE_REGISTRY_USERNAME")
        .env_remove("NULLSPACE_REGISTRY_PASSWORD");
    let r = run(&mut cmd);
    assert!(
        r.status.success(),
        "nullspace {args:?} failed:\n{}\n{}\nserver log:\n{}",
        r.stdout,
        r.stderr,
        server.log_text()
    );
    r
}

/// Builds the template `web` on `server` and returns its snapshot disk.
fn build(server: &Server, key: &str, data: &Path, image: &str) -> PathBuf {
    cli(
        server,
        key,
        &[
            "template",
            "build",
            "--from-image",
            image,
            "--name",
            "web",
            "--set-user",
            "root",
            "--run-cmd",
            "echo ran > /ran.txt && ln /ran.txt /ran.link && ln -s ran.txt /ran.sym && chown 1234:4321 /ran.txt && chmod 4750 /ran.txt && mkdir -p /srv/deep && echo page > /srv/deep/index.html",
            "--set-runtime-env",
            "MODE=prod",
            "--set-workdir",
            "/srv",
            "--start-cmd",
            START,
            "--ready-cmd",
            "test -d /srv/deep",
        ],
    );
    // The artifact whose start command is ours (the base template has none).
    for ent in std::fs::read_dir(data.join("artifacts/sha256")).unwrap() {
        let p = ent.unwrap().path();
        let Ok(bytes) = std::fs::read(&p) else {
            continue;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue;
        };
        if v["start_cmd"] == START {
            let rel = v["snapshot"].as_str().expect("a snapshot");
            return data.join("artifacts").join(rel).join("disk.ext4");
        }
    }
    panic!("no artifact with the start command in {}", data.display());
}

#[test]
fn exported_templates_pass_oci_tools_match_the_disk_and_are_reproducible() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let init = nullspace_vm::init_binary::locate_or_build(&workspace).expect("guest init");
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let reg = Registry::start(Auth::None);
    let image = reg.push_demo(t, "demo/web");
    let args = ["--build-vm", "--init-bin", init.to_str().unwrap()];
    let (data_a, data_b) = (t.join("data-a"), t.join("data-b"));
    let a = Server::start_with(&data_a, None, &args);
    let key_a = a.key("team-a");
    let disk_a = build(&a, &key_a, &data_a, &image);

    // The archive, as the API streams it.
    let arch_a = t.join("a.oci.tar");
    let out = cli(
        &a,
        &key_a,
        &[
            "template",
            "export",
            "web",
            "--format",
            "oci-archive",
            "--output",
            arch_a.to_str().unwrap(),
            "--json",
        ],
    );
    let summary: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let digest = summary["manifest_digest"].as_str().unwrap().to_string();
    let insp = Command::new("skopeo")
        .args(["inspect", "--config"])
        .arg(format!("oci-archive:{}", arch_a.display()))
        .output()
        .unwrap();
    assert!(
        insp.status.success(),
        "{}",
        String::from_utf8_lossy(&insp.stderr)
    );
    let cfg: serde_json::Value = serde_json::from_slice(&insp.stdout).unwrap();
    let c = &cfg["config"];
    assert_eq!(c["Cmd"], serde_json::json!([START]), "{cfg}");
    assert_eq!(c["Entrypoint"], serde_json::json!(["/bin/sh", "-c"]));
    assert_eq!(c["WorkingDir"], "/srv");
    assert!(
        c["Env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "MODE=prod"),
        "{cfg}"
    );
    assert_eq!(c["Labels"]["dev.nullspace.template"], "web");
    let raw = Command::new("skopeo")
        .args(["inspect", "--raw", "--config"])
        .arg(format!("oci-archive:{}", arch_a.display()))
        .output()
        .unwrap();
    let raw: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert_eq!(
        raw["config"]["Healthcheck"]["Test"],
        serde_json::json!(["CMD-SHELL", "test -d /srv/deep"])
    );

    // umoci's unpack of the layout form equals the disk.
    let layout = t.join("layout-a");
    cli(
        &a,
        &key_a,
        &[
            "template",
            "export",
            "web",
            "--format",
            "oci",
            "--output",
            layout.to_str().unwrap(),
        ],
    );
    let bundle = t.join("bundle");
    let u = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:latest", layout.display()))
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(
        u.status.success(),
        "umoci: {}",
        String::from_utf8_lossy(&u.stderr)
    );
    // The snapshot is taken with the root file system mounted: its journal
    // needs recovery, which the reader replays on a copy.
    let img = nullspace_rootfs::ext4_read::Ext4Image::open(&disk_a, t).unwrap();
    assert!(
        img.replayed_journal,
        "the snapshot's disk had a clean journal"
    );
    drop(img);
    let want = export_tree::from_image(&disk_a, t).unwrap();
    let ran = &want["ran.txt"];
    assert_eq!(
        (ran.mode, ran.uid, ran.gid),
        (0o4750, 1234, 4321),
        "{ran:?}"
    );
    assert_eq!(ran.link_group.as_deref(), Some("ran.link"));
    assert_eq!(want["srv/deep/index.html"].size, 5);
    let got = export_tree::from_dir(&bundle.join("rootfs")).unwrap();
    let d = export_tree::diff(&want, &got);
    assert!(d.is_empty(), "umoci's tree differs:\n{}", d.join("\n"));

    // Another namespace does not see the private template; a bad
    // compression is the caller's error; zstd passes skopeo too.
    let key_other = a.key("team-z");
    let mut cmd = Command::new(nullspace_bin());
    cmd.args(["template", "export", "web", "--output"])
        .arg(t.join("other.oci.tar"))
        .env("NULLSPACE_API_URL", &a.url)
        .env("NULLSPACE_API_KEY", &key_other);
    let r = run(&mut cmd);
    assert_eq!(r.status.code(), Some(1), "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("not found"), "{}", r.stderr);
    assert!(!t.join("other.oci.tar").exists());
    let status = {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(a.url.trim_start_matches("http://")).unwrap();
        write!(
            c,
            "GET /v1/templates/refs/web/export?compression=xz HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key_a}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        answer.lines().next().unwrap_or_default().to_string()
    };
    assert!(status.starts_with("HTTP/1.1 400"), "{status}");
    let arch_z = t.join("z.oci.tar");
    cli(
        &a,
        &key_a,
        &[
            "template",
            "export",
            "web",
            "--output",
            arch_z.to_str().unwrap(),
            "--compression",
            "zstd",
        ],
    );
    let insp = Command::new("skopeo")
        .args(["inspect", "--raw"])
        .arg(format!("oci-archive:{}", arch_z.display()))
        .output()
        .unwrap();
    assert!(
        insp.status.success(),
        "{}",
        String::from_utf8_lossy(&insp.stderr)
    );
    let m: serde_json::Value = serde_json::from_slice(&insp.stdout).unwrap();
    assert_eq!(
        m["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );

    // Pushed and imported again: the same tree.
    let pushed = format!("docker://{}/exported/web:1", reg.addr);
    let arch_p = t.join("p.oci.tar");
    cli(
        &a,
        &key_a,
        &[
            "template",
            "export",
            "web",
            "--output",
            arch_p.to_str().unwrap(),
            "--push",
            &pushed,
        ],
    );
    let imported = t.join("imported");
    cli(
        &a,
        &key_a,
        &[
            "image",
            "import",
            &pushed,
            "--output",
            imported.to_str().unwrap(),
            "--no-cache",
        ],
    );
    let again = export_tree::from_image(&imported.join("rootfs.ext4"), t).unwrap();
    let d = export_tree::diff(&want, &again);
    assert!(d.is_empty(), "the imported tree differs:\n{}", d.join("\n"));

    // A second server, its own data directory and build: the same image.
    drop(a);
    let b = Server::start_with(&data_b, None, &args);
    let key_b = b.key("team-b");
    build(&b, &key_b, &data_b, &image);
    let arch_b = t.join("b.oci.tar");
    let out = cli(
        &b,
        &key_b,
        &[
            "template",
            "export",
            "web",
            "--output",
            arch_b.to_str().unwrap(),
            "--json",
        ],
    );
    let sb: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(sb["manifest_digest"], digest.as_str());
    assert_eq!(
        std::fs::read(&arch_a).unwrap(),
        std::fs::read(&arch_b).unwrap()
    );
}
