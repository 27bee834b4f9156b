"""E2B's unmodified Python SDK against a nullspace server.

Environment: E2B_API_URL and E2B_SANDBOX_URL (the server), E2B_API_KEY (a
nullspace API key of namespace A), NS_OTHER_KEY (one of namespace B),
NS_TEMPLATE (a nullspace template ref). Prints `OK <check>` per check that
passed, `TIMING <what> <seconds>`, and `DONE` at the end; a failing check
prints `FAIL <check>: <why>` and the run goes on.
"""

import asyncio
import os
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid

from e2b import (
    AsyncSandbox,
    CommandExitException,
    FileType,
    NotFoundException,
    PtySize,
    Sandbox,
    SandboxQuery,
)

TEMPLATE = os.environ["NS_TEMPLATE"]
URL = os.environ["E2B_SANDBOX_URL"]
OTHER = os.environ["NS_OTHER_KEY"]
RUN = uuid.uuid4().hex[:8]
failed = []


def check(name):
    def wrap(fn):
        try:
            fn()
            print("OK", name, flush=True)
        except Exception as e:  # noqa: BLE001 - every failure is reported
            failed.append(name)
            print(f"FAIL {name}: {e!r}", flush=True)
            traceback.print_exc()
        return fn

    return wrap


def envd(path, sid, token=None, port="49983", method="GET"):
    """A raw envd call: (status, body)."""
    req = urllib.request.Request(URL + path, method=method)
    req.add_header("E2b-Sandbox-Id", sid)
    req.add_header("E2b-Sandbox-Port", port)
    if token is not None:
        req.add_header("X-Access-Token", token)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


t0 = time.monotonic()
sbx = Sandbox.create(
    TEMPLATE, envs={"GREETING": "hello from e2b"}, metadata={"suite": "e2b", "run": RUN}, timeout=600
)
first = sbx.commands.run("echo $GREETING")
print(f"TIMING e2b_create_and_first_run {time.monotonic() - t0:.2f}", flush=True)


@check("create_from_a_template_with_envs_and_metadata")
def _():
    assert first.stdout == "hello from e2b\n", repr(first.stdout)
    assert first.exit_code == 0
    info = sbx.get_info()
    assert info.sandbox_id == sbx.sandbox_id
    assert info.metadata.get("run") == RUN, info.metadata
    assert info.template_id == TEMPLATE, info.template_id


@check("run_output_stderr_and_a_failing_exit")
def _():
    r = sbx.commands.run("echo out; echo err >&2")
    assert r.stdout == "out\n" and r.stderr == "err\n", (r.stdout, r.stderr)
    try:
        sbx.commands.run("echo bad >&2; exit 3")
        raise AssertionError("exit 3 did not raise")
    except CommandExitException as e:
        assert e.exit_code == 3, e.exit_code
        assert "bad" in e.stderr, e.stderr


@check("streaming_callbacks_arrive_while_the_command_runs")
def _():
    seen = []
    start = time.monotonic()
    sbx.commands.run(
        "echo first; sleep 3; echo second",
        on_stdout=lambda d: seen.append((time.monotonic() - start, d)),
    )
    end = time.monotonic() - start
    assert [d for _, d in seen] == ["first\n", "second\n"], seen
    assert end - seen[0][0] >= 2, f"first chunk at {seen[0][0]:.1f}s of {end:.1f}s"


@check("background_command_with_stdin_and_close_stdin")
def _():
    h = sbx.commands.run("cat; echo done", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "line one\n")
    sbx.commands.send_stdin(h.pid, "line two\n")
    sbx.commands.close_stdin(h.pid)
    r = h.wait()
    assert r.stdout == "line one\nline two\ndone\n", repr(r.stdout)


@check("connect_to_a_running_command_and_kill")
def _():
    h = sbx.commands.run("echo started; sleep 600", background=True, timeout=0)
    listed = [p for p in sbx.commands.list() if p.pid == h.pid]
    assert listed, "not listed"
    assert listed[0].cmd == "/bin/bash" and "sleep 600" in listed[0].args[-1], listed[0]
    h2 = sbx.commands.connect(h.pid, timeout=0)
    assert h2.pid == h.pid
    assert sbx.commands.kill(h.pid) is True
    try:
        h2.wait()
        raise AssertionError("a killed command ended cleanly")
    except CommandExitException as e:
        assert e.exit_code != 0
    assert not any(p.pid == h.pid for p in sbx.commands.list()), "still listed"
    assert sbx.commands.kill(h.pid) is False
    try:
        sbx.commands.connect(999999)
        raise AssertionError("connect to a missing pid worked")
    except NotFoundException:
        pass


@check("files_read_write_list_exists_info_mkdir_rename_remove")
def _():
    d = f"/tmp/e2b-{RUN}"
    sbx.files.write(f"{d}/a.txt", "text content")
    assert sbx.files.read(f"{d}/a.txt") == "text content"
    sbx.files.write(f"{d}/b.bin", b"\x00\x01\xff")
    assert bytes(sbx.files.read(f"{d}/b.bin", format="bytes")) == b"\x00\x01\xff"
    from e2b.sandbox.filesystem.filesystem import WriteEntry

    sbx.files.write_files(
        [WriteEntry(path=f"{d}/sub/c.txt", data="c"), WriteEntry(path=f"{d}/sub/deep/d.txt", data="d")]
    )
    assert sbx.commands.run(f"cat {d}/sub/c.txt {d}/sub/deep/d.txt").stdout == "cd"
    one = {e.name for e in sbx.files.list(d)}
    assert one == {"a.txt", "b.bin", "sub"}, one
    two = {e.path for e in sbx.files.list(d, depth=2)}
    assert f"{d}/sub/c.txt" in two and f"{d}/sub/deep" in two, two
    assert f"{d}/sub/deep/d.txt" not in two, two
    assert sbx.files.exists(f"{d}/a.txt") and not sbx.files.exists(f"{d}/nope")
    info = sbx.files.get_info(f"{d}/a.txt")
    assert info.type == FileType.FILE and info.size == 12, (info.type, info.size)
    assert sbx.files.get_info(f"{d}/sub").type == FileType.DIR
    assert sbx.files.make_dir(f"{d}/new/inner") is True
    assert sbx.files.make_dir(f"{d}/new/inner") is False
    moved = sbx.files.rename(f"{d}/a.txt", f"{d}/new/a2.txt")
    assert moved.path == f"{d}/new/a2.txt", moved.path
    assert sbx.files.read(f"{d}/new/a2.txt") == "text content"
    sbx.files.remove(f"{d}/sub")
    assert not sbx.files.exists(f"{d}/sub/c.txt")
    assert sbx.commands.run(f"test -e {d}/sub || echo gone").stdout == "gone\n"


@check("octet_stream_and_gzip_uploads_and_a_big_file")
def _():
    import io

    d = f"/tmp/up-{RUN}"
    sbx.files.write(f"{d}/stream.txt", io.BytesIO(b"streamed body"))
    assert sbx.files.read(f"{d}/stream.txt") == "streamed body"
    sbx.files.write(f"{d}/z.txt", "zipped body", gzip=True)
    assert sbx.files.read(f"{d}/z.txt") == "zipped body"
    # Accept-Encoding: gzip is answered uncompressed, which the SDK reads.
    assert sbx.files.read(f"{d}/z.txt", gzip=True) == "zipped body"
    big = os.urandom(3 << 20)
    sbx.files.write(f"{d}/big.bin", big, use_octet_stream=True)
    assert bytes(sbx.files.read(f"{d}/big.bin", format="bytes")) == big
    assert sbx.commands.run(f"wc -c < {d}/big.bin").stdout.strip() == str(len(big))
    try:
        sbx.files.read(f"{d}/missing.txt")
        raise AssertionError("a missing file was read")
    except NotFoundException:
        pass


@check("stream_input_users_and_a_command_timeout")
def _():
    h = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.stream_input(h.pid, ["a", b"b", "c\n"])
    sbx.commands.close_stdin(h.pid)
    assert h.wait().stdout == "abc\n"
    assert sbx.commands.run("id -u", user="root").stdout == "0\n"
    default = sbx.commands.run("id -un").stdout.strip()
    assert default == sbx.commands.run("id -un", user="user").stdout.strip(), default
    sbx.files.write("/root/only-root.txt", "r", user="root")
    assert sbx.files.get_info("/root/only-root.txt", user="root").owner == "root"
    start = time.monotonic()
    try:
        sbx.commands.run("sleep 60", timeout=2)
        raise AssertionError("the command outlived its timeout")
    except Exception as e:  # noqa: BLE001 - the SDK's exception for a killed command
        assert time.monotonic() - start < 30, e


@check("watch_dir_polled")
def _():
    d = f"/tmp/watch-{RUN}"
    sbx.files.make_dir(d)
    w = sbx.files.watch_dir(d)
    sbx.files.write(f"{d}/polled.txt", "x")
    names = set()
    for _ in range(20):
        names |= {e.name for e in w.get_new_events()}
        if "polled.txt" in names:
            break
        time.sleep(0.5)
    w.stop()
    assert "polled.txt" in names, names


def _wait_quietly(h, out):
    try:
        h.wait(on_pty=lambda d: out.append(bytes(d)))
    except Exception:  # noqa: BLE001 - a killed terminal exits non-zero
        pass


def _until(cond, what, out):
    for _ in range(60):
        if cond():
            return
        time.sleep(0.25)
    raise AssertionError(f"{what!r} not in {b''.join(out)!r}")


@check("pty_create_input_resize_kill")
def _():
    out = []
    h = sbx.pty.create(PtySize(rows=24, cols=80), timeout=0)
    t = threading.Thread(target=lambda: _wait_quietly(h, out), daemon=True)
    t.start()
    sbx.pty.send_stdin(h.pid, b"stty size\n")
    _until(lambda: "24 80" in b"".join(out).decode(errors="replace"), "24 80", out)
    sbx.pty.resize(h.pid, PtySize(rows=33, cols=101))
    sbx.pty.send_stdin(h.pid, b"stty size\n")
    _until(lambda: "33 101" in b"".join(out).decode(errors="replace"), "33 101", out)
    assert sbx.pty.kill(h.pid) is True
    t.join(20)
    assert not t.is_alive(), "the terminal's stream did not end after kill"


@check("set_timeout_get_info_and_list_with_metadata_and_paging")
def _():
    before = sbx.get_info().end_at
    sbx.set_timeout(1200)
    after = sbx.get_info().end_at
    assert after > before, (before, after)
    other = Sandbox.create(TEMPLATE, metadata={"suite": "e2b", "run": RUN}, timeout=300)
    try:
        q = SandboxQuery(metadata={"run": RUN})
        p = Sandbox.list(query=q, limit=1)
        ids = []
        pages = 0
        while p.has_next:
            items = p.next_items()
            pages += 1
            assert len(items) <= 1, items
            ids += [i.sandbox_id for i in items]
        assert sorted(ids) == sorted([sbx.sandbox_id, other.sandbox_id]), ids
        assert pages >= 2, pages
        none = Sandbox.list(query=SandboxQuery(metadata={"run": "nothing-" + RUN})).next_items()
        assert none == [], none
    finally:
        other.kill()


@check("pause_then_connect_keeps_files_and_a_background_process")
def _():
    sbx.files.write("/tmp/kept.txt", "still here")
    h = sbx.commands.run("sleep 900", background=True, timeout=0)
    sbx.pause()
    assert sbx.get_info().state.value == "paused", sbx.get_info().state
    back = Sandbox.connect(sbx.sandbox_id)
    assert back.files.read("/tmp/kept.txt") == "still here"
    assert any(p.pid == h.pid for p in back.commands.list()), "the process is gone"
    back.commands.kill(h.pid)


@check("lifecycle_pause_at_the_timeout_then_connect_resumes")
def _():
    s = Sandbox.create(TEMPLATE, timeout=4, lifecycle={"on_timeout": "pause"})
    try:
        s.files.write("/tmp/at-timeout.txt", "kept")
        for _ in range(60):
            if s.get_info().state.value == "paused":
                break
            time.sleep(0.5)
        assert s.get_info().state.value == "paused", s.get_info().state
        assert not s.is_running()
        back = Sandbox.connect(s.sandbox_id, timeout=120)
        assert back.get_info().state.value == "running"
        assert back.files.read("/tmp/at-timeout.txt") == "kept"
    finally:
        Sandbox.kill(s.sandbox_id)


@check("isolation_between_namespaces_and_access_tokens")
def _():
    try:
        Sandbox.connect(sbx.sandbox_id, api_key=OTHER)
        raise AssertionError("another namespace connected")
    except NotFoundException:
        pass
    listed = [s.sandbox_id for s in Sandbox.list(api_key=OTHER).next_items()]
    assert sbx.sandbox_id not in listed, listed
    assert Sandbox.kill(sbx.sandbox_id, api_key=OTHER) is False
    token = sbx._envd_access_token
    assert token, "create gave no envdAccessToken"
    ok, _ = envd("/files?path=/tmp/kept.txt", sbx.sandbox_id, token)
    assert ok == 200, ok
    for bad in [None, "0" * len(token), token[:-1] + ("0" if token[-1] != "0" else "1")]:
        code, body = envd("/files?path=/tmp/kept.txt", sbx.sandbox_id, bad)
        assert code == 401 and b"still here" not in body, (code, body)
    code, _ = envd("/health", sbx.sandbox_id)
    assert code == 204, code
    # The same machine through the Nullspace API, for its namespace only.
    for key, want in [(os.environ["E2B_API_KEY"], 200), (OTHER, 404)]:
        req = urllib.request.Request(f"{URL}/v1/machines/{sbx.sandbox_id}")
        req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                code, body = r.status, r.read()
        except urllib.error.HTTPError as e:
            code, body = e.code, e.read()
        assert code == want, (code, body)
        if want == 200:
            assert b'"running"' in body, body
    code, body = envd("/health", "sbx_does_not_exist")
    assert code == 502 and b"was not found" in body, (code, body)
    code, body = envd("/execute", sbx.sandbox_id, token, port="49999", method="POST")
    assert code == 501 and b"49999" in body, (code, body)
    # Hostile Connect bodies are refused with invalid_argument, in the
    # stream or as a unary answer, and the sandbox still answers.
    for path, ctype, body in [
        ("/process.Process/Start", "application/connect+json", b"\x00\xff\xff\xff\xffx"),
        ("/process.Process/Start", "application/connect+json", b"\x00\x00\x00\x00\x02[]"),
        ("/filesystem.Filesystem/Stat", "application/json", b'{"path": 5}'),
        ("/process.Process/SendInput", "application/json", b'{"process":{"pid":1},"input":{"stdin":"***"}}'),
    ]:
        req = urllib.request.Request(URL + path, method="POST", data=body)
        for k, v in [("E2b-Sandbox-Id", sbx.sandbox_id), ("X-Access-Token", token), ("Content-Type", ctype)]:
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                code, out = r.status, r.read()
        except urllib.error.HTTPError as e:
            code, out = e.code, e.read()
        assert b"invalid_argument" in out and code in (200, 400), (path, code, out)
    assert sbx.commands.run("echo alive").stdout == "alive\n"


@check("what_is_not_offered_names_itself")
def _():
    from e2b import SandboxException

    # Another vCPU count within the template's ceiling (4) is served...
    s = Sandbox.create(TEMPLATE, cpu_count=4)
    try:
        assert s.commands.run("nproc").stdout.strip() == "4"
    finally:
        s.kill()
    # ...one above it is refused, naming what is possible.
    for kw, word in [({"network": {"deny_out": ["0.0.0.0/0"]}}, "network"), ({"cpu_count": 7}, "vcpus")]:
        try:
            s = Sandbox.create(TEMPLATE, **kw)
            s.kill()
            raise AssertionError(f"{kw} was accepted")
        except SandboxException as e:
            assert word in str(e), e
    req = urllib.request.Request(f"{URL}/templates", method="POST", data=b"{}")
    req.add_header("X-API-KEY", os.environ["E2B_API_KEY"])
    req.add_header("Content-Type", "application/json")
    try:
        urllib.request.urlopen(req, timeout=30)
        raise AssertionError("/templates answered 2xx")
    except urllib.error.HTTPError as e:
        body = e.read()
        assert e.code == 501 and b"template build API" in body, (e.code, body)


@check("async_sdk_runs_commands_and_watches_a_directory")
def _():
    async def main():
        a = await AsyncSandbox.connect(sbx.sandbox_id)
        r = await a.commands.run("echo async")
        assert r.stdout == "async\n", r.stdout
        d = f"/tmp/awatch-{RUN}"
        await a.files.make_dir(d)
        seen = []
        w = await a.files.watch_dir(d, on_event=lambda e: seen.append(e.name))
        await a.files.write(f"{d}/streamed.txt", "y")
        for _ in range(40):
            if "streamed.txt" in seen:
                break
            await asyncio.sleep(0.25)
        await w.stop()
        assert "streamed.txt" in seen, seen
        await a.files.write(f"{d}/bytes.bin", b"\x01\x02")
        assert bytes(await a.files.read(f"{d}/bytes.bin", format="bytes")) == b"\x01\x02"
        assert {e.name for e in await a.files.list(d)} >= {"streamed.txt", "bytes.bin"}
        chunks = []
        h = await a.commands.run(
            "echo bg; sleep 600", background=True, timeout=0, on_stdout=chunks.append
        )
        for _ in range(40):
            if chunks:
                break
            await asyncio.sleep(0.25)
        assert chunks == ["bg\n"], chunks
        assert await a.commands.kill(h.pid) is True
        try:
            await a.commands.run("exit 5")
            raise AssertionError("exit 5 did not raise")
        except CommandExitException as e:
            assert e.exit_code == 5

    asyncio.run(main())


@check("metrics_kill_and_kill_of_a_killed_sandbox")
def _():
    m = sbx.get_metrics()
    assert m and m[-1].cpu_count >= 1 and m[-1].mem_total > 0, m
    assert sbx.kill() is True
    assert Sandbox.kill(sbx.sandbox_id) is False
    assert not sbx.is_running()


print("FAILED", failed if failed else "none", flush=True)
print("DONE", flush=True)
