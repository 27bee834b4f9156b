//! Dockerfiles and `.dockerignore`: an analysed Dockerfile has stages whose
//! names are valid targets and whose lines exist; ignore patterns never
//! panic on any path.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use nullspace_build::context::DockerIgnore;
use nullspace_build::dockerfile::analyze;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(ignore) = DockerIgnore::parse(text) {
        for p in ["a", "a/b", "Dockerfile", ".git/config", "dir/sub/file.txt"] {
            let _ = ignore.is_ignored(p);
            let _ = ignore.deciding_line(p);
        }
    }
    let mut args = BTreeMap::new();
    args.insert("TAG".to_string(), "3.20".to_string());
    let Ok(a) = analyze(text, &args) else {
        return;
    };
    assert!(!a.stages.is_empty(), "an analysed Dockerfile has a stage");
    let lines = text.lines().count().max(1);
    for st in &a.stages {
        assert!(
            st.line >= 1 && st.line <= lines + 1,
            "stage line {} of {lines}",
            st.line
        );
        if let Some(name) = &st.name {
            a.check_target(name).expect("a stage name is a target");
        }
    }
    let _ = a.registry_hosts();
    let _ = a.external_images().count();
});
