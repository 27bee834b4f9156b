#!/usr/bin/env bash
# Benchmark (issue 12): machine restore modes side by side in one run,
# through the published SDK (1.0.3) against a real server, for the Debian
# bench template (bookworm + python3 + site-packages, start command
# `python3 -m http.server 8080`, 2 vCPU, 512 MiB):
#
#   streamed  the earlier design: the build VM's RAM in the snapshot's
#             migration stream, read by every restore (--build-vm-memory
#             streamed), no pool
#   mapped    RAM file mapped copy-on-write by every restore, no pool
#             (--machine-pool-size 0)
#   pool      mapped + prepared VMs (--machine-pool-size $NS_POOL, default 2;
#             a mode poolN uses N)
#   previous  the pool before issue 18 (a fixed size, refills only after
#             300 ms without creates): the server binary NS_PREV_BIN, built
#             from an earlier commit (`git worktree add /tmp/prev b70f911`,
#             `cargo build -p nullspace --bins` there), default flags
#   warmN     pool + a warm pool of N ready machines made through the SDK
#             (TemplateWarmPool.create, min_ready = max_ready = N) first
#   cold boot the same template's build VM: QEMU start to the agent plus
#             start command to readiness (from each mode's snapshot.json)
#
# Per mode: create + first commands.run p50/p99 over NS_N sequential creates
# (default 50, one every NS_PACE_MS = 1000 ms at most), NS_ROUNDS rounds of
# NS_PAR concurrent creates (3 x 10), PSS (smaps_rollup) of 1, 8 and 32 idle
# machines (NS_PSS), snapshot pause and size. Prints ratios.
#
# Usage: bench/restore.sh   (env: NS_N NS_PACE_MS NS_PAR NS_ROUNDS NS_PSS NS_POOL
#                            NS_MODES="streamed mapped pool pool10" NS_DEBIAN_LAYOUT
#                            NS_PREV_BIN)
# Issue 18's run: NS_MODES="previous pool warm20" NS_N=20 NS_PACE_MS=0
# The Debian layout is the one bench/import.sh caches (`sudo bash bench/import.sh
# --build-only`). Debug build (VM time dominates). CPU-heavy under TCG.
set -euo pipefail
cd "$(dirname "$0")/.."
LAYOUT=${NS_DEBIAN_LAYOUT:-/var/tmp/nullspace-bench/oci-app}
[ -f "$LAYOUT/index.json" ] || { echo "error: $LAYOUT missing (sudo bash bench/import.sh --build-only)" >&2; exit 1; }
MODES=${NS_MODES:-streamed mapped pool pool10}
POOL=${NS_POOL:-2}
CARGO_INCREMENTAL=0 cargo build -q -p nullspace --bins
RUSTFLAGS="-C target-feature=+crt-static" CARGO_INCREMENTAL=0 cargo build -q --release -p nullspace-init \
  --target x86_64-unknown-linux-gnu --target-dir target/guest
INIT=target/guest/x86_64-unknown-linux-gnu/release/nullspace-init
PY=${NULLSPACE_SDK1_PYTHON:-target/sdk1-venv/bin/python}
[ -x "$PY" ] || { echo "error: $PY missing (bash scripts/deps.sh makes the SDK 1.0.3 venv)" >&2; exit 1; }
WORK=$(mktemp -d /var/tmp/ns-bench-restore.XXXXXX)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The image, served from a docker-registry on loopback.
# shellcheck source=bench/registry.sh
source bench/registry.sh
REG=
SRV=
stop_server() {
  [ -n "$SRV" ] || return 0
  kill -TERM "$SRV" 2>/dev/null || true
  wait "$SRV" 2>/dev/null || true
  SRV=
}
kill_machines() {
  # Machines outlive their server: end this run's (their pidfiles; only a
  # QEMU whose command line names this run's directory).
  for p in "$WORK"/*/machines/*/qemu.pid; do
    [ -f "$p" ] || continue
    pid=$(cat "$p")
    tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF "$WORK" && kill -9 "$pid" 2>/dev/null || true
  done
}
cleanup() {
  stop_server
  kill_machines
  kill "$REG" 2>/dev/null || true
  wait "$REG" 2>/dev/null || true
  [ -n "${NS_KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
start_registry "$WORK"
skopeo copy -q --dest-tls-verify=false "oci:$LAYOUT:app" "docker://127.0.0.1:$RPORT/bench/deb:1"
IMAGE="127.0.0.1:$RPORT/bench/deb:1"

echo "nullspace $(git rev-parse --short HEAD), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(qemu-system-x86_64 --version | head -1)"
for mode in $MODES; do
  size=0 skip_pss=0 warm=0 bin=target/debug/nullspace
  case $mode in
    previous)
      data=$WORK/previous; size=2; skip_pss=1; flags=()
      bin=${NS_PREV_BIN:?NS_PREV_BIN: the earlier server binary}
      ;;
    warm[0-9]*) data=$WORK/warm; warm=${mode#warm}; size=$warm; skip_pss=1; flags=() ;;
    streamed) data=$WORK/streamed; flags=(--build-vm-memory streamed --machine-pool-size 0) ;;
    mapped) data=$WORK/mapped; flags=(--machine-pool-size 0) ;;
    pool) data=$WORK/mapped; size=$POOL; flags=(--machine-pool-size "$POOL") ;;
    # Another pool size: the create figures only.
    pool[0-9]*) data=$WORK/mapped; size=${mode#pool}; skip_pss=1; flags=(--machine-pool-size "$size") ;;
    *) echo "unknown mode $mode" >&2; exit 1 ;;
  esac
  mkdir -p "$data"
  port=$(free_port)
  log=$WORK/server-$mode.log
  "$bin" serve --data-dir "$data" --listen "127.0.0.1:$port" --build-vm \
    --init-bin "$INIT" --no-base-template "${flags[@]}" 2>"$log" &
  SRV=$!
  for _ in $(seq 600); do curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
  key=$(target/debug/nullspace keys create --data-dir "$data" --name bench --namespace bench)
  NULLSPACE_API_URL="http://127.0.0.1:$port" NULLSPACE_API_KEY="$key" NS_DATA="$data" \
    NS_IMAGE="$IMAGE" NS_MODE="$mode" NS_OUT="$WORK/$mode.json" NS_SERVER_LOG="$log" \
    NS_POOL_SIZE="$size" NS_SKIP_PSS="$skip_pss" NS_WARM="$warm" \
    "$PY" bench/restore.py || { tail -30 "$log" >&2; exit 1; }
  stop_server
  kill_machines
done
python3 bench/restore_report.py "$WORK" $MODES
