//! Each value rule (env names, users, modes, context paths, secret ids),
//! the probe defaults and the build statuses are written once, in this
//! crate; every other crate calls them. This reads the other crates'
//! sources for the shapes a second copy would have, so a copy cannot come
//! back unnoticed; and the CLI builds its requests from the model's types,
//! never with `json!`.

use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `(file relative to crates/, line number, line)` of every non-test
/// source line outside this crate (a `#[cfg(test)]` module ends a file's
/// scan: tests may spell out what they check).
fn workspace_lines() -> Vec<(String, usize, String)> {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = vec![];
    for c in std::fs::read_dir(&crates).unwrap().flatten() {
        let name = c.file_name().to_string_lossy().into_owned();
        if name == "nullspace-model" || name == "nullspace-testkit" {
            continue;
        }
        let src = c.path().join("src");
        if src.is_dir() {
            sources(&src, &mut files);
        }
    }
    assert!(files.len() > 50, "found only {} source files", files.len());
    let mut out = vec![];
    for f in files {
        let rel = f
            .strip_prefix(&crates)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("#[cfg(test)]") {
                break;
            }
            out.push((rel.clone(), i + 1, line.to_string()));
        }
    }
    out
}

/// Lines containing `needle`, except in `allowed` files (each with why).
fn hits(lines: &[(String, usize, String)], needle: &str, allowed: &[(&str, &str)]) -> Vec<String> {
    lines
        .iter()
        .filter(|(f, _, l)| l.contains(needle) && !allowed.iter().any(|(a, _)| f == a))
        .map(|(f, n, l)| format!("{f}:{n}: {}", l.trim()))
        .collect()
}

/// The store's SQL layer names the stored status values in its queries
/// and log gates (it knows no record types).
const STORE: &[(&str, &str)] = &[(
    "nullspace-store/src/lib.rs",
    "the SQL layer's queries and gates name the stored column values",
)];

/// What a copy is, the text it would contain, and the files where that
/// text is something else (with why).
type Check<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);

#[test]
fn value_rules_probe_defaults_and_requests_live_in_the_model() {
    let lines = workspace_lines();
    let checks: &[Check] = &[
        // Octal modes are parsed by rules::Mode only.
        (
            "modes",
            "from_str_radix(",
            &[
                (
                    "nullspace-rootfs/src/decode.rs",
                    "tar header numbers, a format field, not a request rule",
                ),
                (
                    "nullspace-init/src/net.rs",
                    "an interface's flags in sysfs (hex), not a mode",
                ),
                (
                    "nullspace-init/src/volume.rs",
                    "mountinfo's octal escapes in names, not a mode",
                ),
                (
                    "nullspace-vm/src/volume_image.rs",
                    "debugfs `ls -p` output (type and mode bits), a format field",
                ),
            ],
        ),
        // The env-name character rule, as code.
        ("env names", "is_ascii_alphabetic() || b == b'_'", &[]),
        (
            "env names",
            "[A-Za-z_][A-Za-z0-9_]*",
            &[(
                "nullspace-build/src/dockerfile.rs",
                "finds `$VAR` references to expand in FROM, not a rule on names",
            )],
        ),
        // The user / secret-id character set `[A-Za-z0-9._-]`.
        ("users, secret ids", "b\"._-\"", &[]),
        ("users, secret ids", "\"._-\".contains", &[]),
        // Context paths: `clean_relative` delegates to rules::context_path.
        ("context paths", "fn context_path(", &[]),
        ("context paths", "must be relative and stay inside", &[]),
        // The probe schedule defaults (30 s / 500 ms / 2 s) are the model's.
        ("probe defaults", "\"timeout_secs\": 30", &[]),
        ("probe defaults", "\"startup_grace_secs\"", &[]),
        // Build statuses are BuildStatus values, not strings (machine
        // statuses are another vocabulary).
        ("build statuses", "status == \"ready\"", STORE),
        ("build statuses", "status != \"ready\"", STORE),
        ("build statuses", "status = \"ready\"", STORE),
        ("build statuses", "status == \"waiting\"", STORE),
        ("build statuses", "status = \"waiting\"", STORE),
        ("build statuses", "status == \"building\"", STORE),
        ("build statuses", "status = \"building\"", STORE),
        ("build statuses", "status = \"cancelled\"", STORE),
        ("build statuses", "\"waiting\" |", STORE),
        // The agent protocol and the guest configuration are the model's.
        ("agent protocol", "struct GuestConfig", &[]),
    ];
    let mut found = vec![];
    for (what, needle, allowed) in checks {
        for h in hits(&lines, needle, allowed) {
            found.push(format!("{what} ({needle}): {h}"));
        }
    }
    // The CLI's API clients (templates, machines) serialise the model's
    // request types: no JSON written by hand.
    for (f, n, l) in &lines {
        if f.starts_with("nullspace/src/") && l.contains("json!") {
            found.push(format!("CLI requests: {f}:{n}: {}", l.trim()));
        }
    }
    assert!(
        found.is_empty(),
        "a second copy of a model rule:\n{}",
        found.join("\n")
    );
}

/// The check can fail: a copy of the env-name rule is found.
#[test]
fn the_scan_finds_a_copy() {
    let lines = vec![(
        "x/src/lib.rs".to_string(),
        1,
        "let ok = name.bytes().all(|b| b.is_ascii_alphanumeric() || b\"._-\".contains(&b));"
            .to_string(),
    )];
    assert_eq!(hits(&lines, "b\"._-\"", &[]).len(), 1);
    assert!(hits(&lines, "b\"._-\"", &[("x/src/lib.rs", "allowed")]).is_empty());
}
