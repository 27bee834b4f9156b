//! `metrics`: the guest's CPU, memory, disk and network figures, read from
//! `/proc` and `statvfs` (CPU use is the busy share of two `/proc/stat`
//! readings a short sample apart).

use crate::agent::{Failure, Outcome};
use nullspace_model::agent::{
    DEFAULT_METRICS_SAMPLE_MS, ErrorCode, Event, GuestMetrics, MAX_METRICS_SAMPLE_MS,
};
use std::time::Duration;

/// Cumulative CPU time of all CPUs (clock ticks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CpuTimes {
    busy: u64,
    total: u64,
}

/// The aggregate `cpu` line of `/proc/stat`: busy is everything but idle
/// and iowait (guest time is already inside user and nice).
fn cpu_times(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8) // user nice system idle iowait irq softirq steal
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    if v.len() < 4 {
        return None;
    }
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    let total: u64 = v.iter().sum();
    Some(CpuTimes {
        busy: total - idle,
        total,
    })
}

/// Online CPUs: the `cpuN` lines of `/proc/stat`.
fn online_cpus(stat: &str) -> u32 {
    stat.lines()
        .filter(|l| {
            l.strip_prefix("cpu")
                .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count() as u32
}

fn cpu_percent(a: CpuTimes, b: CpuTimes) -> f64 {
    let total = b.total.saturating_sub(a.total);
    if total == 0 {
        return 0.0;
    }
    let busy = b.busy.saturating_sub(a.busy).min(total);
    (busy as f64 * 100.0 / total as f64 * 10.0).round() / 10.0
}

/// `(used, total)` bytes from `/proc/meminfo`: used is `MemTotal -
/// MemAvailable`.
fn memory(meminfo: &str) -> Option<(u64, u64)> {
    let kb = |key: &str| -> Option<u64> {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let total = kb("MemTotal")?;
    let available = kb("MemAvailable").or_else(|| kb("MemFree"))?;
    Some((total.saturating_sub(available) << 10, total << 10))
}

/// `(rx, tx)` bytes of every interface but loopback, from `/proc/net/dev`.
fn network(dev: &str) -> (u64, u64) {
    let mut rx = 0u64;
    let mut tx = 0u64;
    for line in dev.lines().skip(2) {
        let Some((name, counters)) = line.split_once(':') else {
            continue;
        };
        if name.trim() == "lo" {
            continue;
        }
        let v: Vec<u64> = counters
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        if v.len() >= 9 {
            rx = rx.saturating_add(v[0]);
            tx = tx.saturating_add(v[8]);
        }
    }
    (rx, tx)
}

fn read(path: &str) -> Result<String, Failure> {
    std::fs::read_to_string(path).map_err(|e| Failure::io(path, e))
}

pub fn metrics(sample_ms: Option<u64>) -> Outcome {
    let ms = sample_ms
        .unwrap_or(DEFAULT_METRICS_SAMPLE_MS)
        .clamp(10, MAX_METRICS_SAMPLE_MS);
    let unreadable = || Failure::new(ErrorCode::Io, "/proc/stat: no aggregate cpu line");
    let first = cpu_times(&read("/proc/stat")?).ok_or_else(unreadable)?;
    std::thread::sleep(Duration::from_millis(ms));
    let stat = read("/proc/stat")?;
    let second = cpu_times(&stat).ok_or_else(unreadable)?;
    let (mem_used_bytes, mem_total_bytes) = memory(&read("/proc/meminfo")?)
        .ok_or_else(|| Failure::new(ErrorCode::Io, "/proc/meminfo: no MemTotal"))?;
    let fs = rustix::fs::statvfs("/")
        .map_err(|e| Failure::new(ErrorCode::Io, format!("statvfs /: {e}")))?;
    let (network_rx_bytes, network_tx_bytes) =
        network(&std::fs::read_to_string("/proc/net/dev").unwrap_or_default());
    Ok(Event::Metrics(GuestMetrics {
        cpu_percent: cpu_percent(first, second),
        cpu_count: online_cpus(&stat).max(1),
        mem_used_bytes,
        mem_total_bytes,
        disk_used_bytes: fs.f_blocks.saturating_sub(fs.f_bfree) * fs.f_frsize,
        disk_total_bytes: fs.f_blocks * fs.f_frsize,
        network_rx_bytes,
        network_tx_bytes,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  100 0 50 800 50 0 0 0 0 0\n\
        cpu0 50 0 25 400 25 0 0 0 0 0\n\
        cpu1 50 0 25 400 25 0 0 0 0 0\n\
        intr 1 2 3\nctxt 5\ncpus_running 1\n";

    #[test]
    fn cpu_share_and_count() {
        let a = cpu_times(STAT).unwrap();
        assert_eq!(
            a,
            CpuTimes {
                busy: 150,
                total: 1000
            }
        );
        assert_eq!(online_cpus(STAT), 2, "cpus_running is not a CPU");
        let b = CpuTimes {
            busy: 250,
            total: 1400,
        };
        assert_eq!(cpu_percent(a, b), 25.0);
        assert_eq!(cpu_percent(a, a), 0.0, "no time passed");
        // Counters that went backwards (a restored snapshot) never give
        // more than 100 or less than 0.
        let odd = CpuTimes {
            busy: 900,
            total: 1001,
        };
        assert!((0.0..=100.0).contains(&cpu_percent(a, odd)));
        assert_eq!(cpu_percent(odd, a), 0.0);
        assert!(cpu_times("intr 1\n").is_none());
    }

    #[test]
    fn memory_and_network() {
        let mi = "MemTotal:        1000 kB\nMemFree:  100 kB\nMemAvailable:     400 kB\n";
        assert_eq!(memory(mi), Some((600 << 10, 1000 << 10)));
        assert_eq!(
            memory("MemTotal: 10 kB\nMemFree: 4 kB\n"),
            Some((6 << 10, 10 << 10))
        );
        assert_eq!(memory("nothing"), None);
        let dev = "Inter-|   Receive |  Transmit\n face |bytes packets ...\n\
            \x20   lo: 999 9 0 0 0 0 0 0 999 9 0 0 0 0 0 0\n\
            \x20 eth0: 1500 10 0 0 0 0 0 0 700 5 0 0 0 0 0 0\n\
            \x20 eth1: 500 1 0 0 0 0 0 0 300 1 0 0 0 0 0 0\n";
        assert_eq!(network(dev), (2000, 1000));
        assert_eq!(network(""), (0, 0));
    }
}
