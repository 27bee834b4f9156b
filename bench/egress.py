# Driver of bench/egress.sh (NS_MODE: namespaces or user): the latency of
# update_egress through the SDK (until the rules are in place) over NS_N
# changes between two custom policies (namespaces only), and the kernel
# memory (Slab) per idle machine: NS_PAR machines, measured before and
# after they were created.
#
# Env: NULLSPACE_API_URL, NULLSPACE_API_KEY, NS_N (default 20), NS_PAR (8).
import math, os, time

from nullspace import Machine, NetworkEgressPolicy

N = int(os.environ.get("NS_N", "20"))
PAR = int(os.environ.get("NS_PAR", "8"))


def pct(xs, p):
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]


def slab_kib():
    for line in open("/proc/meminfo"):
        if line.startswith("Slab:"):
            return int(line.split()[1])
    return 0


USER = os.environ.get("NS_MODE") == "user"
m = Machine.create()
a = NetworkEgressPolicy.custom(allow_cidrs=["198.51.100.0/24"], deny_cidrs=["198.51.100.7/32"])
b = NetworkEgressPolicy.custom(deny_cidrs=["203.0.113.0/24"])
lat = []
for i in range(0 if USER else N):
    t = time.perf_counter()
    m.update_egress(a if i % 2 == 0 else b)
    lat.append((time.perf_counter() - t) * 1000)
m.kill()
time.sleep(2)
s0 = slab_kib()
ms = [Machine.create() for _ in range(PAR)]
time.sleep(2)
s1 = slab_kib()
for x in ms:
    x.kill()
print()
if lat:
    print(f"| update_egress (SDK round trip, rules in place) | {N} | p50 {pct(lat, 50):.0f} ms | p99 {pct(lat, 99):.0f} ms |")
print(f"| kernel Slab per idle machine ({'user network' if USER else 'namespace, veth, TAP, tables'}; {PAR} machines) | | {(s1 - s0) / PAR / 1024:.2f} MiB | |")
