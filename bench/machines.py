# Driver of bench/machines.sh: the published SDK (1.0.3) against a running
# nullspace server. Measures Machine.create and the first commands.run,
# one at a time (N creates) and 10 at once (rounds of 10), prints p50/p99
# beside the template's boot-to-ready time and the PSS of idle machines.
#
# Env: NULLSPACE_API_URL, NULLSPACE_API_KEY, NS_DATA (the server's data
# directory), NS_N (creates one at a time, default 30), NS_PAR (machines at
# once, default 10), NS_ROUNDS (parallel rounds, default 3).
import glob, json, math, os, statistics, threading, time

from nullspace import Machine
from nullspace.errors import NotFoundError
from procstat import pss_kib

DATA = os.environ["NS_DATA"]
N = int(os.environ.get("NS_N", "30"))
PAR = int(os.environ.get("NS_PAR", "10"))
ROUNDS = int(os.environ.get("NS_ROUNDS", "3"))


def pct(xs, p):
    """Nearest-rank percentile."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def one():
    t0 = time.perf_counter()
    m = Machine.create()
    t1 = time.perf_counter()
    r = m.commands.run("echo hi")
    t2 = time.perf_counter()
    assert r.stdout == "hi\n", r
    return m, (t1 - t0) * 1000, (t2 - t1) * 1000


def machine_pids():
    pids = []
    for p in glob.glob(os.path.join(DATA, "machines", "*", "qemu.pid")):
        try:
            pids.append(int(open(p).read().strip()))
        except (OSError, ValueError):
            pass
    return pids


# The base template builds in the background when the server starts.
deadline = time.time() + 900
while True:
    try:
        m, _, _ = one()
        m.kill()
        break
    except NotFoundError:
        if time.time() > deadline:
            raise
        time.sleep(2)

snap = snap_dir = None
for p in glob.glob(os.path.join(DATA, "artifacts", "snapshots", "*", "snapshot.json")):
    snap, snap_dir = json.load(open(p)), os.path.dirname(p)
t = snap["timings_ms"]
boot_to_ready = t["boot"] + t["ready"]


def mib(entry, allocated=False):
    """A snapshot file's size (or the blocks it takes: the RAM file is sparse), MiB."""
    if not allocated:
        return entry["size"] >> 20
    return (os.stat(os.path.join(snap_dir, entry["path"])).st_blocks * 512) >> 20


mem = snap["memory"]
ram = mem.get("ram")
snap_desc = (f"snapshot memory {mem['mode']}: "
             + (f"RAM file {mib(ram)} MiB ({mib(ram, True)} MiB allocated), " if ram else "")
             + f"device state {mem['state']['size'] >> 10} KiB; disk {sum(mib(d['file']) for d in snap['disk'])} MiB")

seq_create, seq_exec, seq_total = [], [], []
for _ in range(N):
    m, c, e = one()
    seq_create.append(c)
    seq_exec.append(e)
    seq_total.append(c + e)
    m.kill()

par_create, par_exec, par_total, pss = [], [], [], []
walls = []
for _ in range(ROUNDS):
    out, errs = [], []

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
    if errs:
        raise errs[0]
    # All PAR machines idle now: their memory, counted once where shared.
    pss.append(sum(pss_kib(p) for p in machine_pids()) / 1024)
    for m, c, e in out:
        par_create.append(c)
        par_exec.append(e)
        par_total.append(c + e)
        m.kill()


def row(name, xs):
    p50, p99 = pct(xs, 50), pct(xs, 99)
    print(f"| {name} | {len(xs)} | {p50:.0f} | {p99:.0f} | {p50 / boot_to_ready:.2f} | {p99 / boot_to_ready:.2f} |")


print()
print(f"template boot to ready (same run, the base template's build VM): {boot_to_ready} ms "
      f"(boot {t['boot']} ms + start command to ready {t['ready']} ms); {snap_desc}")
print()
print("| measure | n | p50 ms | p99 ms | p50 / boot-to-ready | p99 / boot-to-ready |")
print("|---|---|---|---|---|---|")
row("create (one at a time)", seq_create)
row("first commands.run (one at a time)", seq_exec)
row("create + first run (one at a time)", seq_total)
row(f"create ({PAR} at once)", par_create)
row(f"first commands.run ({PAR} at once)", par_exec)
row(f"create + first run ({PAR} at once)", par_total)
print()
print(f"{PAR} at once: wall time per round {statistics.median(walls):.0f} ms (median of {ROUNDS}); "
      f"PSS of {PAR} idle machines {statistics.median(pss):.0f} MiB "
      f"({statistics.median(pss) / PAR:.0f} MiB each)")
