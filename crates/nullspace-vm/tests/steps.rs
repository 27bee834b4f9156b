//! Native declarative build steps in the build VM (busybox demo template):
//! one boot runs every step kind, starts the start command with the
//! defaults the steps left, snapshots; a restore checks files, modes and the
//! start command's user/workdir/env. Plus a failing step.
//! CPU-heavy: run with `--test-threads=1`.

use nullspace_vm::qemu::{QemuVmm, RestoreSpec};
use nullspace_vm::template::{self, GuestConfig, Step, StepEvent, TemplateSpec};
use nullspace_vm::{GuestKernel, Probe, Readiness, Vm, VmError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

fn setup() -> anyhow::Result<(QemuVmm, PathBuf)> {
    use nullspace_oci::SourceRef;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("nullspace-vm-steps");
    let _ = std::fs::remove_dir_all(dir.join("images"));
    std::fs::create_dir_all(dir.join("images"))?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let init = nullspace_vm::init_binary::locate_or_build(&workspace)?;
    let layout = dir.join("images/demo-layout");
    nullspace_testkit::image::Layout::create(&layout)
        .image("1", &nullspace_testkit::image::demo_image()?)
        .finish();
    let image = nullspace_oci::Image::resolve(
        &SourceRef::parse(&format!("oci:{}:1", layout.display()))?,
        &Default::default(),
    )?;
    let out = dir.join("images/demo");
    nullspace_build::import::import(
        &image,
        &out,
        &nullspace_build::import::ImportOptions::default(),
        &nullspace_oci::layout::NoProgress,
    )?;
    let vmm = QemuVmm::new(GuestKernel::find()?, &init, &dir.join("cache"))?;
    Ok((vmm, out.join("rootfs.ext4")))
}

fn fixture() -> &'static (QemuVmm, PathBuf) {
    static F: std::sync::OnceLock<(QemuVmm, PathBuf)> = std::sync::OnceLock::new();
    F.get_or_init(|| setup().expect("fixture"))
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// The image's own defaults: root, no workdir (the steps change them).
fn base_config(start: &str) -> GuestConfig {
    let mut c = GuestConfig::new("nullspace-steps");
    c.env.insert("PATH".into(), "/bin".into());
    c.start_cmd = Some(start.into());
    c
}

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn every_step_kind_then_start_command_snapshot_and_restore() {
    let _serial = serial();
    let (vmm, rootfs) = fixture();
    // Host context: a file (0640) and a directory with a nested file.
    let ctx = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    let file = ctx.path().join("config.toml");
    std::fs::write(&file, "x = 1\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let app = ctx.path().join("app");
    std::fs::create_dir_all(app.join("sub")).unwrap();
    std::fs::write(app.join("run.sh"), "#!/bin/sh\necho run\n").unwrap();
    std::fs::set_permissions(app.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(app.join("sub/data.txt"), "data\n").unwrap();
    let big: Vec<u8> = (0..(5 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(ctx.path().join("big.bin"), &big).unwrap();

    let steps = vec![
        Step::BuildEnv {
            envs: env(&[("BUILD_ONLY", "b1")]),
        },
        Step::Run {
            command: "id -u > /tmp/root-uid; echo $BUILD_ONLY > /tmp/build-env".into(),
            user: None,
        },
        Step::Run {
            command: "id -u > /tmp/app-uid".into(),
            user: Some("app".into()),
        },
        Step::Copy {
            sources: vec![(file.clone(), false)],
            dst: "/etc/app/".into(),
            user: None,
            mode: None,
        },
        Step::Copy {
            sources: vec![(file.clone(), false)],
            dst: "/etc/renamed.toml".into(),
            user: Some("app".into()),
            mode: Some(0o600),
        },
        Step::Copy {
            sources: vec![(app.clone(), true)],
            dst: "/opt/app".into(),
            user: Some("app".into()),
            mode: None,
        },
        Step::Copy {
            sources: vec![(ctx.path().join("big.bin"), false)],
            dst: "/opt/big.bin".into(),
            user: None,
            mode: Some(0o644),
        },
        Step::MakeDir {
            path: "/data".into(),
            mode: Some(0o700),
        },
        Step::MakeSymlink {
            target: "/data".into(),
            path: "/d".into(),
        },
        Step::Run {
            command: "echo junk > /tmp/junk; mkdir -p /tmp/tree/x; echo a > /tmp/a".into(),
            user: None,
        },
        Step::Remove {
            path: "/tmp/junk".into(),
            recursive: false,
            force: false,
        },
        Step::Remove {
            path: "/tmp/tree".into(),
            recursive: true,
            force: true,
        },
        Step::Rename {
            src: "/tmp/a".into(),
            dst: "/tmp/b".into(),
            force: true,
        },
        Step::Shell {
            action: "apt_install".into(),
            command: "echo pretend-install > /tmp/shell-step".into(),
        },
        Step::SkipCache,
        Step::Workdir {
            path: "/srv/site".into(),
        },
        Step::Env {
            envs: env(&[("GREETING", "hi there")]),
        },
        Step::Run {
            command: "chown app /srv/site; pwd > /tmp/run-pwd; echo \"$GREETING\" > /tmp/run-env"
                .into(),
            user: None,
        },
        Step::User { user: "app".into() },
        Step::Run {
            command: "id -u > /tmp/later-uid; echo hello from steps > index.html".into(),
            user: None,
        },
    ];
    let start = "echo $$ > /tmp/start-pid; (id -u; pwd; echo \"$GREETING\"; echo \"${BUILD_ONLY:-unset}\") > /tmp/start-facts; exec httpd -f -p 8080 -h .";
    let mut spec = TemplateSpec::new(rootfs, base_config(start));
    spec.disk_mb = Some(128);
    let mut r = Readiness::new(Probe::Tcp { port: 8080 });
    r.startup_grace = Duration::from_millis(300);
    spec.readiness = Some(r);
    let snapdir = tempfile::Builder::new()
        .prefix("ns-snap-")
        .tempdir()
        .unwrap();
    let out = snapdir.path().join("snap");
    let mut events: Vec<(usize, String)> = vec![];
    let mut output = String::new();
    let t = Instant::now();
    let snap = template::build_snapshot_with_steps(
        vmm,
        &spec,
        &steps,
        &mut |i, s, e| match e {
            StepEvent::Started => events.push((i, format!("start {}", s.action()))),
            StepEvent::Output(d) => output.push_str(&String::from_utf8_lossy(d)),
            StepEvent::Finished { .. } => events.push((i, "done".into())),
        },
        &out,
        &nocancel(),
    )
    .expect("snapshot with steps");
    eprintln!(
        "[timing] boot {} ms, {} steps {} ms, ready {} ms, snapshot {} ms (total {:?})",
        snap.meta.timings_ms.boot,
        steps.len(),
        snap.meta.timings_ms.steps,
        snap.meta.timings_ms.ready,
        snap.meta.timings_ms.snapshot,
        t.elapsed()
    );
    assert_eq!(events.len(), steps.len() * 2, "{events:?}");
    assert_eq!(events[0], (0, "start build_env".into()));
    assert!(output.contains("/opt/app/sub/data.txt"), "{output}");
    // The final runtime defaults are in the snapshot meta.
    assert_eq!(snap.meta.config.user.as_deref(), Some("app"));
    assert_eq!(snap.meta.config.workdir.as_deref(), Some("/srv/site"));
    assert_eq!(snap.meta.config.env["GREETING"], "hi there");
    assert!(!snap.meta.config.env.contains_key("BUILD_ONLY"));
    let start_pid = snap.meta.start["pid"].as_u64().expect("start pid");

    let snap = template::Snapshot::open(&out).unwrap();
    let t = Instant::now();
    let mut vm = template::restore(&snap, &RestoreSpec::default(), &nocancel()).expect("restore");
    let a = vm.agent();
    let sh = |a: &mut nullspace_vm::AgentClient, c: &str| {
        let o = a
            .exec(
                &nullspace_vm::ExecRequest {
                    cmd: Some(c.into()),
                    user: Some("root".into()),
                    ..Default::default()
                },
                T,
            )
            .unwrap();
        assert!(o.success(), "{c}: {o:?}");
        o.stdout_str()
    };
    assert_eq!(sh(a, "echo hi"), "hi\n");
    eprintln!("[timing] restore to first exec {:?}", t.elapsed());
    let facts = sh(
        a,
        "cat /tmp/root-uid /tmp/build-env /tmp/app-uid /tmp/shell-step /tmp/run-pwd /tmp/run-env /tmp/later-uid /tmp/b",
    );
    assert_eq!(
        facts,
        "0\nb1\n1000\npretend-install\n/srv/site\nhi there\n1000\na\n"
    );
    // Files, modes, owners (stat: mode octal, uid, name).
    let st = sh(
        a,
        "stat -c '%a %u %n' /etc/app/config.toml /etc/renamed.toml /opt/app /opt/app/run.sh /opt/app/sub /opt/app/sub/data.txt /opt/big.bin /data",
    );
    assert_eq!(
        st,
        "640 0 /etc/app/config.toml\n600 1000 /etc/renamed.toml\n755 1000 /opt/app\n755 1000 /opt/app/run.sh\n755 1000 /opt/app/sub\n644 1000 /opt/app/sub/data.txt\n644 0 /opt/big.bin\n700 0 /data\n"
    );
    assert_eq!(sh(a, "cat /opt/app/sub/data.txt"), "data\n");
    assert_eq!(a.read_file("/opt/big.bin", T).unwrap(), big);
    assert_eq!(sh(a, "readlink /d"), "/data\n");
    assert_eq!(
        sh(a, "ls /tmp/junk /tmp/tree /tmp/a 2>/dev/null | wc -l"),
        "0\n"
    );
    // The start command ran with the steps' user, workdir and runtime env,
    // without build envs, and was not restarted.
    assert_eq!(
        sh(a, "cat /tmp/start-facts"),
        "1000\n/srv/site\nhi there\nunset\n"
    );
    assert_eq!(sh(a, "cat /tmp/start-pid").trim(), start_pid.to_string());
    let info = a.info(T).unwrap();
    assert_eq!(info["start"]["pid"].as_u64(), Some(start_pid));
    assert_eq!(info["start"]["running"].as_bool(), Some(true));
    assert_eq!(
        sh(a, "wget -q -O - http://127.0.0.1:8080/index.html"),
        "hello from steps\n"
    );
    // Sandbox execs get the final defaults too.
    let who = a.sh("id -u; pwd; echo \"$GREETING\"", T).unwrap();
    assert_eq!(who.stdout_str(), "1000\n/srv/site\nhi there\n");
    drop(vm);
}

#[test]
fn failing_step_reports_its_index_and_leaves_no_vm() {
    let _serial = serial();
    let (vmm, rootfs) = fixture();
    let spec = TemplateSpec::new(rootfs, base_config("exec sleep 1000"));
    let steps = vec![
        Step::Run {
            command: "echo fine".into(),
            user: None,
        },
        Step::Run {
            command: "echo about to fail; echo oops >&2; exit 5".into(),
            user: None,
        },
        Step::Run {
            command: "echo never".into(),
            user: None,
        },
    ];
    let snapdir = tempfile::Builder::new()
        .prefix("ns-snap-")
        .tempdir()
        .unwrap();
    let out = snapdir.path().join("snap");
    let before = qemu_children();
    let mut seen = vec![];
    let err = template::build_snapshot_with_steps(
        vmm,
        &spec,
        &steps,
        &mut |i, _, e| {
            if let StepEvent::Started = e {
                seen.push(i)
            }
        },
        &out,
        &nocancel(),
    )
    .expect_err("step 1 fails");
    eprintln!("{err}");
    match &err {
        VmError::StepFailed {
            index,
            action,
            exit_code,
            tail,
        } => {
            assert_eq!(*index, 1);
            assert_eq!(action, "run");
            assert_eq!(*exit_code, Some(5));
            assert!(
                tail.contains("about to fail") && tail.contains("oops"),
                "{tail}"
            );
        }
        e => panic!("{e:?}"),
    }
    assert_eq!(err.code(), "step");
    assert_eq!(seen, vec![0, 1]);
    assert!(!out.exists(), "half-written snapshot left");
    assert_eq!(qemu_children(), before, "qemu left running");

    // A missing user is a failed step too (no exit code).
    let steps = vec![Step::Run {
        command: "true".into(),
        user: Some("nobody-here".into()),
    }];
    let err = template::build_snapshot_with_steps(
        vmm,
        &spec,
        &steps,
        &mut |_, _, _| {},
        &out,
        &nocancel(),
    )
    .expect_err("unknown user");
    assert!(
        matches!(&err, VmError::StepFailed { index: 0, exit_code: None, tail, .. } if tail.contains("nobody-here")),
        "{err:?}"
    );
    assert_eq!(qemu_children(), before, "qemu left running");
}

fn qemu_children() -> Vec<u32> {
    let me = std::process::id().to_string();
    let mut v = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let rest: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        if stat.contains("(qemu-system-x86")
            && rest.first() != Some(&"Z")
            && rest.get(1) == Some(&me.as_str())
        {
            v.push(pid);
        }
    }
    v
}

fn nocancel() -> nullspace_vm::CancellationToken {
    nullspace_vm::CancellationToken::new()
}
