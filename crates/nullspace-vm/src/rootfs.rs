//! Host-side checks and changes to a template's ext4 rootfs (e2fsprogs).

use crate::VmError;
use std::path::Path;
use std::process::Command;

fn debugfs(img: &Path, req: &str) -> Result<String, VmError> {
    let out = Command::new("debugfs")
        .args(["-R", req])
        .arg(img)
        .output()
        .map_err(VmError::io("debugfs (install e2fsprogs)"))?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// What `path` is in the image after following symlinks (at most 40):
/// `Some(type)` from debugfs (`regular`, `directory`, …) or `None`.
pub fn resolve_type(img: &Path, path: &str) -> Result<Option<String>, VmError> {
    let mut comps: Vec<String> = path
        .split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect();
    comps.reverse();
    let mut cur: Vec<String> = Vec::new();
    let mut hops = 0;
    let mut last_type = Some("directory".to_string());
    while let Some(c) = comps.pop() {
        match c.as_str() {
            "." => continue,
            ".." => {
                cur.pop();
                continue;
            }
            _ => {}
        }
        cur.push(c);
        let p = format!("/{}", cur.join("/"));
        let out = debugfs(img, &format!("stat \"{p}\""))?;
        let Some(ty) = out
            .lines()
            .find_map(|l| l.split("Type: ").nth(1))
            .map(|t| t.split_whitespace().next().unwrap_or("").to_string())
        else {
            return Ok(None);
        };
        if ty == "symlink" {
            hops += 1;
            if hops > 40 {
                return Ok(None);
            }
            let target = match out.lines().find_map(|l| l.split("Fast link dest: ").nth(1)) {
                Some(t) => t.trim().trim_matches('"').to_string(),
                None => {
                    let o = Command::new("debugfs")
                        .args(["-R", &format!("cat \"{p}\"")])
                        .arg(img)
                        .output()
                        .map_err(VmError::io("debugfs"))?;
                    String::from_utf8_lossy(&o.stdout).to_string()
                }
            };
            cur.pop();
            if target.starts_with('/') {
                cur.clear();
            }
            for t in target.split('/').filter(|c| !c.is_empty()).rev() {
                comps.push(t.to_string());
            }
            continue;
        }
        last_type = Some(ty);
    }
    Ok(last_type)
}

/// Fails with `invalid_rootfs` unless `/bin/sh` resolves to a regular file.
pub fn check_shell(img: &Path) -> Result<(), VmError> {
    match resolve_type(img, "/bin/sh")? {
        Some(t) if t == "regular" => Ok(()),
        Some(t) => Err(VmError::InvalidRootfs(format!(
            "/bin/sh in {} is a {t}, not an executable file: the start command and agent need a shell",
            img.display()
        ))),
        None => Err(VmError::InvalidRootfs(format!(
            "the image has no /bin/sh ({}): nullspace templates need a shell for the start command and commands",
            img.display()
        ))),
    }
}

/// Grows the ext4 image to at least `disk_mb` MiB (`truncate` + `resize2fs`).
pub fn grow(img: &Path, disk_mb: u64) -> Result<(), VmError> {
    let want = disk_mb << 20;
    let len = std::fs::metadata(img)
        .map_err(VmError::io(img.display().to_string()))?
        .len();
    if len >= want {
        return Ok(());
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(img)
        .map_err(VmError::io("grow"))?;
    f.set_len(want).map_err(VmError::io("grow"))?;
    drop(f);
    let run = |args: &[&str]| -> Result<std::process::Output, VmError> {
        Command::new(args[0])
            .args(&args[1..])
            .arg(img)
            .output()
            .map_err(VmError::io(args[0]))
    };
    let fsck = run(&["e2fsck", "-fy"])?;
    // 0: clean, 1: fixed. Anything else is a broken image.
    if !matches!(fsck.status.code(), Some(0 | 1)) {
        return Err(VmError::InvalidRootfs(format!(
            "e2fsck: {}",
            String::from_utf8_lossy(&fsck.stdout)
        )));
    }
    let out = run(&["resize2fs"])?;
    if !out.status.success() {
        return Err(VmError::InvalidRootfs(format!(
            "resize2fs: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}
