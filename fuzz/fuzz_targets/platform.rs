//! Platform strings (`os/arch[/variant]`): a parsed spec prints and parses
//! back equal, and it always matches a platform made of its own fields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nullspace_oci::platform::{PlatformSpec, normalize_arch};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = normalize_arch(s);
    let Ok(spec) = PlatformSpec::parse(s) else {
        return;
    };
    let printed = spec.to_string();
    let again = PlatformSpec::parse(&printed).expect("a printed platform parses");
    assert_eq!(again, spec, "{s:?} printed as {printed:?}");
    let own: nullspace_oci::manifest::Platform = serde_json::from_value(serde_json::json!({
        "os": spec.os,
        "architecture": spec.architecture,
        "variant": spec.variant,
    }))
    .expect("a platform of strings");
    spec.check(&own).expect("a spec matches its own platform");
});
