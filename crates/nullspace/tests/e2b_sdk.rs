//! E2B's published Python SDK (`e2b>=2,<3`, unmodified; its venv made by
//! scripts/deps.sh from `e2b/requirements.txt`) drives a real server with
//! the build VM: `e2b/scenario.py` runs every check of issue 20's suite,
//! sync and async, with `E2B_API_URL` and `E2B_SANDBOX_URL` both the
//! server. Then the benchmark: E2B's `Sandbox.create` + first
//! `commands.run` against the Nullspace SDK's `Machine.create` + first
//! run, same template, same server. CPU-heavy (a TCG guest).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use nullspace_testkit::registry::{Auth, Registry};
use nullspace_testkit::server::{Sdk, Server, run_sdk_version};

const SCENARIO: &str = include_str!("e2b/scenario.py");

const BUILD: &str = r#"
import os
from nullspace import Template, wait_for_port
start = "httpd -f -p 8080 -h /srv"
b = Template.build(Template.from_image(os.environ["NS_IMAGE"]).set_start_cmd(start, wait_for_port(8080)), name="web")
print("BUILT", b.status.value)
"#;

const NULLSPACE_FIRST_RUN: &str = r#"
import time
from nullspace import Machine
t = time.monotonic()
m = Machine.create(template="web")
r = m.commands.run("echo hi", shell=True)
print(f"TIMING nullspace_create_and_first_run {time.monotonic() - t:.2f}")
assert r.stdout == "hi\n", r.stdout
m.kill()
"#;

const CHECKS: &[&str] = &[
    "create_from_a_template_with_envs_and_metadata",
    "run_output_stderr_and_a_failing_exit",
    "streaming_callbacks_arrive_while_the_command_runs",
    "background_command_with_stdin_and_close_stdin",
    "connect_to_a_running_command_and_kill",
    "files_read_write_list_exists_info_mkdir_rename_remove",
    "octet_stream_and_gzip_uploads_and_a_big_file",
    "stream_input_users_and_a_command_timeout",
    "watch_dir_polled",
    "pty_create_input_resize_kill",
    "set_timeout_get_info_and_list_with_metadata_and_paging",
    "pause_then_connect_keeps_files_and_a_background_process",
    "lifecycle_pause_at_the_timeout_then_connect_resumes",
    "isolation_between_namespaces_and_access_tokens",
    "what_is_not_offered_names_itself",
    "async_sdk_runs_commands_and_watches_a_directory",
    "metrics_kill_and_kill_of_a_killed_sandbox",
];

/// The venv's Python with the `e2b` SDK (`NULLSPACE_E2B_PYTHON`
/// overrides it).
fn e2b_python() -> PathBuf {
    if let Ok(p) = std::env::var("NULLSPACE_E2B_PYTHON") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/e2b-venv/bin/python");
    assert!(
        p.exists(),
        "{} missing: run scripts/deps.sh (it installs e2b from crates/nullspace/tests/e2b/requirements.txt)",
        p.display()
    );
    p
}

fn timing(out: &str, what: &str) -> Option<f64> {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("TIMING {what} ")))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn the_e2b_sdk_drives_nullspace_unchanged() {
    let tmp = tempfile::Builder::new().prefix("ns-e2b").tempdir().unwrap();
    let reg = Registry::start(Auth::None);
    let image = reg.push_demo(tmp.path(), "demo/web");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let init = nullspace_vm::init_binary::locate_or_build(&workspace)
        .expect("guest init")
        .display()
        .to_string();
    let server = Server::start_with(
        &tmp.path().join("data"),
        None,
        &["--build-vm", "--init-bin", init.as_str()],
    );
    let key = server.key("team-a");
    let other = server.key("team-b");
    let r = run_sdk_version(Sdk::V1_0_3, &server, &key, BUILD, &[("NS_IMAGE", &image)]);
    assert!(
        r.stdout.contains("BUILT ready"),
        "{}\n{}\nserver log:\n{}",
        r.stdout,
        r.stderr,
        server.log_text()
    );
    let t = Instant::now();
    let out = Command::new(e2b_python())
        .arg("-c")
        .arg(SCENARIO)
        .env("E2B_API_URL", &server.url)
        .env("E2B_SANDBOX_URL", &server.url)
        .env("E2B_API_KEY", &key)
        .env("NS_OTHER_KEY", &other)
        .env("NS_TEMPLATE", "web")
        .output()
        .expect("run the e2b scenario");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    eprintln!("[e2b] scenario in {:?}\n{stdout}", t.elapsed());
    let bench = run_sdk_version(Sdk::V1_0_3, &server, &key, NULLSPACE_FIRST_RUN, &[]);
    eprintln!(
        "[benchmark] create + first run: e2b SDK {:?} s, Nullspace SDK {:?} s\n{}",
        timing(&stdout, "e2b_create_and_first_run"),
        timing(&bench.stdout, "nullspace_create_and_first_run"),
        bench.stderr
    );
    let mut failures: Vec<String> = CHECKS
        .iter()
        .filter(|c| !stdout.lines().any(|l| l == format!("OK {c}")))
        .map(|c| c.to_string())
        .collect();
    if !stdout.contains("DONE") {
        failures.push("the scenario did not finish".into());
    }
    if timing(&bench.stdout, "nullspace_create_and_first_run").is_none() {
        failures.push(format!(
            "the Nullspace SDK benchmark failed: {}",
            bench.stderr
        ));
    }
    assert!(
        failures.is_empty(),
        "failed: {failures:?}\nstderr:\n{stderr}\nserver log:\n{}",
        server.log_text()
    );
    drop(reg);
}
