//! A small synchronous QMP client.

use crate::VmError;
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

    pub fn status(&mut self) -> Result<String, VmError> {
        let r = self.execute("query-status", json!({}))?;
        Ok(r.get("status")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string())
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
