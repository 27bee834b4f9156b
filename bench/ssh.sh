#!/usr/bin/env bash
# Benchmark: SSH session set-up (issue 17). The server of bench/machines.sh
# (build VM, base template), driven by bench/ssh.py: one machine, then
# NS_N times (default 20) create_ssh_access + the first `ssh … true` with
# the command the SDK returns; p50/p99 of each part and of both.
#
# Usage: bench/ssh.sh        (env: NS_N)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v ssh >/dev/null && command -v ssh-keygen >/dev/null \
  || { echo "error: ssh and ssh-keygen are needed (openssh-client; bash scripts/deps.sh)" >&2; exit 1; }
NS_DRIVER=bench/ssh.py exec bench/machines.sh
