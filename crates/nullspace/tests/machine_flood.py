# A guest that floods the host, through the published SDK 1.0.3: a terminal
# running `yes` for ~30 s read by a slow client, then a watched directory
# taking 100k changes (files created and removed in rounds). The server's RSS
# Then a client downloads a 32 MiB file eight times at once, and reads an
# 8 MiB text file sixteen times at once (bounded separately). The server's RSS
# (VmRSS polled, and VmHWM) must stay under NS_RSS_BOUND_KB above where it
# started; the terminal and the watch still answer afterwards; nothing of
# the flood is left running in the guest. Prints "FLOOD OK" and figures.
import os, threading, time
from nullspace import Machine

PID = os.environ["NS_SERVER_PID"]
BOUND_KB = int(os.environ["NS_RSS_BOUND_KB"])


def kb(field):
    with open(f"/proc/{PID}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise AssertionError(field)


def sh(cmd):
    r = m.commands.run(cmd, shell=True, timeout=600)
    assert r.exit_code == 0, (cmd, r)
    return r.stdout


def until(cond, what, t=300):
    end = time.time() + t
    while not cond():
        assert time.time() < end, what()
        time.sleep(0.2)


m = Machine.create(template="web")
peak = [0]
stop = threading.Event()


def poll():
    while not stop.is_set():
        peak[0] = max(peak[0], kb("VmRSS:"))
        time.sleep(0.1)


with open(f"/proc/{PID}/clear_refs", "w") as f:
    f.write("5")
base = kb("VmRSS:")
threading.Thread(target=poll, daemon=True).start()

# 1. The terminal flood, read by the SDK in Python: much slower than `yes`
#    writes, so the server holds the guest back. (A reader slower still
#    loses its socket to the SDK's own keepalive: the pong waits behind the
#    output it has not read. The session survives that and reattaches.)
s = m.pty.create_session(cols=80, rows=24)
seen = [0]
tail = [b""]


def reader():
    for c in s:
        seen[0] += len(c)
        tail[0] = (tail[0] + c)[-4096:]


threading.Thread(target=reader, daemon=True).start()
s.send_input("yes flood\n")
t0 = time.time()
time.sleep(30)
pty_peak = peak[0] - base
s.send_input("\x03")
time.sleep(1)
s.send_input("echo after-$((6*7))\n")
until(lambda: b"after-42" in tail[0], lambda: tail[0][-300:], t=180)
pty_secs = time.time() - t0
m.pty.kill_session(s.session_id)
until(lambda: m.pty.list_sessions() == [], lambda: m.pty.list_sessions())
left = sh("for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done | grep -c '^yes flood' || true")
assert left.strip() == "0", f"yes still runs: {left}"
print(f"[figures] pty flood: {seen[0]} bytes read in {pty_secs:.0f} s; server RSS peak +{pty_peak} KiB", flush=True)

# 2. The watch flood: 100k changes (5000 files created and removed, ten
#    times) in a watched directory, the events read by the SDK's own
#    (Python) callback.
sh("mkdir -p /tmp/wf")
events = []
h = m.files.watch_dir("/tmp/wf", events.append)
t0 = time.time()
# Rounds of 5000: the guest's root file system has ~8k free inodes.
sh("cd /tmp/wf && for r in 1 2 3 4 5 6 7 8 9 10; do "
   "seq 1 5000 | xargs touch && seq 1 5000 | xargs rm -f || exit 1; done")
made = time.time() - t0
last = [len(events), time.time()]


def settled():
    n = len(events)
    if n != last[0]:
        last[0], last[1] = n, time.time()
    return time.time() - last[1] > 3


until(settled, lambda: len(events), t=600)
sh("touch /tmp/wf/after-the-flood")
until(lambda: any(e.name == "after-the-flood" for e in events), lambda: events[-3:], t=120)
h.stop()
watch_peak = peak[0] - base

# 3. A client downloading a 32 MiB file eight times at once (`read` as
#    bytes: GET …/file): the server streams each, holding a chunk apiece.
import concurrent.futures, hashlib
sh("head -c 33554432 /dev/urandom > /dev/shm/big")
want = sh("sha256sum /dev/shm/big").split()[0]
t0 = time.time()
with concurrent.futures.ThreadPoolExecutor(8) as pool:
    got = list(pool.map(lambda _: hashlib.sha256(m.files.read("/dev/shm/big", format="bytes")).hexdigest(), range(8)))
assert got == [want] * 8, (got, want)
read_peak = peak[0] - base
print(f"[figures] 8 concurrent 32 MiB downloads in {time.time() - t0:.0f} s; server RSS peak +{read_peak} KiB", flush=True)

stop.set()
hwm = kb("VmHWM:") - base
print(f"[figures] watch flood: 100k changes in {made:.0f} s; SDK got {len(events)} events; "
      f"server RSS peak +{watch_peak} KiB, VmHWM +{hwm} KiB (bound {BOUND_KB} KiB)", flush=True)
assert max(pty_peak, watch_peak, read_peak, hwm) < BOUND_KB, (pty_peak, watch_peak, read_peak, hwm, BOUND_KB)

# 4. Sixteen text reads of an 8 MiB file at once (POST …/files/read: the
#    file and its JSON answer are held whole): at most NS_WHOLE_READS run
#    at a time, so the server holds about that many times four copies.
sh("yes abcdefg | head -c 8388608 > /dev/shm/text")
with open(f"/proc/{PID}/clear_refs", "w") as f:
    f.write("5")
text_base = kb("VmRSS:")
t0 = time.time()
with concurrent.futures.ThreadPoolExecutor(16) as pool:
    texts = list(pool.map(lambda _: m.files.read("/dev/shm/text"), range(16)))
assert all(len(t) == 8388608 and t.startswith("abcdefg\n") for t in texts), [len(t) for t in texts]
del texts
text_peak = kb("VmHWM:") - text_base
# Per read in flight: the file, its text and its JSON, with buffer growth
# (about four copies), plus the allocator's arenas.
text_bound = int(os.environ["NS_WHOLE_READS"]) * 4 * 8 * 1024 + (48 << 10)
print(f"[figures] 16 concurrent 8 MiB text reads in {time.time() - t0:.0f} s; server RSS peak +{text_peak} KiB (bound {text_bound} KiB)", flush=True)
assert text_peak < text_bound, (text_peak, text_bound)

m.kill()
print("FLOOD OK", flush=True)
