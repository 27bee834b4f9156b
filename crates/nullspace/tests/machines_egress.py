# Egress policies through the published SDK 1.0.3, unpatched, checked by
# what a machine reaches of a stand-in internet (nullspace_testkit::inet):
# two web hosts (ALLOWED, DENIED), DNS servers on NS_DNS and DENIED, and
# the machine's own resolver (10.0.2.3, sent to NS_DNS), over TCP and
# UDP. Policies at create (typed and legacy) and by update_egress,
# before and after; internet_access false stays closed; pause, resume and
# fork keep a policy; bad policies and other namespaces are refused.
import os
import time

from nullspace import Machine, NetworkEgressPolicy
from nullspace.errors import MachineError, NotFoundError

T = os.environ["NS_TEMPLATE"]
A, D, DNS = os.environ["NS_ALLOWED"], os.environ["NS_DENIED"], os.environ["NS_DNS"]
PROBES = [
    ("http A", f"wget -q -O - http://{A}:8080/"),
    ("http D", f"wget -q -O - http://{D}:8080/"),
    ("udp A", f"nslookup allowed.test {DNS}"),
    ("udp D", f"nslookup allowed.test {D}"),
    ("resolver", "nslookup allowed.test"),
]
# ICMP (raw IP) is checked by nullspace-vm's egress test: busybox ping
# needs root, and the SDK runs commands as the template's user.


def reach(m):
    # Debian's busybox wget crashes with -T: `timeout` bounds every probe.
    script = "; ".join(f"timeout 8 {cmd} >/dev/null 2>&1; echo $?" for _, cmd in PROBES)
    out = m.commands.run(script, shell=True, timeout=120).stdout.split()
    return [c == "0" for c in out]


def expect(m, want, when):
    got = reach(m)
    assert got == want, (when, dict(zip([p for p, _ in PROBES], got)))


ALL = [True] * 5
NONE = [False] * 5
ONLY_A = [True, False, True, False, True]
ONLY_D = [False, True, False, True, True]

# A policy at create: only 198.51.100.0/24.
m = Machine.create(template=T, network={
    "egress": NetworkEgressPolicy.custom(allow_cidrs=["198.51.100.0/24"]).to_dict()})
expect(m, ONLY_A, "created with allow 198.51.100.0/24")

# update_egress: effective before it answers, established flows included.
t = time.monotonic()
p = m.update_egress(NetworkEgressPolicy.custom(allow_cidrs=["203.0.113.0/24"]))
took = time.monotonic() - t
assert p.mode.value == "custom" and p.allow_cidrs == ["203.0.113.0/24"], p
print(f"update_egress took {took * 1000:.0f} ms")
assert took < 1.0, took
expect(m, ONLY_D, "after update_egress to allow 203.0.113.0/24")
m.update_egress(NetworkEgressPolicy.deny_all())
expect(m, NONE, "deny_all (the resolver too)")
p = m.update_egress({"mode": "allow_all"})
assert p.mode.value == "allow_all", p
expect(m, ALL, "allow_all")
m.update_egress(NetworkEgressPolicy.custom(deny_cidrs=["203.0.113.0/24"]))
expect(m, ONLY_A, "deny 203.0.113.0/24")

# A bad policy: a clear 400 naming the field; the old one stays.
try:
    m.update_egress({"mode": "custom", "allow_cidrs": ["10.0.0.0/33"]})
    raise AssertionError("a bad CIDR was accepted")
except MachineError as e:
    assert e.code == "invalid_request" and "allow_cidrs" in str(e), (e.code, str(e))
expect(m, ONLY_A, "after a refused update")

# Another namespace cannot see or change it.
try:
    Machine.connect(m.id, api_key=os.environ["NS_KEY_B"]).update_egress(
        NetworkEgressPolicy.allow_all())
    raise AssertionError("another namespace reached the machine")
except NotFoundError:
    pass

# Pause and resume keep the policy; a fork's child starts with it.
m.pause()
m = Machine.connect(m.id)
expect(m, ONLY_A, "after pause and resume")
child = m.fork()
expect(child, ONLY_A, "a fork's child")
child.update_egress(NetworkEgressPolicy.deny_all())
expect(m, ONLY_A, "the parent, after its child changed its own")
child.kill()
m.kill()

# The legacy lists: deny everything but one host.
legacy = Machine.create(template=T, network={"deny_out": ["0.0.0.0/0"], "allow_out": [f"{A}/32"]})
expect(legacy, [True, False, False, False, True], "legacy deny_out/allow_out")
legacy.kill()

# internet_access false: closed for good.
closed = Machine.create(template=T, internet_access=False)
expect(closed, NONE, "internet_access false")
try:
    closed.update_egress(NetworkEgressPolicy.allow_all())
    raise AssertionError("internet_access false was opened")
except MachineError as e:
    assert "internet_access false" in str(e), str(e)
expect(closed, NONE, "internet_access false, after a refused update")
closed.kill()

# By default a machine reaches everything.
free = Machine.create(template=T)
expect(free, ALL, "no policy")
free.kill()
print("EGRESS OK")
