//! Waiting for readiness (spec §2.4) with the build model's probes
//! ([`Readiness`]: `tcp`, `http`, `command`, `timeout`, and their defaults).
//! Probes run in the guest via the agent (there is no host network); the
//! host owns the schedule. The timeout counts from the end of the grace
//! period. A start command that exits before readiness fails at once.

use crate::{AgentClient, VmError};
use std::time::{Duration, Instant};

/// The build model's probe and readiness (their defaults live there).
pub use nullspace_model::build::probe::{Probe, Readiness};

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
    let Some(probe) = r.guest_check() else {
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
            serde_json::to_value(&probe).map_err(|e| VmError::Agent(format!("probe: {e}")))?,
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
