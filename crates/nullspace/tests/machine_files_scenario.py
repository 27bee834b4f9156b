# The file operations beyond read and write, and metrics, run unchanged by
# the published SDK 1.0.3 (`Machine`) and 0.1.9 (`Sandbox`) against a real
# server: make_dir, write_files, search_files, find_files, replace_in_files,
# rename, set_permissions, remove, get_metrics. Each check prints
# "OK <name>" or "FAIL <name>: <why>" and asserts effects in the guest;
# tests/machine_files_sdk.rs asserts every name passed.
import datetime, hashlib, os, sys, traceback

V1 = os.environ["NS_SDK"] == "1"
TEMPLATE = os.environ["NS_TEMPLATE"]
if V1:
    from nullspace import Machine as M
    from nullspace.errors import MachineError as BaseError
else:
    from nullspace import Sandbox as M
    from nullspace.errors import SandboxError as BaseError
from nullspace.errors import BatchWriteError, NotFoundError, PermissionError as Denied

failed = []


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


def sh(cmd, user=None):
    kw = {"user": user} if user else {}
    r = m.commands.run(cmd, shell=True, **kw)
    assert r.exit_code == 0, (cmd, r)
    return r.stdout


def code_of(call):
    try:
        call()
    except BaseError as e:
        return e
    raise AssertionError("no error")


m = M.create(template=TEMPLATE)
P = "/tmp/proj"
A = "import os\nneedle = 1\nprint(needle)\n"
B = b"x\r\nneedle here\r\n"


@check("make_dir_makes_parents_as_the_user")
def _():
    assert m.files.make_dir(f"{P}/src/deep") is True
    info = m.files.info(f"{P}/src/deep")
    assert info.is_dir and info.owner == "app", info
    assert m.files.make_dir(f"{P}/src/deep") is True, "an existing directory is fine"
    assert sh(f"stat -c %U:%a {P}/src") == "app:755\n"


@check("write_files_writes_each_file")
def _():
    infos = m.files.write_files([
        (f"{P}/a.py", A),
        (f"{P}/src/b.py", B),
        (f"{P}/src/deep/c.txt", "Needle\n"),
        (f"{P}/bin.dat", b"needle\x00bin"),
    ])
    assert [(i.path, i.size) for i in infos] == [
        (f"{P}/a.py", len(A)),
        (f"{P}/src/b.py", len(B)),
        (f"{P}/src/deep/c.txt", 7),
        (f"{P}/bin.dat", 10),
    ], infos
    assert all(i.owner == "app" and not i.is_dir for i in infos), infos
    assert m.files.read(f"{P}/a.py") == A
    assert m.files.read(f"{P}/src/b.py", format="bytes") == B
    want = hashlib.sha256(b"needle\x00bin").hexdigest()
    assert sh(f"sha256sum {P}/bin.dat").split()[0] == want


@check("write_files_reports_a_file_it_could_not_write")
def _():
    try:
        m.files.write_files([(f"{P}/ok.txt", "ok"), ("/etc/nope.txt", "x")])
        raise AssertionError("wrote into /etc as app")
    except BatchWriteError as e:
        assert [s.path for s in e.successes] == [f"{P}/ok.txt"], e.successes
        assert [f.path for f in e.failures] == ["/etc/nope.txt"], e.failures
        why = e.failures[0].error
        assert "/etc/nope.txt" in why and "app" in why, why
    assert m.files.read(f"{P}/ok.txt") == "ok"
    assert not m.files.exists("/etc/nope.txt")


@check("search_files_by_name")
def _():
    assert sorted(m.files.search_files(P, "*.py")) == [f"{P}/a.py", f"{P}/src/b.py"]
    assert m.files.search_files(P, "src/**/*.txt") == [f"{P}/src/deep/c.txt"]
    assert m.files.search_files(P, "deep") == [f"{P}/src/deep"], "directories too"
    assert m.files.search_files(P, "*.rs") == []


@check("find_files_by_content_with_line_numbers")
def _():
    hits = sorted((h.file, h.line, h.content) for h in m.files.find_files(P, "needle"))
    assert hits == [
        (f"{P}/a.py", 2, "needle = 1"),
        (f"{P}/a.py", 3, "print(needle)"),
        (f"{P}/src/b.py", 2, "needle here"),
    ], hits
    hits = m.files.find_files(P, r"^needle\s*=")
    assert [(h.file, h.line) for h in hits] == [(f"{P}/a.py", 2)], hits
    hits = m.files.find_files(P, "print(")
    assert [(h.file, h.line) for h in hits] == [(f"{P}/a.py", 3)], "not a regex: plain text"


@check("replace_in_files_rewrites_and_counts")
def _():
    n = m.files.replace_in_files([f"{P}/a.py", f"{P}/src/b.py", f"{P}/src/deep/c.txt"], "needle", "thread")
    assert n == 3, n
    assert m.files.read(f"{P}/a.py") == A.replace("needle", "thread")
    assert m.files.read(f"{P}/src/b.py", format="bytes") == B.replace(b"needle", b"thread")
    assert m.files.read(f"{P}/src/deep/c.txt") == "Needle\n", "case-sensitive"
    assert sh(f"ls -a {P} | grep -c ns-replace || true") == "0\n", "no temporary file left"


@check("replace_refuses_a_file_the_user_may_not_write")
def _():
    m.files.write(f"{P}/secret.txt", "needle\n", user="root")
    m.files.set_permissions(f"{P}/secret.txt", "0600", user="root")
    e = code_of(lambda: m.files.replace_in_files([f"{P}/a.py", f"{P}/secret.txt"], "thread", "x"))
    assert isinstance(e, Denied) and e.code == "permission_denied", (type(e), e.code, str(e))
    assert f"{P}/secret.txt" in str(e) and "app" in str(e), str(e)
    assert "thread" in m.files.read(f"{P}/a.py"), "nothing changed"
    assert m.files.replace_in_files([f"{P}/secret.txt"], "needle", "pin", user="root") == 1
    assert m.files.read(f"{P}/secret.txt", user="root") == "pin\n"
    info = m.files.info(f"{P}/secret.txt", user="root")
    assert (info.owner, info.mode) == ("root", "0600"), info


@check("rename_and_set_permissions")
def _():
    info = m.files.rename(f"{P}/a.py", f"{P}/main.py")
    assert (info.path, info.name, info.size) == (f"{P}/main.py", "main.py", len(A)), info
    assert not m.files.exists(f"{P}/a.py")
    assert m.files.read(f"{P}/main.py").startswith("import os")
    m.files.set_permissions(f"{P}/main.py", "0750")
    assert m.files.info(f"{P}/main.py").mode == "0750"
    assert sh(f"stat -c %a {P}/main.py") == "750\n"
    e = code_of(lambda: m.files.set_permissions(f"{P}/main.py", "rwx"))
    assert e.code == "invalid_request" and "rwx" in str(e), (e.code, str(e))


@check("remove_files_and_trees")
def _():
    m.files.remove(f"{P}/src")
    assert not m.files.exists(f"{P}/src") and not m.files.exists(f"{P}/src/deep/c.txt")
    m.files.remove(f"{P}/bin.dat")
    assert sh(f"ls {P}") == "main.py\nok.txt\nsecret.txt\n"
    e = code_of(lambda: m.files.remove(f"{P}/missing"))
    assert isinstance(e, NotFoundError) and e.code == "file_not_found", (type(e), e.code)
    assert f"{P}/missing" in str(e), str(e)
    e = code_of(lambda: m.files.remove("/etc/passwd"))
    assert isinstance(e, Denied), (type(e), e.code, str(e))
    assert "/etc/passwd" in str(e) and "app" in str(e), str(e)
    assert m.files.exists("/etc/passwd")


@check("errors_name_the_path_and_the_user")
def _():
    e = code_of(lambda: m.files.find_files("/root", "x"))
    assert isinstance(e, Denied) and "/root" in str(e) and "app" in str(e), (e.code, str(e))
    e = code_of(lambda: m.files.search_files(f"{P}/main.py", "*"))
    assert e.code == "not_a_directory" and f"{P}/main.py" in str(e), (e.code, str(e))
    e = code_of(lambda: m.files.search_files("/tmp/" + "n" * 300, "*"))
    assert e.code == "invalid_request" and "255" in str(e), (e.code, str(e))
    e = code_of(lambda: m.files.find_files(P, ""))
    assert e.code == "invalid_request", (e.code, str(e))


@check("hostile_paths_are_refused_on_every_route")
def _():
    # `..`, NUL and an overlong name on every file route: each is refused
    # by the server with invalid_request (watch_dir: watch_error) in one
    # line naming the path and the user, and nothing changes in the guest.
    import tempfile
    H = "/tmp/hz"
    sh(f"mkdir -p {H} && echo keep > {H}/f")
    src = tempfile.mkdtemp()
    with open(os.path.join(src, "x.txt"), "w") as fh:
        fh.write("x")
    bad = {
        "dotdot": (f"{H}/sub/../made", "'..'"),
        "nul": (f"{H}/a\x00b", "NUL"),
        "long": (f"{H}/" + "n" * 300, "longer than 255"),
    }
    calls = {
        "read": lambda p: m.files.read(p),
        "write": lambda p: m.files.write(p, "x"),
        "info": lambda p: m.files.info(p),
        "list": lambda p: m.files.list(p),
        "remove": lambda p: m.files.remove(p),
        "rename_from": lambda p: m.files.rename(p, f"{H}/g"),
        "rename_to": lambda p: m.files.rename(f"{H}/f", p),
        "make_dir": lambda p: m.files.make_dir(p),
        "set_permissions": lambda p: m.files.set_permissions(p, "0777"),
        "search_files": lambda p: m.files.search_files(p, "*"),
        "find_files": lambda p: m.files.find_files(p, "keep"),
        "replace_in_files": lambda p: m.files.replace_in_files([p], "keep", "lost"),
        "write_files": lambda p: m.files.write_files([(p, "x")]),
    }
    if V1:
        calls.update({
            "upload_file": lambda p: m.files.upload(os.path.join(src, "x.txt"), p),
            "upload_dir": lambda p: m.files.upload_dir(src, p),
            "upload_url": lambda p: m.files.upload_url(p),
            "download_url": lambda p: m.files.download_url(p),
            "watch_dir": lambda p: m.files.watch_dir(p, lambda e: None).stop(),
        })
    wrong = []
    for name, call in calls.items():
        for kind, (path, rule) in bad.items():
            try:
                call(path)
                wrong.append(f"{name}/{kind}: accepted")
                continue
            except BatchWriteError as e:
                code, msg = "invalid_request", e.failures[0].error if e.failures else str(e)
            except BaseError as e:
                code, msg = e.code, str(e)
            except Exception as e:
                wrong.append(f"{name}/{kind}: {type(e).__name__} {e}")
                continue
            want = "watch_error" if name == "watch_dir" else "invalid_request"
            # A NUL in a JSON body is refused before the route, by the
            # body's guard: it names the field and the path, not the user.
            by_guard = msg.startswith("request body: field")
            named = H in msg and (by_guard or "default user" in msg)
            if code != want or rule not in msg or not named or "\n" in msg:
                wrong.append(f"{name}/{kind}: {code} {msg[:300]}")
    assert not wrong, wrong
    # Named users are named.
    e = code_of(lambda: m.files.read(f"{H}/../etc/shadow", user="app"))
    assert e.code == "invalid_request" and 'as user "app"' in str(e), str(e)
    assert sh(f"ls -A {H}; cat {H}/f") == "f\nkeep\n", sh(f"ls -A {H}")
    assert sh("test ! -e /tmp/made && test ! -e /tmp/g && echo none") == "none\n"


@check("metrics_of_the_guest")
def _():
    for sample in (m.get_metrics(), M.get_metrics_by_id(m.id)):
        assert len(sample) == 1, sample
        s = sample[0]
        assert s.cpu_count == int(sh("grep -c ^processor /proc/cpuinfo")), s
        assert 0 <= s.cpu_percent <= 100, s
        assert 0 < s.mem_used_bytes < s.mem_total_bytes, s
        assert 0 < s.disk_used_bytes < s.disk_total_bytes, s
        assert s.network_rx_bytes >= 0 and s.network_tx_bytes >= 0, s
        age = datetime.datetime.now(datetime.timezone.utc) - s.timestamp
        assert abs(age.total_seconds()) < 120, s.timestamp
    kb = int(sh("grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2"))
    assert s.mem_total_bytes == kb * 1024, (s.mem_total_bytes, kb)


try:
    M.kill_by_id(m.id)
except BaseError:
    pass
print("DONE", len(failed), "failed:", ",".join(failed), flush=True)
sys.exit(1 if failed else 0)
