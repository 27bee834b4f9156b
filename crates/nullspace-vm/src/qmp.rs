//! A small synchronous QMP client, with typed answers for the queries the
//! VM driver decides on (`query-status`, `query-migrate`).
//!
//! Hand-written rather than `qapi`/`qapi-qmp`: those generate the whole
//! QMP schema of one QEMU release (a large crate whose closed enums reject
//! the values a newer QEMU adds); two enums with an `Other` arm are enough.

use crate::VmError;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects (retrying until `limit`) and negotiates capabilities.
    pub fn connect(path: &Path, limit: Duration) -> Result<Qmp, VmError> {
        Self::connect_checked(path, limit, &mut || Ok(()))
    }

    /// Like [`Qmp::connect`], calling `check` before every retry (e.g. to
    /// stop when QEMU exited or the operation was cancelled).
    pub fn connect_checked(
        path: &Path,
        limit: Duration,
        check: &mut dyn FnMut() -> Result<(), VmError>,
    ) -> Result<Qmp, VmError> {
        let t = Instant::now();
        let stream = loop {
            check()?;
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if t.elapsed() > limit => {
                    return Err(VmError::Agent(format!("QMP {}: {e}", path.display())));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(VmError::io("qmp"))?;
        let writer = stream.try_clone().map_err(VmError::io("qmp"))?;
        let mut q = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        q.read_msg()?; // greeting
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read_msg(&mut self) -> Result<Value, VmError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(VmError::io("qmp read"))?;
        if n == 0 {
            return Err(VmError::Agent("QMP connection closed".into()));
        }
        serde_json::from_str(&line).map_err(|e| VmError::Agent(format!("QMP: {e}: {line}")))
    }

    /// Runs a command; returns its `return` value (events are skipped).
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, VmError> {
        let mut msg = json!({"execute": cmd});
        if args.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = args;
        }
        let mut s = msg.to_string();
        s.push('\n');
        self.writer
            .write_all(s.as_bytes())
            .map_err(VmError::io("qmp write"))?;
        loop {
            let v = self.read_msg()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(VmError::Agent(format!("QMP {cmd}: {e}")));
            }
        }
    }

    /// Runs a command and reads its `return` value as `T`.
    pub fn query<T: DeserializeOwned>(&mut self, cmd: &str) -> Result<T, VmError> {
        let r = self.execute(cmd, json!({}))?;
        serde_json::from_value(r.clone())
            .map_err(|e| VmError::Agent(format!("QMP {cmd}: {e}: {r}")))
    }

    /// `query-status`: the VM's run state.
    pub fn status(&mut self) -> Result<RunState, VmError> {
        Ok(self.query::<StatusInfo>("query-status")?.status)
    }

    /// `query-migrate`: the state of the current (or last) migration.
    pub fn migration(&mut self) -> Result<MigrationInfo, VmError> {
        self.query("query-migrate")
    }
}

/// QAPI `RunState` (`query-status`'s `status`); a value this list does not
/// know (a newer QEMU's) is `Other`, which every caller handles.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    Debug,
    Inmigrate,
    InternalError,
    IoError,
    Paused,
    Postmigrate,
    Prelaunch,
    FinishMigrate,
    RestoreVm,
    Running,
    SaveVm,
    Shutdown,
    Suspended,
    Watchdog,
    GuestPanicked,
    Colo,
    #[serde(untagged)]
    Other(String),
}

/// QAPI `StatusInfo` (the fields read here).
#[derive(Debug, Clone, Deserialize)]
pub struct StatusInfo {
    pub status: RunState,
}

/// QAPI `MigrationStatus`; unknown values are `Other`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    None,
    Setup,
    Cancelling,
    Cancelled,
    Active,
    PostcopyActive,
    PostcopyPaused,
    PostcopyRecoverSetup,
    PostcopyRecover,
    Completed,
    Failed,
    Colo,
    PreSwitchover,
    Device,
    WaitUnplug,
    #[serde(untagged)]
    Other(String),
}

impl MigrationStatus {
    /// A migration in this state is still going (it may end or pause the VM).
    pub fn in_progress(&self) -> bool {
        use MigrationStatus::*;
        matches!(
            self,
            Setup
                | Cancelling
                | Active
                | PostcopyActive
                | PostcopyPaused
                | PostcopyRecoverSetup
                | PostcopyRecover
                | PreSwitchover
                | Device
                | WaitUnplug
        )
    }
}

/// QAPI `MigrationInfo` (the fields read here): `status` is absent before
/// the first migration.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct MigrationInfo {
    #[serde(default)]
    pub status: Option<MigrationStatus>,
    #[serde(default, rename = "error-desc")]
    pub error_desc: Option<String>,
}

impl MigrationInfo {
    /// Why it failed, as QEMU says (or its status).
    pub fn why(&self) -> String {
        match (&self.error_desc, &self.status) {
            (Some(d), _) => d.clone(),
            (None, Some(s)) => format!("status {s:?}"),
            (None, None) => "no migration".into(),
        }
    }
}

impl Qmp {
    /// QMP `query-version`.
    pub fn version(&mut self) -> Result<nullspace_model::snapshot::QemuVersion, VmError> {
        let r = self.execute("query-version", json!({}))?;
        let n = |k: &str| r["qemu"][k].as_u64().unwrap_or(0) as u32;
        Ok(nullspace_model::snapshot::QemuVersion {
            major: n("major"),
            minor: n("minor"),
            micro: n("micro"),
            package: r["package"].as_str().unwrap_or("").trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qmp_states_parse_and_unknown_values_are_other() {
        let st: StatusInfo =
            serde_json::from_str(r#"{"status": "postmigrate", "running": false}"#).unwrap();
        assert_eq!(st.status, RunState::Postmigrate);
        let st: StatusInfo = serde_json::from_str(r#"{"status": "finish-migrate"}"#).unwrap();
        assert_eq!(st.status, RunState::FinishMigrate);
        let st: StatusInfo = serde_json::from_str(r#"{"status": "new-state"}"#).unwrap();
        assert_eq!(st.status, RunState::Other("new-state".into()));
        let m: MigrationInfo = serde_json::from_str("{}").unwrap();
        assert!(m.status.is_none());
        let m: MigrationInfo =
            serde_json::from_str(r#"{"status": "failed", "error-desc": "disk full"}"#).unwrap();
        assert_eq!(m.status, Some(MigrationStatus::Failed));
        assert_eq!(m.why(), "disk full");
        let m: MigrationInfo = serde_json::from_str(r#"{"status": "pre-switchover"}"#).unwrap();
        assert!(m.status.unwrap().in_progress());
        let m: MigrationInfo = serde_json::from_str(r#"{"status": "x-later"}"#).unwrap();
        assert_eq!(m.status, Some(MigrationStatus::Other("x-later".into())));
    }
}
