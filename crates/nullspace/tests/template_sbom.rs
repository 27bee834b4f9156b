//! `nullspace template sbom` against a real server: an image whose layers
//! hold package databases the real tools wrote (dpkg; rpm's BerkeleyDB
//! `Packages` written by `db5.3_load` from rpm's own headers; both from
//! nullspace-sbom's `make-rootfs.sh`), pushed to a real `docker-registry`,
//! built into a template; its SBOM, listed when the build ended, names
//! exactly the installed packages in both formats. Another namespace gets
//! nothing.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use nullspace_testkit::image::{Compression, ImageSpec, Layer, tar_dir};
use nullspace_testkit::registry::{Auth, Registry};
use nullspace_testkit::server::Server;
use nullspace_testkit::{Run, nullspace_bin, run};

fn cli(server: &Server, key: &str, args: &[&str]) -> Run {
    let mut cmd = Command::new(nullspace_bin());
    cmd.args(args)
        .env("NULLSPACE_API_URL", &server.url)
        .env("NULLSPACE_API_KEY", key)
        .env_remove("NULLSPACE_BASE_URL");
    run(&mut cmd)
}

fn expected(roots: &Path, name: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(roots.join(format!("expected-{name}.txt"))).unwrap();
    text.lines().map(str::to_owned).collect()
}

#[test]
fn a_templates_sbom_lists_exactly_its_packages_and_only_for_its_namespace() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let roots = t.join("roots");
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../nullspace-sbom/tests/fixtures/make-rootfs.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(&roots)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "make-rootfs.sh (scripts/deps.sh installs its tools):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let layer = |name: &str| {
        let tar = t.join(format!("{name}.tar"));
        tar_dir(&roots.join(name), &tar);
        Layer::new(std::fs::read(&tar).unwrap(), Compression::Gzip)
    };
    let img = ImageSpec::new(vec![layer("deb"), layer("rpm-bdb")]).build();
    let reg = Registry::start(Auth::None);
    let image = reg.push_image(t, "sbom/app", &img);
    let data = t.join("data");
    let server = Server::start_with(&data, None, &[]);
    let key = server.key("team-a");
    let b = cli(
        &server,
        &key,
        &["template", "build", "--from-image", &image, "--name", "app"],
    );
    assert!(b.status.success(), "{}\n{}", b.stderr, server.log_text());

    let mut want = expected(&roots, "deb");
    want.extend(expected(&roots, "rpm"));
    let spdx_file = t.join("app.spdx.json");
    let r = cli(
        &server,
        &key,
        &[
            "template",
            "sbom",
            "app",
            "--output",
            spdx_file.to_str().unwrap(),
        ],
    );
    assert!(r.status.success(), "{}\n{}", r.stderr, server.log_text());
    let spdx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&spdx_file).unwrap()).unwrap();
    assert_eq!(spdx["spdxVersion"], "SPDX-2.3");
    let got: BTreeSet<String> = spdx["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            format!(
                "{} {}",
                p["name"].as_str().unwrap(),
                p["versionInfo"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(got, want, "SPDX packages");

    let r = cli(
        &server,
        &key,
        &["template", "sbom", "app", "--format", "cyclonedx-json"],
    );
    assert!(r.status.success(), "{}", r.stderr);
    let cdx: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(cdx["specVersion"], "1.5");
    let got: BTreeSet<String> = cdx["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            format!(
                "{} {}",
                c["name"].as_str().unwrap(),
                c["version"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(got, want, "CycloneDX components");
    assert!(
        cdx["components"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["purl"].as_str().unwrap().starts_with("pkg:rpm/")),
        "rpm packages from the BerkeleyDB database"
    );
    // The same document again: byte-stable.
    let again = cli(
        &server,
        &key,
        &["template", "sbom", "app", "--format", "cyclonedx-json"],
    );
    assert_eq!(again.stdout, r.stdout);

    // Another namespace does not see the template; a bad format is a 400.
    let other = server.key("team-b");
    let r = cli(&server, &other, &["template", "sbom", "app"]);
    assert!(!r.status.success());
    assert!(r.stderr.contains("not found"), "{}", r.stderr);
    let resp = reqwest::blocking::Client::new()
        .get(format!(
            "{}/v1/templates/refs/app/sbom?format=xml",
            server.url
        ))
        .bearer_auth(&key)
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert!(resp.text().unwrap().contains("spdx-json"));
}
