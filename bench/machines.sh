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
# shellcheck source=bench/server.sh
source "$(dirname "$0")/server.sh"
"$PY" bench/machines.py
