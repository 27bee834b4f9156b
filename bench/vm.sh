#!/usr/bin/env bash
# Benchmark: the build VM and snapshots (issues 6, 9, 12). For a small
# template (the busybox demo image) and a Debian-based one (the image
# bench/import.sh caches: bookworm minbase + python3 + a large site-packages
# tree), side by side in one run for memory mode `streamed` (the earlier
# design: RAM in the migration stream) and `mapped` (RAM file mapped
# copy-on-write by restores), prints
#   boot to ready    QEMU start -> agent up (boot) + start command -> readiness
#   snapshot         VM paused until its state is written; commit (exit,
#                    fsync, sha256); stream and memory sizes on disk
#   restore to exec  new QEMU + overlay -> first `echo hi` answered (median)
#   PSS              /proc/PID/smaps_rollup Pss summed over N idle restored
#                    VMs (N = 1, 8 by default)
#   snapshot of a restored VM (after it wrote 16 MiB to guest memory):
#                    pause, commit, size, pages changed, restore of it
#
# Usage: bench/vm.sh [--reps N] [--pss 1,8,32] [--only busybox|debian] [--debian-layout DIR]
# The Debian row needs the cached OCI layout (default
# /var/tmp/nullspace-bench/oci-app, built by `sudo bash bench/import.sh
# --build-only`); without it the row is reported as SKIPPED.
# Runs a debug build of the example (VM time dominates, the host side is
# not the bottleneck). CPU-heavy under TCG: do not run alongside other VMs.

set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run -q -p nullspace-vm --example vm_bench -- "$@"
