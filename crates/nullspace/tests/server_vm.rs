//! Builds finished in the build VM (`nullspace serve --build-vm`), driven by
//! the published SDK: the start command runs in the VM before the snapshot;
//! a sandbox restored from the snapshot finds it running, not restarted.

use std::path::Path;
use std::time::Duration;

use nullspace_testkit::registry::{Auth, Registry};
use nullspace_testkit::server::{Sdk, Server, run_sdk, run_sdk_version};
use nullspace_vm::Vm as _;

/// A failing native step through the SDK: `error_detail.phase` is
/// `build_step` and `step_index` its 1-based place among the request's
/// steps, in the exception, the status and the log entries (with
/// `total_steps`).
const FAILING_STEP: &str = r#"
import os
from nullspace import Template, TemplateBuild
from nullspace.errors import BuildError, MachineError, SandboxError
IMAGE = os.environ["NS_IMAGE"]
# 1.0 renamed the base class; the harness makes both names mean it.
assert issubclass(BuildError, SandboxError) and issubclass(BuildError, MachineError)
seen = []
# (The demo image runs as `app`: the steps write where it may.)
failing = (Template.from_image(IMAGE).run_cmd("true").make_dir("/tmp/made")
           .run_cmd("echo doomed; exit 9").run_cmd("echo never"))
try:
    Template.build(failing, name="native-broken", on_log_entry=seen.append)
    raise AssertionError("a failing step must fail the build")
except BuildError as e:
    assert getattr(e.phase, "value", e.phase) == "build_step", e.phase
    assert e.step_index == 3, (e.step_index, str(e))
    assert e.error_detail.step_index == 3, e.error_detail
    assert "step 3 of 4 (run) failed with exit code 9" in str(e), str(e)
    print("STEPFAIL", getattr(e.phase, "value", e.phase), e.step_index)
steps_seen = [(x.step_index, x.total_steps) for x in seen if getattr(x.phase, "value", x.phase) == "step"]
assert steps_seen and all(t == 4 for _, t in steps_seen), steps_seen
assert {i for i, _ in steps_seen} == {1, 2, 3}, steps_seen
assert any("doomed" in x.message for x in seen if x.step_index == 3), seen
err = [x for x in seen if x.kind.value == "error"]
assert len(err) == 1 and err[0].step_index == 3 and err[0].total_steps == 4, err
assert err[0].error_detail.step_index == 3, err[0].error_detail
st = TemplateBuild.connect(err[0].build_id).get_status().build
assert st.status.value == "error", st.status
assert st.error_detail.step_index == 3 and getattr(st.failure_phase, "value", st.failure_phase) == "build_step", st
assert getattr(st.error_detail.phase, "value", st.error_detail.phase) == "build_step", st.error_detail
print("FAILING STEP OK")
"#;

const SCRIPT: &str = r#"
import os
from nullspace import Template, TemplateBuild, wait_for_port
from nullspace.errors import BuildError
IMAGE = os.environ["NS_IMAGE"]
start = "sh -c 'echo $$ > /tmp/pid; exec httpd -f -p 8080 -h /srv'"
b = Template.build(Template.from_image(IMAGE).set_start_cmd(start, wait_for_port(8080)), name="web")
kinds = [e.phase for e in TemplateBuild.connect(b.build_id).logs()]
assert "vm_create" in kinds and "snapshot" in kinds, kinds
print("BUILD", b.build_id)
try:
    Template.build(Template.from_image(IMAGE).set_start_cmd("sh -c 'exit 3'", wait_for_port(8080)), name="broken")
    raise AssertionError("a start command that exits must fail readiness")
except BuildError as e:
    print("FAILED", getattr(e.phase, "value", e.phase))
# Native declarative steps (default backend) run inside the build VM.
import tempfile
ctx = tempfile.mkdtemp()
with open(os.path.join(ctx, "config.toml"), "w") as f:
    f.write("answer = 42\n")
steps = (Template.from_image(IMAGE).set_file_context(ctx)
         .set_user("root")
         .run_cmd("echo ran > /ran.txt")
         .copy("config.toml", "/etc/app/")
         .make_dir("/data", mode=0o700)
         .set_workdir("/data")
         .set_runtime_envs({"MODE": "prod"})
         .set_start_cmd("sh -c 'pwd > /tmp/cwd; id -u > /tmp/uid; echo $MODE > /tmp/mode; exec httpd -f -p 8080 -h /srv'", wait_for_port(8080)))
n = Template.build(steps, name="native")
st = TemplateBuild.connect(n.build_id).get_status().build
assert st.build_backend.value == "native", st.build_backend
rd = st.runtime_defaults
assert rd.default_workdir == "/data" and rd.default_user == "root" and "MODE" in rd.default_env_keys, rd
idx = [e.step_index for e in TemplateBuild.connect(n.build_id).logs() if e.phase == "step"]
assert 1 in idx and max(i for i in idx if i) >= 5, idx
print("NATIVE", n.build_id)
print("VM OK")
"#;

fn snapshot_of(server: &Server, key: &str, data: &Path, build: &str) -> nullspace_vm::Snapshot {
    let script = format!(
        "import httpx, os\nr = httpx.get(os.environ['NULLSPACE_API_URL'] + '/v1/templates/builds/{build}', headers={{'Authorization': 'Bearer ' + os.environ['NULLSPACE_API_KEY']}})\nprint(r.json()['build']['artifact_ids'][0])"
    );
    let a = run_sdk(server, key, &script, &[]);
    a.ok();
    let hex = a.stdout.trim().strip_prefix("sha256:").unwrap().to_string();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("artifacts/sha256").join(hex)).unwrap())
            .unwrap();
    // Relative to the artifact store.
    let rel = manifest["snapshot"].as_str().expect("snapshot");
    assert!(!rel.starts_with('/'), "{rel}");
    nullspace_vm::Snapshot::open(&data.join("artifacts").join(rel)).unwrap()
}

fn restore(snap: &nullspace_vm::Snapshot, dir: &Path) -> nullspace_vm::QemuVm {
    nullspace_vm::template::restore(
        snap,
        &nullspace_vm::RestoreSpec {
            work_dir: Some(dir.to_path_buf()),
            timeout: Duration::from_secs(60),
            ..Default::default()
        },
        &nullspace_vm::CancellationToken::new(),
    )
    .unwrap()
}

#[test]
fn build_vm_runs_the_start_command_and_snapshots_a_ready_template() {
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
    let key = server.key("team-a");
    let r = run_sdk(&server, &key, SCRIPT, &[("NS_IMAGE", &image)]);
    assert!(
        r.status.success() && r.stdout.contains("VM OK"),
        "{}\n{}\nserver log:\n{}",
        r.stdout,
        r.stderr,
        server.log_text()
    );
    assert!(r.stdout.contains("FAILED readiness"), "{}", r.stdout);
    let build = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("BUILD "))
        .unwrap()
        .to_string();
    let native = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("NATIVE "))
        .unwrap()
        .to_string();

    // The native build's snapshot holds what the steps did, and its start
    // command ran with the final defaults.
    {
        let snap = snapshot_of(&server, &key, &data, &native);
        let mut vm = restore(&snap, tmp.path());
        let out = vm
            .agent()
            .sh(
                "cat /ran.txt /etc/app/config.toml /tmp/cwd /tmp/uid /tmp/mode; stat -c %a /data",
                Duration::from_secs(30),
            )
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "ran\nanswer = 42\n/data\n0\nprod\n700\n"
        );
    }

    // The artifact manifest names the snapshot; restore it as a sandbox.
    let script = format!(
        "import httpx, os\nr = httpx.get(os.environ['NULLSPACE_API_URL'] + '/v1/templates/builds/{build}', headers={{'Authorization': 'Bearer ' + os.environ['NULLSPACE_API_KEY']}})\nprint(r.json()['build']['artifact_ids'][0])"
    );
    let a = run_sdk(&server, &key, &script, &[]);
    a.ok();
    let hex = a.stdout.trim().strip_prefix("sha256:").unwrap().to_string();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("artifacts/sha256").join(hex)).unwrap())
            .unwrap();
    let snap_dir = manifest["snapshot"]
        .as_str()
        .expect("snapshot in the artifact manifest");
    let snap = nullspace_vm::Snapshot::open(&data.join("artifacts").join(snap_dir)).unwrap();
    let mut vm = nullspace_vm::template::restore(
        &snap,
        &nullspace_vm::RestoreSpec {
            work_dir: Some(tmp.path().to_path_buf()),
            timeout: Duration::from_secs(60),
            ..Default::default()
        },
        &nullspace_vm::CancellationToken::new(),
    )
    .unwrap();
    let out = vm
        .agent()
        .sh(
            "cat /proc/$(cat /tmp/pid)/comm; wget -q -O - http://127.0.0.1:8080/",
            Duration::from_secs(30),
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.starts_with("httpd\n"),
        "the start command is not running after restore: {text:?}"
    );
    assert!(text.contains("hello from a nullspace template"), "{text:?}");
    let info = vm.agent().info(Duration::from_secs(10)).unwrap();
    assert_eq!(
        info["start"]["pid"], snap.meta.start["pid"],
        "restored, not restarted: {info}"
    );
}

const NET_SCRIPT: &str = r#"
import os, threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from nullspace import Template
from nullspace.errors import BuildError
IMAGE = os.environ["NS_IMAGE"]

class Ok(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"from-host")
    def log_message(self, *a):
        pass

srv = HTTPServer(("127.0.0.1", 0), Ok)
threading.Thread(target=srv.serve_forever, daemon=True).start()
# QEMU user networking maps the gateway 10.0.2.2 to the host's loopback.
step = f"wget -q -O /tmp/fetched http://10.0.2.2:{srv.server_port}/ && grep -q from-host /tmp/fetched"
b = Template.build(Template.from_image(IMAGE).run_cmd(step), name="net")
print("NET ON", b.status.value)
try:
    Template.build(Template.from_image(IMAGE).run_cmd(step), name="net", tags=["off"], internet_access=False)
    print("NET OFF built")
except BuildError as e:
    print("NET OFF", getattr(e.phase, "value", e.phase))
"#;

/// A native step that fails, seen through both published SDKs (0.1.9 and
/// 1.0.3): phase `build_step`, its 1-based `step_index` in the exception,
/// the record and the log (with `total_steps`); the build VM is gone.
#[test]
fn a_failing_native_step_reports_build_step_and_its_index_on_both_sdks() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let init = nullspace_vm::init_binary::locate_or_build(&workspace).expect("guest init");
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(Auth::None);
    let image = reg.push_demo(tmp.path(), "demo/steps");
    let data = tmp.path().join("data");
    let server = Server::start_with(
        &data,
        None,
        &["--build-vm", "--init-bin", init.to_str().unwrap()],
    );
    let key = server.key("team-a");
    let run_dir = std::fs::canonicalize(&data).unwrap().join("run");
    for sdk in Sdk::ALL {
        let r = run_sdk_version(sdk, &server, &key, FAILING_STEP, &[("NS_IMAGE", &image)]);
        assert!(
            r.status.success() && r.stdout.contains("FAILING STEP OK"),
            "SDK {}:\n{}\n{}\nserver log:\n{}",
            sdk.version(),
            r.stdout,
            r.stderr,
            server.log_text()
        );
        assert!(r.stdout.contains("STEPFAIL build_step 3"), "{}", r.stdout);
        // The failed build's VM ended with it.
        let left: Vec<_> = std::fs::read_dir(&run_dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("ns-"))
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "VM directories left: {left:?}");
        assert!(
            processes_mentioning(&run_dir.display().to_string()).is_empty(),
            "a process of this server's run directory is still running"
        );
    }
}

#[test]
fn build_vm_network_follows_internet_access_when_the_operator_allows_it() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let init = nullspace_vm::init_binary::locate_or_build(&workspace).expect("guest init");
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(Auth::None);
    let image = reg.push_demo(tmp.path(), "demo/net");
    let server = Server::start_with(
        &tmp.path().join("data"),
        None,
        &[
            "--build-vm",
            "--build-vm-network",
            "--init-bin",
            init.to_str().unwrap(),
        ],
    );
    let key = server.key("team-a");
    let r = run_sdk(&server, &key, NET_SCRIPT, &[("NS_IMAGE", &image)]);
    assert!(
        r.stdout.contains("NET ON ready") && r.stdout.contains("NET OFF build_step"),
        "{}\n{}\nserver log:\n{}",
        r.stdout,
        r.stderr,
        server.log_text()
    );
}

const DEFAULT_SCRIPT: &str = r#"
import os
from nullspace import Template, TemplateBuild
IMAGE = os.environ["NS_IMAGE"]
b = Template.build(Template.from_image(IMAGE).run_cmd("echo native > /tmp/native.txt"), name="plain")
st = TemplateBuild.connect(b.build_id).get_status().build
phases = [e.phase for e in TemplateBuild.connect(b.build_id).logs()]
assert st.build_backend.value == "native", st.build_backend
assert "vm_create" in phases and "snapshot" in phases, phases
print("DEFAULT", b.status.value)
"#;

/// A server started with no VM flags at all finds the guest init in its data
/// directory, turns the build VM on, and builds declarative steps with the
/// SDK's default (native) backend.
#[test]
fn a_default_server_has_the_build_vm_when_the_machine_can_run_it() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let init = nullspace_vm::init_binary::locate_or_build(&workspace).expect("guest init");
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(Auth::None);
    let image = reg.push_demo(tmp.path(), "demo/default");
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("guest")).unwrap();
    std::fs::copy(&init, data.join("guest/nullspace-init")).unwrap();
    let server = Server::start_with(&data, None, &["--auto-build-vm"]);
    let key = server.key("team-a");
    let r = run_sdk(&server, &key, DEFAULT_SCRIPT, &[("NS_IMAGE", &image)]);
    assert!(
        r.stdout.contains("DEFAULT ready"),
        "{}\n{}\nserver log:\n{}",
        r.stdout,
        r.stderr,
        server.log_text()
    );
    assert!(
        server.log_text().contains("build VM ready"),
        "{}",
        server.log_text()
    );
}

const SLOW: &str = r#"
import os
from nullspace import Template
IMAGE = os.environ["NS_IMAGE"]
b = Template.build_in_background(Template.from_image(IMAGE).run_cmd("echo started; sleep 600"), name=os.environ["NS_NAME"])
print("BUILD", b.build_id)
"#;

const CANCEL: &str = r#"
import os
from nullspace import TemplateBuild
TemplateBuild.connect(os.environ["NS_BUILD"]).cancel()
print("CANCELLED")
"#;

const STATUS: &str = r#"
import os
from nullspace import TemplateBuild
st = TemplateBuild.connect(os.environ["NS_BUILD"]).get_status().build
print("STATUS", getattr(st.status, "value", st.status))
"#;

/// Live processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let zombie = stat
            .rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('Z'));
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if !zombie && String::from_utf8_lossy(&cmdline).contains(needle) {
            out.push(pid);
        }
    }
    out
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t = std::time::Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    t.elapsed()
}

/// A build's VM in a long step: a cancel ends its QEMU within 2 s and the
/// build is `cancelled` with nothing left in the run directory; a server
/// killed with SIGKILL takes its build VM with it (PR_SET_PDEATHSIG), and
/// the restarted server removes what the dead one left in the run directory.
#[test]
fn cancel_and_a_killed_server_end_the_build_vm() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let init = nullspace_vm::init_binary::locate_or_build(&workspace).expect("guest init");
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(Auth::None);
    let image = reg.push_demo(tmp.path(), "demo/web");
    let data = tmp.path().join("data");
    let mut server = Server::start_with(
        &data,
        None,
        &["--build-vm", "--init-bin", init.to_str().unwrap()],
    );
    let key = server.key("team-a");
    let run_dir = std::fs::canonicalize(&data).unwrap().join("run");
    let run_str = run_dir.display().to_string();
    let start = |name: &str| {
        let r = run_sdk(
            &server,
            &key,
            SLOW,
            &[("NS_IMAGE", &image), ("NS_NAME", name)],
        );
        r.ok();
        r.stdout
            .lines()
            .find_map(|l| l.strip_prefix("BUILD "))
            .unwrap()
            .to_string()
    };
    // The step runs once the VM is up; give it time to get into `sleep`.
    let build = start("slow-cancel");
    wait_for("the build VM", Duration::from_secs(180), || {
        !processes_mentioning(&run_str).is_empty()
    });
    std::thread::sleep(Duration::from_secs(8));
    let r = run_sdk(&server, &key, CANCEL, &[("NS_BUILD", &build)]);
    r.ok();
    let took = wait_for("QEMU gone after cancel", Duration::from_secs(2), || {
        processes_mentioning(&run_str).is_empty()
    });
    eprintln!("build VM gone {took:?} after the cancel returned");
    wait_for("cancelled", Duration::from_secs(10), || {
        let r = run_sdk(&server, &key, STATUS, &[("NS_BUILD", &build)]);
        r.stdout.contains("STATUS cancelled")
    });
    // The run directory also holds the server's own `own_*` directory (its
    // lock and child pidfiles) while it serves: only VM directories count.
    let vm_dirs = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&run_dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("ns-"))
            .map(|e| e.path())
            .collect()
    };
    wait_for("run directory empty", Duration::from_secs(5), || {
        vm_dirs().is_empty()
    });
    assert!(
        !data
            .join("artifacts/snapshots")
            .join(format!("{build}.1"))
            .exists()
    );

    // SIGKILL the server mid-step.
    let _second = start("slow-kill");
    wait_for("the second build VM", Duration::from_secs(180), || {
        !processes_mentioning(&run_str).is_empty()
    });
    std::thread::sleep(Duration::from_secs(3));
    server.kill();
    let took = wait_for(
        "QEMU gone after the server was killed",
        Duration::from_secs(2),
        || processes_mentioning(&run_str).is_empty(),
    );
    eprintln!("build VM gone {took:?} after the server was killed");
    let left = vm_dirs();
    assert_eq!(left.len(), 1, "the dead server's VM directory: {left:?}");
    server.restart();
    wait_for("stale VM directory reaped", Duration::from_secs(30), || {
        !left[0].exists()
    });
}

const FLOOD: &str = r#"
import os
from nullspace import Template, TemplateBuild
IMAGE = os.environ["NS_IMAGE"]
# 2 GB of output from one native step, then a line that must not be logged
# either (the step's budget is spent), then a second step that logs again.
b = Template.build(Template.from_image(IMAGE)
                   .run_cmd("yes nullspace-flood | head -c 2000000000; echo flood-end")
                   .run_cmd("echo second-step"), name="flood")
logs = list(TemplateBuild.connect(b.build_id).logs())
step1 = [e.message or "" for e in logs if e.phase == "step" and e.step_index == 1]
trunc = [m for m in step1 if "output truncated" in m]
assert len(trunc) == 1, trunc
# The step's own output: not its description ("step 1: ..."), its
# duration ("step done ...") or the truncation entry.
out = [m for m in step1 if not m.startswith("step ") and "truncated" not in m]
print("LOGGED", sum(len(m.encode()) for m in out))
print("TRUNC", trunc[0])
assert not any("flood-end" in m for m in out), "output past the limit was logged"
assert any(e.step_index == 2 and "second-step" in (e.message or "") for e in logs), "the next step logs again"
print("FLOOD OK")
"#;

/// The guest is hostile: a native step that prints 2 GB neither grows the
/// server (peak RSS stays under 256 MiB; the agent channel and the log are
/// both bounded) nor fills the build log (1 MiB per step here, then one
/// entry that says how much was left out).
#[test]
fn a_step_that_prints_2_gb_keeps_the_server_small_and_the_log_marks_the_truncation() {
    const LIMIT: u64 = 1 << 20;
    const RSS_BOUND_KIB: u64 = 256 << 10;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let init = nullspace_vm::init_binary::locate_or_build(&workspace).expect("guest init");
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(Auth::None);
    let image = reg.push_demo(tmp.path(), "demo/web");
    let data = tmp.path().join("data");
    let limit = LIMIT.to_string();
    let server = Server::start_with(
        &data,
        None,
        &[
            "--build-vm",
            "--init-bin",
            init.to_str().unwrap(),
            "--step-log-limit-bytes",
            &limit,
        ],
    );
    let key = server.key("team-a");
    let r = run_sdk(&server, &key, FLOOD, &[("NS_IMAGE", &image)]);
    let out = &r.ok().stdout;
    let logged: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("LOGGED "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(logged > 0 && logged <= LIMIT, "logged {logged} bytes");
    let trunc = out.lines().find_map(|l| l.strip_prefix("TRUNC ")).unwrap();
    let dropped: u64 = trunc
        .split_whitespace()
        .skip_while(|w| *w != "truncated:")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {trunc:?}"));
    assert!(dropped >= 2_000_000_000 - LIMIT, "{trunc}");
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", server.pid().unwrap())).unwrap();
    let hwm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    eprintln!("server peak RSS {} MiB; {trunc}", hwm_kib >> 10);
    assert!(
        hwm_kib < RSS_BOUND_KIB,
        "server peak RSS {hwm_kib} KiB over the bound"
    );
}
