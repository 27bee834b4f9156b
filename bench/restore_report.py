# Prints bench/restore.sh's modes side by side, with ratios against the
# streamed restore (the earlier design) and issue 12's targets.
# Usage: restore_report.py WORKDIR MODE...
import json, os, sys

work, modes = sys.argv[1], sys.argv[2:]
r = {m: json.load(open(os.path.join(work, f"{m}.json"))) for m in modes}
base = "streamed" if "streamed" in r else modes[0]


def get(m, path):
    v = r[m]
    for p in path:
        if isinstance(p, int):
            v = v[p] if p < len(v) else None
        else:
            v = v.get(p) if v else None
    return v


def fmt(v, unit=""):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}{unit}" if abs(v) < 100 else f"{v:.0f}{unit}"
    return f"{v}{unit}"


def row(label, f, unit=""):
    vals = [f(m) for m in modes]
    cells = [fmt(v, unit) for v in vals]
    b = f(base)
    ratios = []
    for m, v in zip(modes, vals):
        if m == base:
            continue
        ratios.append(f"{b / v:.1f}x" if (b and v) else "-")
    print(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")


others = [m for m in modes if m != base]
print()
print("| measure | " + " | ".join(modes) + " | " + " | ".join(f"{base}/{m}" for m in others) + " |")
print("|---" * (1 + len(modes) + len(others)) + "|")
row("cold boot: template boot + start command to ready, ms", lambda m: get(m, ["snapshot", "boot_ms"]) + get(m, ["snapshot", "ready_ms"]))
row("snapshot: VM paused, ms", lambda m: get(m, ["snapshot", "paused_ms"]))
row("snapshot: migration stream, KiB", lambda m: get(m, ["snapshot", "stream_bytes"]) // 1024)
row("snapshot: memory on disk, MiB", lambda m: get(m, ["snapshot", "memory_on_disk_bytes"]) / 2**20)
for what, key in [("create", "create"), ("first commands.run", "exec"), ("create + first run", "total"), ("create + first run + kill", "with_kill")]:
    for p in ["p50", "p99"]:
        row(f"{what} ({get(base, ['sequential', 'create', 'n'])} one at a time), {p} ms", lambda m, k=key, p=p: None if get(m, ["sequential", k]) is None else round(get(m, ["sequential", k, p])))
row("  of them from the pool", lambda m: get(m, ["sequential", "pooled"]))
par = get(base, ["concurrent", "par"])
for p in ["p50", "p99"]:
    row(f"create + first run ({par} at once), {p} ms", lambda m, p=p: round(get(m, ["concurrent", "total", p])))
row(f"  wall time of {par} at once (median round), ms", lambda m: round(get(m, ["concurrent", "wall_ms_median"])))
row("  of them from the pool", lambda m: get(m, ["concurrent", "pooled"]))
def pss(m, i, *keys):
    """Sum of `keys` (KiB) of PSS row `i` as MiB; None where not measured."""
    e = get(m, ["pss", i])
    return sum(e[k] for k in keys) / 1024 if e else None


def per(m, i, *keys):
    e = get(m, ["pss", i])
    return sum(e[k] for k in keys) / 1024 / max(1, e["made"]) if e else None


for i, e in enumerate(r[base]["pss"]):
    if all(not r[m]["pss"] for m in modes if m != base):
        break
    n = e["n"]
    row(f"PSS of {n} idle machines, MiB total", lambda m, i=i: pss(m, i, "pss_kib"))
    row("  per machine, MiB", lambda m, i=i: per(m, i, "pss_kib"))
    row(f"  machines made of {n}", lambda m, i=i: get(m, ["pss", i, "made"]))
    row("  the pool's own PSS, MiB", lambda m, i=i: pss(m, i, "pool_pss_kib"))
    row("  machines + pool, MiB", lambda m, i=i: pss(m, i, "pss_kib", "pool_pss_kib"))
    row("  machines + pool per machine, MiB", lambda m, i=i: per(m, i, "pss_kib", "pool_pss_kib"))
def snaps(m, key):
    """Median of `key` over the machine snapshots; None where not measured."""
    xs = sorted(e[key] for e in r[m].get("machine_snapshots", []))
    return xs[len(xs) // 2] if xs else None


if any(r[m].get("machine_snapshots") for m in modes):
    row("snapshot of a machine that changed 10 MiB (median), ms", lambda m: snaps(m, "snapshot_ms"))
    row("  VM paused, ms", lambda m: snaps(m, "paused_ms"))
    row("  written (files not shared with the template), MiB", lambda m: None if snaps(m, "written_bytes") is None else snaps(m, "written_bytes") / 2**20)
    row("  migration stream, MiB", lambda m: None if snaps(m, "state_bytes") is None else snaps(m, "state_bytes") / 2**20)
    row("fork -> running child (median), ms", lambda m: snaps(m, "fork_ms"))
    row("  + its first commands.run, ms", lambda m: snaps(m, "fork_exec_ms"))
    row("pause (median), ms", lambda m: snaps(m, "pause_ms"))
    row("resume + first commands.run (median), ms", lambda m: snaps(m, "resume_exec_ms"))
print()
for m in modes:
    for e in r[m]["pss"]:
        if e.get("error"):
            print(f"{m}: {e['made']} of {e['n']} machines made: {e['error']}")

# Issue 12's targets.
print()
if "pool" in r and "streamed" in r:
    s = get("streamed", ["sequential", "total", "p50"])
    p = get("pool", ["sequential", "total", "p50"])
    print(f"create -> first exec p50: streamed {s:.0f} ms / pool {p:.0f} ms = {s / p:.1f}x (target >= 4x): {'MET' if s / p >= 4 else 'MISSED'}")
    print(f"create -> first exec p50 through the SDK, pool: {p:.0f} ms (target <= 250 ms): {'MET' if p <= 250 else 'MISSED'}")
for m in ["mapped", "pool"]:
    if m in r and "streamed" in r and r[m]["pss"] and r["streamed"]["pss"]:
        a, b = r["streamed"]["pss"][-1], r[m]["pss"][-1]
        if a["made"] and b["made"]:
            pa = a["pss_kib"] / a["made"]
            # The pool's entries count with its machines.
            pb = (b["pss_kib"] + b["pool_pss_kib"]) / b["made"]
            what = "machines + pool" if b["pool_pss_kib"] else "machines"
            print(f"PSS per idle machine at N={b['n']} ({m} made {b['made']}, streamed {a['made']}): streamed {pa / 1024:.1f} MiB / {m} {pb / 1024:.1f} MiB ({what}) = {pa / pb:.2f}x (target >= 3x): {'MET' if pa / pb >= 3 else 'MISSED'}")
# Issue 18's targets: the pool keeps up with creates one after another and
# answers ten at once.
for m in modes:
    if m in ("streamed", "mapped"):
        continue
    t = get(m, ["sequential", "total"])
    c = get(m, ["concurrent", "total", "p99"])
    if t:
        ok = t["p50"] <= 150 and t["p99"] <= 400
        print(f"{m}: {t['n']} sequential create + first exec p50 {t['p50']:.0f} ms, p99 {t['p99']:.0f} ms (targets <= 150 / <= 400 ms): {'MET' if ok else 'MISSED'}")
    if c is not None:
        print(f"{m}: {par} at once, slowest create + first exec {c:.0f} ms (target <= 2000 ms): {'MET' if c <= 2000 else 'MISSED'}")
for m in modes:
    ms = get(m, ["snapshot", "paused_ms"])
    print(f"{m}: snapshot of the build VM {ms} ms paused (target <= 100 ms): {'MET' if ms <= 100 else 'MISSED'}")
# Issue 18's snapshot targets.
for m in modes:
    if snaps(m, "snapshot_ms") is None:
        continue
    w, t, f = snaps(m, "written_bytes") / 2**20, snaps(m, "snapshot_ms"), snaps(m, "fork_ms")
    print(f"{m}: snapshot of a machine that changed 10 MiB wrote {w:.1f} MiB in {t:.0f} ms (targets <= 32 MiB, <= 200 ms): {'MET' if w <= 32 and t <= 200 else 'MISSED'}")
    print(f"{m}: fork {f:.0f} ms to a running child (target <= 300 ms): {'MET' if f <= 300 else 'MISSED'}")
