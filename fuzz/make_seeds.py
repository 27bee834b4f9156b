#!/usr/bin/env python3
"""Regenerates fuzz/seeds/ from the repository's test fixtures.

String literals in the crates' tests and test modules are sorted into the
target that parses their kind of text (manifests, configs, Dockerfiles,
step lists, agent lines, ...); layer tars are built here with the shapes
the rootfs tests use (whiteouts, opaque dirs, links, PAX and GNU long
names, escapes), plain and compressed. Run from the repository root.
"""
import gzip, hashlib, io, json, os, re, subprocess, sys, tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fuzz", "seeds")
seeds = {}

def add(target, data):
    if isinstance(data, str):
        data = data.encode()
    if len(data) > 64 << 10:
        return
    seeds.setdefault(target, {})[hashlib.sha1(data).hexdigest()[:16]] = data

LIT = re.compile(r'r(#*)"(.*?)"\1', re.S)
import warnings
warnings.simplefilter("ignore")
PLAIN = re.compile(r'"((?:[^"\\\n]|\\.){8,})"')

def unescape(s):
    try:
        return bytes(s, "utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")
    except Exception:
        return s

def literals(path):
    text = open(path, encoding="utf-8", errors="replace").read()
    out = [m.group(2) for m in LIT.finditer(text)]
    out += [unescape(m.group(1)) for m in PLAIN.finditer(text)]
    return out

def classify(s):
    t = s.strip()
    js = None
    if t[:1] in "{[":
        try:
            js = json.loads(t)
        except Exception:
            js = None
    if re.search(r"(?mi)^\s*FROM\s", s):
        add("dockerfile", s)
    if js is not None:
        if isinstance(js, dict) and "schemaVersion" in js:
            add("oci_document", b"\x00" + t.encode())
            add("oci_document", b"\x02" + t.encode())
        if isinstance(js, dict) and ("config" in js or "rootfs" in js or "Entrypoint" in js or "Env" in js):
            add("oci_config", t)
        if isinstance(js, dict) and "auths" in js:
            add("docker_auth", "127.0.0.1:5000\n" + t)
            add("docker_auth", "docker.io\n" + t)
        if isinstance(js, dict) and "format_version" in js:
            add("snapshot_manifest", t)
        if isinstance(js, list) and js and all(isinstance(x, dict) and "type" in x for x in js):
            add("render", t)
        if isinstance(js, dict) and any(k in js for k in ("steps", "from_image", "from_template", "dockerfile", "template_id", "from_image_registry")):
            add("build_plan", t)
        if isinstance(js, dict) and "op" in js and "id" in js:
            add("agent_init", b"\x07" + t.encode() + b"\n")
        if isinstance(js, dict) and "id" in js and "type" in js:
            add("agent_host", b"\x80" + t.encode() + b"\n")
            if str(js.get("type", "")).startswith(("pty_", "file_watch", "exec_")):
                add("ws_frames", b"\x03" + t.encode())
        if isinstance(js, dict) and any(k in js for k in ("cmd", "command", "template", "template_id", "envs", "timeout", "path", "mode", "pattern", "files")):
            add("machine_api", t)
        if isinstance(js, dict) and any(k in js for k in ("target_path", "content_length", "source_kind", "sha256")):
            add("upload", t)
    if re.fullmatch(r"[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?", t):
        add("platform", t)
    if re.fullmatch(r"(docker://|oci:|oci-archive:|docker-archive:)?[A-Za-z0-9._:/@-]+", t) and ("/" in t or ":" in t) and len(t) < 300:
        add("image_ref", t)
    if re.match(r"(?i)(bearer|basic)\s", t):
        add("docker_auth", "registry.example\n" + t)

for base, _, files in os.walk(os.path.join(ROOT, "crates")):
    for f in files:
        if f.endswith(".rs"):
            p = os.path.join(base, f)
            text = open(p, encoding="utf-8", errors="replace").read()
            if "/tests/" in p or "#[cfg(test)]" in text or "testkit" in p or "demo.rs" in p:
                for s in literals(p):
                    classify(s)

# Layer tars: the shapes the rootfs decode/flatten/safety tests build.
def tar_of(members, fmt=tarfile.PAX_FORMAT):
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w", format=fmt) as t:
        for m in members:
            kind, name = m[0], m[1]
            ti = tarfile.TarInfo(name)
            ti.mtime = 1700000000
            data = b""
            if kind == "f":
                data = m[2]
                ti.size = len(data)
                ti.mode = 0o644
            elif kind == "d":
                ti.type = tarfile.DIRTYPE
                ti.mode = 0o755
            elif kind == "l":
                ti.type = tarfile.SYMTYPE
                ti.linkname = m[2]
            elif kind == "h":
                ti.type = tarfile.LNKTYPE
                ti.linkname = m[2]
            elif kind == "x":
                ti.size = 3
                data = b"cap"
                ti.pax_headers = {"SCHILY.xattr.security.capability": "\x01\x00\x00\x02", "mtime": "1700000000.5"}
            t.addfile(ti, io.BytesIO(data) if data else None)
    return b.getvalue()

layers = [
    [("d", "etc"), ("f", "etc/hosts", b"127.0.0.1 localhost\n"), ("l", "etc/link", "/etc/hosts"), ("h", "etc/hard", "etc/hosts")],
    [("f", "a/.wh.b", b""), ("d", "c"), ("f", "c/.wh..wh..opq", b""), ("f", "c/new", b"x")],
    [("f", "./x/../y", b"y"), ("f", "/abs", b"a"), ("f", "../escape", b"e"), ("h", "bad", "../../etc/passwd")],
    [("f", "d/" + "n" * 200 + "/" + "m" * 120, b"long"), ("x", "bin/ping")],
    [("d", "dir"), ("f", "dir", b"file replaces dir"), ("l", "dir2", "dir"), ("f", "dir2/through", b"t")],
]
for i, members in enumerate(layers):
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        try:
            raw = tar_of(members, fmt)
        except Exception as e:
            print("skip layer", i, e, file=sys.stderr)
            continue
        add("tar_layer", raw)
        add("compression", raw)
        add("compression", gzip.compress(raw, mtime=0))
        z = subprocess.run(["zstd", "-q", "-c", "-1"], input=raw, capture_output=True).stdout
        if z:
            add("compression", z)
add("compression", b"")
add("compression", b"\xfd7zXZ\x00rest")
add("compression", b"BZh91AY&SY")

# The agent line splitter: chunking and overlong lines.
add("agent_init", b"\x00" + b'{"id":1,"op":"ping"}\n{"id":2,"op":"hello","protocol":1}\n{"id":3,"op":"bogus"}\nnot json\n')
add("agent_host", b"\x05" + b'{"id":1,"type":"pong"}\n{"id":7,"type":"stdout","data":"aGk="}\n{"id":9,"type":[[[[\n')
add("ws_frames", b"\x01h\xc3\xa9llo \xe2\x82\xac \xf0\x9f\x98\x80 \xff\xfe end")
add("upload", "/workspace/dir/./file.txt")
add("upload", "12")
add("upload", json.dumps({"target_path": "/tmp/a", "content_length": 10, "source_kind": "restartable_file"}))


# The snapshot manifest of nullspace-model's snapshot tests (`sample()`).
def fe(p, size):
    return {"path": p, "size": size, "sha256": "ab" * 32}
snap = {
    "format_version": 2, "created_unix_ms": 1,
    "qemu": {"major": 10, "minor": 0, "micro": 2, "package": "Debian"},
    "kernel": {"version": "6.1.0-57-cloud-amd64", "file": fe("vmlinuz", 8 << 20)},
    "initramfs": fe("initrd.img", 1 << 20),
    "device": {"machine": "microvm", "accel": "tcg", "memory_mib": 512, "vcpus": 2, "network": False,
               "spare_disks": 4, "nic": True, "kernel_cmdline": "console=ttyS0"},
    "disk": [{"format": "raw", "file": fe("disk.ext4", 1 << 26)}],
    "memory": {"mode": "mapped", "ram": fe("memory.ram", 512 << 20), "state": fe("device.state", 60000)},
    "guest": {"hostname": "h"}, "start": {"pid": 7}, "timings_ms": {"snapshot": 9},
}
add("snapshot_manifest", json.dumps(snap, indent=2))
snap2 = dict(snap, parent={"manifest_sha256": "cd" * 32}, disk=snap["disk"] + [{"format": "qcow2", "file": fe("disk.1.qcow2", 4096)}])
add("snapshot_manifest", json.dumps(snap2))
add("snapshot_manifest", json.dumps(dict(snap, format_version=1)))

# Steps as the SDK's Template builder sends them (nullspace-sdk-surface.md).
steps = [
    {"action": "apt_install", "packages": ["curl", "git"]},
    {"action": "pip_install", "packages": ["requests==2.32.0"], "g": False},
    {"action": "npm_install", "packages": ["typescript"], "g": True},
    {"action": "bun_install", "packages": ["zod"]},
    {"action": "run", "command": "echo hi && mkdir -p /app", "user": "root"},
    {"action": "run", "command": "line one\nline two"},
    {"action": "skip_cache"},
    {"action": "copy", "src": "app/", "dest": "/app", "mode": "0755", "user": "app"},
    {"action": "copy_items", "items": [{"src": "a.txt", "dest": "/a.txt"}]},
    {"action": "git_clone", "url": "https://example.com/r.git", "path": "/src", "branch": "main", "depth": 1},
    {"action": "workdir", "path": "/app"},
    {"action": "user", "user": "app"},
    {"action": "remove", "path": "/tmp/x", "recursive": True, "force": True},
    {"action": "rename", "src": "/a", "dst": "/b", "force": False},
    {"action": "make_dir", "path": "/data", "mode": "0700"},
    {"action": "make_symlink", "target": "/app", "path": "/srv"},
]
add("render", json.dumps(steps))
for st in steps:
    add("render", json.dumps([st]))
reqs = [
    {"name": "py", "base_image": "python:3.12-slim", "steps": steps[:6], "start_cmd": "python -m http.server 8000",
     "runtime_config": {"envs": {"A": "1"}, "workdir": "/app", "user": "root"}},
    {"alias": "df", "dockerfile": "FROM alpine:3.20\nRUN echo hi\nCMD [\"sh\"]\n", "build_backend": "buildkit",
     "build_args": {"X": "1"}, "target": "", "tags": ["v1", "latest"]},
    {"name": "tmpl", "base_image": "team/base:v1", "steps": steps, "build_envs": {"PIP_INDEX_URL": "https://x"},
     "base_image_auth": {"username": "u", "password": "p"}, "skip_cache": True},
    {"base_image": "ghcr.io/org/img@sha256:" + "a" * 64, "registry_auth": [{"registry": "ghcr.io", "username": "u", "password": "p"}],
     "build_secrets": [{"id": "npmrc", "value": "x"}], "build_context": {"files": []}},
]
for r in reqs:
    add("build_plan", json.dumps(r))

# Machine API bodies (SDK 1.0.3 machine.py / files.py / commands.py shapes).
for b in [
    {"template": "python", "timeout": 300, "metadata": {"k": "v"}, "envs": {"A": "1"}, "cpu_count": 2, "memory_mb": 1024},
    {"cmd": "ls -la", "cwd": "/tmp", "envs": {"X": "y"}, "user": "root", "timeout": 10, "background": False},
    {"source": "/a", "destination": "/b", "overwrite": True},
    {"path": "/a", "mode": "0644"},
    {"path": "/", "pattern": "*.py"},
    {"files": ["/a.txt"], "pattern": "foo", "replacement": "bar"},
    {"files": [{"path": "/a", "mode": "0600"}]},
]:
    add("machine_api", json.dumps(b))
for m in ["0755", "0o644", "7777", "10000", " 0600 "]:
    add("machine_api", m)

# WebSocket frames (SDK 1.0.3 pty.py, the exec channel, file_watch).
for f in [
    {"type": "pty_start", "id": 1, "cols": 80, "rows": 24, "cwd": "/", "envs": {"TERM": "xterm"}, "cmd": "bash"},
    {"type": "pty_connect", "id": "a", "session_id": "pty_1"},
    {"type": "pty_input", "id": 2, "session_id": "pty_1", "data_base64": "bHMK"},
    {"type": "pty_resize", "id": 3, "session_id": "pty_1", "cols": 120, "rows": 40},
    {"type": "pty_kill", "id": 4, "session_id": "pty_1"},
    {"type": "file_watch", "id": 5, "path": "/workspace", "recursive": True, "timeout_secs": 1.5},
    {"type": "exec_start", "id": 6, "cmd": "echo hi", "envs": {}},
    {"type": "exec_connect", "id": 7, "pid": 42},
]:
    add("ws_frames", json.dumps(f))

# Upload sessions (SDK 1.0.3 files.py: create, complete, transfer URLs).
for b in [
    {"target_path": "/workspace/big.bin", "content_length": 1 << 30, "source_kind": "restartable_file", "kind": "file",
     "conflict": "overwrite", "sha256": "ab" * 32},
    {"target_path": "dir", "content_length": 0, "source_kind": "directory_archive", "kind": "directory"},
    {"sha256": "ab" * 32},
    {"path": "/a", "expires_in": 60, "user": "root"},
]:
    add("upload", json.dumps(b))
for t in ["/workspace/.nullspace/x", "a//b/./c/", "/" + "x" * 256, "0", "4294967295", "4294967296", "00", "ab" * 32]:
    add("upload", t)

# Agent frames both ways (nullspace-model agent.rs's protocol table).
for line in [
    {"id": 1, "op": "exec", "argv": ["ls", "-l"], "env": {"A": "1"}, "cwd": "/", "timeout_ms": 1000},
    {"id": 2, "op": "write_file", "path": "/a", "data": "aGk=", "offset": 0, "truncate": True, "mode": 420},
    {"id": 3, "op": "ack", "target": 1, "bytes": 4096},
    {"id": 4, "op": "search_content", "path": "/", "pattern": "x", "literal": True},
    {"id": 5, "op": "pty_start", "cmd": "bash", "cols": 80, "rows": 24},
]:
    add("agent_init", b"\x02" + json.dumps(line).encode() + b"\n")
for line in [
    {"id": 1, "type": "hello", "protocol": 1, "agent": "nullspace-init"},
    {"id": 2, "type": "started", "pid": 7},
    {"id": 2, "type": "exit", "code": 0, "signal": None, "timed_out": False},
    {"id": 3, "type": "error", "code": "not_found", "message": "no such file"},
    {"id": 4, "type": "entries", "entries": []},
    {"id": 5, "type": "data", "data": "aGk=", "size": 2, "eof": True},
]:
    add("agent_host", b"\xc1" + json.dumps(line).encode() + b"\n")

for ref in ["alpine", "docker.io/library/ubuntu:22.04", "localhost:5000/a/b@sha256:" + "0" * 64,
            "oci:/tmp/layout:tag", "oci-archive:/x.tar", "docker-archive:/y.tar:img:1", "docker://[::1]:5000/x:y",
            "nullspace/base", "team/name:v1", "tmpl_0123456789abcdef"]:
    add("image_ref", ref)
for pl in ["linux/amd64", "linux/arm64/v8", "linux/arm/v7", "windows/amd64", "linux/x86_64"]:
    add("platform", pl)
for ch in ['Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull"',
           'Basic realm="registry"', 'Bearer realm="a", Basic realm="b"']:
    add("docker_auth", "registry-1.docker.io\n" + ch)

# package_db: the real databases the SBOM tests have their tools write
# (crates/nullspace-sbom/tests/fixtures/make-rootfs.sh), each behind the
# byte that picks its path in the target.
import glob, tempfile
with tempfile.TemporaryDirectory() as w:
    subprocess.run(["bash", os.path.join(ROOT, "crates/nullspace-sbom/tests/fixtures/make-rootfs.sh"), w],
                   check=True, stdout=subprocess.DEVNULL)
    for pick, pattern in [(0, "rpm-bdb/var/lib/rpm/Packages"), (0, "rpm-bdb-be/var/lib/rpm/Packages"),
                          (1, "deb/var/lib/dpkg/status"), (2, "apk/lib/apk/db/installed"),
                          (3, "alpm/var/lib/pacman/local/*/desc"),
                          (4, "lang/opt/venv/lib/python3*/site-packages/pip-*.dist-info/METADATA"),
                          (5, "lang/app/node_modules/*/package.json")]:
        for f in sorted(glob.glob(os.path.join(w, pattern))):
            with open(f, "rb") as fh:
                add("package_db", bytes([pick]) + fh.read())

CAP = 80
for target, files in sorted(seeds.items()):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    # The hand-written seeds (added last) first, then fixtures by hash.
    for name, data in list(files.items())[::-1][:CAP]:
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
    print(f"{target}: {min(len(files), CAP)}")
