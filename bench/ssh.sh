#!/usr/bin/env bash
# Benchmark: SSH session set-up (issue 17). Starts a server
# (bench/server.sh; its SSH endpoint on a free port), then bench/ssh.py:
# one machine of the base template, then NS_N times (default 20)
# create_ssh_access + the first `ssh … true` with the command the SDK
# returns; p50/p99 of each part and of both.
#
# Usage: bench/ssh.sh        (env: NS_N)
set -euo pipefail
command -v ssh >/dev/null && command -v ssh-keygen >/dev/null \
  || { echo "error: ssh and ssh-keygen are needed (openssh-client; bash scripts/deps.sh)" >&2; exit 1; }
# shellcheck source=bench/server.sh
source "$(dirname "$0")/server.sh"
"$PY" bench/ssh.py
