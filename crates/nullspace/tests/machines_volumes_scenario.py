# Volumes through the published SDK 1.0.3, unpatched, each checked by its
# effect: Volume.files with no machine attached (write, list, read); a
# file written by one machine read by the next (attach at create, then at
# run time); exclusive use refused (read-write and read-only attaches, a
# delete, host file access); health, remount, detach; shared read-only;
# pause and resume keep an attachment; another namespace sees nothing.
import os
import time

from nullspace import Machine, Volume
from nullspace.errors import ConflictError, MachineError, NotFoundError

T = os.environ["NS_TEMPLATE"]
OTHER = os.environ["NS_OTHER_KEY"]


def run(m, cmd):
    r = m.commands.run(cmd, timeout=120)
    assert r.exit_code == 0, (cmd, r.exit_code, r.stdout, r.stderr)
    return r.stdout


def refused(call, words):
    try:
        call()
    except ConflictError as e:
        for w in words:
            assert w in str(e), (w, str(e))
        return str(e)
    raise AssertionError(f"not refused: {words}")


vol = Volume.create("team-data")
assert vol.name == "team-data" and vol.status == "available", vol.status
assert Volume.get_by_name("team-data").id == vol.id
assert vol.id in [v.id for v in Volume.list()]

# Volume.files with no machine attached.
vol.files.write("/seed/hello.txt", "from the host\n")
names = [f.name for f in vol.files.list("/seed")]
assert names == ["hello.txt"], names
assert vol.files.read("/seed/hello.txt") == "from the host\n"
assert vol.files.exists("/seed/hello.txt") and not vol.files.exists("/nope")

# Another namespace sees nothing.
try:
    Volume.get(vol.id, api_key=OTHER)
    raise AssertionError("another namespace got the volume")
except NotFoundError:
    pass
assert vol.id not in [v.id for v in Volume.list(api_key=OTHER)]
for call in (lambda: Volume.get_by_name("team-data", api_key=OTHER),
             lambda: Volume.get(vol.id, api_key=OTHER).delete()):
    try:
        call()
        raise AssertionError("another namespace reached the volume")
    except NotFoundError:
        pass

# Hostile requests get one-line 400s, never a 5xx.
for call, words in (
    (lambda: Volume.create("bad name!"), "volume name"),
    (lambda: vol.files.read("/seed/../etc"), "'..'"),
    (lambda: vol.files.write('/a"b', "x"), "quotes"),
):
    try:
        call()
        raise AssertionError(f"accepted: {words}")
    except MachineError as e:
        assert e.code == "invalid_request" and words in str(e), (e.code, str(e))

# A directory with entries, and the volume's root, stay (a clear 4xx, not
# the tool's failure as a 500: schemathesis found the root case).
for path, code, words in (("/seed", "directory_not_empty", "not empty"), ("/", "invalid_request", "root")):
    try:
        vol.files.remove(path)
        raise AssertionError(f"removed {path}")
    except MachineError as e:
        assert e.code == code and words in str(e), (path, e.code, str(e))
assert vol.files.read("/seed/hello.txt") == "from the host\n"

# Attached at create: the host's file is there; the machine writes one.
a = Machine.create(template=T, volumes=[vol.mount("/data")])
b = None
try:
    assert [(x.mount_path, x.state.value) for x in a.volumes] == [("/data", "mounted")], a.volumes
    att = a.list_volumes()
    assert [(x.mount_path, x.read_only) for x in att] == [("/data", False)], att
    assert run(a, "cat /data/seed/hello.txt") == "from the host\n"
    run(a, "echo from-a > /data/a.txt && sync")
    assert Volume.get(vol.id).status == "attached"

    # Exclusive use: other attaches, a delete and host file writes refused.
    b = Machine.create(template=T)
    for ro in (False, True):
        msg = refused(lambda: b.attach_volume(vol.id, "/data", read_only=ro),
                      ["exclusive use", a.id])
    print("refused:", msg)
    refused(lambda: vol.delete(), ["attached"])
    refused(lambda: vol.files.write("/x.txt", "x"), ["exclusive use"])

    # Health, remount, detach.
    h = a.get_volume_health(att[0].id)
    assert h.state.value == "mounted", h
    r = a.remount_volume(att[0].id)
    assert r.state.value == "mounted", r
    assert run(a, "cat /data/a.txt") == "from-a\n"
    d = a.detach_volume(att[0].id)
    assert d.state.value == "released", d
    assert a.list_volumes() == []
    assert run(a, "test -e /data/a.txt || echo gone") == "gone\n"

    # The next machine reads it (attached at run time), and writes.
    t = time.monotonic()
    got = b.attach_volume(vol.id, "/mnt/v")
    attach_ms = (time.monotonic() - t) * 1000
    assert got.state.value == "mounted" and got.machine_id == b.id, got
    assert run(b, "cat /mnt/v/a.txt") == "from-a\n"
    # Throughput in the guest (TCG), timed around the commands: 64 MiB
    # written with fsync; read back after a remount (no page cache).
    t = time.monotonic()
    run(b, "dd if=/dev/zero of=/mnt/v/big bs=1M count=64 conv=fsync 2>/dev/null")
    w_s = time.monotonic() - t
    b.remount_volume(got.id)
    t = time.monotonic()
    run(b, "dd if=/mnt/v/big of=/dev/null bs=1M 2>/dev/null")
    r_s = time.monotonic() - t
    print(f"FIGURES attach_ms={attach_ms:.0f} write_MiBps={64/w_s:.0f} read_MiBps={64/r_s:.0f}")
    run(b, "rm /mnt/v/big; echo from-b > /mnt/v/b.txt")

    # Pause and resume keep the attachment and the mount.
    b.pause()
    assert [x.state.value for x in b.list_volumes()] == ["paused"]
    b = Machine.resume(b.id)
    assert run(b, "cat /mnt/v/b.txt") == "from-b\n"
    run(b, "echo after-resume >> /mnt/v/b.txt")
    batt = b.list_volumes()[0]
    assert b.get_volume_health(batt.id).state.value == "mounted"

    # A fork has no volumes (never a second writer); the original has its
    # volume mounted again after the snapshot.
    child = b.fork()
    try:
        assert child.list_volumes() == []
        assert run(child, "test -e /mnt/v/b.txt || echo none") == "none\n"
    finally:
        child.kill()
    assert run(b, "cat /mnt/v/b.txt") == "from-b\nafter-resume\n"
    assert b.get_volume_health(batt.id).state.value == "mounted"
    b.detach_volume(batt.id)

    # No machine: the host reads what b wrote.
    assert vol.files.read("/b.txt") == "from-b\nafter-resume\n"
    assert "b.txt" in [f.name for f in vol.files.list("/")]

    # Shared read-only: both machines read, neither writes, no writer joins.
    ra = a.attach_volume(vol.id, "/ro", read_only=True)
    rb = b.attach_volume(vol.id, "/ro", read_only=True)
    for m in (a, b):
        assert run(m, "cat /ro/a.txt") == "from-a\n"
        assert m.commands.run("echo x > /ro/new.txt").exit_code != 0
    refused(lambda: Machine.create(template=T, volumes=[vol.mount("/w")]), ["exclusive use"])
    assert len(vol.attachments()) == 2
    a.detach_volume(ra.id)
    b.detach_volume(rb.id)
    assert not vol.files.exists("/new.txt")
finally:
    a.kill()
    if b is not None:
        b.kill()

# Free again: deleted, and gone.
vol.delete()
try:
    Volume.get(vol.id)
    raise AssertionError("a deleted volume answered")
except NotFoundError:
    pass
print("VOLUMES OK")
