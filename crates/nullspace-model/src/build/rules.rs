//! The value rules of build requests, each written once: environment
//! variable names, users, file modes, context paths. Every consumer (the
//! plan, the Dockerfile renderer, the build VM, context materialisation,
//! the CLI) calls these; none has its own copy.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("{0:?} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)")]
    EnvName(String),
    #[error("the value of {0:?} contains a NUL byte")]
    EnvValue(String),
    #[error(
        "{0:?} is not user, uid, user:group, user:gid, uid:group or uid:gid (names of [A-Za-z0-9._-], not starting with '-')"
    )]
    User(String),
    #[error("{0} is not an octal mode like \"0755\"")]
    Mode(String),
    #[error("path {path:?} must be relative and stay inside the context ({why})")]
    ContextPath { path: String, why: &'static str },
    #[error("{0:?} contains a newline or NUL")]
    Line(String),
    #[error("{0:?} looks like an option")]
    Option(String),
    #[error("path {0:?} must be absolute")]
    NotAbsolute(String),
    #[error("secret id {0:?} must match [A-Za-z0-9._-]+")]
    SecretId(String),
}

/// `[A-Za-z_][A-Za-z0-9_]*`: a name `sh`, Dockerfile `ARG`/`ENV` and the
/// guest's environment all accept.
pub fn env_name(name: &str) -> Result<(), RuleError> {
    let ok = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(RuleError::EnvName(name.to_string()))
    }
}

/// Every name valid, no value with a NUL (which no environment can hold).
pub fn envs(map: &BTreeMap<String, String>) -> Result<(), RuleError> {
    for (k, v) in map {
        env_name(k)?;
        if v.contains('\0') {
            return Err(RuleError::EnvValue(k.clone()));
        }
    }
    Ok(())
}

/// `user`, `uid`, `user:group`, `user:gid`, `uid:group` or `uid:gid`, each
/// part of `[A-Za-z0-9._-]` and the whole not starting with `-`: safe as a
/// Dockerfile `USER`/`--chown`, an `su` argument and a guest user.
pub fn user(u: &str) -> Result<(), RuleError> {
    let ok = !u.is_empty()
        && !u.starts_with('-')
        && u.split(':').count() <= 2
        && u.split(':').all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(RuleError::User(u.to_string()))
    }
}

/// Permission bits (`0o7777` at most), written as 4 octal digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mode(u32);

impl Mode {
    /// The SDK's normalisation: an integer is masked with `0o7777`.
    pub fn new(bits: u32) -> Mode {
        Mode(bits & 0o7777)
    }

    pub fn bits(self) -> u32 {
        self.0
    }

    /// An octal string of 1 to 4 digits (`"644"`, `"0755"`).
    pub fn parse(s: &str) -> Result<Mode, RuleError> {
        if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            return Err(RuleError::Mode(format!("{s:?}")));
        }
        u32::from_str_radix(s, 8)
            .map(Mode)
            .map_err(|_| RuleError::Mode(format!("{s:?}")))
    }

    /// A JSON mode: an octal string, or an integer (masked like the SDK).
    pub fn from_json(v: &Value) -> Result<Mode, RuleError> {
        match v {
            Value::String(s) => Mode::parse(s),
            Value::Number(n) => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Mode::new)
                .ok_or_else(|| RuleError::Mode(n.to_string())),
            other => Err(RuleError::Mode(other.to_string())),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl serde::Serialize for Mode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(feature = "schema")]
impl schemars::JsonSchema for Mode {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Mode".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "pattern": "^[0-7]{4}$", "description": "permission bits as 4 octal digits"})
    }
}

/// A path inside the build context: relative, `/`-separated, no `..`, no
/// NUL. Returns it cleaned (`./` and empty components dropped); an empty
/// result (the context root itself) is refused.
pub fn context_path(path: &str) -> Result<String, RuleError> {
    let bad = |why| RuleError::ContextPath {
        path: path.to_string(),
        why,
    };
    if path.contains('\0') {
        return Err(bad("NUL byte"));
    }
    if path.starts_with('/') {
        return Err(bad("absolute"));
    }
    let mut parts = vec![];
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(bad("`..`")),
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return Err(bad("names the context root"));
    }
    Ok(parts.join("/"))
}

/// One line of text: no newline, carriage return or NUL (it is written into
/// a Dockerfile line or a shell word).
pub fn single_line(v: &str) -> Result<(), RuleError> {
    if v.contains(['\n', '\r', '\0']) {
        Err(RuleError::Line(v.to_string()))
    } else {
        Ok(())
    }
}

/// A word that must not be taken for an option (`-x`) by the command it
/// is passed to.
pub fn not_option(v: &str) -> Result<(), RuleError> {
    if v.starts_with('-') {
        Err(RuleError::Option(v.to_string()))
    } else {
        Ok(())
    }
}

/// A build secret id: `[A-Za-z0-9._-]+` (a file name under
/// `/run/secrets`).
pub fn secret_id(id: &str) -> Result<(), RuleError> {
    if !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        Ok(())
    } else {
        Err(RuleError::SecretId(id.to_string()))
    }
}

/// An absolute guest path.
pub fn absolute(p: &str) -> Result<(), RuleError> {
    if p.starts_with('/') {
        Ok(())
    } else {
        Err(RuleError::NotAbsolute(p.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn env_names() {
        for ok in ["A", "_x", "PATH_2"] {
            env_name(ok).unwrap();
        }
        for bad in ["", "1BAD", "A-B", "A B", "é"] {
            assert!(env_name(bad).is_err(), "{bad:?}");
        }
        let m: BTreeMap<String, String> = [("A".into(), "x\0".into())].into();
        assert_eq!(envs(&m), Err(RuleError::EnvValue("A".into())));
    }

    #[test]
    fn users() {
        for ok in ["app", "1000", "app:staff", "1000:1000", "www-data", "a.b_c"] {
            user(ok).unwrap();
        }
        for bad in ["", "a:b:c", "-x", "a b", "app; rm -rf /", ":g", "u:"] {
            assert!(user(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn modes() {
        assert_eq!(Mode::parse("0755").unwrap().bits(), 0o755);
        assert_eq!(Mode::parse("644").unwrap().to_string(), "0644");
        assert_eq!(
            Mode::from_json(&json!(0o40755)).unwrap().to_string(),
            "0755"
        );
        for bad in [
            json!("999"),
            json!("abc"),
            json!(""),
            json!("07777x"),
            json!(-1),
            json!(true),
        ] {
            assert!(Mode::from_json(&bad).is_err(), "{bad}");
        }
        assert_eq!(serde_json::to_value(Mode::new(0o700)).unwrap(), "0700");
    }

    #[test]
    fn context_paths() {
        assert_eq!(context_path("./a//b/").unwrap(), "a/b");
        assert_eq!(
            context_path("builder-context/step-0/src-0/app").unwrap(),
            "builder-context/step-0/src-0/app"
        );
        for bad in ["", ".", "/etc/passwd", "../x", "a/../../x", "a\0b"] {
            let e = context_path(bad).unwrap_err().to_string();
            assert!(e.contains("inside the context"), "{bad:?}: {e}");
        }
    }
}
