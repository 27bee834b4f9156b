#!/usr/bin/env bash
# Benchmark: machines through the published SDK (issue 11). Starts a
# nullspace server with the build VM on a fresh data directory (it builds
# the base template from the embedded demo image), then measures with SDK
# 1.0.3: Machine.create + the first commands.run, p50 and p99 over NS_N
# creates one at a time (default 30) and NS_ROUNDS rounds of NS_PAR at once
# (default 3 x 10), printed beside the base template's boot-to-ready time
# from the same run, and the PSS of NS_PAR idle machines.
#
# Usage: bench/machines.sh        (env: NS_N, NS_PAR, NS_ROUNDS)
# Debug build: VM time dominates, the host side is not the bottleneck.
# CPU-heavy under TCG: do not run alongside other VMs.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p nullspace --bins
RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --release -p nullspace-init \
  --target x86_64-unknown-linux-gnu --target-dir target/guest
INIT=target/guest/x86_64-unknown-linux-gnu/release/nullspace-init
PY=${NULLSPACE_SDK1_PYTHON:-target/sdk1-venv/bin/python}
[ -x "$PY" ] || { echo "error: $PY missing (bash scripts/deps.sh makes the SDK 1.0.3 venv)" >&2; exit 1; }
WORK=$(mktemp -d /var/tmp/ns-bench-machines.XXXXXX)
DATA=$WORK/data
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
target/debug/nullspace serve --data-dir "$DATA" --listen "127.0.0.1:$PORT" --build-vm \
  --init-bin "$INIT" --ssh-listen 127.0.0.1:0 2>"$WORK/server.log" &
SRV=$!
cleanup() {
  kill "$SRV" 2>/dev/null || true
  wait "$SRV" 2>/dev/null || true
  # Machines outlive their server: end this run's (their pidfiles).
  for p in "$DATA"/machines/*/qemu.pid; do
    [ -f "$p" ] || continue
    pid=$(cat "$p")
    # Only a QEMU whose command line names this run's data directory.
    tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF "$DATA" && kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
for _ in $(seq 600); do curl -fsS "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
KEY=$(target/debug/nullspace keys create --data-dir "$DATA" --name bench --namespace bench)
echo "nullspace $(git rev-parse --short HEAD), $(nproc) cores, $(grep -c ^processor /proc/cpuinfo) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
# NS_DRIVER: another driver against the same server (bench/ssh.sh).
NULLSPACE_API_URL="http://127.0.0.1:$PORT" NULLSPACE_API_KEY="$KEY" NS_DATA="$DATA" "$PY" "${NS_DRIVER:-bench/machines.py}"
