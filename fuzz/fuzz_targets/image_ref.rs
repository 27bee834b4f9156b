//! Image and template references: a parsed source reference prints in a
//! normal form that parses to itself; template refs and registry hosts
//! never panic, and a registry host names no path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nullspace_build::dockerfile::registry_host;
use nullspace_model::refs::{TemplateRef, from_template, names_template};
use nullspace_oci::SourceRef;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = TemplateRef::parse(s);
    let _ = from_template(s);
    let _ = names_template(s, Some("team"));
    let host = registry_host(s);
    assert!(!host.contains('/'), "registry host {host:?} of {s:?}");
    if let Ok(r) = SourceRef::parse(s) {
        let printed = r.to_string();
        let again = SourceRef::parse(&printed)
            .unwrap_or_else(|e| panic!("{s:?} printed as {printed:?}, which fails: {e}"));
        assert_eq!(again.to_string(), printed, "{s:?}");
        assert_eq!(again.tag(), r.tag());
    }
});
