//! The initramfs: `nullspace-init` as `/init`, the virtio modules of the
//! guest kernel (decompressed) and `/nullspace/modules.list` in dependency
//! order, plus `/nullspace/modules.net.list` (the virtio-net modules not
//! already in the first list; init loads them only with `network`). Cached
//! by kernel version + init binary hash + module lists. The per-VM config is
//! a second cpio archive appended at boot (the kernel unpacks concatenated
//! archives), so the cached part is shared by every template.

use crate::VmError;
use crate::cpio::CpioWriter;
use crate::kernel::{GUEST_MODULES, GuestKernel, NET_MODULES};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn find_module(kernel: &GuestKernel, name: &str) -> Result<PathBuf, VmError> {
    let mut stack = vec![kernel.modules_dir.join("kernel")];
    let alt = name.replace('_', "-");
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)
            .map_err(VmError::io(d.display().to_string()))?
            .flatten()
        {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let f = e.file_name().to_string_lossy().to_string();
            for ext in [".ko", ".ko.xz", ".ko.zst", ".ko.gz"] {
                if let Some(stem) = f.strip_suffix(ext)
                    && (stem == name || stem == alt)
                {
                    return Ok(p);
                }
            }
        }
    }
    Err(VmError::Kernel(format!(
        "module {name} not found under {} (is it built in?)",
        kernel.modules_dir.display()
    )))
}

fn read_module(p: &Path) -> Result<Vec<u8>, VmError> {
    let s = p.to_string_lossy();
    let tool = if s.ends_with(".xz") {
        Some("xz")
    } else if s.ends_with(".zst") {
        Some("zstd")
    } else if s.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => std::fs::read(p).map_err(VmError::io(s.to_string())),
        Some(t) => {
            let out = std::process::Command::new(t)
                .arg("-dc")
                .arg(p)
                .output()
                .map_err(VmError::io(format!("{t} -dc {s}")))?;
            if !out.status.success() {
                return Err(VmError::Kernel(format!("{t} -dc {s} failed")));
            }
            Ok(out.stdout)
        }
    }
}

/// `depends=` from a module's `.modinfo` section.
fn depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    for (i, w) in ko.windows(key.len()).enumerate() {
        if w == key && (i == 0 || ko[i - 1] == 0) {
            let rest = &ko[i + key.len()..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            return String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.replace('-', "_"))
                .collect();
        }
    }
    Vec::new()
}

/// Loads `names` and their dependencies, in load order.
pub fn modules_in_order(
    kernel: &GuestKernel,
    names: &[&str],
) -> Result<Vec<(String, Vec<u8>)>, VmError> {
    let mut loaded: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut todo: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    while let Some(n) = todo.pop() {
        if loaded.contains_key(&n) {
            continue;
        }
        let data = read_module(&find_module(kernel, &n)?)?;
        let d = depends(&data);
        todo.extend(d.iter().cloned());
        deps.insert(n.clone(), d);
        loaded.insert(n, data);
    }
    let mut order: Vec<String> = Vec::new();
    fn visit(n: &str, deps: &BTreeMap<String, Vec<String>>, order: &mut Vec<String>, depth: usize) {
        if order.iter().any(|o| o == n) || depth > 64 {
            return;
        }
        for d in deps.get(n).into_iter().flatten() {
            visit(d, deps, order, depth + 1);
        }
        order.push(n.to_string());
    }
    for n in names {
        visit(n, &deps, &mut order, 0);
    }
    Ok(order
        .into_iter()
        .map(|n| {
            let data = loaded.remove(&n).unwrap_or_default();
            (n, data)
        })
        .collect())
}

/// Builds (or reuses) the base initramfs in `cache_dir`; returns its path.
pub fn build_base(
    kernel: &GuestKernel,
    init_bin: &Path,
    cache_dir: &Path,
) -> Result<PathBuf, VmError> {
    let init = std::fs::read(init_bin).map_err(VmError::io(init_bin.display().to_string()))?;
    let mut h = Sha256::new();
    h.update(&init);
    for m in GUEST_MODULES.iter().chain([&"|"]).chain(NET_MODULES) {
        h.update(m.as_bytes());
        h.update(b"\n");
    }
    let hash = hex::encode(&h.finalize()[..8]);
    std::fs::create_dir_all(cache_dir).map_err(VmError::io(cache_dir.display().to_string()))?;
    let path = cache_dir.join(format!("initramfs-{}-{hash}.cpio", kernel.version));
    if path.is_file() {
        return Ok(path);
    }
    let mods = modules_in_order(kernel, GUEST_MODULES)?;
    let net_mods: Vec<(String, Vec<u8>)> = modules_in_order(kernel, NET_MODULES)?
        .into_iter()
        .filter(|(n, _)| !mods.iter().any(|(m, _)| m == n))
        .collect();
    let mut w = CpioWriter::new(Vec::new());
    let io = VmError::io("initramfs");
    (|| -> std::io::Result<()> {
        for d in [
            "dev",
            "proc",
            "sys",
            "newroot",
            "nullspace",
            "nullspace/modules",
        ] {
            w.dir(d, 0o755)?;
        }
        w.char_dev("dev/console", 0o600, 5, 1)?;
        w.char_dev("dev/null", 0o666, 1, 3)?;
        w.file("init", 0o755, &init)?;
        let mut list = String::new();
        for (n, data) in &mods {
            w.file(&format!("nullspace/modules/{n}.ko"), 0o644, data)?;
            list.push_str(&format!("{n}.ko\n"));
        }
        w.file("nullspace/modules.list", 0o644, list.as_bytes())?;
        let mut net_list = String::new();
        for (n, data) in &net_mods {
            w.file(&format!("nullspace/modules/{n}.ko"), 0o644, data)?;
            net_list.push_str(&format!("{n}.ko\n"));
        }
        w.file("nullspace/modules.net.list", 0o644, net_list.as_bytes())?;
        Ok(())
    })()
    .map_err(io)?;
    let bytes = w.finish().map_err(VmError::io("initramfs"))?;
    let tmp = tempfile::NamedTempFile::new_in(cache_dir).map_err(VmError::io("initramfs temp"))?;
    std::fs::write(tmp.path(), &bytes).map_err(VmError::io("initramfs write"))?;
    tmp.persist(&path)
        .map_err(|e| VmError::io("initramfs persist")(e.error))?;
    Ok(path)
}

/// The base initramfs followed by a cpio holding `/nullspace/config.json`.
pub fn write_with_config(base: &Path, config_json: &[u8], out: &Path) -> Result<(), VmError> {
    let mut bytes = std::fs::read(base).map_err(VmError::io(base.display().to_string()))?;
    let mut w = CpioWriter::new(Vec::new());
    w.file("nullspace/config.json", 0o644, config_json)
        .map_err(VmError::io("config cpio"))?;
    bytes.extend(w.finish().map_err(VmError::io("config cpio"))?);
    std::fs::write(out, bytes).map_err(VmError::io(out.display().to_string()))
}
