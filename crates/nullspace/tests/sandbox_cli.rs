//! `nullspace sandbox create/exec/list/kill` on a data directory whose
//! server built a template in the build VM: two sandboxes restored from one
//! snapshot find the start command already running (same PID and start
//! time, not started again), both answer on its port, each has its own
//! disk, and nothing is left once they are killed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nullspace_testkit::registry::{Auth, Registry};
use nullspace_testkit::server::{Server, run_sdk};
use nullspace_testkit::{Run, nullspace_bin, run};

const SCRIPT: &str = r#"
import os
from nullspace import Template, wait_for_port
IMAGE = os.environ["NS_IMAGE"]
start = "sh -c 'echo $$ > /tmp/pid; date +%s%N > /tmp/started; exec httpd -f -p 8080 -h /srv'"
b = Template.build(Template.from_image(IMAGE).set_start_cmd(start, wait_for_port(8080)), name="web")
print("BUILD", b.build_id)
"#;

fn sandbox(data: &Path, args: &[&str]) -> Run {
    let mut cmd = Command::new(nullspace_bin());
    cmd.arg("sandbox")
        .arg(args[0])
        .arg("--data-dir")
        .arg(data)
        .args(&args[1..]);
    run(&mut cmd)
}

fn exec(data: &Path, id: &str, cmd: &[&str]) -> Run {
    let mut a = vec!["exec", id, "--"];
    a.extend(cmd);
    sandbox(data, &a)
}

/// Live processes whose command line mentions `needle` (zombies have none).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            out.push(format!("{name}: {cmdline}"));
        }
    }
    out
}

/// Kills whatever sandboxes are still recorded when the test ends early.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Ok(rd) = std::fs::read_dir(self.0.join("sandboxes")) else {
            return;
        };
        for e in rd.flatten() {
            if let Ok(b) = std::fs::read(e.path().join("state.json"))
                && let Ok(h) = serde_json::from_slice::<nullspace_vm::sandbox::SandboxHandle>(&b)
            {
                let _ = h.kill(Duration::from_secs(2));
            }
        }
    }
}

#[test]
fn sandboxes_restored_from_one_snapshot_share_the_started_process_but_not_the_disk() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let init = nullspace_vm::init_binary::locate_or_build(&workspace).expect("guest init");
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(Auth::None);
    let image = reg.push_demo(tmp.path(), "demo/web");
    let data = tmp.path().join("data");
    let server = Server::start_with(
        &data,
        None,
        &["--build-vm", "--init-bin", init.to_str().unwrap()],
    );
    let _cleanup = Cleanup(data.clone());
    let key = server.key("team-a");
    let t = Instant::now();
    let r = run_sdk(&server, &key, SCRIPT, &[("NS_IMAGE", &image)]);
    assert!(
        r.status.success(),
        "{}\n{}\nserver log:\n{}",
        r.stdout,
        r.stderr,
        server.log_text()
    );
    eprintln!("template build in the build VM: {:?}", t.elapsed());

    // Errors are one line.
    let r = sandbox(&data, &["create", "nope", "--namespace", "team-a"]);
    assert!(!r.status.success());
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("not found"), "{}", r.stderr);
    let r = exec(&data, "sbx_000000000000", &["true"]);
    assert!(!r.status.success());
    assert!(
        r.stderr.contains("no sandbox sbx_000000000000"),
        "{}",
        r.stderr
    );

    // Two sandboxes from the same snapshot.
    let mut ids = vec![];
    for _ in 0..2 {
        let t = Instant::now();
        let r = sandbox(&data, &["create", "web", "--namespace", "team-a"]);
        r.ok();
        let id = r.stdout.trim().to_string();
        assert!(id.starts_with("sbx_"), "{}", r.stdout);
        let created = t.elapsed();
        let first = exec(&data, &id, &["true"]);
        first.ok();
        eprintln!(
            "{id}: create {:?} ({}), first exec done {:?} after create started",
            created,
            r.stderr.trim(),
            t.elapsed()
        );
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1]);

    // The start command's process was restored, not started again.
    let probe = "cat /tmp/pid /tmp/started; cat /proc/$(cat /tmp/pid)/comm";
    let a = exec(&data, &ids[0], &["sh", "-c", probe]);
    a.ok();
    let b = exec(&data, &ids[1], &["sh", "-c", probe]);
    b.ok();
    assert_eq!(a.stdout, b.stdout, "same PID and start time in both");
    let lines: Vec<&str> = a.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", a.stdout);
    assert_eq!(lines[2], "httpd", "{}", a.stdout);
    let meta: serde_json::Value = {
        let st: serde_json::Value = serde_json::from_slice(
            &std::fs::read(data.join("sandboxes").join(&ids[0]).join("state.json")).unwrap(),
        )
        .unwrap();
        let snap = st["snapshot"].as_str().unwrap();
        serde_json::from_slice(&std::fs::read(Path::new(snap).join("snapshot.json")).unwrap())
            .unwrap()
    };
    assert_eq!(
        meta["start"]["pid"].to_string(),
        lines[0],
        "the snapshot's start pid"
    );

    // Both answer on the port.
    for id in &ids {
        let r = exec(
            &data,
            id,
            &["wget", "-q", "-O", "-", "http://127.0.0.1:8080/"],
        );
        r.ok();
        assert!(
            r.stdout.contains("hello from a nullspace template"),
            "{id}: {}",
            r.stdout
        );
    }

    // A file written in one is not in the other; a single string with
    // spaces runs under sh -c; the exit code comes back.
    exec(&data, &ids[0], &["echo x > /tmp/only-here && sync"]).ok();
    exec(&data, &ids[0], &["test", "-f", "/tmp/only-here"]).ok();
    let r = exec(&data, &ids[1], &["test", "-e", "/tmp/only-here"]);
    assert_eq!(r.status.code(), Some(1), "{}", r.stderr);
    let r = exec(
        &data,
        &ids[1],
        &["sh", "-c", "echo out; echo err >&2; exit 7"],
    );
    assert_eq!(r.status.code(), Some(7));
    assert_eq!(r.stdout, "out\n");
    assert_eq!(r.stderr, "err\n");

    // Listed as running.
    let r = sandbox(&data, &["list", "--json"]);
    r.ok();
    let list: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(list.len(), 2, "{}", r.stdout);
    for v in &list {
        assert_eq!(v["status"], "running", "{v}");
        assert_eq!(v["canonical_ref"], "team-a/web:default", "{v}");
        assert!(ids.contains(&v["id"].as_str().unwrap().to_string()));
    }
    let r = sandbox(&data, &["list"]);
    r.ok();
    assert!(
        r.stdout.contains(&ids[0]) && r.stdout.contains("running"),
        "{}",
        r.stdout
    );

    // Killed: no QEMU, overlay or socket left.
    let data_str = std::fs::canonicalize(&data).unwrap().display().to_string();
    assert_eq!(
        processes_mentioning(&format!("{data_str}/sandboxes")).len(),
        2
    );
    sandbox(&data, &["kill", &ids[0], &ids[1]]).ok();
    let left = processes_mentioning(&format!("{data_str}/sandboxes"));
    assert!(left.is_empty(), "QEMU left running: {left:?}");
    let dirs: Vec<_> = std::fs::read_dir(data.join("sandboxes"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(dirs.is_empty(), "sandbox dirs left: {dirs:?}");
    let r = sandbox(&data, &["list", "--json"]);
    assert_eq!(r.stdout.trim(), "[]");
    let r = exec(&data, &ids[0], &["true"]);
    assert!(r.stderr.contains("no sandbox"), "{}", r.stderr);

    // The data directory moved elsewhere (server stopped): the template
    // still restores, its snapshot being self-contained and recorded
    // relative to the artifact store.
    let mut server = server;
    server.kill();
    let moved = tmp.path().join("elsewhere/data");
    std::fs::create_dir_all(moved.parent().unwrap()).unwrap();
    std::fs::rename(&data, &moved).unwrap();
    let _cleanup_moved = Cleanup(moved.clone());
    let r = sandbox(&moved, &["create", "web", "--namespace", "team-a"]);
    r.ok();
    let id = r.stdout.trim().to_string();
    let r = exec(
        &moved,
        &id,
        &["wget", "-q", "-O", "-", "http://127.0.0.1:8080/"],
    );
    r.ok();
    assert!(r.stdout.contains("hello from a nullspace template"));
    sandbox(&moved, &["kill", &id]).ok();

    // A tampered snapshot file is refused in one line naming it.
    let snaps = moved.join("artifacts/snapshots");
    let snap = std::fs::read_dir(&snaps)
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let ram = snap.join("memory.ram");
    use std::os::unix::fs::{FileExt, PermissionsExt};
    std::fs::set_permissions(&ram, std::fs::Permissions::from_mode(0o644)).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&ram).unwrap();
    f.write_all_at(b"tampered", 4096).unwrap();
    drop(f);
    let r = sandbox(&moved, &["create", "web", "--namespace", "team-a"]);
    assert!(!r.status.success());
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("memory.ram (memory): sha256")
            && r.stderr.contains("rebuild the template"),
        "{}",
        r.stderr
    );
    assert!(processes_mentioning(&moved.display().to_string()).is_empty());
}

#[test]
fn a_template_built_without_the_build_vm_has_no_snapshot_to_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(Auth::None);
    let image = reg.push_demo(tmp.path(), "demo/plain");
    let data = tmp.path().join("data");
    let server = Server::start(&data, None);
    let key = server.key("default");
    let script = "import os\nfrom nullspace import Template\nTemplate.build(Template.from_image(os.environ['NS_IMAGE']), name='plain')\n";
    run_sdk(&server, &key, script, &[("NS_IMAGE", &image)]).ok();
    let r = sandbox(&data, &["create", "plain"]);
    assert!(!r.status.success());
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("has no snapshot: build the template with `nullspace serve --build-vm`"),
        "{}",
        r.stderr
    );
    assert!(
        !data.join("sandboxes").exists()
            || std::fs::read_dir(data.join("sandboxes"))
                .unwrap()
                .next()
                .is_none()
    );
}
