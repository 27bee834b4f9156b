# The machine scenario suite, run unchanged by the published SDK 1.0.3
# (`Machine`) and 0.1.9 (`Sandbox`) against a real server with the build VM.
# Each check prints "OK <name>" or "FAIL <name>: <why>"; the Rust test
# (tests/machines_sdk.rs) asserts every name passed.
import os, sys, threading, time, traceback, uuid

V1 = os.environ["NS_SDK"] == "1"
TEMPLATE = os.environ["NS_TEMPLATE"]
OTHER_KEY = os.environ["NS_OTHER_KEY"]
if V1:
    from nullspace import Machine as M, Snapshot
    from nullspace.errors import MachineError as BaseError, NotFoundError, ConflictError
    OWNER = "machine_id"
else:
    from nullspace import Sandbox as M, Snapshot
    from nullspace.errors import SandboxError as BaseError, NotFoundError, ConflictError
    OWNER = "sandbox_id"

failed = []
made = []


def check(name):
    def wrap(fn):
        try:
            fn()
            print("OK", name, flush=True)
        except Exception:
            failed.append(name)
            print("FAIL", name, ":", traceback.format_exc().replace("\n", " | "), flush=True)
        return fn
    return wrap


def create(**kw):
    m = M.create(template=kw.pop("template", TEMPLATE), **kw)
    made.append(m)
    return m


def sh(m, cmd, **kw):
    return m.commands.run(cmd, shell=True, **kw)


def start_of(m):
    """The start process's pid and start time (clock ticks after boot)."""
    r = sh(m, "p=$(cat /tmp/pid); echo $p $(cut -d' ' -f22 /proc/$p/stat)")
    assert r.exit_code == 0 and len(r.stdout.split()) == 2, r
    return r.stdout


a = create(envs={"SECRET_TOKEN": "s3cret"}, cwd="/tmp")
b = create()


@check("restored_not_rerun")
def _():
    sa, sb = start_of(a), start_of(b)
    assert sa == sb and sa.strip(), (sa, sb)
    pid = sa.split()[0]
    assert sh(a, f"cat /proc/{pid}/comm").stdout == "httpd\n"
    page = sh(b, "wget -q -O - http://127.0.0.1:8080/").stdout
    assert "hello from a nullspace template" in page, page


@check("exit_codes_stdout_stderr")
def _():
    r = sh(a, "echo out; echo err >&2; exit 3")
    assert (r.exit_code, r.stdout, r.stderr) == (3, "out\n", "err\n"), r
    r = a.commands.run("printf", ["%s-%s", "x y", "z"])
    assert (r.exit_code, r.stdout) == (0, "x y-z"), r
    assert sh(a, "true").exit_code == 0


@check("background_wait")
def _():
    bg = sh(a, "sleep 1; echo done; echo oops >&2; exit 4", background=True)
    assert bg.pid > 0
    ps = a.commands.list()
    assert any(p.pid == bg.pid for p in ps), ps
    res = bg.wait(timeout=60)
    assert (res.exit_code, res.stdout.strip(), res.stderr.strip()) == (4, "done", "oops"), res
    k = sh(a, "sleep 300", background=True)
    a.commands.kill(k.pid)
    deadline = time.time() + 20
    while time.time() < deadline and any(p.pid == k.pid and p.running for p in a.commands.list()):
        time.sleep(0.2)
    assert not any(p.pid == k.pid and p.running for p in a.commands.list())


@check("files_isolated")
def _():
    info = a.files.write("/tmp/only-a.txt", "A\n")
    assert (info.name, info.path, info.is_dir) == ("only-a.txt", "/tmp/only-a.txt", False), info
    assert a.files.read("/tmp/only-a.txt") == "A\n"
    assert a.files.read("/tmp/only-a.txt", format="bytes") == b"A\n"
    assert sh(b, "test -e /tmp/only-a.txt").exit_code == 1
    try:
        b.files.read("/tmp/only-a.txt")
        raise AssertionError("b can read a's file")
    except NotFoundError:
        pass
    a.files.write("/tmp/bin.dat", bytes(range(256)))
    assert a.files.read("/tmp/bin.dat", format="bytes") == bytes(range(256))


@check("files_list_and_info")
def _():
    names = {f.name: f for f in a.files.list("/srv")}
    assert "index.html" in names and "start.sh" in names, names
    assert not names["index.html"].is_dir and names["index.html"].size > 0
    assert a.files.info("/srv").is_dir
    assert a.files.exists("/srv/index.html") and not a.files.exists("/srv/nope")


@check("envs_for_commands_not_start")
def _():
    assert sh(a, "echo $SECRET_TOKEN").stdout == "s3cret\n"
    assert sh(a, "pwd").stdout == "/tmp\n"
    assert sh(a, "echo $GREETING").stdout == "hello\n", "template runtime env"
    pid = start_of(a).split()[0]
    env = sh(a, f"tr '\\0' '\\n' < /proc/{pid}/environ").stdout
    assert "GREETING=hello" in env, env
    assert "SECRET_TOKEN" not in env, env
    assert sh(b, "echo x${SECRET_TOKEN}x").stdout == "xx\n"
    assert sh(a, "echo $X", envs={"X": "per-command"}).stdout == "per-command\n"


@check("streaming_before_exit")
def _():
    seen = []
    r = a.commands.run("echo one; sleep 3; echo two", shell=True,
                       on_stdout=lambda d: seen.append((time.time(), d)))
    assert r.exit_code == 0 and "one" in r.stdout and "two" in r.stdout, r
    t_one = next(t for t, d in seen if "one" in d)
    t_two = next(t for t, d in seen if "two" in d)
    assert t_two - t_one > 2.0, seen


@check("background_stream_and_connect")
def _():
    # A background command streamed as it runs, and one reached later by
    # its pid (commands.connect): both deliver output and the exit code.
    seen = []
    h = sh(a, "echo one; sleep 2; echo two; exit 5", background=True,
           on_stdout=lambda d: seen.append((time.time(), d)))
    assert h.pid > 0
    res = h.wait(timeout=60)
    assert res.exit_code == 5 and "one" in res.stdout and "two" in res.stdout, res
    t_one = next(t for t, d in seen if "one" in d)
    t_two = next(t for t, d in seen if "two" in d)
    assert t_two - t_one > 1.0, seen
    bg = sh(a, "sleep 2; echo later; exit 6", background=True)
    got = []
    c = a.commands.connect(bg.pid, on_stdout=got.append)
    assert c.pid == bg.pid
    res = c.wait(timeout=60)
    assert res.exit_code == 6 and "later" in "".join(got), (res, got)


@check("fork_keeps_files_then_diverges")
def _():
    a.files.write("/tmp/f.txt", "before")
    c = a.fork()
    made.append(c)
    assert c.id != a.id
    assert c.files.read("/tmp/f.txt") == "before"
    assert start_of(c) == start_of(a)
    c.files.write("/tmp/f.txt", "child")
    a.files.write("/tmp/g.txt", "parent-only")
    assert a.files.read("/tmp/f.txt") == "before"
    assert sh(c, "test -e /tmp/g.txt").exit_code == 1
    assert sh(c, "echo $SECRET_TOKEN").stdout == "s3cret\n", "a fork keeps the envs"


@check("snapshot_create_from_delete")
def _():
    a.files.write("/tmp/snap.txt", "in-snapshot")
    s = a.create_snapshot()
    assert getattr(s, OWNER) == a.id and s.size_bytes > 0, s
    got = Snapshot.get(s.id)
    assert got.id == s.id and getattr(got, OWNER) == a.id
    kw = {OWNER: a.id}
    assert s.id in [x.id for x in Snapshot.list(**kw)]
    m = M.create(snapshot_id=s.id)
    made.append(m)
    assert m.files.read("/tmp/snap.txt") == "in-snapshot"
    try:
        Snapshot.delete(s.id)
        raise AssertionError("deleted a snapshot in use")
    except ConflictError:
        pass
    m.kill()
    Snapshot.delete(s.id)
    try:
        Snapshot.get(s.id)
        raise AssertionError("deleted snapshot still there")
    except NotFoundError:
        pass


@check("pause_then_connect_resume")
def _():
    a.files.write("/tmp/p.txt", "kept")
    before = start_of(a)
    snap = a.pause()
    assert getattr(snap, OWNER) == a.id, snap
    info = M.get_info_by_id(a.id) if hasattr(M, "get_info_by_id") else None
    assert info is None or info.status.value == "paused", info
    try:
        sh(a, "true")
        raise AssertionError("exec on a paused machine")
    except ConflictError:
        pass
    a2 = M.connect(a.id)
    assert a2.id == a.id
    assert a2.files.read("/tmp/p.txt") == "kept"
    assert start_of(a2) == before, "the start process survived the pause"
    assert "hello" in sh(a2, "wget -q -O - http://127.0.0.1:8080/").stdout


@check("kill_removes_from_list")
def _():
    ids = [m.id for m in M.list()]
    assert b.id in ids, ids
    b.kill()
    assert b.id not in [m.id for m in M.list()]
    running = [m.id for m in M.list(state="running")]
    assert a.id in running and b.id not in running


@check("killed_machine_is_not_found")
def _():
    # b was killed above: connect (GET, then resume) must not hand it out.
    try:
        M.connect(b.id)
        raise AssertionError("connected to a killed machine")
    except NotFoundError as e:
        assert e.code == ("machine_not_found" if V1 else "sandbox_not_found"), e.code
        assert "destroyed" in str(e), str(e)
    # It is still listed among the destroyed ones.
    assert b.id in [m.id for m in M.list(state="destroyed")]


@check("unoffered_calls_are_not_implemented")
def _():
    from nullspace.errors import NotImplementedError as NotOffered
    from nullspace.client import NullspaceClient
    c = NullspaceClient()
    prefix = f"/v1/{'machines' if V1 else 'sandboxes'}/{a.id}"
    # An SDK call whose feature this server does not offer: a JSON 501
    # (volumes are offered under /v1/machines only).
    try:
        if V1:
            c.request("GET", prefix + "/desktop/status")
        else:
            a.list_volumes()
        raise AssertionError("an unoffered call answered")
    except NotOffered as e:
        assert ("desktop" if V1 else "volumes") in str(e), str(e)
    # A WebSocket channel not offered: refused before the upgrade with 501.
    try:
        c.ws_connect(prefix + "/ws", params={"channel": "desktop"}).close()
        raise AssertionError("a desktop channel opened")
    except NotOffered:
        pass
    # A path the SDK does not know either: a JSON 404, never a bare one.
    try:
        c.request("GET", "/v1/no-such-thing")
        raise AssertionError("an unknown path answered")
    except BaseError as e:
        assert e.code == "not_found" and "/v1/no-such-thing" in str(e), (e.code, str(e))


@check("other_namespace_cannot_see")
def _():
    assert a.id not in [m.id for m in M.list(api_key=OTHER_KEY)]
    for call in (lambda: M.connect(a.id, api_key=OTHER_KEY),
                 lambda: M.kill_by_id(a.id, api_key=OTHER_KEY)):
        try:
            call()
            raise AssertionError("another namespace reached the machine")
        except NotFoundError as e:
            assert "not_found" in e.code, e.code
    # Nor through the machine's routes or its exec WebSocket directly
    # (which the owner's key reaches: the paths are right).
    from nullspace.client import NullspaceClient
    mine, other = NullspaceClient(), NullspaceClient(api_key=OTHER_KEY)
    prefix = f"/v1/{'machines' if V1 else 'sandboxes'}/{a.id}"
    code = "machine_not_found" if V1 else "sandbox_not_found"
    for method, path, kw in (("POST", "/exec", {"json": {"command": "true"}}),
                             ("GET", "/processes", {}),
                             ("DELETE", "", {})):
        try:
            other.request(method, prefix + path, **kw)
            raise AssertionError(f"{method} {path} from another namespace")
        except NotFoundError as e:
            assert e.code == code, e.code
    mine.request("GET", prefix + "/processes")
    mine.ws_connect(prefix + "/ws", params={"channel": "exec"}).close()
    try:
        other.ws_connect(prefix + "/ws", params={"channel": "exec"}).close()
        raise AssertionError("another namespace opened the exec channel")
    except BaseError as e:
        assert "HTTP 404" in str(e), str(e)
    assert sh(a, "true").exit_code == 0, "still running"


@check("idempotency_key_same_machine")
def _():
    k = str(uuid.uuid4())
    got = []
    ts = [threading.Thread(target=lambda: got.append(create(idempotency_key=k).id)) for _ in range(2)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    again = create(idempotency_key=k).id
    assert len(got) == 2 and got[0] == got[1] == again, (got, again)
    assert [m.id for m in M.list()].count(again) == 1


@check("timeout_destroys_or_hibernates")
def _():
    d = create(timeout=3)
    h = create(timeout=3, timeout_action="hibernate")
    deadline = time.time() + 90
    states = {}
    while time.time() < deadline:
        states = {m.id: m.status.value for m in M.list()}
        if d.id not in states and states.get(h.id) == "paused":
            break
        time.sleep(1)
    assert d.id not in states and states.get(h.id) == "paused", states
    h2 = M.connect(h.id)
    assert sh(h2, "true").exit_code == 0


@check("set_timeout")
def _():
    lease = a.set_timeout(600) if V1 else None
    if V1:
        assert lease.timeout_ms == 600000 and lease.remaining_ms > 590000, lease
    else:
        a.set_timeout(600)


@check("sizes_from_one_template")
def _():
    # The template was built at 2 vCPUs / 512 MiB without maxima: its
    # machines take 1 to 4 vCPUs and up to 512 MiB (its ceiling).
    for vcpus, mb in ((4, 512), (1, 256)):
        m = create(vcpus=vcpus, memory_mb=mb)
        assert sh(m, "nproc").stdout.strip() == str(vcpus), (vcpus, sh(m, "nproc"))
        total = int(sh(m, "free -m | awk '/^Mem:/{print $2}'").stdout)
        assert mb - 200 <= total <= mb, (mb, total)
        page = sh(m, "wget -q -O - http://127.0.0.1:8080/").stdout
        assert "hello from a nullspace template" in page, page
        m.kill()
    try:
        create(memory_mb=1024)
        raise AssertionError("a 1024 MiB machine from a template whose ceiling is 512 MiB")
    except BaseError as e:
        assert e.code == "incompatible_snapshot" and "512" in str(e) and "max_memory_mib" in str(e), (e.code, str(e))


@check("base_template")
def _():
    deadline = time.time() + 600
    while True:
        try:
            m = M.create()
            break
        except NotFoundError:
            if time.time() > deadline:
                raise
            time.sleep(5)
    made.append(m)
    assert "hello" in sh(m, "wget -q -O - http://127.0.0.1:8080/").stdout


for m in made:
    try:
        M.kill_by_id(m.id)
    except BaseError:
        pass
print("DONE", len(failed), "failed:", ",".join(failed), flush=True)
sys.exit(1 if failed else 0)
