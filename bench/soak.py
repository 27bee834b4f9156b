# Driver of bench/soak.sh (issue 22 item 3): mixed load at a bounded rate
# through the published SDK (1.0.3) against one running server, a sampler
# of the server's resources, and the verdict.
#
# Load: one operation at a time, one every PACE: create (+ commands.run),
# exec, files write/read/list (content checked by sha256 inside the guest),
# pause, resume, fork, kill; at most LIVE running machines and PAUSED paused
# ones; a template build (demo image + a run_cmd) every BUILD seconds, a
# machine made from it. Machines are made with a timeout past the run's end:
# the soak kills them itself.
#
# Samples (every SAMPLE seconds, and at quiet points) to OUT/samples.csv:
# the server's VmRSS and PSS, open fds, direct children, QEMUs whose command
# line names the data directory, the data directory's size (and the store
# file's and logs' apart), and every table's row count (read-only).
#
# Quiet points (the end of warm-up, then QUIETS more, the last at the end):
# every machine killed, the soak templates deleted, the next garbage
# collection passed, QEMUs settled. The quiet samples are the comparable
# ones (same load: none); the summary compares the last with the first and
# exits 1 on an unexpected error or a series outside its bound.
#
# Env: NULLSPACE_API_URL, NULLSPACE_API_KEY, NS_DATA, SRV (server pid),
# NS_IMAGE, NS_SOAK_OUT, NS_SOAK_SECS (3600), NS_SOAK_PACE_MS (1500),
# NS_SOAK_LIVE (3), NS_SOAK_PAUSED (2), NS_SOAK_BUILD_SECS (240),
# NS_SOAK_SAMPLE_SECS (10), NS_SOAK_GC_SECS (the server's GC interval, 30),
# NS_SOAK_QUIETS (5).
import csv, glob, hashlib, os, random, sqlite3, subprocess, sys, threading, time, traceback

from nullspace import Machine, Template
from nullspace.errors import NotFoundError
from procstat import pss_kib

DATA = os.environ["NS_DATA"]
SRV = int(os.environ["SRV"])
IMAGE = os.environ["NS_IMAGE"]
OUT = os.environ["NS_SOAK_OUT"]
SECS = int(os.environ.get("NS_SOAK_SECS", "3600"))
PACE = int(os.environ.get("NS_SOAK_PACE_MS", "1500")) / 1000
LIVE = int(os.environ.get("NS_SOAK_LIVE", "3"))
PAUSED = int(os.environ.get("NS_SOAK_PAUSED", "2"))
BUILD = int(os.environ.get("NS_SOAK_BUILD_SECS", "240"))
SAMPLE = int(os.environ.get("NS_SOAK_SAMPLE_SECS", "10"))
GC = int(os.environ.get("NS_SOAK_GC_SECS", "30"))
WARMUP = min(600, SECS // 6)
QUIETS = int(os.environ.get("NS_SOAK_QUIETS", "5"))
DB = os.path.join(DATA, "nullspace.db")
MIB = 1 << 20

rng = random.Random(22)
t_start = time.monotonic()


def now():
    return time.monotonic() - t_start


def log(*a):
    print(f"[{now():7.1f}s]", *a, flush=True)


# ---------------------------------------------------------------- sampling

def proc_status(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def processes():
    """(direct children of the server, QEMUs naming the data directory)."""
    children = qemus = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if proc_status(d, "PPid") == SRV:
                children += 1
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"qemu" in cmd.split(b"\0")[0] and DATA.encode() in cmd:
            qemus += 1
    return children, qemus


def du(path):
    try:
        out = subprocess.run(["du", "-sb", path], capture_output=True, text=True, check=False).stdout
        return int(out.split()[0])
    except (ValueError, IndexError):
        return 0


def tables():
    """Row counts of every table, read-only (the server keeps writing)."""
    con = sqlite3.connect(f"file:{DB}?mode=ro", uri=True, timeout=10)
    try:
        names = [r[0] for r in con.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' "
            "AND name NOT LIKE '_sqlx%' ORDER BY name")]
        rows = {n: con.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0] for n in names}
        rows["machines_not_destroyed"] = con.execute(
            "SELECT count(*) FROM machines WHERE status <> 'destroyed'").fetchone()[0]
        return rows
    finally:
        con.close()


def db_bytes():
    return sum(os.path.getsize(p) for p in glob.glob(DB + "*") if os.path.isfile(p))


samples = []
csv_writer = None
samples_lock = threading.Lock()
state = {"running": 0, "paused": 0}


def sample(kind):
    children, qemus = processes()
    try:
        rows = tables()
    except sqlite3.Error as e:
        rows = {}
        log(f"sample: store unreadable: {e}")
    data = du(DATA)
    logs = du(os.path.join(DATA, "logs")) if os.path.isdir(os.path.join(DATA, "logs")) else 0
    s = {
        "t": round(now(), 1), "kind": kind,
        "running": state["running"], "paused": state["paused"],
        "rss_kib": proc_status(SRV, "VmRSS"), "pss_kib": pss_kib(SRV, missing=-1),
        "fds": len(os.listdir(f"/proc/{SRV}/fd")) if os.path.isdir(f"/proc/{SRV}/fd") else -1,
        "threads": proc_status(SRV, "Threads"),
        "children": children, "qemus": qemus,
        "data_bytes": data, "db_bytes": db_bytes(), "logs_bytes": logs,
    }
    s.update({f"rows_{k}": v for k, v in rows.items()})
    with samples_lock:
        samples.append(s)
        # Written as it goes: a run cut short keeps its samples.
        global csv_writer
        if csv_writer is None:
            f = open(os.path.join(OUT, "samples.csv"), "w", newline="")
            csv_writer = (f, csv.DictWriter(f, fieldnames=list(s), extrasaction="ignore"))
            csv_writer[1].writeheader()
        csv_writer[1].writerow(s)
        csv_writer[0].flush()
    return s


stop = threading.Event()


def sampler():
    while not stop.wait(SAMPLE):
        try:
            sample("periodic")
        except Exception as e:  # noqa: BLE001 - a failed sample is reported, not fatal
            log(f"sample failed: {e!r}")


# ---------------------------------------------------------------- load

class Tracked:
    def __init__(self, m, template):
        self.m, self.template = m, template
        self.paused = False
        self.files = {}  # path -> sha256 hex written there


machines = []
ops = {}
errors = []  # (op, message)


def count(op):
    ops[op] = ops.get(op, 0) + 1


def refresh_state():
    state["running"] = sum(1 for t in machines if not t.paused)
    state["paused"] = sum(1 for t in machines if t.paused)


def check_exec(m, n):
    r = m.commands.run(f"echo soak-{n}", timeout=60)
    assert r.exit_code == 0 and r.stdout == f"soak-{n}\n", f"commands.run: {r}"


def op_create(template="base"):
    m = Machine.create(template=template, timeout=SECS + 900)
    t = Tracked(m, template)
    machines.append(t)
    check_exec(m, len(machines))


def op_exec(t):
    check_exec(t.m, rng.randrange(1 << 30))


def op_files(t):
    path = f"/tmp/soak/f{rng.randrange(4)}"
    body = rng.randbytes(rng.choice([100, 4096, 65536])).hex()
    t.m.files.write(path, body)
    got = t.m.files.read(path)
    assert got == body, f"files.read {path}: {len(got)} chars back, {len(body)} written"
    names = [f.name for f in t.m.files.list("/tmp/soak")]
    assert os.path.basename(path) in names, f"files.list /tmp/soak: {names}"
    r = t.m.commands.run(f"sha256sum {path}", timeout=60)
    want = hashlib.sha256(body.encode()).hexdigest()
    assert r.stdout.split()[:1] == [want], f"sha256sum {path} in the guest: {r.stdout!r}, want {want}"
    t.files[path] = want


def check_files(t):
    for path, want in t.files.items():
        r = t.m.commands.run(f"sha256sum {path}", timeout=60)
        assert r.stdout.split()[:1] == [want], f"{path} after pause/fork: {r.stdout!r}, want {want}"


def op_pause(t):
    t.m.pause()
    t.paused = True


def op_resume(t):
    m = Machine.connect(t.m.id)
    t.m.close()
    t.m, t.paused = m, False
    check_exec(m, 0)
    check_files(t)


def op_fork(t):
    c = t.m.fork()
    child = Tracked(c, t.template)
    child.files = dict(t.files)
    machines.append(child)
    check_files(child)


def op_kill(t):
    t.m.kill()
    machines.remove(t)
    try:
        Machine.connect(t.m.id)
        raise AssertionError(f"machine {t.m.id} still there after kill")
    except NotFoundError:
        pass


builds = []  # template names alive


def op_build(n):
    name = f"soak-{n}"
    # A step that differs per build: never a cache hit.
    b = Template.build(Template.from_image(IMAGE).run_cmd(f"echo soak-build-{n} > /etc/soak", user="root"), name=name)
    assert b.status.value == "ready", f"build {name}: {b.status}"
    builds.append(name)
    op_create(name)
    t = machines[-1]
    r = t.m.commands.run("cat /etc/soak", timeout=60)
    assert r.stdout == f"soak-build-{n}\n", f"machine of {name}: /etc/soak {r.stdout!r}"


def run(op, fn, *a):
    count(op)
    t0 = time.monotonic()
    try:
        fn(*a)
    except Exception as e:  # noqa: BLE001 - counted and reported
        errors.append((op, f"{type(e).__name__}: {e}"))
        log(f"ERROR {op}: {type(e).__name__}: {e}")
        if len(errors) <= 3:
            traceback.print_exc()
    finally:
        refresh_state()
    return time.monotonic() - t0


def choose():
    running = [t for t in machines if not t.paused]
    paused = [t for t in machines if t.paused]
    choices = []
    if len(running) < LIVE:
        choices += [("create", 3)]
    if running:
        choices += [("exec", 4), ("files", 4)]
        if len(paused) < PAUSED:
            choices += [("pause", 2)]
        if len(running) < LIVE:
            choices += [("fork", 2)]
    if paused and len(running) < LIVE:
        choices += [("resume", 3)]
    if machines:
        choices += [("kill", 3 if len(running) >= LIVE else 1)]
    op = rng.choices([c for c, _ in choices], [w for _, w in choices])[0]
    if op == "create":
        return op, op_create, ()
    if op in ("exec", "files", "pause", "fork"):
        return op, {"exec": op_exec, "files": op_files, "pause": op_pause, "fork": op_fork}[op], (rng.choice(running),)
    if op == "resume":
        return op, op_resume, (rng.choice(paused),)
    return op, op_kill, (rng.choice(machines),)


def quiet(label):
    """Everything the soak made gone; the sample once the server settled."""
    for t in list(machines):
        run("kill", op_kill, t)
    for name in list(builds):
        try:
            count("template_delete")
            Template.delete(name)
        except Exception as e:  # noqa: BLE001 - counted and reported
            errors.append(("template_delete", f"{name}: {type(e).__name__}: {e}"))
        builds.remove(name)
    # Two whole collector intervals: one collection started after the
    # deletions (the server logs a collection only when it removed something).
    time.sleep(2 * GC + 5)
    # The pool refilled, nothing exiting: the same process count twice.
    last, deadline = None, time.monotonic() + 90
    while time.monotonic() < deadline:
        cur = processes()
        if cur == last:
            break
        last = cur
        time.sleep(5)
    s = sample(f"quiet:{label}")
    log(f"quiet {label}: rss {s['rss_kib'] >> 10} MiB, fds {s['fds']}, children {s['children']}, "
        f"qemus {s['qemus']}, data {s['data_bytes'] / MIB:.1f} MiB")


# ---------------------------------------------------------------- verdict

# Tables that grow by design (history): their rate is reported, not bounded.
BY_DESIGN = {
    "builds": "one per build",
    "build_logs": "the builds' log entries",
    "lifecycle_events": "the machine audit trail",
    "machines": "destroyed machines keep their record",
    "idempotency_keys": "one per create/fork, kept for retries",
}


def summary():
    quiets = [s for s in samples if s["kind"].startswith("quiet")]
    after = [s for s in samples if s["t"] >= WARMUP]
    q0, qn = quiets[0], quiets[-1]
    hours = max(qn["t"] - q0["t"], 1) / 3600
    rows, failed = [], []

    def verdict(name, first, last, lo, hi, bound, ok, unit=""):
        v = "ok" if ok else "FAIL"
        if not ok:
            failed.append(name)
        rows.append((name, f"{first}{unit}", f"{last}{unit}", f"{lo}..{hi}{unit}", bound, v))

    k = "rss_kib"
    verdict("server RSS (MiB)", q0[k] >> 10, qn[k] >> 10, min(s[k] for s in after) >> 10,
            max(s[k] for s in after) >> 10, "quiet end <= quiet start x1.2 + 16 MiB",
            qn[k] <= q0[k] * 1.2 + 16 * 1024)
    k = "pss_kib"
    verdict("server PSS (MiB)", q0[k] >> 10, qn[k] >> 10, min(s[k] for s in after) >> 10,
            max(s[k] for s in after) >> 10, "quiet end <= quiet start x1.2 + 16 MiB",
            qn[k] <= q0[k] * 1.2 + 16 * 1024)
    for k, name, slack in (("fds", "server fds", 8), ("threads", "server threads", 4),
                           ("children", "server children", 0), ("qemus", "QEMUs of the data dir", 0)):
        verdict(name, q0[k], qn[k], min(s[k] for s in after), max(s[k] for s in after),
                f"quiet end <= quiet start + {slack}", qn[k] <= q0[k] + slack)
    rest = lambda s: s["data_bytes"] - s["db_bytes"] - s["logs_bytes"]  # noqa: E731
    verdict("data dir w/o store and logs (MiB)", round(rest(q0) / MIB, 1), round(rest(qn) / MIB, 1),
            round(min(rest(s) for s in after) / MIB, 1), round(max(rest(s) for s in after) / MIB, 1),
            "quiet end <= quiet start + 8 MiB", rest(qn) <= rest(q0) + 8 * MIB)
    grow = lambda s: s["db_bytes"] + s["logs_bytes"]  # noqa: E731
    rate = (grow(qn) - grow(q0)) / MIB / hours
    verdict("store file + logs (MiB)", round(grow(q0) / MIB, 1), round(grow(qn) / MIB, 1),
            round(min(grow(s) for s in after) / MIB, 1), round(max(grow(s) for s in after) / MIB, 1),
            f"by design (history); {rate:.1f} MiB/h <= 64 MiB/h", rate <= 64)
    for k in sorted(x for x in q0 if x.startswith("rows_")):
        t = k[len("rows_"):]
        lo = min(s.get(k, 0) for s in after)
        hi = max(s.get(k, 0) for s in after)
        if t in BY_DESIGN:
            r = (qn.get(k, 0) - q0[k]) / hours
            verdict(f"rows {t}", q0[k], qn.get(k, 0), lo, hi, f"by design ({BY_DESIGN[t]}): {r:.0f}/h", True)
        else:
            verdict(f"rows {t}", q0[k], qn.get(k, 0), lo, hi, "quiet end <= quiet start",
                    qn.get(k, 0) <= q0[k])
    print()
    print(f"run {now():.0f} s (warm-up {WARMUP} s; quiet points at "
          + ", ".join(f"{s['t']:.0f}" for s in quiets) + " s)")
    print("ops: " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())))
    print(f"errors: {len(errors)}")
    for op, msg in errors[:5]:
        print(f"  {op}: {msg}")
    print()
    print("| series | quiet after warm-up | quiet at end | min..max after warm-up | bound | verdict |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    return failed


def main():
    # The base template builds in the background when the server starts.
    deadline = time.time() + 900
    while True:
        try:
            m = Machine.create(timeout=60)
            m.kill()
            break
        except NotFoundError:
            if time.time() > deadline:
                raise
            time.sleep(2)
    log("base template ready")
    sample("start")
    threading.Thread(target=sampler, daemon=True).start()

    end = SECS
    quiet_at = [WARMUP + i * (SECS - WARMUP) / QUIETS for i in range(QUIETS)]
    n_build = 0
    last_build = -BUILD
    while now() < end:
        if quiet_at and now() >= quiet_at[0]:
            quiet_at.pop(0)
            quiet(f"{now():.0f}s")
            continue
        t0 = time.monotonic()
        if now() - last_build >= BUILD:
            last_build = now()
            n_build += 1
            took = run("build", op_build, n_build)
            log(f"build {n_build}: {took:.1f} s")
        else:
            op, fn, a = choose()
            took = run(op, fn, *a)
            log(f"{op} {took:.1f} s; running {state['running']}, paused {state['paused']}")
        left = PACE - (time.monotonic() - t0)
        if left > 0:
            time.sleep(left)
    quiet("end")
    stop.set()

    failed = summary()
    print(f"\nsamples: {os.path.join(OUT, 'samples.csv')} ({len(samples)})")
    if errors or failed:
        print(f"SOAK FAILED: {len(errors)} errors; out of bound: {', '.join(failed) or 'none'}")
        sys.exit(1)
    print("SOAK PASSED")


if __name__ == "__main__":
    main()
