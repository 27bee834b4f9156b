//! The file operations beyond read and write (make_dir, write_files,
//! search_files, find_files, replace_in_files, rename, set_permissions,
//! remove) and metrics, through the published SDKs unchanged: 1.0.3
//! (`Machine`) and 0.1.9 (`Sandbox`) run `machine_files_scenario.py`
//! against a real server with the build VM. CPU-heavy (a TCG guest).

use std::path::Path;
use std::time::Instant;

use nullspace_testkit::registry::{Auth, Registry};
use nullspace_testkit::server::{Sdk, Server, run_sdk_version};

const SCENARIO: &str = include_str!("machine_files_scenario.py");

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
    assert!(
        failures.is_empty(),
        "failed: {failures:?}\nserver log:\n{}",
        server.log_text()
    );
    drop(reg);
}
