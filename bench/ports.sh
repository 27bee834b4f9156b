#!/usr/bin/env bash
# Benchmark: ports through the preview proxy (issue 17). Starts a server
# (bench/server.sh), then with SDK 1.0.3 in one machine of the base
# template: HTTP latency of a small page through the proxy against the same
# request made inside the guest (p50/p99 over NS_N, default 50), and a
# NS_MIB (default 100) MiB download through the proxy against inside the
# guest and against the file route (`files.read(..., format="bytes")`), with
# the server's peak PSS while it streams.
#
# Usage: bench/ports.sh        (env: NS_N, NS_MIB)
# CPU-heavy under TCG: do not run alongside other VMs.
set -euo pipefail
# shellcheck source=bench/server.sh
source "$(dirname "$0")/server.sh"
"$PY" bench/ports.py
