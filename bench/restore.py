# Driver of bench/restore.sh (issue 12): one restore mode of one running
# nullspace server, measured through the published SDK (1.0.3). Writes its
# figures as JSON to NS_OUT; bench/restore.sh prints the modes side by side.
#
# Env: NULLSPACE_API_URL, NULLSPACE_API_KEY, NS_DATA (the server's data
# directory), NS_IMAGE (the Debian image in a local registry), NS_MODE
# (a label), NS_OUT, NS_N (creates one at a time, default 50), NS_PACE_MS
# (at least this long from one sequential create to the next, default
# 1000), NS_PAR (creates at once, default 10), NS_ROUNDS (default 3),
# NS_PSS (machine counts, default "1,8,32"), NS_SERVER_LOG (for the pool
# hits the server logs), NS_WARM (a warm pool of that many ready machines
# made first; 0: none), NS_SNAPS (snapshots, forks and pauses of machines
# that changed 10 MiB of memory, default 3).
import glob, json, math, os, statistics, threading, time

from nullspace import Machine, Template, TemplateWarmPool, wait_for_port
from procstat import pss_kib

DATA = os.environ["NS_DATA"]
MODE = os.environ["NS_MODE"]
N = int(os.environ.get("NS_N", "50"))
PACE = int(os.environ.get("NS_PACE_MS", "1000")) / 1000
PAR = int(os.environ.get("NS_PAR", "10"))
ROUNDS = int(os.environ.get("NS_ROUNDS", "3"))
PSS = [int(x) for x in os.environ.get("NS_PSS", "1,8,32").split(",") if x]
LOG = os.environ.get("NS_SERVER_LOG")
# The pool's size (0: none): concurrent rounds start once it is refilled.
POOL = int(os.environ.get("NS_POOL_SIZE", "0"))
TEMPLATE = "deb"


def log(*a):
    print(f"[{MODE}]", *a, flush=True)


def pct(xs, p):
    """Nearest-rank percentile."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def summary(xs):
    return {"n": len(xs), "p50": pct(xs, 50), "p99": pct(xs, 99), "all": xs}


def one():
    t0 = time.perf_counter()
    m = Machine.create(template=TEMPLATE)
    t1 = time.perf_counter()
    r = m.commands.run("echo hi")
    t2 = time.perf_counter()
    assert r.stdout == "hi\n", r
    return m, (t1 - t0) * 1000, (t2 - t1) * 1000


def pid_of(machine_id):
    try:
        return int(open(os.path.join(DATA, "machines", machine_id, "qemu.pid")).read().strip())
    except (OSError, ValueError):
        return None


def pooled_pids(running):
    """QEMUs of machine directories that are no running machine's: the pool."""
    out = []
    for p in glob.glob(os.path.join(DATA, "machines", "*", "qemu.pid")):
        mid = os.path.basename(os.path.dirname(p))
        if mid in running:
            continue
        try:
            pid = int(open(p).read().strip())
            if os.path.exists(f"/proc/{pid}"):
                out.append(pid)
        except (OSError, ValueError):
            pass
    return out


def pooled_hits():
    if not LOG:
        return 0
    try:
        return open(LOG).read().count("pooled=true")
    except OSError:
        return 0


def kill_all(ms):
    for m in ms:
        try:
            m.kill()
        except Exception:  # noqa: BLE001 - best effort between phases
            pass


def settle(seconds):
    """Lets refills and exits finish between phases."""
    time.sleep(seconds)


res = {"mode": MODE}

# The template (built once per data directory).
if Template.exists(TEMPLATE):
    log("template exists")
else:
    t = time.perf_counter()
    b = Template.build(
        Template.from_image(os.environ["NS_IMAGE"]).set_start_cmd(
            "python3 -m http.server 8080", wait_for_port(8080)
        ),
        name=TEMPLATE,
        cpu_count=2,
        memory_mb=512,
    )
    assert b.status.value == "ready", b
    log(f"template built in {time.perf_counter() - t:.1f} s")

# Its snapshot (the one snapshot directory of this data directory).
snaps = glob.glob(os.path.join(DATA, "artifacts", "snapshots", "*", "snapshot.json"))
assert len(snaps) == 1, snaps
sdir = os.path.dirname(snaps[0])
m = json.load(open(snaps[0]))
tm = m["timings_ms"]
mem = m["memory"]
on_disk = mem["state"]["size"]
if mem.get("ram"):
    on_disk += os.stat(os.path.join(sdir, mem["ram"]["path"])).st_blocks * 512
res["snapshot"] = {
    "memory_mode": mem["mode"],
    "boot_ms": tm.get("boot", 0),
    "ready_ms": tm.get("ready", 0),
    "paused_ms": tm.get("snapshot", 0),
    "commit_ms": tm.get("commit", 0),
    "stream_bytes": mem["state"]["size"],
    "memory_on_disk_bytes": on_disk,
    "disk_bytes": sum(layer["file"]["size"] for layer in m["disk"]),
}

WARM = int(os.environ.get("NS_WARM", "0"))
if WARM:
    t = time.perf_counter()
    wp = TemplateWarmPool.create(TEMPLATE, name="bench", min_ready=WARM, max_ready=WARM)
    wp.wait_until_ready(timeout_secs=900, interval_secs=0.5)
    res["warm_pool_ready_s"] = time.perf_counter() - t
    log(f"warm pool of {WARM} ready in {res['warm_pool_ready_s']:.1f} s")

# One untimed create: the server hashes the snapshot's files once.
mm, _, _ = one()
mm.kill()
settle(5)

if WARM:
    t = time.time()
    while len(pooled_pids(set())) < WARM and time.time() - t < 300:
        time.sleep(0.5)
hits0 = pooled_hits()
seq_c, seq_e, seq_t, seq_k = [], [], [], []
for i in range(N):
    t = time.perf_counter()
    mm, c, e = one()
    seq_c.append(c)
    seq_e.append(e)
    seq_t.append(c + e)
    k0 = time.perf_counter()
    mm.kill()
    seq_k.append(c + e + (time.perf_counter() - k0) * 1000)
    left = PACE - (time.perf_counter() - t)
    if left > 0:
        time.sleep(left)
res["sequential"] = {
    "create": summary(seq_c),
    "exec": summary(seq_e),
    "total": summary(seq_t),
    "with_kill": summary(seq_k),
    "pooled": pooled_hits() - hits0,
    "pace_ms": PACE * 1000,
}
log(f"sequential: create+exec p50 {pct(seq_t, 50):.0f} ms p99 {pct(seq_t, 99):.0f} ms; "
    f"with kill p50 {pct(seq_k, 50):.0f} ms p99 {pct(seq_k, 99):.0f} ms")
settle(5)

def wait_pool(limit=90):
    """Until the pool holds its POOL entries again (or `limit` s)."""
    t = time.time()
    while POOL and len(pooled_pids(set())) < POOL and time.time() - t < limit:
        time.sleep(0.5)
    time.sleep(1)


hits0 = pooled_hits()
par_t, walls = [], []
for _ in range(ROUNDS):
    out, errs = [], []
    wait_pool()

    def worker():
        try:
            out.append(one())
        except Exception as ex:  # noqa: BLE001 - reported below
            errs.append(ex)

    w0 = time.perf_counter()
    ts = [threading.Thread(target=worker) for _ in range(PAR)]
    [x.start() for x in ts]
    [x.join() for x in ts]
    walls.append((time.perf_counter() - w0) * 1000)
    kill_all([o[0] for o in out])
    if errs:
        raise errs[0]
    par_t.extend(c + e for _, c, e in out)
    settle(8)
res["concurrent"] = {
    "par": PAR,
    "total": summary(par_t),
    "wall_ms_median": statistics.median(walls),
    "pooled": pooled_hits() - hits0,
}
log(f"{PAR} at once: create+exec p50 {pct(par_t, 50):.0f} ms p99 {pct(par_t, 99):.0f} ms")

res["pss"] = []
for n in PSS if os.environ.get("NS_SKIP_PSS") != "1" else []:
    ms, errs = [], []
    t = time.perf_counter()
    try:
        for _ in range(n):
            mm, _, _ = one()
            ms.append(mm)
    except Exception as ex:  # noqa: BLE001 - reported: what fitted
        errs.append(repr(ex))
    create_s = time.perf_counter() - t
    settle(10)
    ids = {x.id for x in ms}
    pids = [p for p in (pid_of(i) for i in ids) if p]
    total = sum(pss_kib(p) for p in pids)
    pool = sum(pss_kib(p) for p in pooled_pids(ids))
    load = open("/proc/loadavg").read().split()[0]
    res["pss"].append(
        {
            "n": n,
            "made": len(ms),
            "pss_kib": total,
            "pool_pss_kib": pool,
            "create_s": create_s,
            "load": float(load),
            "error": errs[0] if errs else None,
        }
    )
    log(f"{len(ms)}/{n} idle machines: PSS {total / 1024:.0f} MiB "
        f"({total / 1024 / max(1, len(ms)):.0f} MiB each), pool {pool / 1024:.0f} MiB, load {load}")
    kill_all(ms)
    settle(10)



def own_bytes(d):
    """Bytes a snapshot directory wrote: allocated blocks of its files that
    are not hard links shared with another snapshot."""
    n = 0
    for f in os.listdir(d):
        st = os.stat(os.path.join(d, f))
        if st.st_nlink == 1:
            n += st.st_blocks * 512
    return n


def snapshot_dirs():
    return set(glob.glob(os.path.join(DATA, "snapshots", "*", "snapshot.json")))


# Snapshots of running machines that changed 10 MiB of memory, and forks
# (NS_SNAPS of each; 0: none).
res["machine_snapshots"] = []
for _ in range(int(os.environ.get("NS_SNAPS", "3"))):
    mm, _, _ = one()
    r = mm.commands.run("head -c 10485760 /dev/urandom > /dev/shm/ten && sha256sum /dev/shm/ten")
    want = r.stdout.split()[0]
    before = snapshot_dirs()
    t = time.perf_counter()
    mm.create_snapshot()
    snap_ms = (time.perf_counter() - t) * 1000
    new = sorted(snapshot_dirs() - before)
    assert len(new) == 1, new
    sd = os.path.dirname(new[0])
    sm = json.load(open(new[0]))
    t = time.perf_counter()
    child = mm.fork()
    fork_ms = (time.perf_counter() - t) * 1000
    r = child.commands.run("sha256sum /dev/shm/ten")
    fork_exec_ms = (time.perf_counter() - t) * 1000
    assert r.stdout.split()[0] == want, (r.stdout, want)
    t = time.perf_counter()
    mm.pause()
    pause_ms = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    back = Machine.resume(mm.id)
    r = back.commands.run("sha256sum /dev/shm/ten")
    resume_exec_ms = (time.perf_counter() - t) * 1000
    assert r.stdout.split()[0] == want, (r.stdout, want)
    e = {
        "snapshot_ms": snap_ms,
        "paused_ms": sm["timings_ms"].get("snapshot", 0),
        "commit_ms": sm["timings_ms"].get("commit", 0),
        "written_bytes": own_bytes(sd),
        "memory_mode": sm["memory"]["mode"],
        "state_bytes": sm["memory"]["state"]["size"],
        "fork_ms": fork_ms,
        "fork_exec_ms": fork_exec_ms,
        "pause_ms": pause_ms,
        "resume_exec_ms": resume_exec_ms,
    }
    res["machine_snapshots"].append(e)
    log(f"snapshot of a machine that changed 10 MiB: {snap_ms:.0f} ms, wrote {e['written_bytes'] / 2**20:.1f} MiB "
        f"({e['memory_mode']}); fork {fork_ms:.0f} ms (+ first exec {fork_exec_ms:.0f} ms); "
        f"pause {pause_ms:.0f} ms, resume + first exec {resume_exec_ms:.0f} ms")
    kill_all([child, back])
    settle(3)

json.dump(res, open(os.environ["NS_OUT"], "w"), indent=1)
log("done")
