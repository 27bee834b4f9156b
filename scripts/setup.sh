#!/usr/bin/env bash
# One command from a fresh machine to a working nullspace: installs the
# Debian packages, builds, and runs the main job end to end on the embedded
# demo image: write it as an OCI layout, push it to a local registry, then
# inspect, pull and import it into an ext4 template rootfs and verify that
# rootfs with e2fsck.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh

cargo build --release --workspace --bins
# The guest's PID 1 is a static binary of its own; `nullspace serve` finds it
# in guest/ beside the nullspace binary and turns the build VM on.
RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --release -p nullspace-init \
  --target x86_64-unknown-linux-gnu --target-dir target/guest
mkdir -p target/release/guest
install -m 0755 target/guest/x86_64-unknown-linux-gnu/release/nullspace-init target/release/guest/nullspace-init
NS=target/release/nullspace
OUT=${NULLSPACE_DEMO_DIR:-target/demo}
rm -rf "$OUT" && mkdir -p "$OUT"

target/release/ns-demo-image "$OUT/layout" demo

# A registry on loopback, stopped when this script exits.
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$OUT/registry.yml" <<YML
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $PWD/$OUT/registry}}
http: {addr: 127.0.0.1:$PORT, secret: demo}
YML
docker-registry serve "$OUT/registry.yml" 2>"$OUT/registry.log" &
REG_PID=$!
trap 'kill $REG_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$PORT/v2/" >/dev/null 2>&1 && break; sleep 0.1; done
skopeo copy -q --dest-tls-verify=false "oci:$OUT/layout:demo" "docker://127.0.0.1:$PORT/demo/busybox:latest"

IMG=127.0.0.1:$PORT/demo/busybox:latest
echo "== nullspace image inspect $IMG"
$NS image inspect "$IMG"
echo "== nullspace image pull $IMG"
$NS image pull "$IMG" --output "$OUT/pulled"
skopeo inspect "oci:$OUT/pulled:latest" >/dev/null && echo "skopeo accepts the pulled layout"
echo "== nullspace image import $IMG"
$NS image import "$IMG" --output "$OUT/template" --cache-dir "$OUT/cache"
e2fsck -fn "$OUT/template/rootfs.ext4" >/dev/null && echo "e2fsck: $OUT/template/rootfs.ext4 is clean"
echo "== $OUT/template/template.json (runtime)"
python3 -c 'import json,sys; t=json.load(open(sys.argv[1])); print(json.dumps(t["runtime"], indent=2))' "$OUT/template/template.json"

echo "== the template build server: a build VM snapshot, then a machine restored from it"
DATA=$OUT/server
KEY=$($NS keys create --data-dir "$DATA" --name demo --namespace demo)
SPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# No VM flags: the build VM is on by default wherever it can run.
$NS serve --data-dir "$DATA" --listen "127.0.0.1:$SPORT" 2>"$OUT/server.log" &
SRV_PID=$!
trap 'kill $REG_PID $SRV_PID 2>/dev/null || true' EXIT
for _ in $(seq 600); do curl -fsS "http://127.0.0.1:$SPORT/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
grep -q "build VM ready" "$OUT/server.log" || { cat "$OUT/server.log" >&2; echo "error: the server started without its build VM" >&2; exit 1; }
# The published Python SDK, unchanged, builds the template: import, boot,
# start command (busybox httpd), readiness from the image's HEALTHCHECK, snapshot.
NULLSPACE_API_URL="http://127.0.0.1:$SPORT" NULLSPACE_API_KEY="$KEY" target/sdk-venv/bin/python - "$IMG" <<'PY'
import sys
from nullspace import Template
b = Template.build(Template.from_image(sys.argv[1]), name="demo", on_log_entry=lambda e: print("  ", e))
print("template", b.canonical_ref, b.status.value)
PY
export NULLSPACE_API_URL="http://127.0.0.1:$SPORT" NULLSPACE_API_KEY="$KEY"
MID=$($NS machine create demo)
echo "machine $MID restored from the snapshot; the start command is already serving:"
$NS machine exec "$MID" -- wget -q -O - http://127.0.0.1:8080/
$NS machine kill "$MID"
echo "done: see README.md for the commands"
