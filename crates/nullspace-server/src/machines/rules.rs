//! The rules a machine request's values must keep: guest paths, cwd,
//! envs, timeouts and their action, and the create options this server
//! refuses rather than ignores. Each failure is one line naming the field.

use std::collections::BTreeMap;

use nullspace_model::machine::{CreateMachineBody, TimeoutAction};
use serde_json::Value;

use super::error::{MachineError, MachineResult};

/// The SDK's default `timeout_ms`.
pub const DEFAULT_TIMEOUT_MS: u64 = 300_000;
/// The longest `timeout_ms` (one day).
pub const MAX_TIMEOUT_MS: u64 = 86_400_000;
/// Longest guest path accepted (Linux's `PATH_MAX`).
pub const MAX_PATH: usize = 4096;
/// Longest path component (Linux's `NAME_MAX`).
pub const MAX_NAME: usize = 255;

fn invalid(m: impl Into<String>) -> MachineError {
    MachineError::Invalid(m.into())
}

/// An absolute guest path, normalised (`.` and `..` resolved, never above
/// `/`); NUL bytes and overlong paths or names are refused.
pub fn guest_path(what: &str, p: &str) -> MachineResult<String> {
    if !p.starts_with('/') {
        return Err(invalid(format!("{what} {p:?} must be an absolute path")));
    }
    if p.contains('\0') {
        return Err(invalid(format!("{what} {p:?} contains a NUL byte")));
    }
    if p.len() > MAX_PATH {
        return Err(invalid(format!("{what} is longer than {MAX_PATH} bytes")));
    }
    let mut parts: Vec<&str> = vec![];
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c if c.len() > MAX_NAME => {
                return Err(invalid(format!(
                    "{what}: the name {:?}… is longer than {MAX_NAME} bytes",
                    &c[..c.floor_char_boundary(32)]
                )));
            }
            c => parts.push(c),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

/// A path a file route names (read, write, stat, list, remove, rename,
/// mkdir, chmod, search, find, replace, transfer URLs, watches), as
/// `user` would use it: absolute (or, with `relative_ok`, relative to the
/// guest's working directory), without NUL bytes, within `PATH_MAX` and
/// `NAME_MAX`, and without `..` components: the guest resolves those
/// through symbolic links and the server cannot, so it refuses rather than
/// guess. `.` and repeated slashes are dropped. The refusal is one line
/// naming the field, the path and the user.
pub fn file_path(what: &str, p: &str, user: Option<&str>) -> MachineResult<String> {
    checked_file_path(what, p, user, false)
}

/// [`file_path`] that also takes a path relative to the guest's working
/// directory (a directory watch, as the SDK sends it).
pub fn file_path_or_relative(what: &str, p: &str, user: Option<&str>) -> MachineResult<String> {
    checked_file_path(what, p, user, true)
}

fn checked_file_path(
    what: &str,
    p: &str,
    user: Option<&str>,
    relative_ok: bool,
) -> MachineResult<String> {
    let as_user = match user.filter(|u| !u.trim().is_empty()) {
        Some(u) => format!("as user {:?}", clip(u, 64)),
        None => "as the machine's default user".to_string(),
    };
    let refuse = |rule: String| {
        Err(invalid(format!(
            "{what} {:?} ({as_user}): {rule}",
            clip(p, 128)
        )))
    };
    if p.is_empty() {
        return refuse("is empty".into());
    }
    if !relative_ok && !p.starts_with('/') {
        return refuse("must be an absolute path".into());
    }
    if p.contains('\0') {
        return refuse("contains a NUL byte".into());
    }
    if p.len() > MAX_PATH {
        return refuse(format!("is {} bytes, longer than {MAX_PATH}", p.len()));
    }
    let mut parts: Vec<&str> = vec![];
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => return refuse("has a '..' component (name the directory itself)".into()),
            c if c.len() > MAX_NAME => {
                return refuse(format!(
                    "has a name of {} bytes ({:?}…), longer than {MAX_NAME}",
                    c.len(),
                    clip(c, 32)
                ));
            }
            c => parts.push(c),
        }
    }
    Ok(match (p.starts_with('/'), parts.is_empty()) {
        (true, _) => format!("/{}", parts.join("/")),
        (false, true) => ".".to_string(),
        (false, false) => parts.join("/"),
    })
}

/// At most `max` bytes of `s`, cut at a character boundary (a hostile
/// path is quoted, not echoed whole).
fn clip(s: &str, max: usize) -> &str {
    &s[..s.floor_char_boundary(max)]
}

/// A command's or machine's working directory.
pub fn cwd(cwd: &str) -> MachineResult<String> {
    let p = guest_path("cwd", cwd)?;
    if p == "/workspace/.nullspace" || p.starts_with("/workspace/.nullspace/") {
        return Err(invalid(format!(
            "cwd {cwd:?} is reserved (/workspace/.nullspace)"
        )));
    }
    Ok(p)
}

pub fn envs(what: &str, envs: &BTreeMap<String, String>) -> MachineResult<()> {
    if envs.len() > 1000 {
        return Err(invalid(format!("{what}: at most 1000 variables")));
    }
    let mut total = 0;
    for (k, v) in envs {
        nullspace_model::build::rules::env_name(k).map_err(|e| invalid(format!("{what}: {e}")))?;
        total += k.len() + v.len();
    }
    if total > 1 << 20 {
        return Err(invalid(format!("{what}: more than 1 MiB")));
    }
    Ok(())
}

/// `timeout_action`, else `lifecycle.on_timeout` (`pause` is hibernate).
pub fn timeout_action(
    raw: Option<&str>,
    lifecycle: Option<&Value>,
) -> MachineResult<Option<TimeoutAction>> {
    if let Some(a) = raw {
        return match a {
            "destroy" | "hibernate" => Ok(TimeoutAction::parse(a)),
            o => Err(invalid(format!(
                "timeout_action {o:?} must be destroy or hibernate"
            ))),
        };
    }
    match lifecycle
        .and_then(|l| l.get("on_timeout"))
        .and_then(Value::as_str)
    {
        None => Ok(None),
        Some(o) => TimeoutAction::parse(o).map(Some).ok_or_else(|| {
            invalid(format!(
                "lifecycle.on_timeout {o:?} must be destroy or pause"
            ))
        }),
    }
}

pub fn timeout_ms(ms: u64) -> MachineResult<u64> {
    if ms == 0 || ms > MAX_TIMEOUT_MS {
        return Err(invalid(format!(
            "timeout_ms {ms} must be between 1 and {MAX_TIMEOUT_MS} (one day)"
        )));
    }
    Ok(ms)
}

/// `network.allow_public_traffic` (default true, as the SDK documents):
/// whether the machine's ports answer without a token.
pub fn public_traffic(b: &CreateMachineBody) -> MachineResult<bool> {
    match b
        .network
        .as_ref()
        .and_then(|n| n.get("allow_public_traffic"))
    {
        None | Some(serde_json::Value::Null) => Ok(true),
        Some(serde_json::Value::Bool(v)) => Ok(*v),
        Some(v) => Err(MachineError::Invalid(format!(
            "network.allow_public_traffic must be true or false, not {v}"
        ))),
    }
}

/// Options this server does not offer fail clearly instead of being
/// ignored.
pub fn refuse_unsupported(b: &CreateMachineBody) -> MachineResult<()> {
    let not = |m: &str| Err(MachineError::NotImplemented(m.to_string()));
    if b.desktop.as_ref().is_some_and(|d| !d.is_null()) {
        return not("desktop machines are not supported by this server");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_are_normalised_and_hostile_ones_refused() {
        assert_eq!(guest_path("path", "/a/./b/../c//").unwrap(), "/a/c");
        assert_eq!(guest_path("path", "/../../etc").unwrap(), "/etc");
        for bad in ["relative", "/a\0b", &format!("/{}", "x".repeat(300))] {
            let e = guest_path("path", bad).unwrap_err().to_string();
            assert!(e.starts_with("path"), "{e}");
        }
        let long = format!("/{}", "a/".repeat(2100));
        assert!(guest_path("path", &long).is_err());
    }

    #[test]
    fn file_paths_refuse_dot_dot_nul_and_overlong_names_naming_path_and_user() {
        assert_eq!(file_path("path", "/a/./b//c/", None).unwrap(), "/a/b/c");
        assert_eq!(file_path("path", "/", Some("app")).unwrap(), "/");
        assert_eq!(file_path_or_relative("path", "./w/x", None).unwrap(), "w/x");
        assert_eq!(file_path_or_relative("path", ".", None).unwrap(), ".");
        let long_name = format!("/tmp/{}", "n".repeat(256));
        let long_path = format!("/{}", "a/".repeat(2100));
        let cases: [(&str, &str); 7] = [
            ("/workspace/../etc/passwd", "has a '..' component"),
            ("/..", "has a '..' component"),
            ("/tmp/a\0b", "contains a NUL byte"),
            (&long_name, "has a name of 256 bytes"),
            (&long_path, "is 4201 bytes, longer than 4096"),
            ("relative/x", "must be an absolute path"),
            ("", "is empty"),
        ];
        for (bad, rule) in cases {
            let e = file_path("path", bad, Some("app")).unwrap_err().to_string();
            assert!(e.starts_with("path \""), "{e}");
            assert!(
                e.contains("(as user \"app\")") && e.contains(rule),
                "{bad:?}: {e}"
            );
            assert!(e.len() < 400, "one short line: {e}");
            let e = file_path("old_path", bad, None).unwrap_err().to_string();
            assert!(e.contains("(as the machine's default user)"), "{e}");
        }
        // Relative watch paths still refuse the rest.
        let e = file_path_or_relative("path", "a/../../b", Some("app")).unwrap_err();
        assert!(e.to_string().contains("'..'"), "{e}");
    }

    #[test]
    fn timeout_actions_come_from_either_field() {
        assert_eq!(
            timeout_action(Some("hibernate"), None).unwrap(),
            Some(TimeoutAction::Hibernate)
        );
        let l = serde_json::json!({"on_timeout": "pause"});
        assert_eq!(
            timeout_action(None, Some(&l)).unwrap(),
            Some(TimeoutAction::Hibernate)
        );
        assert!(timeout_action(Some("pause"), None).is_err());
        assert!(timeout_action(None, Some(&serde_json::json!({"on_timeout": "x"}))).is_err());
        assert_eq!(timeout_action(None, None).unwrap(), None);
    }

    #[test]
    fn reserved_cwd_is_refused() {
        assert!(cwd("/workspace/.nullspace/x").is_err());
        assert_eq!(cwd("/workspace/app/").unwrap(), "/workspace/app");
    }
}
