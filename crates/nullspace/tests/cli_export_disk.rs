//! `nullspace template export REF --format disk`: a template built in the
//! build VM (`serve --build-vm`) leaves as a disk that boots under plain
//! QEMU (TCG, a `pc` machine, no nullspace) to its start command, whose
//! HTTP server answers through a QEMU host forward. Another namespace
//! cannot export it.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use nullspace_testkit::registry::{Auth, Registry};
use nullspace_testkit::server::Server;
use nullspace_testkit::{Run, nullspace_bin, run};

fn cli(server: &Server, key: &str, args: &[&str]) -> Run {
    let mut cmd = Command::new(nullspace_bin());
    cmd.arg("template")
        .args(args)
        .env("NULLSPACE_API_URL", &server.url)
        .env("NULLSPACE_API_KEY", key);
    run(&mut cmd)
}

#[test]
fn exported_disk_boots_to_the_start_command_under_plain_qemu() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let init = nullspace_vm::init_binary::locate_or_build(&workspace).expect("guest init");
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(Auth::None);
    let image = reg.push_demo(tmp.path(), "demo/disk");
    let data = tmp.path().join("data");
    let server = Server::start_with(
        &data,
        None,
        &["--build-vm", "--init-bin", init.to_str().unwrap()],
    );
    let key = server.key("team-a");
    let start = "sh -c 'echo disk-says-hello > /tmp/index.html; exec httpd -f -p 8080 -h /tmp'";
    let b = cli(
        &server,
        &key,
        &[
            "build",
            "--from-image",
            &image,
            "--name",
            "web",
            "--start-cmd",
            start,
            "--ready-port",
            "8080",
        ],
    );
    assert!(
        b.status.success(),
        "{}\n{}\nserver log:\n{}",
        b.stdout,
        b.stderr,
        server.log_text()
    );

    // Another namespace does not see the template, and gets no file.
    let other = server.key("team-b");
    let denied = tmp.path().join("denied.qcow2");
    let r = cli(
        &server,
        &other,
        &[
            "export",
            "web",
            "--format",
            "disk",
            "--output",
            denied.to_str().unwrap(),
        ],
    );
    assert!(!r.status.success(), "{}", r.stdout);
    assert!(r.stderr.contains("template_not_found"), "{}", r.stderr);
    assert!(!denied.exists());

    let disk = tmp.path().join("web.qcow2");
    let t = Instant::now();
    let r = cli(
        &server,
        &key,
        &[
            "export",
            "web",
            "--format",
            "disk",
            "--output",
            disk.to_str().unwrap(),
        ],
    );
    assert!(
        r.status.success(),
        "{}\n{}\nserver log:\n{}",
        r.stdout,
        r.stderr,
        server.log_text()
    );
    eprintln!(
        "[timing] export through the API: {:?} ({})",
        t.elapsed(),
        r.stdout.trim()
    );
    // No temporary sibling of the output, no work directory on the server.
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".nullspace-disk-")
        })
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let work = std::fs::read_dir(data.join("work"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("export-disk-"))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(work, 0, "export work directories left on the server");

    let console = tmp.path().join("console.log");
    let answer = nullspace_testkit::plain_qemu::boot_and_get(
        &disk,
        "qcow2",
        &console,
        "/index.html",
        "disk-says-hello",
    );
    assert!(answer.starts_with("HTTP/1."), "{answer}");
}
