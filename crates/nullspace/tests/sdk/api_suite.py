"""The template API driven by the published nullspace-sdk 0.1.9, unpatched.

Env: NULLSPACE_API_URL, NULLSPACE_API_KEY (namespace team-a), NS_KEY_B
(another namespace), NS_IMAGE (public image), NS_PRIVATE_IMAGE with
NS_PRIVATE_USER/NS_PRIVATE_PASSWORD (basic-auth registry), NS_SECRET.
Every check asserts; the last line printed is SUITE OK.
"""
import json
import os
import time

import httpx
from nullspace import Template, TemplateBuild, wait_for_port, wait_for_url
from nullspace.errors import BuildError, NotFoundError, SandboxError
from nullspace.types import TemplateBuildStatus

URL = os.environ["NULLSPACE_API_URL"]
KEY_A = os.environ["NULLSPACE_API_KEY"]
KEY_B = os.environ["NS_KEY_B"]
IMAGE = os.environ["NS_IMAGE"]
PRIVATE = os.environ["NS_PRIVATE_IMAGE"]
PUSER, PPASS = os.environ["NS_PRIVATE_USER"], os.environ["NS_PRIVATE_PASSWORD"]
SECRET = os.environ["NS_SECRET"]


def api(method, path, key=KEY_A, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, URL + path, headers=headers, timeout=30, **kw)


def section(name):
    print(f"--- {name}", flush=True)


# --- blocking build (SSE) ---------------------------------------------------
section("blocking build")
entries = []
b = Template.build(Template.from_image(IMAGE).set_runtime_envs({"RUNTIME": "yes"}), name="app",
                   tags=["v1"], on_log_entry=entries.append)
assert b.status == TemplateBuildStatus.READY
kinds = [e.kind.value for e in entries]
assert kinds[0] == "start" and kinds[-1] == "end", kinds
assert "cache" in kinds, kinds
assert len({e.build_id for e in entries}) == 1
assert sorted(b.runtime_defaults.default_env_keys) == ["GREETING", "PATH", "RUNTIME"], b.runtime_defaults
assert b.runtime_defaults.start_cmd == "/srv/start.sh", b.runtime_defaults
assert b.runtime_defaults.default_user == "app:app"
assert b.oci_metadata.exposed_ports == ["8080/tcp"]
blocking_id = b.build_id
b.close()

# --- background build, status with offsets, wait ---------------------------
section("background build")
h = Template.build_in_background(Template.from_image(IMAGE), name="app", tags=["bg"])
assert h.status.value in ("waiting", "building", "ready")
first = h.get_status(offset=0)
assert first.build.build_id == h.build_id
assert first.next_offset == (first.entries[-1].offset + 1 if first.entries else 0)
seen = list(first.entries)
final = h.wait_until_terminal(poll_interval=0.1, offset=first.next_offset, on_log_entry=seen.append)
assert final.build.status == TemplateBuildStatus.READY
offsets = [e.offset for e in seen]
assert offsets == list(range(len(offsets))), offsets            # dense, no gaps, no repeats
tail = h.get_status(offset=3)
assert [e.offset for e in tail.entries] == offsets[3:]
assert h.get_status(offset=len(offsets)).entries == []

# --- SSE logs: replay, resume from an offset, cursor alias, follow ----------
section("logs")
replay = list(h.logs(offset=0))
assert [e.offset for e in replay] == offsets
resumed = list(h.logs(offset=2))
assert [e.offset for e in resumed] == offsets[2:]
via_cursor = list(h.logs(cursor=4))
assert [e.offset for e in via_cursor] == offsets[4:]
followed = list(h.logs(offset=0, follow=True))                 # terminal: closes after replay
assert followed[-1].kind.value == "end"
raw = api("GET", f"/v1/templates/builds/{h.build_id}/logs?offset=1&cursor=5")
lines = [l for l in raw.text.splitlines() if l.startswith("data: ")]
assert len(lines) == len(offsets) - 1, "offset takes precedence over cursor"
# The wire frames the SDK's parser reads: exactly `id: N`, `event: log`,
# `data: <one JSON entry>` (whose offset is N), a blank line after each.
assert raw.headers["content-type"].startswith("text/event-stream"), raw.headers
assert raw.text.endswith("\n\n"), raw.text[-20:]
frames = [f for f in raw.text.split("\n\n") if f and not f.startswith(":")]
assert len(frames) == len(offsets) - 1, frames
for f in frames:
    fl = f.split("\n")
    assert len(fl) == 3 and fl[0].startswith("id: ") and fl[1] == "event: log" and fl[2].startswith("data: "), fl
    assert int(fl[0][len("id: "):]) == json.loads(fl[2][len("data: "):])["offset"], fl

# follow a build while it runs: the stream ends with the end entry.
h2 = Template.build_in_background(Template.from_image(IMAGE), name="app", tags=["live"])
live = list(h2.logs(offset=0, follow=True))
assert live[0].kind.value == "start" and live[-1].kind.value == "end", [e.kind.value for e in live]

# --- reconnect, cancel (idempotent on terminal), promote, retry ------------
section("reconnect/cancel/promote/retry")
again = TemplateBuild.connect(h.build_id)
assert again.build_id == h.build_id and again.template_id == h.template_id
snap = again.cancel(reason="too late")
assert snap.build.status == TemplateBuildStatus.READY          # terminal: unchanged
info = again.promote(tag="stable")
assert "stable" in info.tags, info.tags
r = again.retry(tags=["retried"])
assert r.build_id != h.build_id
fin = r.wait_until_terminal(poll_interval=0.1)
assert fin.build.status == TemplateBuildStatus.READY
assert fin.build.retry_of_build_id == h.build_id, fin.build
assert fin.build.original_build_id == h.build_id

# cancel a build that is queued or running: it ends cancelled with a durable entry.
c = Template.build_in_background(Template.from_image(IMAGE), name="app", tags=["cancelme"])
c.cancel(reason="changed my mind")
cfin = c.wait_until_terminal(poll_interval=0.1)
assert cfin.build.status in (TemplateBuildStatus.CANCELLED, TemplateBuildStatus.READY), cfin.build.status
if cfin.build.status == TemplateBuildStatus.CANCELLED:
    assert any(e.kind.value == "cancelled" for e in c.logs(offset=0))
    assert cfin.build.cancellation_reason == "changed my mind"

# --- build errors are typed ---------------------------------------------------
section("errors")
try:
    Template.build(Template.from_image("127.0.0.1:1/nothing/here:1"), name="broken")
    raise AssertionError("expected BuildError")
except BuildError as e:
    assert e.phase in ("prepare", "auth"), e.phase
    assert e.build_id and e.build_id.startswith("tb_")
try:
    Template.build(Template.from_image(IMAGE).run_cmd("echo hi"), name="steps")
    raise AssertionError("expected BuildError for steps without a build VM")
except BuildError as e:
    assert "step" in str(e), str(e)

# --- build context blobs: the SDK's preflight + PUT flow ---------------------
section("blobs")
import hashlib, tempfile
ctx = tempfile.mkdtemp()
with open(os.path.join(ctx, "config.toml"), "w") as f:
    f.write("answer = 42\n")
try:
    Template.build(Template.from_image(IMAGE).set_file_context(ctx).copy("config.toml", "/etc/app/"), name="ctx")
    raise AssertionError("steps need the build VM (for now)")
except BuildError as e:
    assert "step" in str(e)
body = b"answer = 42\n"
sha = hashlib.sha256(body).hexdigest()
pre = api("POST", "/v1/templates/blobs/preflight", json={"files": [
    {"path": "d", "entry_type": "dir", "mode": "0755"},
    {"path": "d/config.toml", "entry_type": "file", "mode": "0644", "sha256": sha, "size_bytes": len(body)}]}).json()
assert [f["path"] for f in pre["files"]] == ["d", "d/config.toml"], pre
assert pre["files"][1]["missing"] is False, "the SDK already uploaded this content"
other = b"new content"
osha = hashlib.sha256(other).hexdigest()
pre = api("POST", "/v1/templates/blobs/preflight", json={"files": [
    {"path": "n", "entry_type": "file", "mode": "0644", "sha256": osha, "size_bytes": len(other)}]}).json()
blob = pre["files"][0]["blob_id"]
assert pre["files"][0]["missing"] is True
bad = api("PUT", f"/v1/templates/blobs/{blob}", content=b"evil content")
assert bad.status_code == 400 and bad.json()["code"] == "file_upload_error", bad.text
assert api("PUT", f"/v1/templates/blobs/{blob}", content=other).status_code == 204
# Blobs are per namespace: another caller must upload its own copy.
pre_b = api("POST", "/v1/templates/blobs/preflight", key=KEY_B, json={"files": [
    {"path": "n", "entry_type": "file", "mode": "0644", "sha256": osha, "size_bytes": len(other)}]}).json()
assert pre_b["files"][0]["missing"] is True
assert api("PUT", "/v1/templates/blobs/blob_unknown", content=b"x").json()["code"] == "blob_not_found"

# --- private registry: credentials used, never kept -------------------------
section("private image")
p = Template.build(Template.from_image(PRIVATE, username=PUSER, password=PPASS), name="private")
assert p.status == TemplateBuildStatus.READY
try:
    Template.build(Template.from_image(PRIVATE), name="private", tags=["noauth"])
    raise AssertionError("expected an auth failure")
except BuildError as e:
    assert e.phase == "auth", (e.phase, str(e))
ph = TemplateBuild.connect(p.build_id)
try:
    ph.retry()
    raise AssertionError("retry without fresh base_image_auth must fail")
except SandboxError as e:
    assert "base_image_auth" in str(e), str(e)
pr = ph.retry(base_image_auth={"kind": "basic", "username": PUSER, "password": PPASS})
assert pr.wait_until_terminal(poll_interval=0.1).build.status == TemplateBuildStatus.READY

# A secret sent to the API (rejected for native builds) is never persisted.
try:
    Template.build_in_background(Template.from_image(IMAGE), name="sec",
                                 build_secrets=[{"id": "tok", "value": SECRET}])
    raise AssertionError("native builds reject secrets")
except SandboxError as e:
    assert e.code == "invalid_request" and SECRET not in str(e), (e.code, str(e))

# --- validate and plan ----------------------------------------------------------
section("validate/plan")
v = Template.validate(Template.from_image(IMAGE), name="ok")
assert v.valid and v.errors == [], v
v = Template.validate(Template.from_image(IMAGE).set_start_cmd("./serve", wait_for_port(8080)), name="Bad Name")
assert not v.valid and any("name" in e.message for e in v.errors), v.errors
plan = Template.plan(Template.from_image(IMAGE).set_workdir("/srv").set_start_cmd("./serve", wait_for_url("http://localhost:8080/ready")), name="planned")
assert plan.build_plan["default_workdir"] == "/srv", plan.build_plan
assert plan.build_plan["readiness"]["kind"] == "http"
assert plan.requires_base_image_auth is False

# --- history, list/get/exists, tags, aliases, visibility, delete -----------
section("management")
hist = Template.list_builds("app", limit=2)
assert len(hist.builds) == 2 and hist.next_cursor
rest = Template.list_builds("app", limit=100, cursor=hist.next_cursor)
ids = [x.build_id for x in hist.builds] + [x.build_id for x in rest.builds]
assert blocking_id in ids and len(ids) == len(set(ids))
ready_only = Template.list_builds("app", status="ready", limit=100)
assert all(x.status == TemplateBuildStatus.READY for x in ready_only.builds)
assert [t.name for t in Template.list()].count("app") == 1
got = Template.get("app")
assert got.name == "app" and "v1" in got.tags and got.visibility.value == "private"
assert Template.exists("app") is True
assert Template.exists("team-a/app:v1") is True
assert Template.exists("nope") is False
# A tag the template does not have: exists and get agree with what a
# create from that ref would do.
assert Template.exists("app:no-such-tag") is False
try:
    Template.get("app:no-such-tag")
    raise AssertionError("get of a missing tag answered")
except NotFoundError as e:
    assert "no-such-tag" in str(e), str(e)
Template.assign_tags("app:v1", ["prod"])
assert "prod" in [t.tag for t in Template.get_tags("app")]
Template.remove_tag("app", "prod")
assert "prod" not in [t.tag for t in Template.get_tags("app")]
Template.rename("app", "service")
assert Template.exists("service") and Template.get("app").name == "service"   # old name is an alias
assert [a.alias_ref for a in Template.list_aliases("service")] == ["team-a/app"]

# --- caller isolation ------------------------------------------------------------
section("isolation")
for path in [f"/v1/templates/builds/{h.build_id}", f"/v1/templates/builds/{h.build_id}/logs",
             "/v1/templates/refs/service", "/v1/templates/refs/team-a%2Fservice"]:
    resp = api("GET", path, key=KEY_B)
    assert resp.status_code == 404, (path, resp.status_code)
    assert resp.json()["code"] in ("template_not_found", "template_build_not_found"), resp.text
missing = api("GET", "/v1/templates/builds/tb_doesnotexist", key=KEY_B)
assert missing.json()["code"] == api("GET", f"/v1/templates/builds/{h.build_id}", key=KEY_B).json()["code"]
assert api("POST", f"/v1/templates/builds/{h.build_id}/cancel", key=KEY_B, json={}).status_code == 404
assert api("DELETE", "/v1/templates/refs/team-a%2Fservice", key=KEY_B).status_code == 404
Template.set_visibility("service", "public")
pub = api("GET", "/v1/templates/refs/team-a%2Fservice", key=KEY_B)
assert pub.status_code == 200 and pub.json()["visibility"] == "public", pub.text
assert api("DELETE", "/v1/templates/refs/team-a%2Fservice", key=KEY_B).status_code == 404
assert api("GET", "/v1/templates", key=KEY_B).json() == []
assert api("GET", "/v1/templates", key="ns_not_a_key").json()["code"] == "unauthorized"
assert api("GET", "/v1/templates", key=None).json()["code"] == "missing_api_key"

# --- name claims and namespaces --------------------------------------------------
section("claims")
claim = Template.reserve_name("reserved-name")
assert claim.canonical_ref == "team-a/reserved-name"
try:
    Template.build(Template.from_image(IMAGE), name="reserved-name")
    raise AssertionError("a claimed name needs its token")
except SandboxError as e:
    assert "reserved" in str(e)
Template.release_name_claim(claim.claim_token)
assert Template.get_namespace("team-a").is_default is True

Template.delete("service")
assert Template.exists("service") is False
try:
    Template.get("service")
    raise AssertionError("expected NotFoundError")
except NotFoundError as e:
    assert e.code == "template_not_found"
print("SUITE OK")
