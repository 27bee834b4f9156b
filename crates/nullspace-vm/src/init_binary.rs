//! The static `nullspace-init` binary for the guest.

use crate::VmError;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `NULLSPACE_INIT_BIN` if set; otherwise builds `crates/nullspace-init` of
/// the workspace at `workspace` (static glibc, release, stripped) into its own
/// target dir `target/guest` (so it never waits on the caller's cargo lock),
/// and returns the binary.
pub fn locate_or_build(workspace: &Path) -> Result<PathBuf, VmError> {
    if let Ok(p) = std::env::var("NULLSPACE_INIT_BIN") {
        return Ok(PathBuf::from(p));
    }
    build(workspace)
}

pub fn build(workspace: &Path) -> Result<PathBuf, VmError> {
    let target_dir = workspace.join("target/guest");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_TARGET_DIR")
        .args([
            "build",
            "-q",
            "-p",
            "nullspace-init",
            "--release",
            "--target",
            "x86_64-unknown-linux-gnu",
            "--config",
            "profile.release.debug=false",
            "--config",
            "profile.release.strip=true",
            "--target-dir",
        ])
        .arg(&target_dir)
        .output()
        .map_err(VmError::io("cargo build -p nullspace-init"))?;
    if !out.status.success() {
        return Err(VmError::Kernel(format!(
            "building nullspace-init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(target_dir.join("x86_64-unknown-linux-gnu/release/nullspace-init"))
}
