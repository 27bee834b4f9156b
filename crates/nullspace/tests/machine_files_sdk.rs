//! The file operations beyond read and write (make_dir, write_files,
//! search_files, find_files, replace_in_files, rename, set_permissions,
//! remove) and metrics, through the published SDKs unchanged: 1.0.3
//! (`Machine`) and 0.1.9 (`Sandbox`) run `machine_files_scenario.py`
//! against a real server with the build VM; then a guest flooding its
//! terminal and a watched directory (`machine_flood.py`) while the
//! server's RSS is measured. CPU-heavy (a TCG guest).

use std::path::Path;
use std::time::Instant;

use nullspace_testkit::registry::{Auth, Registry};
use nullspace_testkit::server::{Sdk, Server, run_sdk_version};

const SCENARIO: &str = include_str!("machine_files_scenario.py");
const FLOOD: &str = include_str!("machine_flood.py");

/// The demo image (user app, workdir /srv) as template "web".
const BUILD: &str = r#"
import os
from nullspace import Template, wait_for_port
start = "httpd -f -p 8080 -h /srv"
b = Template.build(Template.from_image(os.environ["NS_IMAGE"]).set_start_cmd(start, wait_for_port(8080)), name="web")
print("BUILT", b.status.value)
"#;

const CHECKS: &[&str] = &[
    "make_dir_makes_parents_as_the_user",
    "write_files_writes_each_file",
    "write_files_reports_a_file_it_could_not_write",
    "search_files_by_name",
    "find_files_by_content_with_line_numbers",
    "replace_in_files_rewrites_and_counts",
    "replace_refuses_a_file_the_user_may_not_write",
    "rename_and_set_permissions",
    "remove_files_and_trees",
    "errors_name_the_path_and_the_user",
    "hostile_paths_are_refused_on_every_route",
    "metrics_of_the_guest",
];

#[test]
fn both_published_sdks_pass_the_file_scenarios() {
    let tmp = tempfile::Builder::new()
        .prefix("ns-files")
        .tempdir()
        .unwrap();
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
    let t = Instant::now();
    let r = run_sdk_version(Sdk::V1_0_3, &server, &key, BUILD, &[("NS_IMAGE", &image)]);
    assert!(
        r.stdout.contains("BUILT ready"),
        "{}\n{}\nserver log:\n{}",
        r.stdout,
        r.stderr,
        server.log_text()
    );
    eprintln!("[timing] template built in {:?}", t.elapsed());
    let mut failures = vec![];
    for (sdk, v) in [(Sdk::V1_0_3, "1"), (Sdk::V0_1_9, "0")] {
        let t = Instant::now();
        let r = run_sdk_version(
            sdk,
            &server,
            &key,
            SCENARIO,
            &[("NS_SDK", v), ("NS_TEMPLATE", "web")],
        );
        eprintln!(
            "[{sdk:?}] file scenarios in {:?}\n{}",
            t.elapsed(),
            r.stdout
        );
        for name in CHECKS {
            if !r.stdout.lines().any(|l| l == format!("OK {name}")) {
                failures.push(format!("{sdk:?} {name}"));
            }
        }
        if !r.stdout.contains("DONE") {
            failures.push(format!("{sdk:?} did not finish: {}", r.stderr));
        }
    }
    // A guest that floods the terminal and the watcher (same template, one
    // more machine): the server's memory stays within the agent client's
    // stated bound for a few requests in flight plus allocator slack.
    let bound_kb = (nullspace_vm::Limits::default().memory_bound(4) >> 10) + (32 << 10);
    let pid = server.pid().unwrap().to_string();
    let t = Instant::now();
    let r = run_sdk_version(
        Sdk::V1_0_3,
        &server,
        &key,
        FLOOD,
        &[
            ("NS_SERVER_PID", &pid),
            ("NS_RSS_BOUND_KB", &bound_kb.to_string()),
            (
                "NS_WHOLE_READS",
                &nullspace_server::machine_api::files::WHOLE_READS.to_string(),
            ),
        ],
    );
    eprintln!("[V1_0_3] floods in {:?}\n{}", t.elapsed(), r.stdout);
    if !r.stdout.contains("FLOOD OK") {
        failures.push(format!("flood: {}", r.stderr));
    }
    assert!(
        failures.is_empty(),
        "failed: {failures:?}\nserver log:\n{}",
        server.log_text()
    );
    drop(reg);
}
