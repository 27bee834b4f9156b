//! Large uploads, directory uploads and signed URLs through the published
//! SDK 1.0.3, unchanged (`machines_uploads.py`), against a real server with
//! the build VM: a 200 MiB file and a directory arrive with their sha256
//! while the server's peak RSS grows less than the upload engine's stated
//! bound; parts out of order, twice, beyond the size get clear errors; a
//! tampered or expired signed URL is refused. CPU-heavy (a TCG guest).

use std::path::Path;
use std::time::Instant;

use nullspace_testkit::registry::{Auth, Registry};
use nullspace_testkit::server::{Sdk, Server, run_sdk_version};

const SCENARIO: &str = include_str!("machines_uploads.py");

/// The demo image with room on its disk for 200 MiB.
const BUILD: &str = r#"
import os
from nullspace import Template
b = Template.build(Template.from_image(os.environ["NS_IMAGE"]), name="roomy", disk_mb=1024)
print("BUILT", b.status.value)
"#;

const CHECKS: &[&str] = &[
    "upload_200mib_sha256_bounded_rss",
    "directory_upload_sha256_modes_links",
    "parts_out_of_order_twice_beyond_and_resume",
    "signed_urls_work_without_the_key_and_refuse_tampered_or_expired",
];

#[test]
fn uploads_and_signed_urls_through_the_published_sdk() {
    let tmp = tempfile::Builder::new().prefix("ns-up").tempdir().unwrap();
    let reg = Registry::start(Auth::None);
    let image = reg.push_demo(tmp.path(), "demo/up");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let init = nullspace_vm::init_binary::locate_or_build(&workspace)
        .expect("guest init")
        .display()
        .to_string();
    let data = tmp.path().join("data");
    let server = Server::start_with(&data, None, &["--build-vm", "--init-bin", &init]);
    let key = server.key("team-a");
    let r = run_sdk_version(Sdk::V1_0_3, &server, &key, BUILD, &[("NS_IMAGE", &image)]);
    assert!(
        r.stdout.contains("BUILT ready"),
        "{}\n{}\n{}",
        r.stdout,
        r.stderr,
        server.log_text()
    );
    // The engine's stated bound with the SDK's concurrency (4 parts in
    // flight) and a margin for the allocator's arenas.
    let limits = nullspace_server::uploads::Limits::default();
    let bound_kb = (limits.memory_bound(limits.max_concurrency as usize) >> 10) + (16 << 10);
    let pid = server.pid().unwrap().to_string();
    let t = Instant::now();
    let r = run_sdk_version(
        Sdk::V1_0_3,
        &server,
        &key,
        SCENARIO,
        &[
            ("NS_TEMPLATE", "roomy"),
            ("NS_SERVER_PID", &pid),
            ("NS_DATA_DIR", data.to_str().unwrap()),
            ("NS_NAMESPACE", "team-a"),
            ("NS_RSS_BOUND_KB", &bound_kb.to_string()),
        ],
    );
    eprintln!("scenarios in {:?}\n{}\n{}", t.elapsed(), r.stdout, r.stderr);
    let missing: Vec<_> = CHECKS
        .iter()
        .filter(|n| !r.stdout.lines().any(|l| l == format!("OK {n}")))
        .collect();
    assert!(
        missing.is_empty() && r.stdout.contains("DONE"),
        "failed: {missing:?}\n{}\n{}\nserver log:\n{}",
        r.stdout,
        r.stderr,
        server.log_text()
    );
    // Every session ended: the spool is empty.
    let left: Vec<_> = std::fs::read_dir(data.join("uploads"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "spool holds {left:?}");
}
