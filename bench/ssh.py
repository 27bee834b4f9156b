# Driver of bench/ssh.sh: SSH session set-up through the published SDK
# (1.0.3) and a real OpenSSH client. One machine of the base template;
# then NS_N times: Machine.create_ssh_access (a fresh grant) and the first
# `ssh … true` with the command it returns (a new connection each time:
# key exchange, certificate authentication, exec in the guest, exit status).
#
# Env: NULLSPACE_API_URL, NULLSPACE_API_KEY, NS_N (default 20).
import math, os, shlex, subprocess, tempfile, time

from nullspace import Machine
from nullspace.errors import NotFoundError

N = int(os.environ.get("NS_N", "20"))


def pct(xs, p):
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]


# The base template builds in the background when the server starts.
deadline = time.time() + 900
while True:
    try:
        m = Machine.create()
        break
    except NotFoundError:
        if time.time() > deadline:
            raise
        time.sleep(2)
assert m.commands.run("true").exit_code == 0

work = tempfile.mkdtemp(prefix="ns-bench-ssh.")
key = os.path.join(work, "id")
subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
pub = open(key + ".pub").read()

mint, first, total = [], [], []
try:
    for i in range(N + 1):
        t0 = time.perf_counter()
        acc = m.create_ssh_access(public_key=pub, identity_file=key, expires_in_minutes=5)
        t1 = time.perf_counter()
        argv = shlex.split(acc.command)
        argv[-1:-1] = ["-o", "BatchMode=yes"]
        r = subprocess.run(argv + ["true"], capture_output=True, text=True)
        t2 = time.perf_counter()
        assert r.returncode == 0, r.stderr
        if i == 0:
            continue  # warm-up: the first connection pays for page faults
        mint.append((t1 - t0) * 1000)
        first.append((t2 - t1) * 1000)
        total.append((t2 - t0) * 1000)
finally:
    m.kill()

print(f"SSH session set-up, {N} runs (ms)          p50      p99")
for name, xs in (("create_ssh_access", mint), ("first ssh … true", first), ("both", total)):
    print(f"  {name:<36} {pct(xs, 50):8.1f} {pct(xs, 99):8.1f}")
