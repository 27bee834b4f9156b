"""Each validation rule, over raw HTTP (other clients skip the SDK's own
checks). Prints VALIDATION OK."""
import os

import httpx

URL = os.environ["NULLSPACE_API_URL"]
KEY = os.environ["NULLSPACE_API_KEY"]
IMAGE = os.environ["NS_IMAGE"]


def post(path, body):
    return httpx.post(URL + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)


def invalid(body, needle):
    v = post("/v1/templates/validate", body).json()
    assert v["valid"] is False, (body, v)
    msgs = " | ".join(e["message"] for e in v["errors"])
    assert needle in msgs, (needle, msgs)
    r = post("/v1/templates/builds", body)
    assert r.status_code == 400 and r.json()["code"] in ("invalid_request", "file_upload_error"), (r.status_code, r.text)
    assert needle in r.json()["error"], r.text


ok = {"base_image": IMAGE}
assert post("/v1/templates/validate", ok).json()["valid"] is True
assert post("/v1/templates/validate", {**ok, "tags": ["a", "b"]}).json()["valid"] is True

invalid({**ok, "tags": []}, "explicit empty list")
invalid({**ok, "tags": ["tb_123"]}, "tb_")
invalid({**ok, "tags": ["has space"]}, "tag")
invalid({**ok, "name": "Upper"}, "name")
invalid({**ok, "name": "a/b"}, "name")
invalid({}, "needs a source")
invalid({**ok, "dockerfile": "FROM x"}, "exactly one source")
invalid({"dockerfile": "FROM x", "build_backend": "native"}, "native cannot build a dockerfile")
invalid({"dockerfile": "FROM x", "build_backend": "buildkit"}, "not available on this server")
invalid({**ok, "build_backend": "docker"}, "not one of native")
invalid({**ok, "steps": [{"action": "teleport"}]}, "unknown action")
invalid({**ok, "steps": [{"action": "run"}]}, "\"command\" is required")
invalid({**ok, "build_secrets": [{"id": "bad id!", "value": "x"}]}, "must match")
invalid({**ok, "build_secrets": [{"id": "a", "value": "x"}, {"id": "a", "value": "y"}]}, "duplicate id")
invalid({**ok, "build_secrets": [{"id": "a", "value": "x"}]}, "native builds reject them")
invalid({**ok, "runtime_config": {"readiness": {"kind": "http", "path": "/x"}}}, "explicit port")
invalid({**ok, "runtime_config": {"readiness": {"kind": "http", "port": 80, "path": "/x?q=1"}}}, "no query")
invalid({**ok, "runtime_config": {"readiness": {"kind": "http", "port": 80, "host": "example.com"}}}, "localhost")
invalid({**ok, "runtime_config": {"readiness": {"kind": "tcp", "port": 70000}}}, "explicit port")
invalid({**ok, "runtime_config": {"readiness": {"kind": "command", "command": " "}}}, "non-empty")
invalid({**ok, "runtime_config": {"readiness": {"kind": "magic"}}}, "not one of tcp")
invalid({**ok, "runtime_config": {"default_user": "a:b:c"}}, "default_user")
invalid({**ok, "runtime_config": {"default_workdir": "relative"}}, "absolute")
invalid({**ok, "runtime_config": {"default_envs": {"1BAD": "x"}}}, "valid variable name")
invalid({**ok, "base_image_auth": {"kind": "basic", "username": "u"}}, "username and password")
invalid({**ok, "base_image_auth": {"kind": "oauth"}}, "kind must be")
invalid({**ok, "build_config": {"disk_mb": 100}}, "disk_mb")
invalid({**ok, "build_config": {"vcpus": 0}}, "vcpus")
invalid({**ok, "build_context": {"files": [{"path": "../x", "entry_type": "file", "blob_id": "b"}]}}, "inside the context")
invalid({**ok, "build_context": {"files": [{"path": "l", "entry_type": "symlink"}]}}, "symlinks")
invalid({**ok, "build_context": {"files": [{"path": "f", "entry_type": "file"}]}}, "neither blob_id nor content_base64")
invalid({**ok, "steps": [{"action": "make_dir", "path": "/x", "mode": "999"}]}, "octal")

bad_json = httpx.post(URL + "/v1/templates/builds", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
assert bad_json.status_code == 400 and bad_json.json()["code"] == "invalid_request"
# NUL bytes never reach the store (Postgres cannot hold them): 400 / 404.
nul = post("/v1/templates/builds", {"base_image": "x\u0000y"})
assert nul.status_code == 400 and "NUL" in nul.json()["error"], nul.text
for path in ["/v1/templates/builds/tb_%00x", "/v1/templates/builds/tb_x%00/logs"]:
    r = httpx.get(URL + path, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404, (path, r.status_code, r.text)
r = httpx.put(URL + "/v1/templates/blobs/blob_%00", content=b"x", headers={"Authorization": f"Bearer {KEY}"})
assert r.status_code == 404, r.text
print("VALIDATION OK")
