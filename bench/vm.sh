#!/usr/bin/env bash
# Benchmark: the build VM (issue 6). For a small template (the busybox demo
# image) and a Debian-based one (the image bench/import.sh caches: bookworm
# minbase + python3 + a large site-packages tree), prints
#   boot to ready    QEMU start -> agent up (boot) + start command -> readiness
#   snapshot size    memory.bin and disk.ext4 of the snapshot
#   restore to exec  new QEMU -incoming + overlay -> first `echo hi` answered
#
# Usage: bench/vm.sh [--reps N] [--debian-layout DIR]
# The Debian row needs the cached OCI layout (default
# /var/tmp/nullspace-bench/oci-app, built by `sudo bash bench/import.sh
# --build-only`); without it the row is reported as SKIPPED.
# Runs a debug build of the example (VM time dominates, the host side is
# not the bottleneck). CPU-heavy under TCG: do not run alongside other VMs.

set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run -q -p nullspace-vm --example vm_bench -- "$@"
