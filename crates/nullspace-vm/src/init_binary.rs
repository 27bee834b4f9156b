//! The static `nullspace-init` binary for the guest: finding an installed
//! one ([`discover`]) and building it from the workspace ([`build`]).

use crate::VmError;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where an installed guest init is looked for, in order, after an explicit
/// path and `$NULLSPACE_INIT_BIN`: beside the running binary
/// (`<exe dir>/guest/nullspace-init`, where `scripts/setup.sh` puts it; cargo
/// never writes there, so a later `cargo build` cannot replace it with a
/// dynamically linked build), in the data directory, then the system
/// locations a package would use.
pub fn candidates(data_dir: Option<&Path>) -> Vec<PathBuf> {
    let mut c = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        c.push(dir.join("guest/nullspace-init"));
    }
    if let Some(d) = data_dir {
        c.push(d.join("guest/nullspace-init"));
    }
    c.push(PathBuf::from("/usr/local/lib/nullspace/nullspace-init"));
    c.push(PathBuf::from("/usr/lib/nullspace/nullspace-init"));
    c
}

/// The guest init to use: `explicit`, else `$NULLSPACE_INIT_BIN`, else the
/// first of [`candidates`] that exists. Whatever is chosen must be a static
/// x86-64 ELF executable (the guest has no loader of ours).
pub fn discover(explicit: Option<&Path>, data_dir: Option<&Path>) -> Result<PathBuf, VmError> {
    let named = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("NULLSPACE_INIT_BIN").map(PathBuf::from));
    if let Some(p) = named {
        check_static(&p)?;
        return Ok(p);
    }
    let cands = candidates(data_dir);
    for p in &cands {
        if p.is_file() {
            check_static(p)?;
            return Ok(p.clone());
        }
    }
    Err(VmError::Kernel(format!(
        "no guest init found (looked in {}); build it with scripts/setup.sh or pass --init-bin",
        cands
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// Refuses anything but a static x86-64 ELF executable: a dynamically
/// linked init would fail inside the guest with an opaque kernel panic.
/// (Reads the ELF header and program headers directly: two fixed-layout
/// structs are all this needs.)
pub fn check_static(p: &Path) -> Result<(), VmError> {
    use std::io::Read;
    let bad = |why: &str| VmError::Kernel(format!("guest init {}: {why}", p.display()));
    let mut f = std::fs::File::open(p).map_err(|e| bad(&e.to_string()))?;
    let mut head = vec![0u8; 64];
    f.read_exact(&mut head)
        .map_err(|_| bad("too short to be an ELF executable"))?;
    if &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        return Err(bad("not a 64-bit little-endian ELF file"));
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    if u16_at(&head, 18) != 62 {
        return Err(bad("not an x86-64 executable"));
    }
    let phoff = u64::from_le_bytes(head[32..40].try_into().expect("8 bytes")) as usize;
    let phentsize = u16_at(&head, 54) as usize;
    let phnum = u16_at(&head, 56) as usize;
    if phentsize < 4 || phnum > 256 {
        return Err(bad("implausible program header table"));
    }
    let mut all = Vec::new();
    std::fs::File::open(p)
        .and_then(|f| {
            f.take((phoff + phentsize * phnum) as u64)
                .read_to_end(&mut all)
        })
        .map_err(|e| bad(&e.to_string()))?;
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        let Some(ph) = all.get(o..o + 4) else {
            return Err(bad("truncated program header table"));
        };
        // PT_INTERP: the file asks for a dynamic loader.
        if u32::from_le_bytes(ph.try_into().expect("4 bytes")) == 3 {
            return Err(bad(
                "dynamically linked; build it with RUSTFLAGS=\"-C target-feature=+crt-static\" (scripts/setup.sh does)",
            ));
        }
    }
    Ok(())
}

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
    build_static(workspace, "nullspace-init")
}

/// Builds the binary of workspace package `package` the way the init is
/// built (static glibc, release, stripped, into `target/guest`): for
/// programs that run inside guests, such as the tests' web server
/// (`nullspace-guest-fixture`).
pub fn build_static(workspace: &Path, package: &str) -> Result<PathBuf, VmError> {
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
            package,
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
        .map_err(VmError::io(format!("cargo build -p {package}")))?;
    if !out.status.success() {
        return Err(VmError::Kernel(format!(
            "building {package} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(target_dir.join(format!("x86_64-unknown-linux-gnu/release/{package}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_executable_is_refused_and_garbage_too() {
        // The test binary itself is dynamically linked.
        let me = std::env::current_exe().unwrap();
        let e = check_static(&me).unwrap_err().to_string();
        assert!(e.contains("dynamically linked"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk");
        std::fs::write(&junk, b"#!/bin/sh\necho hi\n").unwrap();
        let e = check_static(&junk).unwrap_err().to_string();
        assert!(e.contains("ELF"), "{e}");
        assert!(check_static(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn discovery_takes_the_data_dir_copy_and_checks_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("guest")).unwrap();
        // A dynamic binary in the data dir is found, then refused clearly.
        std::fs::copy(
            std::env::current_exe().unwrap(),
            dir.path().join("guest/nullspace-init"),
        )
        .unwrap();
        if std::env::var_os("NULLSPACE_INIT_BIN").is_none()
            && !candidates(None)[0].exists()
            && !Path::new("/usr/local/lib/nullspace/nullspace-init").exists()
            && !Path::new("/usr/lib/nullspace/nullspace-init").exists()
        {
            let e = discover(None, Some(dir.path())).unwrap_err().to_string();
            assert!(
                e.contains("guest/nullspace-init") && e.contains("dynamically"),
                "{e}"
            );
        }
        let e = discover(Some(&dir.path().join("nope")), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
    }
}
