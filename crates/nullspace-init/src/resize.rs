//! The `resize` op: vCPUs and memory blocks on or offline toward the size
//! asked for. A microvm has no CPU or memory hotplug, so a VM boots at its
//! ceiling and the guest takes what it should not have offline
//! (`nullspace_model::size`). Memory goes in whole blocks (128 MiB on
//! x86-64) of the zone the kernel was told to keep movable
//! (`movablecore=`); a block the kernel cannot empty stays online, and the
//! host's balloon takes up whatever the blocks leave over. The host checks
//! the size against the ceiling; this answers with what is online.

use crate::agent::{Failure, Outcome};
use nullspace_model::agent::Event;
use std::path::{Path, PathBuf};

const CPUS: &str = "/sys/devices/system/cpu";
const MEMORY: &str = "/sys/devices/system/memory";

pub fn resize(vcpus: u32, memory_mib: u32) -> Outcome {
    if vcpus == 0 || memory_mib == 0 {
        return Err(Failure::bad("resize needs at least 1 vCPU and 1 MiB"));
    }
    Ok(Event::Resized {
        vcpus: set_cpus(vcpus)?,
        memory_mib: set_memory(memory_mib)?,
    })
}

/// Numbered entries `PREFIX<n>` of a sysfs directory, by number.
fn numbered(dir: &str, prefix: &str) -> Result<Vec<(u32, PathBuf)>, Failure> {
    let mut out: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| Failure::io(dir, e))?
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.strip_prefix(prefix)?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    out.sort();
    Ok(out)
}

fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

/// CPUs `0..vcpus` online, the others offline (the boot CPU has no switch).
fn set_cpus(vcpus: u32) -> Result<u32, Failure> {
    let mut online = 0;
    for (n, dir) in numbered(CPUS, "cpu")? {
        let f = dir.join("online");
        let Some(now) = read(&f) else {
            online += 1;
            continue;
        };
        let want = n < vcpus;
        if (now == "1") != want {
            std::fs::write(&f, if want { "1" } else { "0" })
                .map_err(|e| Failure::io(&f.display().to_string(), e))?;
        }
        online += u32::from(want);
    }
    Ok(online)
}

/// Memory blocks online toward `memory_mib` rounded up to a block: offline
/// blocks come online (movable, so that they can go again) lowest first;
/// movable blocks go offline highest first, skipping any the kernel cannot
/// empty now. Returns the memory online, in MiB.
fn set_memory(memory_mib: u32) -> Result<u32, Failure> {
    let size_file = Path::new(MEMORY).join("block_size_bytes");
    let Some(block_mib) = read(&size_file)
        // sysfs writes it in hex without a prefix.
        .and_then(|s| {
            s.chars()
                .try_fold(0u64, |a, c| Some(a * 16 + u64::from(c.to_digit(16)?)))
        })
        .map(|b| (b >> 20) as u32)
        .filter(|&b| b > 0)
    else {
        return Err(Failure::bad(
            "this guest kernel has no memory hotplug (no memory block size in sysfs)",
        ));
    };
    let blocks = numbered(MEMORY, "memory")?;
    let is_online = |d: &Path| read(&d.join("state")).as_deref() == Some("online");
    let want = memory_mib.div_ceil(block_mib) as usize;
    let mut online = blocks.iter().filter(|(_, d)| is_online(d)).count();
    if online < want {
        for (_, d) in blocks.iter().filter(|(_, d)| !is_online(d)) {
            if online == want {
                break;
            }
            let st = d.join("state");
            if std::fs::write(&st, "online_movable").is_ok()
                || std::fs::write(&st, "online").is_ok()
            {
                online += 1;
            }
        }
    } else {
        for (_, d) in blocks.iter().rev() {
            if online == want {
                break;
            }
            let movable = read(&d.join("valid_zones")).is_some_and(|z| z.starts_with("Movable"));
            if is_online(d) && movable && std::fs::write(d.join("state"), "offline").is_ok() {
                online -= 1;
            }
        }
    }
    Ok(online as u32 * block_mib)
}
