//! Image configs: what nullspace reads of one (runtime defaults, metadata,
//! the `User` forms) never panics, and a parsed config serialises and
//! parses back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nullspace_oci::config::{ImageConfig, UserSpec};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Some(u) = UserSpec::parse(text)
    {
        assert_eq!(u.raw, text.trim());
    }
    let Ok(cfg) = serde_json::from_slice::<ImageConfig>(data) else {
        return;
    };
    let again: ImageConfig = serde_json::from_slice(&serde_json::to_vec(&cfg).unwrap())
        .expect("a serialised config parses");
    assert_eq!(again, cfg);
    let _ = cfg.runtime_defaults();
    let _ = cfg.oci_metadata();
});
