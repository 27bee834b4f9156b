# Template warm pools through the published SDK 1.0.3, unpatched, each
# checked by its effect: create, wait_until_ready, get, list with filters,
# update (and a refused one), checkout in each mode (the machine's
# warm_pool_checkout says where it came from, and it runs commands),
# disable (require refused, prefer cold), drain, enable, reconcile,
# delete; another namespace sees nothing; and the pool never holds more
# than the server's capacity (--max-machines 3): it gives way to creates.
import os
import urllib.request

from nullspace import Machine, TemplateWarmPool
from nullspace.errors import MachineError, NotFoundError

T = os.environ["NS_TEMPLATE"]
OTHER = os.environ["NS_OTHER_KEY"]
URL = os.environ["NULLSPACE_API_URL"]
KEY = os.environ["NULLSPACE_API_KEY"]


def metric(name):
    req = urllib.request.Request(URL + "/metrics", headers={"Authorization": "Bearer " + KEY})
    text = urllib.request.urlopen(req, timeout=30).read().decode()
    vals = [float(l.split()[-1]) for l in text.splitlines() if l.startswith(name + " ") or l.startswith(name + "{")]
    return sum(vals)


def checkout(m):
    c = m._info.warm_pool_checkout
    assert c is not None, "no warm_pool_checkout in the create's answer"
    return c


pool = TemplateWarmPool.create(T, name="ci", min_ready=2, max_ready=3, labels={"team": "a"})
assert pool.state == "enabled", pool.state
assert pool.min_ready == 2 and pool.max_ready == 3
info = pool.wait_until_ready(timeout_secs=240, interval_secs=0.5)
assert info.status.ready >= 2 and info.status.target == 2, info.status
print("ready", info.status)
assert TemplateWarmPool.get(pool.id).name == "ci"
assert pool.id in [p.id for p in TemplateWarmPool.list(template=T)]
assert pool.id in [p.id for p in TemplateWarmPool.list(label="team=a")]
assert pool.id not in [p.id for p in TemplateWarmPool.list(label="team=b")]
assert pool.id in [p.id for p in TemplateWarmPool.list(state="enabled")]
assert pool.id not in [p.id for p in TemplateWarmPool.list(state="draining")]

# Another namespace neither sees nor uses it.
try:
    TemplateWarmPool.get(pool.id, api_key=OTHER)
    raise AssertionError("another namespace got the pool")
except NotFoundError:
    pass
assert TemplateWarmPool.list(api_key=OTHER) == []

# A refused update changes nothing.
try:
    pool.update(min_ready=3, max_ready=1)
    raise AssertionError("max_ready < min_ready accepted")
except MachineError as e:
    assert "max_ready" in str(e), str(e)
assert TemplateWarmPool.get(pool.id).min_ready == 2

# require: a ready machine, which runs commands.
m1 = Machine.create(template=T, warm_pool=pool, warm_pool_mode="require")
c = checkout(m1)
assert c.hit and c.source.value == "ready_instance" and c.id == pool.id, c
assert c.mode.value == "require", c
assert m1.commands.run("echo warm").stdout.strip() == "warm"
assert TemplateWarmPool.get(pool.id).status.claimed >= 1

# With --max-machines 3: m1 plus the pool's stock fill the host. A bypass
# create makes the pool give a VM way instead of being refused.
pool.wait_until_ready(timeout_secs=240, interval_secs=0.5)
m2 = Machine.create(template=T, warm_pool_mode="bypass")
assert checkout(m2).source.value == "bypassed" and not checkout(m2).hit
assert m2.commands.run("echo cold").stdout.strip() == "cold"
held = metric("nullspace_capacity_machines")
assert held <= 3, held
assert metric("nullspace_pool_shed_total") >= 1
m2.kill()

# disable: require is refused with warm_pool_unavailable; prefer goes cold.
pool.disable()
assert pool.state == "disabled"
try:
    Machine.create(template=T, warm_pool=pool, warm_pool_mode="require")
    raise AssertionError("require from a disabled pool")
except MachineError as e:
    # The SDK has no class of its own for it: the code says.
    assert e.code == "warm_pool_unavailable" and "disabled" in str(e), (e.code, str(e))
pool.enable()
assert pool.state == "enabled"

# drain gives the ready machines back (this server keeps no pool of its
# own: --machine-pool-size 0).
pool.wait_until_ready(timeout_secs=240, interval_secs=0.5)
pool.drain()
assert pool.state == "draining"
assert TemplateWarmPool.get(pool.id).status.ready == 0
assert pool.id in [p.id for p in TemplateWarmPool.list(state="draining")]
m3 = Machine.create(template=T, warm_pool=pool, warm_pool_mode="prefer")
c = checkout(m3)
assert not c.hit and c.source.value == "cold_create", c
m3.kill()

info = pool.reconcile()
assert info.last_reconciled_at is not None
pool.update(name="ci-renamed")
assert TemplateWarmPool.get(pool.id).name == "ci-renamed"

pool.delete()
try:
    TemplateWarmPool.get(pool.id)
    raise AssertionError("deleted pool still there")
except NotFoundError:
    pass
m1.kill()
print("WARM POOLS OK")
