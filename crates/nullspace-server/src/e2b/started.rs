//! What each `process.Process/Start` asked for (its config and tag), kept
//! while the process runs, so `List` shows E2B's `ProcessInfo` and a tag
//! selects its process. In memory and bounded: after a restart, or past
//! the bound, `List` shows the guest's command line alone.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use serde_json::{Value, json};

/// Processes remembered at once on this server.
const MAX_STARTED: usize = 10_000;

#[derive(Debug, Clone)]
pub struct Started {
    /// `ProcessConfig` as proto3 JSON.
    pub config: Value,
    pub tag: Option<String>,
}

type Key = (String, u32);

fn all() -> &'static Mutex<HashMap<Key, Started>> {
    static M: OnceLock<Mutex<HashMap<Key, Started>>> = OnceLock::new();
    M.get_or_init(Default::default)
}

/// Remembers process `pid` of sandbox `sandbox` (dropped past the bound).
pub fn remember(sandbox: &str, pid: u32, s: Started) {
    if let Ok(mut m) = all().lock()
        && (m.len() < MAX_STARTED || m.contains_key(&(sandbox.to_string(), pid)))
    {
        m.insert((sandbox.to_string(), pid), s);
    }
}

/// Forgets an ended process.
pub fn forget(sandbox: &str, pid: u32) {
    if let Ok(mut m) = all().lock() {
        m.remove(&(sandbox.to_string(), pid));
    }
}

pub fn get(sandbox: &str, pid: u32) -> Option<Started> {
    all()
        .lock()
        .ok()
        .and_then(|m| m.get(&(sandbox.to_string(), pid)).cloned())
}

/// The pid of the process started with `tag`.
pub fn by_tag(sandbox: &str, tag: &str) -> Option<u32> {
    let m = all().lock().ok()?;
    m.iter()
        .find(|((s, _), v)| s == sandbox && v.tag.as_deref() == Some(tag))
        .map(|((_, pid), _)| *pid)
}

/// `ProcessInfo` of a running process.
pub fn info(sandbox: &str, pid: u32, command: &str) -> Value {
    match get(sandbox, pid) {
        Some(s) => {
            let mut v = json!({"pid": pid, "config": s.config});
            if let Some(t) = s.tag {
                v["tag"] = json!(t);
            }
            v
        }
        None => json!({"pid": pid, "config": {"cmd": command}}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_started_process_is_listed_with_its_config_and_found_by_tag() {
        let s = Started {
            config: json!({"cmd": "/bin/bash", "args": ["-l", "-c", "sleep 1"]}),
            tag: Some("web".into()),
        };
        remember("mch_t1", 42, s);
        assert_eq!(by_tag("mch_t1", "web"), Some(42));
        assert_eq!(by_tag("mch_t2", "web"), None, "another sandbox's tag");
        assert_eq!(info("mch_t1", 42, "x")["config"]["args"][2], "sleep 1");
        assert_eq!(info("mch_t1", 42, "x")["tag"], "web");
        forget("mch_t1", 42);
        assert_eq!(
            info("mch_t1", 42, "sh -c x"),
            json!({"pid": 42, "config": {"cmd": "sh -c x"}})
        );
    }
}
