//! `GET /metrics`: the node's figures in Prometheus' text format — the
//! machines and memory it holds, and per template shape the pool's stock,
//! hits, misses and refill times. Written by hand: the figures are read
//! from the pool and the capacity counters when scraped, and the format
//! for counters and gauges is two lines each (a registry crate would hold
//! a second copy of state the pool already keeps).

use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::state::Shared;

/// One metric's `# HELP`/`# TYPE` lines and its samples.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

/// Label values are template ids and numbers; quotes and backslashes
/// are escaped all the same.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A per-template pool metric: name, type, help, and its value of a key.
type PoolFamily<'a> = (
    &'a str,
    &'a str,
    &'a str,
    &'a dyn Fn(&nullspace_vm::pool::KeyStats) -> f64,
);

pub fn render(state: &Shared) -> String {
    let mut out = String::new();
    let (machines, memory) = state.machines.usage();
    family(
        &mut out,
        "nullspace_capacity_machines",
        "gauge",
        "Machines (and prepared pool VMs) holding capacity.",
        &[(String::new(), machines as f64)],
    );
    family(
        &mut out,
        "nullspace_capacity_memory_mib",
        "gauge",
        "Guest memory held by machines and prepared pool VMs, MiB.",
        &[(String::new(), memory as f64)],
    );
    let stats = state.machines.pool_stats();
    let lab = |k: &nullspace_vm::pool::PoolKey| {
        format!(
            "{{template=\"{}\",vcpus=\"{}\",memory_mb=\"{}\"}}",
            esc(&k.label),
            k.vcpus,
            k.memory_mb
        )
    };
    let each = |f: &dyn Fn(&nullspace_vm::pool::KeyStats) -> f64| -> Vec<(String, f64)> {
        stats.iter().map(|(k, s)| (lab(k), f(s))).collect()
    };
    let rows: [PoolFamily; 8] = [
        (
            "nullspace_pool_ready",
            "gauge",
            "Prepared VMs ready now.",
            &|s| s.ready as f64,
        ),
        (
            "nullspace_pool_target",
            "gauge",
            "Prepared VMs the pool keeps now (demand and warm pools).",
            &|s| s.target as f64,
        ),
        (
            "nullspace_pool_hits_total",
            "counter",
            "Creates that took a prepared VM.",
            &|s| s.hits as f64,
        ),
        (
            "nullspace_pool_misses_total",
            "counter",
            "Creates that found none ready.",
            &|s| s.misses as f64,
        ),
        (
            "nullspace_pool_refills_total",
            "counter",
            "Prepared VMs made.",
            &|s| s.prepared as f64,
        ),
        (
            "nullspace_pool_refill_seconds_sum",
            "counter",
            "Time spent making them (QEMU start to ready).",
            &|s| s.refill_ms_sum as f64 / 1000.0,
        ),
        (
            "nullspace_pool_failures_total",
            "counter",
            "Preparations that failed.",
            &|s| s.failures as f64,
        ),
        (
            "nullspace_pool_shed_total",
            "counter",
            "Prepared VMs ended to give way to creates on a full host.",
            &|s| s.shed as f64,
        ),
    ];
    for (name, kind, help, f) in rows {
        family(&mut out, name, kind, help, &each(f));
    }
    out
}

pub async fn handler(State(s): State<Shared>) -> impl IntoResponse {
    let body = tokio::task::spawn_blocking(move || render(&s))
        .await
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}
