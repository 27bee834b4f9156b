//! The image configuration blob, and the runtime defaults a template takes
//! from it (spec §3.1).
//!
//! The config is parsed with our own serde types rather than `oci-spec`'s:
//! Docker's `Healthcheck` (which we map to readiness) is not part of the OCI
//! schema, and unknown fields must not make an image unusable.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The subset of an OCI / Docker image configuration nullspace reads.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    #[serde(
        rename = "os.features",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_features: Option<Vec<String>>,
    #[serde(default)]
    pub config: Option<ContainerConfig>,
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct RootFs {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// `config` inside the image configuration. Field names are Docker's
/// PascalCase, which the OCI spec kept.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default)]
    pub volumes: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default)]
    pub healthcheck: Option<Healthcheck>,
    #[serde(default)]
    pub stop_signal: Option<String>,
    #[serde(default)]
    pub shell: Option<Vec<String>>,
}

/// Docker's HEALTHCHECK as stored in the config. Durations are nanoseconds.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct Healthcheck {
    #[serde(default)]
    pub test: Option<Vec<String>>,
    #[serde(default)]
    pub interval: Option<i64>,
    #[serde(default)]
    pub timeout: Option<i64>,
    #[serde(default)]
    pub start_period: Option<i64>,
    #[serde(default)]
    pub retries: Option<i64>,
}

/// A default user parsed from `User`, in one of the six Linux forms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserSpec {
    /// The trimmed value as given (what the guest init resolves).
    pub raw: String,
    pub user: IdOrName,
    pub group: Option<IdOrName>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IdOrName {
    Id(u32),
    Name(String),
}

impl IdOrName {
    fn parse(s: &str) -> Option<IdOrName> {
        if s.is_empty() {
            return None;
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            return s.parse().ok().map(IdOrName::Id);
        }
        // Linux user/group names: no ':' (separator), '/', whitespace or NUL.
        if s.chars()
            .any(|c| c == ':' || c == '/' || c.is_whitespace() || c.is_control())
        {
            return None;
        }
        Some(IdOrName::Name(s.to_string()))
    }
}

impl UserSpec {
    /// Parses `user`, `uid`, `user:group`, `user:gid`, `uid:group` or
    /// `uid:gid` after trimming. `None` for an empty or invalid value.
    pub fn parse(value: &str) -> Option<UserSpec> {
        let raw = value.trim();
        if raw.is_empty() {
            return None;
        }
        let (u, g) = match raw.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (raw, None),
        };
        let user = IdOrName::parse(u)?;
        let group = match g {
            Some(g) => Some(IdOrName::parse(g)?),
            None => None,
        };
        Some(UserSpec {
            raw: raw.to_string(),
            user,
            group,
        })
    }
}

/// What a template takes from the image config at run time.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RuntimeDefaults {
    /// `KEY=VALUE` entries in order; a later duplicate key wins.
    pub env: BTreeMap<String, String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    /// Entrypoint + Cmd, shell-escaped into one command line.
    pub start_cmd: Option<String>,
    /// A readiness command mapped from HEALTHCHECK, when that is safe.
    pub ready_cmd: Option<String>,
    /// Env entries that were skipped, with the reason (for warnings).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped_env: Vec<String>,
}

/// Metadata kept but not acted on (EXPOSE does not publish, VOLUME does not
/// create volumes).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct OciMetadata {
    pub labels: BTreeMap<String, String>,
    pub exposed_ports: Vec<String>,
    pub volumes: Vec<String>,
    pub healthcheck: Option<HealthcheckMeta>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct HealthcheckMeta {
    pub test: Vec<String>,
    pub interval_ns: Option<i64>,
    pub timeout_ns: Option<i64>,
    pub start_period_ns: Option<i64>,
    pub retries: Option<i64>,
    /// The readiness command this healthcheck maps to, if it does.
    pub mapped_readiness: Option<String>,
    /// Why it was not mapped, when it was not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl ImageConfig {
    pub fn runtime_defaults(&self) -> RuntimeDefaults {
        let mut out = RuntimeDefaults::default();
        let Some(c) = &self.config else {
            return out;
        };
        for entry in c.env.iter().flatten() {
            match parse_env(entry) {
                Some((k, v)) => {
                    out.env.insert(k.to_string(), v.to_string());
                }
                None => out.skipped_env.push(entry.clone()),
            }
        }
        out.user = c.user.as_deref().and_then(UserSpec::parse).map(|u| u.raw);
        out.workdir = c
            .working_dir
            .as_deref()
            .map(str::trim)
            .filter(|w| !w.is_empty())
            .map(str::to_string);
        let argv: Vec<String> = c
            .entrypoint
            .iter()
            .flatten()
            .chain(c.cmd.iter().flatten())
            .cloned()
            .collect();
        if !argv.is_empty() {
            out.start_cmd = Some(shell_join(&argv));
        }
        out.ready_cmd = c.healthcheck.as_ref().and_then(|h| map_healthcheck(h).0);
        out
    }

    pub fn oci_metadata(&self) -> OciMetadata {
        let Some(c) = &self.config else {
            return OciMetadata::default();
        };
        OciMetadata {
            labels: c.labels.clone().unwrap_or_default(),
            exposed_ports: c
                .exposed_ports
                .iter()
                .flat_map(|m| m.keys().cloned())
                .collect(),
            volumes: c.volumes.iter().flat_map(|m| m.keys().cloned()).collect(),
            healthcheck: c.healthcheck.as_ref().map(|h| {
                let (mapped, reason) = map_healthcheck(h);
                HealthcheckMeta {
                    test: h.test.clone().unwrap_or_default(),
                    interval_ns: h.interval,
                    timeout_ns: h.timeout,
                    start_period_ns: h.start_period,
                    retries: h.retries,
                    mapped_readiness: mapped,
                    reason,
                }
            }),
        }
    }
}

/// `KEY=VALUE` with a non-empty key free of `=`, NUL and whitespace.
fn parse_env(entry: &str) -> Option<(&str, &str)> {
    let (k, v) = entry.split_once('=')?;
    if k.is_empty() || k.chars().any(|c| c.is_whitespace() || c == '\0') || v.contains('\0') {
        return None;
    }
    Some((k, v))
}

/// Maps a HEALTHCHECK to a readiness command: `CMD args…` (exec form) is
/// shell-joined, `CMD-SHELL cmd` is the shell string itself. `NONE`, an
/// empty test (inherit) and unknown forms stay metadata, with the reason.
fn map_healthcheck(h: &Healthcheck) -> (Option<String>, Option<String>) {
    let test = h.test.as_deref().unwrap_or_default();
    match test.split_first() {
        None => (None, Some("empty healthcheck test (inherits)".into())),
        Some((kind, rest)) => match kind.as_str() {
            "CMD" if !rest.is_empty() && !rest[0].is_empty() => (Some(shell_join(rest)), None),
            "CMD" => (None, Some("CMD healthcheck without a command".into())),
            "CMD-SHELL"
                if rest.len() == 1 && !rest[0].trim().is_empty() && !rest[0].contains('\0') =>
            {
                (Some(rest[0].clone()), None)
            }
            "CMD-SHELL" => (
                None,
                Some("CMD-SHELL healthcheck needs exactly one non-empty command".into()),
            ),
            "NONE" => (None, Some("healthcheck disabled (NONE)".into())),
            other => (
                None,
                Some(format!("unsupported healthcheck form {other:?}")),
            ),
        },
    }
}

/// The one shell quoter, shared through `nullspace-model` (the tests below
/// run its output through a real `sh`).
pub use nullspace_model::shell::{join as shell_join, quote as shell_quote};

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn cfg(json: &str) -> ImageConfig {
        serde_json::from_str(json).unwrap()
    }

    /// Runs the joined command line through a real `sh -c` and returns the
    /// argv it produced, NUL-separated by printf.
    fn sh_split(line: &str) -> Vec<String> {
        let script = format!("set -- {line}; for a in \"$@\"; do printf '%s\\0' \"$a\"; done");
        let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
        assert!(out.status.success(), "sh failed on {line:?}");
        let s = String::from_utf8(out.stdout).unwrap();
        let mut v: Vec<String> = s.split('\0').map(str::to_string).collect();
        v.pop();
        v
    }

    #[test]
    fn entrypoint_cmd_round_trips_through_sh() {
        let cases: Vec<Vec<&str>> = vec![
            vec!["/bin/echo", "hello world"],
            vec!["sh", "-c", "echo $HOME && ls *.txt"],
            vec!["printf", "it's", "\"double\"", ""],
            vec![
                "a\nb",
                "tab\there",
                "$(id)",
                "`id`",
                "~",
                "x=y",
                "!",
                "a;b|c&d",
            ],
            vec!["*", "?", "[a]", "{a,b}", "#comment", "back\\slash", "'"],
            vec!["if", "then", "--flag=value", "ünïcode"],
        ];
        for argv in cases {
            let argv: Vec<String> = argv.into_iter().map(String::from).collect();
            let line = shell_join(&argv);
            assert_eq!(sh_split(&line), argv, "line {line:?}");
        }
    }

    #[test]
    fn quotes_only_what_needs_quoting() {
        assert_eq!(
            shell_join(&["/usr/bin/python3", "-m", "http.server", "8080"]),
            "/usr/bin/python3 -m http.server 8080"
        );
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        // An assignment-looking first word would become an env assignment.
        assert_eq!(shell_quote("A=b"), "'A=b'");
        assert_eq!(shell_quote("if"), "'if'");
    }

    #[test]
    fn start_cmd_concatenates_entrypoint_and_cmd() {
        let c = cfg(
            r#"{"config":{"Entrypoint":["/docker-entrypoint.sh"],"Cmd":["nginx","-g","daemon off;"]}}"#,
        );
        assert_eq!(
            c.runtime_defaults().start_cmd.as_deref(),
            Some("/docker-entrypoint.sh nginx -g 'daemon off;'")
        );
        let c = cfg(r#"{"config":{"Cmd":["bash"]}}"#);
        assert_eq!(c.runtime_defaults().start_cmd.as_deref(), Some("bash"));
        let c = cfg(r#"{"config":{"Entrypoint":[],"Cmd":null}}"#);
        assert_eq!(c.runtime_defaults().start_cmd, None);
    }

    #[test]
    fn env_skips_malformed_entries() {
        let c = cfg(
            r#"{"config":{"Env":["PATH=/usr/bin:/bin","EMPTY=","NOEQUALS","=novalue","A=1=2","BAD KEY=x","A=3"]}}"#,
        );
        let d = c.runtime_defaults();
        let keys: Vec<&str> = d.env.keys().map(String::as_str).collect();
        assert_eq!(keys, ["A", "EMPTY", "PATH"]);
        assert_eq!(d.env["A"], "3", "later duplicate wins");
        assert_eq!(d.env["EMPTY"], "");
        assert_eq!(d.skipped_env, ["NOEQUALS", "=novalue", "BAD KEY=x"]);
        let c = cfg(r#"{"config":{"Env":["X=a=b"]}}"#);
        assert_eq!(c.runtime_defaults().env["X"], "a=b");
    }

    #[test]
    fn every_user_form_is_accepted_and_trimmed() {
        let forms = [
            ("app", IdOrName::Name("app".into()), None),
            ("1000", IdOrName::Id(1000), None),
            (
                "app:staff",
                IdOrName::Name("app".into()),
                Some(IdOrName::Name("staff".into())),
            ),
            (
                "app:50",
                IdOrName::Name("app".into()),
                Some(IdOrName::Id(50)),
            ),
            (
                "1000:staff",
                IdOrName::Id(1000),
                Some(IdOrName::Name("staff".into())),
            ),
            ("1000:50", IdOrName::Id(1000), Some(IdOrName::Id(50))),
        ];
        for (raw, user, group) in forms {
            let padded = format!("  {raw}\t");
            let u = UserSpec::parse(&padded).unwrap_or_else(|| panic!("{raw} rejected"));
            assert_eq!((u.raw.as_str(), u.user, u.group), (raw, user, group));
            let c = cfg(&serde_json::json!({"config": {"User": padded}}).to_string());
            assert_eq!(c.runtime_defaults().user.as_deref(), Some(raw));
        }
        for bad in ["", "   ", "a:b:c", ":g", "u:", "a b", "99999999999"] {
            assert!(UserSpec::parse(bad).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn workdir_is_trimmed() {
        let c = cfg(r#"{"config":{"WorkingDir":"  /srv/app "}}"#);
        assert_eq!(c.runtime_defaults().workdir.as_deref(), Some("/srv/app"));
        let c = cfg(r#"{"config":{"WorkingDir":"   "}}"#);
        assert_eq!(c.runtime_defaults().workdir, None);
    }

    #[test]
    fn healthcheck_maps_to_readiness_when_safe() {
        let c = cfg(
            r#"{"config":{"Healthcheck":{"Test":["CMD","curl","-f","http://localhost/"],"Interval":30000000000,"Retries":3}}}"#,
        );
        assert_eq!(
            c.runtime_defaults().ready_cmd.as_deref(),
            Some("curl -f http://localhost/")
        );
        let m = c.oci_metadata().healthcheck.unwrap();
        assert_eq!(m.interval_ns, Some(30_000_000_000));
        assert_eq!(m.retries, Some(3));
        assert_eq!(
            m.mapped_readiness.as_deref(),
            Some("curl -f http://localhost/")
        );

        let c = cfg(
            r#"{"config":{"Healthcheck":{"Test":["CMD-SHELL","pg_isready -U $USER || exit 1"]}}}"#,
        );
        assert_eq!(
            c.runtime_defaults().ready_cmd.as_deref(),
            Some("pg_isready -U $USER || exit 1")
        );

        for (test, reason) in [
            (r#"["NONE"]"#, "disabled"),
            (r#"[]"#, "inherits"),
            (r#"["CMD"]"#, "without a command"),
            (r#"["CMD-SHELL",""]"#, "non-empty"),
            (r#"["WEIRD","x"]"#, "unsupported"),
        ] {
            let c = cfg(&format!(
                r#"{{"config":{{"Healthcheck":{{"Test":{test}}}}}}}"#
            ));
            assert_eq!(c.runtime_defaults().ready_cmd, None, "{test}");
            let m = c.oci_metadata().healthcheck.unwrap();
            assert!(
                m.reason.as_deref().unwrap().contains(reason),
                "{test}: {:?}",
                m.reason
            );
        }
    }

    #[test]
    fn metadata_keeps_labels_ports_volumes() {
        let c = cfg(
            r#"{"config":{"Labels":{"a":"1"},"ExposedPorts":{"8080/tcp":{}},"Volumes":{"/data":{}},"StopSignal":"SIGTERM"}}"#,
        );
        let m = c.oci_metadata();
        assert_eq!(m.labels["a"], "1");
        assert_eq!(m.exposed_ports, ["8080/tcp"]);
        assert_eq!(m.volumes, ["/data"]);
    }
}
