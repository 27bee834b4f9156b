# Large uploads, directory uploads and signed URLs through the published
# SDK 1.0.3, unchanged (run by tests/machines_uploads.rs). Each check prints
# "OK <name>" or "FAIL <name>: <why>".
import shutil, base64, hashlib, hmac, json, os, random, sys, tempfile, time, traceback

import httpx
from nullspace import Machine
from nullspace.errors import FileUploadError, UploadChecksumError, UploadStateError

TEMPLATE = os.environ["NS_TEMPLATE"]
PID = int(os.environ["NS_SERVER_PID"])
DATA_DIR = os.environ["NS_DATA_DIR"]
NAMESPACE = os.environ["NS_NAMESPACE"]
BOUND_KB = int(os.environ["NS_RSS_BOUND_KB"])
API = os.environ["NULLSPACE_API_URL"]
KEY = os.environ["NULLSPACE_API_KEY"]

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


def sh(cmd):
    r = m.commands.run(cmd, shell=True, timeout=600)
    assert r.exit_code == 0, (cmd, r.exit_code, r.stdout, r.stderr)
    return r.stdout


def kb(field):
    with open(f"/proc/{PID}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def write_random(path, size, seed):
    """`size` pseudo-random bytes, written in 1 MiB pieces; their sha256."""
    rnd = random.Random(seed)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            b = rnd.randbytes(n)
            h.update(b)
            f.write(b)
            left -= n
    return h.hexdigest()


tmp = tempfile.mkdtemp(prefix="ns-up-")
m = Machine.create(template=TEMPLATE)


@check("upload_200mib_sha256_bounded_rss")
def _():
    src = os.path.join(tmp, "big.bin")
    size = 200 << 20
    digest = write_random(src, size, 1)
    before = kb("VmRSS")
    # Peak RSS from now on (Linux: 5 resets VmHWM to the current RSS).
    with open(f"/proc/{PID}/clear_refs", "w") as f:
        f.write("5")
    t = time.monotonic()
    r = m.files.upload_file(src, "/tmp/big.bin", checksum="sha256")
    took = time.monotonic() - t
    peak = kb("VmHWM")
    assert r.transport.value == "resumable", r
    assert r.bytes_uploaded == size, r
    assert r.session is not None and r.session.status.value == "completed", r
    got = sh("sha256sum /tmp/big.bin").split()[0]
    assert got == digest, (got, digest)
    print(f"FIGURE upload 200 MiB in {took:.1f}s; server RSS {before} kB before, peak {peak} kB; "
          f"growth {peak - before} kB, bound {BOUND_KB} kB", flush=True)
    assert peak - before < BOUND_KB, (before, peak, BOUND_KB)
    # No temporary name is left beside the file.
    assert sh("ls -a /tmp | grep -c nullspace-upload || true").strip() == "0"


@check("directory_upload_sha256_modes_links")
def _():
    root = os.path.join(tmp, "proj")
    os.makedirs(os.path.join(root, "src/deep/er"))
    os.makedirs(os.path.join(root, "empty"))
    want = {}
    want["./src/big.bin"] = write_random(os.path.join(root, "src/big.bin"), 12 << 20, 2)
    want["./src/deep/er/small.txt"] = write_random(os.path.join(root, "src/deep/er/small.txt"), 100, 3)
    long = "n" * 150 + ".txt"
    want["./src/" + long] = write_random(os.path.join(root, "src", long), 10, 4)
    with open(os.path.join(root, "run.sh"), "w") as f:
        f.write("#!/bin/sh\necho ran\n")
    os.chmod(os.path.join(root, "run.sh"), 0o755)
    want["./run.sh"] = hashlib.sha256(b"#!/bin/sh\necho ran\n").hexdigest()
    os.symlink("src/deep/er/small.txt", os.path.join(root, "link"))
    r = m.files.upload_dir(root, "/tmp/proj")
    assert r.kind.value == "directory_tar", r
    assert r.file_count == 5, r
    out = sh("cd /tmp/proj && find . -type f | sort | xargs sha256sum")
    got = {line.split()[1]: line.split()[0] for line in out.splitlines()}
    assert got == want, (got, want)
    assert sh("readlink /tmp/proj/link").strip() == "src/deep/er/small.txt"
    assert sh("stat -c %a /tmp/proj/run.sh").strip() == "755"
    assert sh("/tmp/proj/run.sh").strip() == "ran"
    assert sh("test -d /tmp/proj/empty && echo yes").strip() == "yes"
    assert sh("ls -a /tmp | grep -c nullspace-upload || true").strip() == "0"


@check("parts_out_of_order_twice_beyond_and_resume")
def _():
    c = m._client
    src = os.path.join(tmp, "parts.bin")
    probe = c.create_upload_session(m.id, kind="file", source_kind="restartable_file",
                                    target_path="/tmp/parts.bin", content_length=1)
    ps = probe.part_size
    c.abort_upload_session(m.id, probe.upload_id)
    assert c.get_upload_session(m.id, probe.upload_id).status.value == "aborted"
    size = 2 * ps + 10
    digest = write_random(src, size, 5)
    data = open(src, "rb").read()
    part = lambda n: data[n * ps:(n + 1) * ps]
    s = c.create_upload_session(m.id, kind="file", source_kind="restartable_file",
                                target_path="/tmp/parts.bin", content_length=size)
    assert s.part_count == 3, s
    sha = lambda b: hashlib.sha256(b).hexdigest()
    c.upload_session_part(m.id, s.upload_id, 2, part(2), part_sha256=sha(part(2)))
    st = c.upload_session_part(m.id, s.upload_id, 0, part(0), part_sha256=sha(part(0)))
    assert st.next_part == 1 and st.accepted_bytes == ps + 10, st
    # The same part again: accepted, counted once.
    st = c.upload_session_part(m.id, s.upload_id, 0, part(0), part_sha256=sha(part(0)))
    assert st.accepted_bytes == ps + 10, st
    # Other bytes for a received part: refused.
    other = bytes(len(part(0)))
    try:
        c.upload_session_part(m.id, s.upload_id, 0, other)
        raise AssertionError("a differing replay was accepted")
    except UploadChecksumError as e:
        assert e.reason.value == "invalid_part_checksum" and e.part_number == 0, e
        assert "already received with other content" in str(e), e
    # A part beyond the declared size.
    try:
        c.upload_session_part(m.id, s.upload_id, 3, b"x")
        raise AssertionError("part 3 was accepted")
    except UploadStateError as e:
        assert e.reason.value == "part_out_of_range", e
        assert "beyond the declared size" in str(e), e
    # A part of the wrong size.
    try:
        c.upload_session_part(m.id, s.upload_id, 1, part(1) + b"more")
        raise AssertionError("an oversized part was accepted")
    except UploadStateError as e:
        assert e.reason.value == "part_size_mismatch", e
        assert f"must be {ps} bytes" in str(e), e
    # A malformed part number.
    resp = httpx.put(f"{API}/v1/machines/{m.id}/uploads/{s.upload_id}/parts/-1", content=b"x",
                     headers={"Authorization": f"Bearer {KEY}"})
    assert resp.status_code == 400 and "is not a number from 0 to 2" in resp.text, resp.text
    # Completing with a part missing names it.
    try:
        c.complete_upload_session(m.id, s.upload_id, whole_checksum_sha256=digest)
        raise AssertionError("completed with a part missing")
    except UploadStateError as e:
        assert e.reason.value == "missing_parts" and e.part_number == 1, e
    # Resume: the SDK reads the status and sends what is missing.
    r = m.files.resume_upload(s.upload_id, src)
    assert r.resumed and r.bytes_uploaded == size, r
    assert sh("sha256sum /tmp/parts.bin").split()[0] == digest


def mint(method, machine, path, exp, user=None):
    """A token made the way the server makes them, with its key."""
    key = open(os.path.join(DATA_DIR, "signing.key"), "rb").read()
    claims = {"m": method, "id": machine, "ns": NAMESPACE, "p": path, "exp": exp}
    if user:
        claims["u"] = user
    raw = json.dumps(claims, separators=(",", ":")).encode()
    tag = hmac.new(key, raw, hashlib.sha256).digest()
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    return f"{b64(raw)}.{b64(tag)}"


@check("signed_urls_work_without_the_key_and_refuse_tampered_or_expired")
def _():
    u = m.files.upload_url("/tmp/signed.txt")
    assert u.token and u.token in u.url, u
    # No API key on these requests.
    r = httpx.put(u.url, content=b"signed bytes")
    assert r.status_code == 204, (r.status_code, r.text)
    assert m.files.read("/tmp/signed.txt") == "signed bytes"
    d = m.files.download_url("/tmp/signed.txt")
    r = httpx.get(d)
    assert r.status_code == 200 and r.content == b"signed bytes", (r.status_code, r.text)
    # The upload grant does not download, nor the download grant upload.
    assert httpx.get(u.url).status_code == 403
    assert httpx.put(d, content=b"x").status_code == 403
    # Tampered: one character of the signature, or the claims.
    base, token = d.split("token=")
    claims, tag = token.split(".")
    flipped = tag[:-2] + ("A" if tag[-2] != "A" else "B") + tag[-1]
    r = httpx.get(f"{base}token={claims}.{flipped}")
    assert r.status_code == 403 and "signature does not match" in r.json()["error"], r.text
    forged = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    forged["p"] = "/etc/shadow"
    fc = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    r = httpx.get(f"{base}token={fc}.{tag}")
    assert r.status_code == 403 and "signature does not match" in r.json()["error"], r.text
    # Another machine's path with this token.
    r = httpx.get(d.replace(m.id, "mch_other"))
    assert r.status_code == 403 and "not mch_other" in r.json()["error"], r.text
    # Made with the server's key (the format is as documented) but expired.
    now = int(time.time())
    ok = mint("GET", m.id, "/tmp/signed.txt", now + 60)
    r = httpx.get(f"{base}token={ok}")
    assert r.status_code == 200 and r.content == b"signed bytes", (r.status_code, r.text)
    old = mint("GET", m.id, "/tmp/signed.txt", now - 5)
    r = httpx.get(f"{base}token={old}")
    assert r.status_code == 403 and r.json()["code"] == "signed_url_expired", r.text
    assert "expired" in r.json()["error"], r.text
    # No token at all.
    assert httpx.get(base.rstrip("?")).status_code == 403


m.kill()
# The 200 MiB source and the directory tree are the test's own: gone too.
shutil.rmtree(tmp, ignore_errors=True)
print("DONE" if not failed else f"FAILED {failed}", flush=True)
