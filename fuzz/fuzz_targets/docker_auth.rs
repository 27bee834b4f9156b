//! Docker client configs and registry `WWW-Authenticate` challenges. The
//! input is `registry\n` then the rest: the config text for the lookup and
//! the challenge header for oci-client's parser.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nullspace_oci::auth::{is_loopback, lookup};

fuzz_target!(|data: &[u8]| {
    let (registry, rest) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"docker.io"[..], data),
    };
    let registry = String::from_utf8_lossy(registry);
    let _ = is_loopback(&registry);
    if let Some(c) = lookup(rest, &registry) {
        // Debug never shows the password.
        let shown = format!("{c:?}");
        assert_eq!(shown, format!("Credentials({}, <redacted>)", c.username));
    }
    if let Ok(header) = std::str::from_utf8(rest)
        && let Ok(challenges) = http_auth::parse_challenges(header)
    {
        for ch in &challenges {
            assert!(!ch.scheme.is_empty());
            for (k, _) in &ch.params {
                assert!(!k.is_empty());
            }
        }
    }
});
