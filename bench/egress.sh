#!/usr/bin/env bash
# Benchmark: machine networking with egress policies (issue 17) against
# the previous design, side by side on one host. Runs bench/machines.py
# twice, each on its own server (bench/server.sh): machines in a network
# namespace each (the default, as root) and machines on QEMU's user
# network (`--no-machine-namespaces`): create + first exec p50/p99 one at
# a time and NS_PAR at once, and the PSS of idle machines. Then
# bench/egress.py: update_egress latency (namespaces) and the kernel
# memory (Slab in /proc/meminfo) per idle machine in both.
#
# Usage: sudo bench/egress.sh   (env: NS_N default 20, NS_PAR 8, NS_ROUNDS 1)
# CPU-heavy under TCG: do not run alongside other VMs.
set -euo pipefail
cd "$(dirname "$0")/.."
export NS_N=${NS_N:-20} NS_PAR=${NS_PAR:-8} NS_ROUNDS=${NS_ROUNDS:-1}
for mode in namespaces user; do
  echo "## machines on ${mode}"
  (
    [ "$mode" = user ] && export NS_SERVE_ARGS="--no-machine-namespaces"
    # shellcheck source=bench/server.sh
    source bench/server.sh
    grep -o 'machine networking: [^"]*' "$NS_DATA/../server.log" | head -1 || true
    "$PY" bench/machines.py
    NS_MODE=$mode "$PY" bench/egress.py
  )
done
