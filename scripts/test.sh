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
# Supply chain (deny.toml): licences, sources (crates.io only), duplicate
# versions; no unused dependency. RustSec advisories only where their
# database (a git repository on github.com) can be fetched: README.md,
# "Supply chain", says what unblocks it here.
cargo deny check licenses sources bans
if timeout 120 cargo deny fetch db >/dev/null 2>&1; then
  cargo deny check advisories
elif compgen -G "$HOME/.cargo/advisory-dbs/advisory-db-*/crates" >/dev/null; then
  echo "note: the RustSec database cannot be fetched; checking against the copy in ~/.cargo/advisory-dbs" >&2
  cargo deny --offline check advisories
else
  echo "note: cargo deny advisories not checked: the RustSec database (github.com/RustSec/advisory-db) cannot be fetched from here" >&2
fi
cargo machete
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
