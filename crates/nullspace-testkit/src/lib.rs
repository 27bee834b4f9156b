//! Test fixtures: images written by code ([`image`]) and real servers
//! started on loopback ([`registry`]). Tests read as scenarios on top.

pub mod export_tree;
pub mod image;
pub mod inet;
pub mod plain_qemu;
pub mod registry;
pub mod server;
pub mod tree;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `nullspace` binary under test (built by cargo for integration tests).
pub fn nullspace_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NULLSPACE_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test-binary> -> target/<profile>/nullspace
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    dir.join("nullspace")
}

/// Output of a finished command.
pub struct Run {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(&self) -> &Self {
        assert!(
            self.status.success(),
            "command failed ({}):\nstdout: {}\nstderr: {}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }
}

pub fn run(cmd: &mut Command) -> Run {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    Run {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `nullspace ARGS`.
pub fn nullspace(args: &[&str]) -> Run {
    run(Command::new(nullspace_bin()).args(args))
}

/// Whether an external tool is installed (the set-up script installs them;
/// tests fail, not skip, when one is missing, unless they say otherwise).
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool} >/dev/null"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}
