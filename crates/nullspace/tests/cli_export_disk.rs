//! `nullspace template export REF --format disk`: a template built in the
//! build VM (`serve --build-vm`) leaves as a disk that boots under plain
//! QEMU (TCG, a `pc` machine, no nullspace) to its start command, whose
//! HTTP server answers through a QEMU host forward. Another namespace
//! cannot export it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nullspace_testkit::registry::{Auth, Registry};
use nullspace_testkit::server::Server;
use nullspace_testkit::{Run, nullspace_bin, run};

struct Qemu(Child);
impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cli(server: &Server, key: &str, args: &[&str]) -> Run {
    let mut cmd = Command::new(nullspace_bin());
    cmd.arg("template")
        .args(args)
        .env("NULLSPACE_API_URL", &server.url)
        .env("NULLSPACE_API_KEY", key);
    run(&mut cmd)
}

fn get(port: u16) -> Option<String> {
    let mut s = TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(2),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    (!out.is_empty()).then_some(out)
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

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let console = tmp.path().join("console.log");
    let t = Instant::now();
    let _q = Qemu(
        Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-m",
                "512",
                "-display",
                "none",
                "-no-reboot",
            ])
            .arg("-drive")
            .arg(format!("file={},if=virtio", disk.display()))
            .arg("-nic")
            .arg(format!(
                "user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{port}-:8080"
            ))
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64"),
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if get(port).is_some_and(|a| a.starts_with("HTTP/1.") && a.contains("disk-says-hello")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no answer through the host forward; console:\n{}",
            std::fs::read_to_string(&console).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "[timing] plain QEMU boot to an HTTP answer: {:?}",
        t.elapsed()
    );
}
