//! What `/proc` says of a pid: its state, start time and command line
//! ([`ProcessRecord`]), and the tree of its descendants.

use std::collections::{BTreeSet, HashMap};
use std::fs;

/// `(ppid, state, start_time)` from `/proc/PID/stat`.
fn stat(pid: u32) -> Option<(u32, char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain anything.
    let rest = text.get(text.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let ppid = fields.get(1)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((ppid, state, start))
}

/// Running: it exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|(_, state, _)| state != 'Z' && state != 'X')
}

/// `/proc/PID/cmdline`, raw (NUL-separated); empty when gone.
pub fn cmdline_bytes(pid: u32) -> Vec<u8> {
    fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()
}

/// Whether `pid` runs and its command line contains `needle` (a path only
/// that process was given, e.g. its agent socket).
pub fn runs_naming(pid: u32, needle: &[u8]) -> bool {
    !needle.is_empty()
        && alive(pid)
        && cmdline_bytes(pid)
            .windows(needle.len())
            .any(|w| w == needle)
}

/// Live processes whose command line contains `needle`.
pub fn naming(needle: &[u8]) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|&p| runs_naming(p, needle))
        .collect()
}

fn all_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `root` and every live (non-zombie) descendant of it.
pub fn tree(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    let mut live = BTreeSet::new();
    for pid in all_pids() {
        if let Some((ppid, state, _)) = stat(pid) {
            children.entry(ppid).or_default().push(pid);
            if state != 'Z' && state != 'X' {
                live.insert(pid);
            }
        }
    }
    let mut out = vec![];
    let mut stack = vec![root];
    let mut seen = BTreeSet::new();
    while let Some(p) = stack.pop() {
        if !seen.insert(p) {
            continue;
        }
        if live.contains(&p) {
            out.push(p);
        }
        stack.extend(children.get(&p).into_iter().flatten().copied());
    }
    out
}

/// What a pidfile records: enough to tell the process from a later one
/// that reuses its pid.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessRecord {
    pub pid: u32,
    /// Clock ticks after boot (`/proc/PID/stat` field 22).
    pub start_time: u64,
    pub cmdline: Vec<String>,
}

impl ProcessRecord {
    /// The record of a running process, or `None` when it is gone.
    pub fn of(pid: u32) -> Option<ProcessRecord> {
        let (_, state, start_time) = stat(pid)?;
        if state == 'Z' || state == 'X' {
            return None;
        }
        let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = raw
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        Some(ProcessRecord {
            pid,
            start_time,
            cmdline,
        })
    }

    /// Whether the process this record describes still runs: same pid,
    /// same start time, and the same command line, or the tail of it (a
    /// wrapper such as `unshare --net -- buildah …` that exec'd its program
    /// after it was recorded).
    pub fn is_running(&self) -> bool {
        ProcessRecord::of(self.pid).is_some_and(|now| {
            now.start_time == self.start_time
                && !now.cmdline.is_empty()
                && self.cmdline.ends_with(&now.cmdline)
        })
    }
}

/// Waits (up to 2 s) until a just-spawned `pid` shows the program it
/// exec'd: `spawn` can return while the exec is still replacing it, with
/// an empty command line.
#[cfg(test)]
pub(crate) fn wait_exec(pid: u32) {
    let t = std::time::Instant::now();
    while cmdline_bytes(pid).is_empty() && t.elapsed() < std::time::Duration::from_secs(2) {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_tells_its_process_from_a_reused_pid() {
        let mut c = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        wait_exec(c.id());
        let rec = ProcessRecord::of(c.id()).unwrap();
        assert_eq!(rec.cmdline, ["sleep", "30"]);
        assert!(rec.is_running());
        assert!(runs_naming(c.id(), b"30"));
        // The same pid with another start time is another process.
        let other = ProcessRecord {
            start_time: rec.start_time + 1,
            ..rec.clone()
        };
        assert!(!other.is_running());
        c.kill().unwrap();
        c.wait().unwrap();
        assert!(!rec.is_running() && !alive(c.id()));
    }
}
