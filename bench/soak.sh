#!/usr/bin/env bash
# Soak (issue 22 item 3): NS_SOAK_SECS (default 3600) of mixed load at a
# bounded rate through the published SDK (1.0.3) against one server with the
# build VM on a fresh data directory: template builds (the embedded demo
# image from a loopback docker-registry + a run_cmd, one every
# NS_SOAK_BUILD_SECS), creates + commands.run, files write/read/list, pause
# and resume, fork, kill; at most NS_SOAK_LIVE running machines, one
# operation every NS_SOAK_PACE_MS. bench/soak.py samples the server (RSS,
# PSS, fds, children, QEMUs, data directory, store rows) every
# NS_SOAK_SAMPLE_SECS into a CSV, and at quiet points (every machine killed,
# the soak templates deleted, a garbage collection passed) compares the
# series against stated bounds. Exit status non-zero on any unexpected
# operation error or a series outside its bound.
#
# Usage: bench/soak.sh   (env: NS_SOAK_SECS NS_SOAK_PACE_MS NS_SOAK_LIVE
#                         NS_SOAK_BUILD_SECS NS_SOAK_SAMPLE_SECS NS_SOAK_GC_SECS
#                         NS_SOAK_QUIETS NS_SOAK_OUT)
# The CSV and the summary go to NS_SOAK_OUT (default /var/tmp/soak-DATE).
# Everything it starts (server, VMs, registry, driver) ends on exit, also on
# Ctrl-C or SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."
GC_SECS=${NS_SOAK_GC_SECS:-30}
# The collector runs often so that deleted templates and killed machines
# leave the data directory within a quiet point's wait.
NS_SERVE_ARGS="--gc-interval-secs $GC_SECS ${NS_SERVE_ARGS:-}"
OUT=${NS_SOAK_OUT:-/var/tmp/soak-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
cargo build -q -p nullspace-testkit --bin ns-demo-image
# shellcheck source=bench/server.sh
source bench/server.sh
SERVER_LOG=$WORK/server.log

# The demo image, served from a docker-registry on loopback (storage in WORK).
target/debug/ns-demo-image "$WORK/demo" demo >/dev/null
# shellcheck source=bench/registry.sh
source bench/registry.sh
REG=
DRV=
soak_cleanup() {
  # The driver first (it would otherwise keep creating), then server.sh's
  # cleanup (server, this run's QEMUs, WORK), then the registry.
  if [ -n "$DRV" ]; then kill "$DRV" 2>/dev/null || true; wait "$DRV" 2>/dev/null || true; fi
  cp "$SERVER_LOG" "$OUT/server.log" 2>/dev/null || true
  cleanup
  kill "$REG" 2>/dev/null || true
  wait "$REG" 2>/dev/null || true
}
trap soak_cleanup EXIT
# An EXIT trap alone does not run on a signal: turn signals into an exit.
trap 'exit 130' INT
trap 'exit 143' TERM HUP
start_registry "$WORK"
skopeo copy -q --dest-tls-verify=false "oci:$WORK/demo:demo" "docker://127.0.0.1:$RPORT/soak/demo:1"

echo "soak: ${NS_SOAK_SECS:-3600} s from $(date -u +%FT%TZ), server pid $SRV, data $NS_DATA, output $OUT"
# In the background and waited for: a signal reaches this shell's trap at
# once instead of after the driver's hour.
NS_IMAGE="127.0.0.1:$RPORT/soak/demo:1" NS_SOAK_OUT="$OUT" \
  NS_SOAK_GC_SECS="$GC_SECS" "$PY" -u bench/soak.py &
DRV=$!
rc=0
wait "$DRV" || rc=$?
DRV=
if [ "$rc" -ne 0 ]; then
  echo "soak: driver exit status $rc; server log tail:" >&2
  tail -20 "$SERVER_LOG" >&2 || true
fi
exit "$rc"
