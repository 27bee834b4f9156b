//! Step JSON → typed steps → a rendered Dockerfile: a step prints back to
//! JSON that parses to the same step, and every Dockerfile the renderer
//! writes parses again with the base as its one stage's image.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use nullspace_build::dockerfile::analyze;
use nullspace_build::render::{RenderInput, render};
use nullspace_model::build::step::{Step, parse_all};

fuzz_target!(|data: &[u8]| {
    let Ok(serde_json::Value::Array(values)) = serde_json::from_slice(data) else {
        return;
    };
    let Ok(steps) = parse_all(&values) else {
        return;
    };
    for (i, s) in steps.iter().enumerate() {
        let again = Step::parse(i, &s.to_json()).expect("a printed step parses");
        assert_eq!(&again, s);
        let _ = s.describe();
        let _ = s.shell_command();
    }
    let mut envs = BTreeMap::new();
    envs.insert("A".to_string(), "x y $z".to_string());
    let input = RenderInput {
        base_image: "docker.io/library/alpine:3.20",
        steps: &steps,
        build_envs: &envs,
        runtime_envs: &envs,
    };
    let Ok(out) = render(&input) else {
        return;
    };
    let a = analyze(&out.dockerfile, &BTreeMap::new()).unwrap_or_else(|e| {
        panic!(
            "rendered Dockerfile does not parse ({e}):\n{}",
            out.dockerfile
        )
    });
    assert_eq!(a.stages.len(), 1, "{}", out.dockerfile);
    assert_eq!(a.stages[0].from, input.base_image);
});
