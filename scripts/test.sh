#!/usr/bin/env bash
# The whole test suite. Installs what the tests need first (CI starts from a
# fresh machine); every server a test needs is started by the test itself.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo test --workspace --all-targets 2>&1
