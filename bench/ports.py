# Driver of bench/ports.sh: the preview proxy against in-guest requests and
# the file route, through the published SDK 1.0.3.
#
# Env: NULLSPACE_API_URL, NULLSPACE_API_KEY, SRV (the server's pid), NS_N
# (requests per latency series, default 50), NS_MIB (download size, 100).
import http.client, math, os, threading, time, urllib.parse

from nullspace import Machine

N = int(os.environ.get("NS_N", "50"))
MIB = int(os.environ.get("NS_MIB", "100"))
SRV = int(os.environ["SRV"])


def pct(xs, p):
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]


def pss_kib(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


class Peak(threading.Thread):
    """The server's peak PSS while a transfer runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = pss_kib(SRV), False

    def run(self):
        while not self.stop:
            self.peak = max(self.peak, pss_kib(SRV))
            time.sleep(0.05)


def create():
    # The base template is built in the background at start-up.
    t = time.time()
    while True:
        try:
            return Machine.create()
        except Exception as e:
            if time.time() - t > 900:
                raise
            time.sleep(5)


m = create()
try:
    # In memory (tmpfs): the base template's disk has little room.
    r = m.commands.run(
        f"mkdir -p /dev/shm/www && echo small > /dev/shm/www/small && head -c {MIB << 20} /dev/zero > /dev/shm/www/big",
        timeout=600,
    )
    assert r.exit_code == 0, (r.stdout, r.stderr)
    m.commands.run("httpd -f -p 8081 -h /dev/shm/www", background=True)
    assert m.wait_for_preview(8081, timeout_secs=60).ready
    u = urllib.parse.urlsplit(m.get_url(8081))
    token = u.query  # edge_token=…
    api = urllib.parse.urlsplit(os.environ["NULLSPACE_API_URL"])

    def get(path, sink=None):
        c = http.client.HTTPConnection(api.hostname, api.port, timeout=600)
        c.request("GET", f"{path}?{token}", headers={"Host": u.netloc})
        r = c.getresponse()
        assert r.status == 200, (r.status, r.read()[:300])
        n = 0
        while True:
            b = r.read(1 << 20)
            if not b:
                break
            n += len(b)
        c.close()
        return n

    get("/small")  # warm
    proxied = []
    for _ in range(N):
        t = time.perf_counter()
        get("/small")
        proxied.append((time.perf_counter() - t) * 1000)
    # Busybox's date has no sub-second field: the guest's clock is
    # /proc/uptime (10 ms), so inside the guest the figure is the mean over
    # the N requests, not a percentile.
    clock = "cut -d' ' -f1 /proc/uptime"
    loop = (
        f"s=$({clock}); for i in $(seq {N}); do wget -q -O /dev/null http://127.0.0.1:8081/small; done;"
        f" e=$({clock}); echo $s $e"
    )
    r = m.commands.run(loop, timeout=600)
    assert r.exit_code == 0, (r.stdout, r.stderr)
    s0, e0 = map(float, r.stdout.split())
    inside_mean = (e0 - s0) * 1000 / N

    peak = Peak()
    base = pss_kib(SRV)
    peak.start()
    t = time.perf_counter()
    n = get("/big")
    proxy_s = time.perf_counter() - t
    peak.stop = True
    peak.join()
    assert n == MIB << 20, n
    r = m.commands.run(
        f"s=$({clock}); wget -q -O /dev/null http://127.0.0.1:8081/big; e=$({clock}); echo $s $e",
        timeout=600,
    )
    assert r.exit_code == 0, (r.stdout, r.stderr)
    s0, e0 = map(float, r.stdout.split())
    inside_s = max(e0 - s0, 0.01)
    t = time.perf_counter()
    data = m.files.read("/dev/shm/www/big", format="bytes")
    file_s = time.perf_counter() - t
    assert len(data) == MIB << 20
    del data

    print(f"\nHTTP latency of a 6-byte page, {N} requests each (ms):")
    print(f"{'':28} {'p50':>8} {'p99':>8}")
    print(f"{'through the proxy':28} {pct(proxied, 50):8.1f} {pct(proxied, 99):8.1f}")
    print(f"{'proxy, mean':28} {sum(proxied) / N:8.1f}")
    print(f"{'inside the guest, mean':28} {inside_mean:8.1f}   (busybox wget; 10 ms clock)")
    print(f"{'ratio proxy/inside (means)':28} {sum(proxied) / N / inside_mean:8.1f}x")
    print(f"\n{MIB} MiB download:")
    print(f"{'through the proxy':28} {proxy_s:7.1f} s {MIB / proxy_s:7.1f} MiB/s")
    print(f"{'inside the guest (wget)':28} {inside_s:7.1f} s {MIB / inside_s:7.1f} MiB/s")
    print(f"{'file route (files.read)':28} {file_s:7.1f} s {MIB / file_s:7.1f} MiB/s")
    print(f"{'ratio proxy/file route':28} {proxy_s / file_s:7.2f}x time")
    print(f"server PSS: {base / 1024:.0f} MiB before, {peak.peak / 1024:.0f} MiB peak during the proxied download")
finally:
    m.kill()
