#!/usr/bin/env bash
# Instructions lifeguard spends per API request and per relayed event, from callgrind, which
# repeats on a noisy machine where times do not (BENCHMARKS.md, "API request path").
#
#   benches/callgrind.sh [LIFEGUARD_BINARY ...]     default: this tree's release build
#
# For each binary: two runs of each workload through lifeguard under valgrind (64 × 110 and
# 64 × 440 get_status calls; 64 × 300 and 64 × 1,200 message events), and the difference
# divided by the extra work, so that start-up, warm-up and shutdown cancel out. Loopback
# only; every run is bounded by the load generator's --timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "callgrind.sh: valgrind is not installed" >&2; exit 1; }

BUILD_JSON=$(cargo build --release --bin lifeguard --bench relay --message-format=json)
RELAY=$(printf '%s\n' "$BUILD_JSON" | grep -o '"executable":"[^"]*/relay-[^"]*"' | tail -1 | cut -d'"' -f4)
OWN=$(printf '%s\n' "$BUILD_JSON" | grep -o '"executable":"[^"]*/lifeguard"' | tail -1 | cut -d'"' -f4)
[ $# -gt 0 ] || set -- "$OWN"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
BASE_PORT=$((21000 + ($$ % 40) * 50))

# instructions BINARY SCENARIO CALLS64 EVENTS64 -> total Ir of lifeguard's run
instructions() {
  local bin=$1 scen=$2 calls=$3 events=$4 sim lg
  "$RELAY" sim --listen 127.0.0.1:$BASE_PORT --control 127.0.0.1:$((BASE_PORT + 1)) >/dev/null 2>&1 &
  sim=$!
  sleep 0.5
  LIFEGUARD_MAX_CONNECTIONS_PER_IP=20000 valgrind --tool=callgrind --callgrind-out-file="$WORK/cg" \
    "$bin" --listen 127.0.0.1:$((BASE_PORT + 10)) --upstream ws://127.0.0.1:$BASE_PORT \
    --admin-listen 127.0.0.1:$((BASE_PORT + 11)) --probe-interval 1s >/dev/null 2>"$WORK/vg" &
  lg=$!
  for _ in $(seq 1 150); do
    curl -sf http://127.0.0.1:$((BASE_PORT + 11))/ready >/dev/null && break
    sleep 0.2
  done
  "$RELAY" run --target lifeguard --url ws://127.0.0.1:$((BASE_PORT + 10)) \
    --control 127.0.0.1:$((BASE_PORT + 1)) --scenarios "$scen" --calls-1 10 --calls-64 "$calls" \
    --events-1 10 --events-64 "$events" --timeout 300 >/dev/null 2>"$WORK/run" \
    || { echo "callgrind.sh: load generator failed:" >&2; tail -5 "$WORK/run" >&2; }
  kill -TERM $lg; wait $lg || true
  kill $sim; wait $sim 2>/dev/null || true
  grep '^summary:' "$WORK/cg" | awk '{print $2}'
}

for bin in "$@"; do
  r1=$(instructions "$bin" rtt 110 10)
  r2=$(instructions "$bin" rtt 440 10)
  t1=$(instructions "$bin" tput 10 300)
  t2=$(instructions "$bin" tput 10 1200)
  awk -v b="$bin" -v r1="$r1" -v r2="$r2" -v t1="$t1" -v t2="$t2" 'BEGIN {
    printf "%s: %.0f instructions per API request, %.0f per relayed event\n", b, (r2 - r1) / (64 * 330), (t2 - t1) / (64 * 900)
  }'
done
