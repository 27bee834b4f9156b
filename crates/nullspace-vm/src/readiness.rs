//! Readiness per spec §2.4: `tcp`, `http`, `command`, `timeout` probes with
//! `timeout_secs=30`, `interval_ms=500`, `startup_grace_secs=2` defaults.
//! Probes run in the guest via the agent (there is no host network); the
//! host owns the schedule. The timeout counts from the end of the grace
//! period. A start command that exits before readiness fails at once.

use crate::{AgentClient, VmError};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    Tcp { port: u16 },
    Http { port: u16, path: String },
    Command { cmd: String },
    Timeout { timeout_ms: u64 },
}

impl Probe {
    /// From the spec's JSON shape (`{"kind":"tcp","port":8080}` …), or a
    /// plain string, which is a command probe.
    pub fn from_json(v: &Value) -> Result<Probe, VmError> {
        if let Some(s) = v.as_str() {
            return Ok(Probe::Command { cmd: s.to_string() });
        }
        let kind = v
            .get("kind")
            .or_else(|| v.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let port = || {
            v.get("port")
                .and_then(Value::as_u64)
                .filter(|p| (1..=65535).contains(p))
                .map(|p| p as u16)
                .ok_or_else(|| VmError::Agent(format!("probe {kind}: port missing or invalid")))
        };
        Ok(match kind {
            "tcp" => Probe::Tcp { port: port()? },
            "http" => Probe::Http {
                port: port()?,
                path: v
                    .get("path")
                    .and_then(Value::as_str)
                    .unwrap_or("/")
                    .to_string(),
            },
            "command" => Probe::Command {
                cmd: v
                    .get("cmd")
                    .or_else(|| v.get("command"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| VmError::Agent("command probe needs cmd".into()))?
                    .to_string(),
            },
            "timeout" => Probe::Timeout {
                timeout_ms: v.get("timeout_ms").and_then(Value::as_u64).unwrap_or(0),
            },
            other => return Err(VmError::Agent(format!("unknown probe kind {other:?}"))),
        })
    }

    fn guest_json(&self) -> Option<Value> {
        match self {
            Probe::Tcp { port } => Some(json!({"kind": "tcp", "port": port})),
            Probe::Http { port, path } => Some(json!({"kind": "http", "port": port, "path": path})),
            Probe::Command { cmd } => Some(json!({"kind": "command", "cmd": cmd})),
            Probe::Timeout { .. } => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Readiness {
    pub probe: Probe,
    pub timeout: Duration,
    pub interval: Duration,
    pub startup_grace: Duration,
}

impl Readiness {
    pub fn new(probe: Probe) -> Readiness {
        Readiness {
            probe,
            timeout: Duration::from_secs(30),
            interval: Duration::from_millis(500),
            startup_grace: Duration::from_secs(2),
        }
    }
}

impl Readiness {
    /// The server's `runtime_config.readiness` object (`kind`, `port`,
    /// `path`, `command`, `timeout_ms`, plus `timeout_secs`, `interval_ms`,
    /// `startup_grace_secs` modifiers), or a plain string (command probe).
    pub fn from_json(v: &Value) -> Result<Readiness, VmError> {
        let mut r = Readiness::new(Probe::from_json(v)?);
        let int = |k: &str| v.get(k).and_then(Value::as_u64);
        if let Some(t) = int("timeout_secs") {
            r.timeout = Duration::from_secs(t);
        }
        if let Some(i) = int("interval_ms") {
            r.interval = Duration::from_millis(i);
        }
        if let Some(g) = int("startup_grace_secs") {
            r.startup_grace = Duration::from_secs(g);
        }
        Ok(r)
    }
}

#[derive(Debug, Clone)]
pub struct ReadyReport {
    pub elapsed: Duration,
    pub attempts: u32,
    pub detail: String,
}

fn check_start(agent: &AgentClient) -> Result<(), VmError> {
    let s = agent.agent_info(Duration::from_secs(10))?.start;
    if !s.configured {
        return Ok(());
    }
    if let Some(e) = s.spawn_error {
        return Err(VmError::StartExited {
            detail: format!("could not start: {e}"),
            output: String::new(),
        });
    }
    if !s.running {
        let detail = match (s.exit_code, s.signal) {
            (Some(c), _) => format!("exited with code {c} before it was ready"),
            (_, Some(sig)) => format!("was killed by signal {sig} before it was ready"),
            _ => "exited before it was ready".to_string(),
        };
        return Err(VmError::StartExited {
            detail,
            output: s.output,
        });
    }
    Ok(())
}

fn sleep_watching(agent: &AgentClient, d: Duration, step: Duration) -> Result<(), VmError> {
    let end = Instant::now() + d;
    loop {
        check_start(agent)?;
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        agent.sleep(left.min(step))?;
    }
}

/// Waits until the template is ready, or fails with `StartExited` /
/// `ReadinessTimeout` (or `Cancelled`, by the agent client's token).
pub fn wait_ready(agent: &AgentClient, r: &Readiness) -> Result<ReadyReport, VmError> {
    let t0 = Instant::now();
    let step = r.interval.max(Duration::from_millis(50));
    sleep_watching(agent, r.startup_grace, step)?;
    let Some(probe) = r.probe.guest_json() else {
        let Probe::Timeout { timeout_ms } = r.probe else {
            unreachable!()
        };
        sleep_watching(agent, Duration::from_millis(timeout_ms), step)?;
        return Ok(ReadyReport {
            elapsed: t0.elapsed(),
            attempts: 0,
            detail: format!("waited {timeout_ms} ms"),
        });
    };
    let deadline = Instant::now() + r.timeout;
    let mut attempts = 0;
    loop {
        check_start(agent)?;
        attempts += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        let (ready, detail) = agent.probe_once(
            probe.clone(),
            left.clamp(Duration::from_millis(200), Duration::from_secs(5)),
        )?;
        if ready {
            return Ok(ReadyReport {
                elapsed: t0.elapsed(),
                attempts,
                detail,
            });
        }
        if Instant::now() + step > deadline {
            check_start(agent)?;
            return Err(VmError::ReadinessTimeout {
                timeout: r.timeout,
                last: detail,
            });
        }
        agent.sleep(step)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_shapes() {
        let r = Readiness::from_json(&json!({"kind": "command", "command": "test -e /x", "timeout_secs": 30, "interval_ms": 500, "startup_grace_secs": 2})).unwrap();
        assert_eq!(
            r.probe,
            Probe::Command {
                cmd: "test -e /x".into()
            }
        );
        assert_eq!(
            (r.timeout, r.interval, r.startup_grace),
            (
                Duration::from_secs(30),
                Duration::from_millis(500),
                Duration::from_secs(2)
            )
        );
        let r = Readiness::from_json(
            &json!({"kind": "http", "port": 8080, "path": "/health", "timeout_secs": 5}),
        )
        .unwrap();
        assert_eq!(
            r.probe,
            Probe::Http {
                port: 8080,
                path: "/health".into()
            }
        );
        assert_eq!(r.timeout, Duration::from_secs(5));
        assert_eq!(
            Readiness::from_json(&json!({"kind": "tcp", "port": 1}))
                .unwrap()
                .probe,
            Probe::Tcp { port: 1 }
        );
        assert_eq!(
            Readiness::from_json(&json!({"kind": "timeout", "timeout_ms": 1500}))
                .unwrap()
                .probe,
            Probe::Timeout { timeout_ms: 1500 }
        );
        assert_eq!(
            Readiness::from_json(&json!("true")).unwrap().probe,
            Probe::Command { cmd: "true".into() }
        );
        assert!(Readiness::from_json(&json!({"kind": "tcp"})).is_err());
        assert!(Readiness::from_json(&json!({"kind": "grpc", "port": 1})).is_err());
    }
}
