//! `GET /metrics`: the node's figures in Prometheus' text format — the
//! machines and memory it holds, and per VM shape the pool's stock, hits,
//! misses and refill times. Written by hand: the figures are read
//! from the pool and the capacity counters when scraped, and the format
//! for counters and gauges is two lines each (a registry crate would hold
//! a second copy of state the pool already keeps).

use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use nullspace_vm::pool::KeyStats;

use crate::state::Shared;

/// One metric's `# HELP`/`# TYPE` lines and its samples.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

/// A pool metric per VM shape: name, type, help, and its value of a key.
type PoolFamily<'a> = (&'a str, &'a str, &'a str, &'a dyn Fn(&KeyStats) -> f64);

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
    // Summed per VM shape: a template id would tell one namespace's key
    // of another namespace's templates.
    let mut by_shape: std::collections::BTreeMap<(u32, u32), KeyStats> = Default::default();
    for (k, x) in state.machines.pool_stats() {
        let a = by_shape.entry((k.vcpus, k.memory_mb)).or_default();
        a.ready += x.ready;
        a.target += x.target;
        a.hits += x.hits;
        a.misses += x.misses;
        a.prepared += x.prepared;
        a.refill_ms_sum += x.refill_ms_sum;
        a.failures += x.failures;
        a.shed += x.shed;
    }
    let each = |f: &dyn Fn(&KeyStats) -> f64| -> Vec<(String, f64)> {
        by_shape
            .iter()
            .map(|((v, m), s)| (format!("{{vcpus=\"{v}\",memory_mb=\"{m}\"}}"), f(s)))
            .collect()
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
