# Lifecycle events, git and stdin through the published SDK 1.0.3,
# unpatched (tests/machines_sdk.rs runs it against a real server with the
# build VM). Each check prints "OK <name>" or "FAIL <name>: <why>".
import os, threading, time, traceback
from nullspace import Machine
from nullspace.errors import GitError, NotFoundError

TEMPLATE = os.environ["NS_TEMPLATE"]


def check(name):
    def wrap(fn):
        try:
            fn()
            print("OK", name, flush=True)
        except Exception:
            print("FAIL", name, ":", traceback.format_exc().replace("\n", " | "), flush=True)
        return fn
    return wrap


m = Machine.create(template=TEMPLATE)


def ops(page):
    return [(e.operation.value, e.status.value) for e in page.events]


@check("stdin_reaches_a_background_process")
def _():
    h = m.commands.run("cat > /tmp/in.txt", shell=True, background=True)
    m.commands.send_stdin(h.pid, "hello ")
    m.commands.send_stdin(h.pid, "stdin\n")
    deadline = time.time() + 30
    got = ""
    while time.time() < deadline:
        try:
            got = m.files.read("/tmp/in.txt")
        except NotFoundError:
            pass  # the shell has not made it yet
        if got == "hello stdin\n":
            break
        time.sleep(0.2)
    assert got == "hello stdin\n", repr(got)
    # A `read` in a shell gets the line and exits with it.
    r = m.commands.run("read x; echo got:$x > /tmp/read.txt", shell=True, background=True)
    m.commands.send_stdin(r.pid, "line-1\n")
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if m.files.read("/tmp/read.txt") == "got:line-1\n":
                break
        except NotFoundError:
            pass
        time.sleep(0.2)
    assert m.files.read("/tmp/read.txt") == "got:line-1\n"
    m.commands.kill(h.pid)
    # A pid that does not exist is not found.
    try:
        m.commands.send_stdin(999999, "x")
        raise AssertionError("stdin to a missing process was accepted")
    except AssertionError:
        raise
    except Exception as e:
        assert "999999" in str(e), e


@check("git_without_git_is_a_clear_error")
def _():
    try:
        m.git.status(path="/tmp")
        raise AssertionError("git status answered without git")
    except GitError as e:
        assert "git is not installed in the template of machine " + m.id in str(e), str(e)
    # Credentials in the URL are refused by the client itself; the server
    # refuses them for raw callers too (checked in unit tests).


snap = m.create_snapshot()
m.set_timeout(600)
child = m.fork()
m.pause()
m = Machine.resume(m.id)


@check("lifecycle_lists_in_order_with_filters")
def _():
    page = m.list_lifecycle(order_asc=True, limit=50)
    got = ops(page)
    want = [
        ("create", "succeeded"),
        ("snapshot_created", "succeeded"),
        ("timeout_updated", "succeeded"),
        ("fork", "succeeded"),
        ("hibernate", "succeeded"),
        ("resume_from_snapshot", "succeeded"),
    ]
    assert got == want, got
    assert not page.has_more
    fork = page.events[3]
    assert fork.source_machine_id == m.id and fork.target_machine_id == child.id, fork
    assert page.events[1].snapshot_id == snap.id, (page.events[1], snap)
    # Newest first by default.
    assert ops(m.list_lifecycle())[0] == ("resume_from_snapshot", "succeeded")
    # Filters and paging.
    assert ops(m.list_lifecycle(operation="hibernate")) == [("hibernate", "succeeded")]
    assert ops(m.list_lifecycle(status="failed")) == []
    p1 = m.list_lifecycle(order_asc=True, limit=2)
    p2 = m.list_lifecycle(order_asc=True, limit=2, offset=2)
    assert ops(p1) == want[:2] and p1.has_more, ops(p1)
    assert ops(p2) == want[2:4], ops(p2)
    t = page.events[4].occurred_at.isoformat()
    assert ops(m.list_lifecycle(order_asc=True, from_time=t)) == want[4:], t
    assert ops(m.list_lifecycle(order_asc=True, to_time=page.events[0].occurred_at.isoformat()))[0] == want[0]
    # The fork's own history starts with its create.
    assert ops(child.list_lifecycle(order_asc=True))[0] == ("create", "succeeded")


@check("lifecycle_stream_replays_then_follows")
def _():
    seen = []
    done = threading.Event()

    def follow():
        for e in m.stream_events():
            seen.append((e.operation.value, e.status.value, e.id))
            if e.operation.value == "destroy":
                done.set()
                return

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    time.sleep(3)
    # The replay came first, in order.
    assert [s[:2] for s in seen[:6]] == [
        ("create", "succeeded"), ("snapshot_created", "succeeded"),
        ("timeout_updated", "succeeded"), ("fork", "succeeded"),
        ("hibernate", "succeeded"), ("resume_from_snapshot", "succeeded"),
    ], seen
    m.kill()
    assert done.wait(30), seen
    assert seen[-1][:2] == ("destroy", "succeeded"), seen
    # Resumed from a cursor (the SDK's reconnect): only what came after it.
    it = m.stream_events(after_event_id=seen[4][2])
    first = next(iter(it))
    assert first.operation.value == "resume_from_snapshot", first
    it.close()


child.kill()
print("DONE", flush=True)
