#!/usr/bin/env bash
# Fuzz every target for a bounded time, corpus seeded from the team's samples.
#
#   fuzz/run.sh                      5 s per target (what .ci/run does)
#   fuzz/run.sh --seconds 3600       an hour per target
#   fuzz/run.sh --seconds 600 frame_scanner handshake
#
# Needs cargo-fuzz (installed here if missing) and a nightly toolchain (`cargo +nightly`;
# installed with rustup if missing). Where no nightly can be had, the stable toolchain is
# used in nightly mode (RUSTC_BOOTSTRAP=1): it ships the same sanitizer runtimes. A crash
# leaves its input in fuzz/artifacts/<target>/ and fails the run.
set -euo pipefail
cd "$(dirname "$0")"

SECONDS_PER_TARGET=5
TARGETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) SECONDS_PER_TARGET="$2"; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) TARGETS+=("$1") ;;
  esac
  shift
done
if [ ${#TARGETS[@]} -eq 0 ]; then
  TARGETS=(frame_scanner classifier handshake napcat_config lifeguard_config http)
fi

TOOLCHAIN=(+nightly)
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz: no nightly toolchain; trying rustup toolchain install nightly" >&2
  if ! rustup toolchain install nightly --profile minimal >&2; then
    echo "fuzz: WARNING: nightly cannot be installed here; using the stable toolchain with RUSTC_BOOTSTRAP=1" >&2
    TOOLCHAIN=(+stable)
    export RUSTC_BOOTSTRAP=1
  fi
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
cargo fuzz --version

python3 seed.py
# One build for every target, then each runs from its seeds for the time given.
cargo "${TOOLCHAIN[@]}" fuzz build --release
for t in "${TARGETS[@]}"; do
  echo "--- fuzz $t (${SECONDS_PER_TARGET}s)"
  log="$(mktemp)"
  status=0
  cargo "${TOOLCHAIN[@]}" fuzz run "$t" --release -- \
    -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    >"$log" 2>&1 || status=$?
  grep -E "^(#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|stat::new_units_added|==[0-9]+==|SUMMARY)|panicked|Test unit written" "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -40 "$log" >&2
    echo "fuzz: $t failed (exit $status); a crash input, if any, is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  rm -f "$log"
done
echo "fuzz: ${#TARGETS[@]} targets, ${SECONDS_PER_TARGET}s each, no crash"
