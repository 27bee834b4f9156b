#!/usr/bin/env bash
# CI's fuzz step: builds every cargo-fuzz target in fuzz/ once, then runs
# each briefly, seeds first, failing on any crash, any input over the
# time or memory limit. Long campaigns: fuzz/README.md.
#   FUZZ_SECONDS      seconds per target (default 8)
#   FUZZ_TARGET_DIR   build directory (default fuzz/target/smoke)
#   FUZZ_JOBS         targets run at once (default: the cores)
#   CARGO_FUZZ_ROOT   install cargo-fuzz there instead of ~/.cargo
#   --install-only    just make sure cargo-fuzz is installed (deps.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO_FUZZ_VERSION=0.13.2
SECS=${FUZZ_SECONDS:-8}
# The machine's one stable toolchain runs cargo-fuzz's nightly flags.
export RUSTC_BOOTSTRAP=1 CARGO_INCREMENTAL=0
if [ -n "${CARGO_FUZZ_ROOT:-}" ]; then export PATH="$CARGO_FUZZ_ROOT/bin:$PATH"; fi

if [ "$(cargo fuzz --version 2>/dev/null | awk '{print $2}')" != "$CARGO_FUZZ_VERSION" ]; then
  cargo install -q --locked --version "$CARGO_FUZZ_VERSION" \
    ${CARGO_FUZZ_ROOT:+--root "$CARGO_FUZZ_ROOT"} cargo-fuzz
fi
[ "${1:-}" = --install-only ] && exit 0

cd fuzz
cargo fmt --check
# Built for CI's budget, not for campaigns (README.md): no sanitizer
# (AddressSanitizer adds nothing to safe Rust's checks and doubles build and
# run time), 16 codegen units and opt-level 1 (a cold build in a few
# minutes on 2 cores); debug assertions and overflow checks stay on. Its own
# directory, so it never rebuilds a campaign's binaries.
dir=${FUZZ_TARGET_DIR:-target/smoke}
CARGO_PROFILE_RELEASE_OPT_LEVEL=1 cargo fuzz build -s none --codegen-units 16 --target-dir "$dir"
bin=$dir/x86_64-unknown-linux-gnu/release
# Two targets at a time (one per core): libFuzzer runs one thread each.
par=${FUZZ_JOBS:-$(nproc)}
run() { # run TARGET: its verdict line in artifacts/TARGET/verdict
  local t=$1 dict=() log="artifacts/$1/smoke.log"
  mkdir -p "corpus/$t" "artifacts/$t"
  cp -n "seeds/$t"/* "corpus/$t"/ 2>/dev/null || true
  [ -f "dicts/$t.dict" ] && dict=(-dict="dicts/$t.dict")
  if "$bin/$t" "corpus/$t" "${dict[@]}" -max_total_time="$SECS" -timeout=10 \
      -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="artifacts/$t/" \
      >"$log" 2>&1; then
    printf '%-18s ok   %s runs\n' "$t" "$(awk '/^stat::number_of_executed_units/ {print $2}' "$log")" \
      >"artifacts/$t/verdict"
  else
    { printf '%-18s FAIL (see fuzz/%s)\n' "$t" "$log"
      grep -E 'panicked|ERROR|SUMMARY|Test unit written' "$log" | head -5 || true; } >"artifacts/$t/verdict"
  fi
}
targets=$(cargo fuzz list)
for t in $targets; do
  while (($(jobs -rp | wc -l) >= par)); do wait -n || true; done
  rm -f "artifacts/$t/verdict"
  run "$t" &
done
wait
failed=()
for t in $targets; do
  cat "artifacts/$t/verdict"
  grep -q ' ok ' "artifacts/$t/verdict" || failed+=("$t")
done
if ((${#failed[@]})); then
  echo "fuzz-smoke: crashes in: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz-smoke: every target ran ${SECS}s without a crash"
