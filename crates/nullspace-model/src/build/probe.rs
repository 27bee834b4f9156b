//! Readiness: how a build decides its start command is ready before the
//! snapshot. The probe shapes are the SDK's `wait_for_*` helpers
//! (contract §3.4); the timing defaults live here and nowhere else.

use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::agent::ProbeSpec;
use crate::shell;

/// `timeout_secs` when a probe does not say (the SDK's default too).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// `interval_ms` when a probe does not say.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(500);
/// `startup_grace_secs` when a probe does not say.
pub const DEFAULT_STARTUP_GRACE: Duration = Duration::from_secs(2);
/// Largest timing value accepted (a day in milliseconds).
pub const MAX_TIMING: u64 = 86_400_000;

/// What is checked, inside the guest (there is no host network).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Probe {
    /// A TCP connect to `localhost:port`.
    Tcp { port: u16 },
    /// `GET http://localhost:port/path` answering 2xx/3xx.
    Http { port: u16, path: String },
    /// `sh -c command` exiting 0.
    Command { command: String },
    /// Ready after a fixed delay (no check).
    Timeout { timeout_ms: u64 },
}

/// A probe and its schedule. The timeout counts from the end of the grace
/// period; a start command that exits first fails readiness at once. On
/// the wire the timings are `timeout_secs`, `interval_ms` and
/// `startup_grace_secs` (whole units).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub probe: Probe,
    pub timeout: Duration,
    pub interval: Duration,
    pub startup_grace: Duration,
}

/// Why a readiness value was refused (the message names the rule).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProbeError(pub String);

impl Readiness {
    /// `probe` with the default schedule.
    pub fn new(probe: Probe) -> Readiness {
        Readiness {
            probe,
            timeout: DEFAULT_TIMEOUT,
            interval: DEFAULT_INTERVAL,
            startup_grace: DEFAULT_STARTUP_GRACE,
        }
    }

    /// `wait_for_port(port)`.
    pub fn tcp(port: u16) -> Readiness {
        Readiness::new(Probe::Tcp { port })
    }

    /// `wait_for_url("http://localhost:PORT/PATH")`.
    pub fn http(port: u16, path: &str) -> Readiness {
        Readiness::new(Probe::Http {
            port,
            path: path.to_string(),
        })
    }

    /// A shell command probe (also a plain-string readiness and a mapped
    /// HEALTHCHECK).
    pub fn command(command: &str) -> Readiness {
        Readiness::new(Probe::Command {
            command: command.to_string(),
        })
    }

    /// `wait_for_file(path)`.
    pub fn file(path: &str) -> Readiness {
        Readiness::command(&format!("test -e {}", shell::quote(path)))
    }

    /// `wait_for_process(name)`.
    pub fn process(name: &str) -> Readiness {
        Readiness::command(&format!(
            "ps -eo comm= | grep -Fx -- {} >/dev/null",
            shell::quote(name)
        ))
    }

    /// `wait_for_timeout(ms)`: a fixed delay, no schedule of its own.
    pub fn timeout(timeout_ms: u64) -> Readiness {
        Readiness {
            probe: Probe::Timeout { timeout_ms },
            timeout: Duration::ZERO,
            interval: DEFAULT_INTERVAL,
            startup_grace: Duration::ZERO,
        }
    }

    /// The wire form (contract §3.4): the probe's fields and the three
    /// timings; a timeout probe carries only `timeout_ms`.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(&self.probe).unwrap_or_default();
        if !matches!(self.probe, Probe::Timeout { .. }) {
            v["timeout_secs"] = json!(self.timeout.as_secs());
            v["interval_ms"] = json!(self.interval.as_millis() as u64);
            v["startup_grace_secs"] = json!(self.startup_grace.as_secs());
        }
        v
    }

    /// Parses `runtime_config.readiness` as clients send it: the SDK's
    /// objects, a plain string (a command probe), `type` for `kind` and
    /// `cmd` for `command` (older clients). Every rule is checked here: an
    /// explicit port 1-65535 for `tcp`/`http`, an `http` path with no query
    /// or fragment, `localhost` as the only host, a non-empty command,
    /// timings 0-86400000.
    pub fn parse(v: &Value) -> Result<Readiness, ProbeError> {
        if let Some(s) = v.as_str() {
            if s.trim().is_empty() {
                return Err(ProbeError(
                    "command probes need a non-empty \"command\"".into(),
                ));
            }
            return Ok(Readiness::command(s));
        }
        let obj: &Map<String, Value> = v
            .as_object()
            .ok_or_else(|| ProbeError("must be an object or a command string".into()))?;
        let timing = |k: &str| -> Result<Option<u64>, ProbeError> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .filter(|n| *n <= MAX_TIMING)
                    .map(Some)
                    .ok_or_else(|| ProbeError(format!("{k} must be a non-negative integer"))),
            }
        };
        let port = || match obj.get("port").and_then(Value::as_u64) {
            Some(p) if (1..=65535).contains(&p) => Ok(p as u16),
            _ => Err(ProbeError("an explicit port 1-65535 is required".into())),
        };
        let kind = obj
            .get("kind")
            .or_else(|| obj.get("type"))
            .and_then(Value::as_str);
        let probe = match kind {
            Some("tcp") => Probe::Tcp { port: port()? },
            Some("http") => {
                let port = port()?;
                let path = match obj.get("path") {
                    None | Some(Value::Null) => "/",
                    Some(Value::String(p)) => p.as_str(),
                    Some(_) => return Err(ProbeError("http path must be a string".into())),
                };
                // The probe runs inside the VM against localhost: only a path.
                if !path.starts_with('/')
                    || path.contains(['?', '#'])
                    || path.contains(char::is_whitespace)
                {
                    return Err(ProbeError(format!(
                        "http path {path:?} must start with '/' and have no query or fragment"
                    )));
                }
                if let Some(h) = obj.get("host").and_then(Value::as_str)
                    && !["localhost", "127.0.0.1", "0.0.0.0"].contains(&h)
                {
                    return Err(ProbeError(format!(
                        "http probes may only target localhost, not {h:?}"
                    )));
                }
                Probe::Http {
                    port,
                    path: path.to_string(),
                }
            }
            Some("command") => {
                let command = obj
                    .get("command")
                    .or_else(|| obj.get("cmd"))
                    .and_then(Value::as_str)
                    .filter(|c| !c.trim().is_empty())
                    .ok_or_else(|| {
                        ProbeError("command probes need a non-empty \"command\"".into())
                    })?;
                if command.contains('\0') {
                    return Err(ProbeError("the probe command contains a NUL byte".into()));
                }
                Probe::Command {
                    command: command.to_string(),
                }
            }
            Some("timeout") => {
                let ms = timing("timeout_ms")?
                    .ok_or_else(|| ProbeError("timeout probes need \"timeout_ms\"".into()))?;
                Probe::Timeout { timeout_ms: ms }
            }
            other => {
                return Err(ProbeError(format!(
                    "kind {other:?} is not one of tcp, http, command, timeout"
                )));
            }
        };
        let mut r = match probe {
            Probe::Timeout { timeout_ms } => Readiness::timeout(timeout_ms),
            p => Readiness::new(p),
        };
        if let Some(t) = timing("timeout_secs")? {
            r.timeout = Duration::from_secs(t);
        }
        if let Some(i) = timing("interval_ms")? {
            r.interval = Duration::from_millis(i);
        }
        if let Some(g) = timing("startup_grace_secs")? {
            r.startup_grace = Duration::from_secs(g);
        }
        Ok(r)
    }

    /// The one guest-side check of an attempt (agent protocol), or `None`
    /// for a timeout probe, which only waits.
    pub fn guest_check(&self) -> Option<ProbeSpec> {
        match &self.probe {
            Probe::Tcp { port } => Some(ProbeSpec::Tcp {
                port: *port,
                host: None,
            }),
            Probe::Http { port, path } => Some(ProbeSpec::Http {
                port: *port,
                host: None,
                path: path.clone(),
            }),
            Probe::Command { command } => Some(ProbeSpec::Command {
                cmd: command.clone(),
            }),
            Probe::Timeout { .. } => None,
        }
    }
}

impl Serialize for Readiness {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

#[cfg(feature = "schema")]
impl schemars::JsonSchema for Readiness {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Readiness".into()
    }
    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let probe = Value::from(g.subschema_for::<Probe>());
        schemars::json_schema!({
            "description": "A readiness probe (`kind` and its fields) with `timeout_secs` (default 30), `interval_ms` (default 500) and `startup_grace_secs` (default 2); a `timeout` probe carries only `timeout_ms`. A plain string is a command probe.",
            "anyOf": [
                {"allOf": [probe, {"type": "object", "properties": {
                    "timeout_secs": {"type": "integer", "minimum": 0, "maximum": MAX_TIMING},
                    "interval_ms": {"type": "integer", "minimum": 0, "maximum": MAX_TIMING},
                    "startup_grace_secs": {"type": "integer", "minimum": 0, "maximum": MAX_TIMING}}}]},
                {"type": "string"}
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SDK's probe JSON (contract §3.4), parsed and written back.
    #[test]
    fn sdk_shapes_round_trip() {
        for v in [
            json!({"kind":"tcp","port":8080,"timeout_secs":30,"interval_ms":500,"startup_grace_secs":2}),
            json!({"kind":"http","port":3000,"path":"/ready","timeout_secs":60,"interval_ms":250,"startup_grace_secs":0}),
            json!({"kind":"command","command":"ps -eo comm= | grep -Fx -- nginx >/dev/null","timeout_secs":30,"interval_ms":500,"startup_grace_secs":2}),
            json!({"kind":"timeout","timeout_ms":1500}),
        ] {
            assert_eq!(Readiness::parse(&v).unwrap().to_json(), v);
        }
        assert_eq!(
            Readiness::parse(&json!("curl -sf localhost:1"))
                .unwrap()
                .to_json(),
            json!({"kind":"command","command":"curl -sf localhost:1","timeout_secs":30,"interval_ms":500,"startup_grace_secs":2})
        );
        assert_eq!(
            Readiness::parse(&json!({"kind":"http","port":9000})).unwrap(),
            Readiness::http(9000, "/")
        );
        assert_eq!(
            Readiness::file("/tmp/ready flag").probe,
            Probe::Command {
                command: "test -e '/tmp/ready flag'".into()
            }
        );
        assert_eq!(Readiness::tcp(1).to_json()["timeout_secs"], 30);
    }

    #[test]
    fn rules() {
        for (v, needle) in [
            (json!({"kind":"http","path":"/x"}), "explicit port"),
            (json!({"kind":"http","port":80,"path":"/x?q=1"}), "no query"),
            (
                json!({"kind":"http","port":80,"host":"example.com"}),
                "localhost",
            ),
            (json!({"kind":"tcp","port":70000}), "explicit port"),
            (json!({"kind":"command","command":" "}), "non-empty"),
            (json!({"kind":"magic"}), "not one of tcp"),
            (json!({"kind":"timeout"}), "timeout_ms"),
            (
                json!({"kind":"tcp","port":1,"interval_ms":-1}),
                "non-negative",
            ),
            (json!(7), "object"),
        ] {
            let e = Readiness::parse(&v).unwrap_err().to_string();
            assert!(e.contains(needle), "{v}: {e}");
        }
    }

    #[test]
    fn guest_checks() {
        assert_eq!(
            Readiness::tcp(80).guest_check(),
            Some(ProbeSpec::Tcp {
                port: 80,
                host: None
            })
        );
        assert_eq!(Readiness::timeout(5).guest_check(), None);
    }
}
