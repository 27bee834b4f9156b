//! Terminal sessions of the agent protocol: a process on a pseudo-terminal
//! that outlives the host connection (`pty_start`, `pty_resize`,
//! `pty_list`; output through `attach`, input through `write_stdin`, ended
//! with `kill`, all by the session's pid).

use super::ExitStatus;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `TERM` of a session whose request does not set one.
pub const DEFAULT_TERM: &str = "xterm-256color";
/// The SDK's default window size.
pub const DEFAULT_COLS: u16 = 120;
pub const DEFAULT_ROWS: u16 = 30;
/// Largest accepted `cols` and `rows`.
pub const MAX_DIMENSION: u16 = 4096;
/// Default and largest output ring of a session.
pub const DEFAULT_PTY_RING: u64 = 256 << 10;
pub const MAX_PTY_RING: u64 = 4 << 20;

fn cols() -> u16 {
    DEFAULT_COLS
}
fn rows() -> u16 {
    DEFAULT_ROWS
}

/// A terminal session to start. Without `argv` and `cmd` it runs the
/// user's shell from /etc/passwd (else `/bin/sh`), interactive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PtySpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub argv: Vec<String>,
    /// Run under `/bin/sh -c` when `argv` is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    /// Over the runtime defaults; `TERM` defaults to [`DEFAULT_TERM`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default = "cols")]
    pub cols: u16,
    #[serde(default = "rows")]
    pub rows: u16,
    /// Output kept for re-attaching ([`DEFAULT_PTY_RING`], at most [`MAX_PTY_RING`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_bytes: Option<u64>,
}

impl Default for PtySpec {
    fn default() -> Self {
        PtySpec {
            argv: Vec::new(),
            cmd: None,
            env: BTreeMap::new(),
            cwd: None,
            user: None,
            cols: DEFAULT_COLS,
            rows: DEFAULT_ROWS,
            ring_bytes: None,
        }
    }
}

/// Why a window size is refused.
pub fn check_size(cols: u16, rows: u16) -> Result<(), String> {
    for (what, v) in [("cols", cols), ("rows", rows)] {
        if v == 0 || v > MAX_DIMENSION {
            return Err(format!("{what} must be 1..={MAX_DIMENSION}, got {v}"));
        }
    }
    Ok(())
}

/// A terminal session, running or exited (exited ones stay listed until
/// newer ones push them out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtyInfo {
    /// Unique within the guest's boot: `pty_` and 16 hex digits.
    pub session: String,
    pub pid: u32,
    pub cols: u16,
    pub rows: u16,
    /// The command line, at most 4 KiB.
    pub command: String,
    pub running: bool,
    pub started_unix_ms: u64,
    pub exit: Option<ExitStatus>,
}
