#!/usr/bin/env bash
# The whole test suite. Installs what the tests need first (CI starts from a
# fresh machine); every server a test needs is started by the test itself.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
# The Debian-based VM template test needs a realistic Debian image
# (debootstrap + python3): build it once (about a minute) and require it.
if [ ! -f /var/tmp/nullspace-bench/oci-app/index.json ]; then
  bash bench/import.sh --build-only
fi
export NULLSPACE_REQUIRE_DEBIAN_VM=1
# Style and lints are part of the suite: CI fails on either.
cargo fmt --all --check
cargo clippy -q --workspace --all-targets -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# Every fuzz target briefly, seeds first (fuzz/README.md): a crash fails CI.
bash scripts/fuzz-smoke.sh
fuzz_status=$?
set -e
# cargo prints one result line per test target, the last often for a target
# with no tests; close with the totals.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
if [ "$status" -eq 0 ]; then status=$fuzz_status; fi
exit "$status"
