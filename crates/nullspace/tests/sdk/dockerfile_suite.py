"""Dockerfile and declarative builds through the server's Dockerfile engine
(buildah here), driven by the published SDK (backend omitted) and raw HTTP
(build_backend "buildah"). Prints lines `KEY value` the Rust side checks,
then DOCKERFILE OK."""
import hashlib
import json
import os
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
from nullspace import Template, TemplateBuild
from nullspace.errors import BuildError

URL = os.environ["NULLSPACE_API_URL"]
KEY = os.environ["NULLSPACE_API_KEY"]
IMAGE = os.environ["NS_IMAGE"]
SECRET = os.environ["NS_SECRET"]
H = {"Authorization": f"Bearer {KEY}"}


def api(method, path, **kw):
    return httpx.request(method, URL + path, headers=H, timeout=120, **kw)


def wait(build_id):
    while True:
        b = api("GET", f"/v1/templates/builds/{build_id}").json()["build"]
        if b["status"] in ("ready", "error", "cancelled"):
            return b
        time.sleep(0.2)


# 1. from_dockerfile_content, backend omitted: the server's default engine.
# The demo image runs as `app`; RUN keeps Docker's semantics (the image's USER).
df = f"""FROM {IMAGE}
USER root
ARG FLAVOR=plain
RUN echo "built $FLAVOR" > /built.txt
ENV FROM_DOCKERFILE=1
WORKDIR /srv
ENTRYPOINT []
CMD ["/bin/sh", "-c", "echo hi"]
"""
t0 = time.time()
b = Template.build(Template.from_dockerfile_content(df), name="df")
first = time.time() - t0
st = TemplateBuild.connect(b.build_id).get_status().build
assert st.status.value == "ready" and st.build_backend.value == "buildkit", st
assert "FROM_DOCKERFILE" in st.runtime_defaults.default_env_keys
assert st.runtime_defaults.default_workdir == "/srv" and st.runtime_defaults.default_user == "root"
assert st.runtime_defaults.start_cmd == "/bin/sh -c 'echo hi'", st.runtime_defaults.start_cmd
rec = api("GET", f"/v1/templates/builds/{b.build_id}").json()["build"]
assert rec["engine"].startswith("buildah "), rec.get("engine")
print("DF_BUILD", b.build_id)

# 2. A second identical build is a final-artifact cache hit, and faster.
t0 = time.time()
b2 = Template.build(Template.from_dockerfile_content(df), name="df", tags=["again"])
second = time.time() - t0
s2 = api("GET", f"/v1/templates/builds/{b2.build_id}").json()["build"]
assert s2["cache_summary"]["final_artifact_hits"] == 1, s2["cache_summary"]
assert second < first, (first, second)
print("CACHE", f"first={first:.2f}s second={second:.2f}s")
# skip_cache rebuilds.
b3 = Template.build(Template.from_dockerfile_content(df), name="df", tags=["fresh"], skip_cache=True)
s3 = api("GET", f"/v1/templates/builds/{b3.build_id}").json()["build"]
assert s3["cache_summary"]["final_artifact_bypasses"] == 1 and s3["cache_summary"]["final_artifact_hits"] == 0, s3["cache_summary"]

# 3. from_dockerfile with a local context uploaded through the blob endpoints,
#    a .dockerignore, a build arg-free multi-stage COPY --from and --target-less build.
ctx = tempfile.mkdtemp()
with open(os.path.join(ctx, "Dockerfile"), "w") as f:
    f.write(f"""FROM {IMAGE} AS builder
USER root
COPY app.txt /stage/app.txt
RUN cp /stage/app.txt /stage/processed.txt
FROM {IMAGE}
COPY --from=builder /stage/processed.txt /opt/processed.txt
COPY conf/ /etc/app/
""")
with open(os.path.join(ctx, "app.txt"), "w") as f:
    f.write("hello from the context\n")
os.mkdir(os.path.join(ctx, "conf"))
with open(os.path.join(ctx, "conf", "settings.toml"), "w") as f:
    f.write("x = 1\n")
with open(os.path.join(ctx, "conf", "ignored.key"), "w") as f:
    f.write("should not be uploaded\n")
with open(os.path.join(ctx, ".dockerignore"), "w") as f:
    f.write("**/*.key\n")
b4 = Template.build(Template.from_dockerfile(os.path.join(ctx, "Dockerfile")), name="ctx")
assert b4.status.value == "ready"
print("CTX_BUILD", b4.build_id)

# 4. A secret mount: the Dockerfile writes the value into the image.
secret_df = f"""FROM {IMAGE}
USER root
RUN --mount=type=secret,id=tok cat /run/secrets/tok > /secret-copy
"""
r = api("POST", "/v1/templates/builds", json={
    "dockerfile": secret_df, "name": "secret", "build_backend": "buildah",
    "build_secrets": [{"id": "tok", "value": SECRET, "source": "value"}]})
assert r.status_code == 202, r.text
sb = wait(r.json()["build_id"])
assert sb["status"] == "ready", sb
logs = api("GET", f"/v1/templates/builds/{sb['build_id']}/logs").text
assert SECRET not in logs
print("SECRET_BUILD", sb["build_id"])

# 5. internet_access false: a network call in the build fails; on, it works.
class Ok(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *a):
        pass

srv = HTTPServer(("127.0.0.1", 0), Ok)
threading.Thread(target=srv.serve_forever, daemon=True).start()
net_df = f"FROM {IMAGE}\nUSER root\nRUN wget -q -O /fetched http://127.0.0.1:{srv.server_port}/\n"
on = api("POST", "/v1/templates/builds", json={"dockerfile": net_df, "name": "net", "build_backend": "buildah"})
assert wait(on.json()["build_id"])["status"] == "ready"
off = api("POST", "/v1/templates/builds", json={"dockerfile": net_df, "name": "net", "tags": ["off"],
          "build_backend": "buildah", "build_config": {"internet_access": False}})
offb = wait(off.json()["build_id"])
assert offb["status"] == "error" and offb["error_detail"]["phase"] == "build_step", offb
srv.shutdown()

# 6. Declarative steps through the engine (raw API: the SDK knows only
#    native|buildkit), with a copy from uploaded blobs.
body = b"key = value\n"
sha = hashlib.sha256(body).hexdigest()
pre = api("POST", "/v1/templates/blobs/preflight", json={"files": [
    {"path": "builder-context/step-1/src-0", "entry_type": "dir", "mode": "0755"},
    {"path": "builder-context/step-1/src-0/app.conf", "entry_type": "file", "mode": "0644", "sha256": sha, "size_bytes": len(body)}]}).json()
blob = pre["files"][1]["blob_id"]
if pre["files"][1]["missing"]:
    assert api("PUT", f"/v1/templates/blobs/{blob}", content=body).status_code == 204
decl = {
    "base_image": IMAGE, "name": "decl", "build_backend": "buildah",
    "steps": [
        {"action": "user", "user": "root"},
        {"action": "copy", "sources": ["builder-context/step-1/src-0/app.conf"], "dst": "/etc/app/", "mode": "0640"},
        {"action": "run", "command": "echo ran > /ran.txt"},
        {"action": "make_dir", "path": "/data", "mode": "0700"},
        {"action": "workdir", "path": "/data"},
    ],
    "start_cmd": "sleep 1000",
    "runtime_config": {"default_workdir": "/data", "default_envs": {"MODE": "prod"}},
    "build_context": {"files": [
        {"path": "builder-context/step-1/src-0", "entry_type": "dir", "mode": "0755"},
        {"path": "builder-context/step-1/src-0/app.conf", "entry_type": "file", "mode": "0644", "blob_id": blob}]},
}
plan = api("POST", "/v1/templates/plan", json=decl).json()
assert "RUN mkdir -p /data && chmod 0700 /data" in plan["build_plan"]["dockerfile"], plan["build_plan"]["dockerfile"]
d = api("POST", "/v1/templates/builds", json=decl)
assert d.status_code == 202, d.text
db = wait(d.json()["build_id"])
assert db["status"] == "ready", db
rd = db["runtime_defaults"]
assert rd["default_workdir"] == "/data" and rd["start_cmd"] == "sleep 1000" and "MODE" in rd["default_env_keys"], rd
print("DECL_BUILD", db["build_id"])
print("DOCKERFILE OK")
