# Sourced by the SDK benchmarks (machines.sh, ports.sh, ssh.sh): builds the
# server and the guest init, starts `nullspace serve` with the build VM on
# a fresh data directory under /var/tmp (it builds the base template from
# the embedded demo image), waits for it, makes an API key and exports
# NULLSPACE_API_URL, NULLSPACE_API_KEY, NS_DATA and PY (SDK 1.0.3's python).
# Everything it started ends on exit. Extra `serve` flags: NS_SERVE_ARGS.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build -q -p nullspace --bins
RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --release -p nullspace-init \
  --target x86_64-unknown-linux-gnu --target-dir target/guest
INIT=target/guest/x86_64-unknown-linux-gnu/release/nullspace-init
PY=${NULLSPACE_SDK1_PYTHON:-target/sdk1-venv/bin/python}
[ -x "$PY" ] || { echo "error: $PY missing (bash scripts/deps.sh makes the SDK 1.0.3 venv)" >&2; exit 1; }
WORK=$(mktemp -d /var/tmp/ns-bench.XXXXXX)
NS_DATA=$WORK/data
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# shellcheck disable=SC2086
target/debug/nullspace serve --data-dir "$NS_DATA" --listen "127.0.0.1:$PORT" --build-vm \
  --init-bin "$INIT" --ssh-listen 127.0.0.1:0 ${NS_SERVE_ARGS:-} 2>"$WORK/server.log" &
SRV=$!
cleanup() {
  kill "$SRV" 2>/dev/null || true
  wait "$SRV" 2>/dev/null || true
  # Machines outlive their server: end this run's (their pidfiles).
  for p in "$NS_DATA"/machines/*/qemu.pid; do
    [ -f "$p" ] || continue
    pid=$(cat "$p")
    # Only a QEMU whose command line names this run's data directory.
    tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF "$NS_DATA" && kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
for _ in $(seq 600); do curl -fsS "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
NULLSPACE_API_KEY=$(target/debug/nullspace keys create --data-dir "$NS_DATA" --name bench --namespace bench)
NULLSPACE_API_URL="http://127.0.0.1:$PORT"
export NULLSPACE_API_URL NULLSPACE_API_KEY NS_DATA SRV
echo "nullspace $(git rev-parse --short HEAD), $(nproc) cores, $(grep -c ^processor /proc/cpuinfo) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
