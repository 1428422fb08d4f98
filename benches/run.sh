#!/usr/bin/env bash
# Benchmarks: lifeguard side by side with a direct connection, nginx and HAProxy.
#
#   benches/run.sh                 full run: 5 interleaved repetitions of every target
#   benches/run.sh --quick         smoke run (a few seconds; debug build; 1 repetition;
#                                  nginx/haproxy only if already installed)
#   options: --reps N  --targets "direct lifeguard nginx haproxy floor"  --no-install
#            --release (quick run with release builds)  --out DIR (default target/bench)
#
# `floor` is a reference, not a competitor: the relay bench binary copying bytes both ways
# (tokio copy_bidirectional, 64 KiB buffers), the cost of one user-space hop and nothing else.
# Everything listens on 127.0.0.1 only. One simulator process (lifeguard::sim, driven by the
# `relay` bench binary) is the upstream of every target. Results: DIR/results.jsonl and the
# table in DIR/table.md (also printed).
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0
REPS=""
TARGETS="direct lifeguard nginx haproxy floor"
INSTALL=1
RELEASE=""
OUT=target/bench
BASE_PORT=${BENCH_BASE_PORT:-19100}
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --reps) REPS="$2"; shift ;;
    --targets) TARGETS="$2"; shift ;;
    --no-install) INSTALL=0 ;;
    --release) RELEASE=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 64 ;;
  esac
  shift
done
if [ "$QUICK" = 1 ]; then
  REPS=${REPS:-1}
  INSTALL=0
  RELEASE=${RELEASE:-0}
  PROBE=250ms
  RUN_TIMEOUT=60
else
  REPS=${REPS:-5}
  RELEASE=${RELEASE:-1}
  PROBE=1s
  RUN_TIMEOUT=300
fi

SIM_PORT=$BASE_PORT
CTL_PORT=$((BASE_PORT + 1))
LG_PORT=$((BASE_PORT + 10))
LG_ADMIN=$((BASE_PORT + 11))
NGINX_PORT=$((BASE_PORT + 20))
HAP_PORT=$((BASE_PORT + 30))
FLOOR_PORT=$((BASE_PORT + 40))

# 9,000 sessions: the load generator holds 9,000 fds, the simulator 9,000, a proxy 18,000.
# They all come from 127.0.0.1, so lifeguard runs with --max-connections-per-ip 20000 (the
# default, half the cap, is meant for real deployments).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 19000 ] && [ "$QUICK" = 0 ]; then
  echo "run.sh: warning: fd limit $(ulimit -n) is below 19,000; the 9,000-session figures will fail" >&2
fi

# --- nginx and haproxy ----------------------------------------------------------------
if [ "$INSTALL" = 1 ]; then
  missing=""
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing="$missing nginx-light"
  command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing="$missing haproxy"
  if [ -n "$missing" ]; then
    echo "run.sh: installing$missing" >&2
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null \
      || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq ${missing/nginx-light/nginx} >/dev/null
  fi
fi
export PATH="$PATH:/usr/sbin:/sbin"
avail=""
for t in $TARGETS; do
  case "$t" in
    nginx|haproxy)
      if command -v "$t" >/dev/null; then avail="$avail $t"; else echo "run.sh: $t not installed, skipped" >&2; fi ;;
    *) avail="$avail $t" ;;
  esac
done
TARGETS=$avail

# --- build -------------------------------------------------------------------------------
PROFILE_FLAG=""; [ "$RELEASE" = 1 ] && PROFILE_FLAG=--release
echo "run.sh: building (${PROFILE_FLAG:-debug})" >&2
BUILD_JSON=$(cargo build $PROFILE_FLAG --bin lifeguard --bench relay --message-format=json)
RELAY=$(printf '%s\n' "$BUILD_JSON" | grep -o '"executable":"[^"]*/relay-[^"]*"' | tail -1 | cut -d'"' -f4)
LIFEGUARD=$(printf '%s\n' "$BUILD_JSON" | grep -o '"executable":"[^"]*/lifeguard"' | tail -1 | cut -d'"' -f4)
# A/B runs: BENCH_LIFEGUARD=/path/to/other/lifeguard measures that binary instead.
LIFEGUARD=${BENCH_LIFEGUARD:-$LIFEGUARD}
[ -x "$RELAY" ] && [ -x "$LIFEGUARD" ] || { echo "run.sh: build produced no relay/lifeguard binary" >&2; exit 1; }

# --- processes -----------------------------------------------------------------------------
WORK=$(mktemp -d /tmp/lifeguard-bench.XXXXXX)
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: >"$RESULTS"
SIM_PID=""
TARGET_PID=""

stop_pid() { # pid: TERM, wait up to 5 s, then KILL
  local p=$1 i
  [ -n "$p" ] || return 0
  kill -TERM "$p" 2>/dev/null || return 0
  for i in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
}
cleanup() {
  stop_pid "$TARGET_PID"; TARGET_PID=""
  stop_pid "$SIM_PID"; SIM_PID=""
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() { # port: until it accepts a TCP connection, at most 10 s
  local i
  for i in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "run.sh: nothing listens on 127.0.0.1:$1" >&2
  return 1
}

"$RELAY" sim --listen "127.0.0.1:$SIM_PORT" --control "127.0.0.1:$CTL_PORT" 2>"$WORK/sim.log" &
SIM_PID=$!
wait_port "$CTL_PORT"

mkdir -p "$WORK/nginx/logs" "$WORK/nginx/tmp"
# worker_processes 2 (one per core); HAProxy nbthread 2; lifeguard: tokio's default of one
# worker thread per core (2). Plain WebSocket tunnels, otherwise defaults.
cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 2;
worker_rlimit_nofile 20000;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/logs/error.log error;
events { worker_connections 19000; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx/tmp/body;
  proxy_temp_path $WORK/nginx/tmp/proxy;
  fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
  uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
  scgi_temp_path $WORK/nginx/tmp/scgi;
  upstream sim { server 127.0.0.1:$SIM_PORT; }
  server {
    listen 127.0.0.1:$NGINX_PORT backlog=4096;
    location / {
      proxy_pass http://sim;
      proxy_http_version 1.1;
      proxy_set_header Upgrade \$http_upgrade;
      proxy_set_header Connection "upgrade";
      proxy_read_timeout 1h;
      proxy_send_timeout 1h;
    }
  }
}
EOF
cat >"$WORK/haproxy.cfg" <<EOF
global
  maxconn 9600
  nbthread 2
defaults
  mode http
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  timeout tunnel 1h
frontend fe
  bind 127.0.0.1:$HAP_PORT
  default_backend sim
backend sim
  server sim 127.0.0.1:$SIM_PORT
EOF

start_target() { # name: sets URL, PIDS, ADMIN_ARG, TARGET_PID
  ADMIN_ARG=()
  case "$1" in
    direct)
      URL="ws://127.0.0.1:$SIM_PORT"; PIDS=""; TARGET_PID="" ;;
    lifeguard)
      "$LIFEGUARD" --listen "127.0.0.1:$LG_PORT" --upstream "ws://127.0.0.1:$SIM_PORT" \
        --admin-listen "127.0.0.1:$LG_ADMIN" --probe-interval "$PROBE" \
        --max-connections-per-ip 20000 >"$WORK/lifeguard.log" 2>&1 &
      TARGET_PID=$!
      wait_port "$LG_PORT"
      URL="ws://127.0.0.1:$LG_PORT"; PIDS=$TARGET_PID
      ADMIN_ARG=(--admin "127.0.0.1:$LG_ADMIN") ;;
    nginx)
      nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -g 'daemon off;' &
      TARGET_PID=$!
      wait_port "$NGINX_PORT"
      sleep 0.2
      URL="ws://127.0.0.1:$NGINX_PORT"
      PIDS=$(echo "$TARGET_PID" $(pgrep -P "$TARGET_PID") | tr ' ' ',') ;;
    haproxy)
      haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
      TARGET_PID=$!
      wait_port "$HAP_PORT"
      URL="ws://127.0.0.1:$HAP_PORT"; PIDS=$TARGET_PID ;;
    floor) # reference: a byte-copying relay (tokio, 64 KiB buffers), no parsing at all
      "$RELAY" floor --listen "127.0.0.1:$FLOOR_PORT" --upstream "127.0.0.1:$SIM_PORT" &
      TARGET_PID=$!
      wait_port "$FLOOR_PORT"
      URL="ws://127.0.0.1:$FLOOR_PORT"; PIDS=$TARGET_PID ;;
    *) echo "run.sh: unknown target $1" >&2; return 1 ;;
  esac
}

QFLAG=(); [ "$QUICK" = 1 ] && QFLAG=(--quick)
read -r -a TLIST <<<"$TARGETS"
N=${#TLIST[@]}
FAILED=0
START=$(date +%s)
for rep in $(seq "$REPS"); do
  for i in $(seq 0 $((N - 1))); do
    t=${TLIST[$(((i + rep - 1) % N))]}
    start_target "$t"
    if ! timeout "$RUN_TIMEOUT" "$RELAY" run --target "$t" --url "$URL" --control "127.0.0.1:$CTL_PORT" \
        --pids "$PIDS" "${ADMIN_ARG[@]}" --rep "$rep" --out "$RESULTS" "${QFLAG[@]}" \
        --scenarios "${BENCH_SCENARIOS:-idle,tput,rtt,disable,detect}"; then
      echo "run.sh: $t rep $rep FAILED" >&2
      FAILED=$((FAILED + 1))
      [ "$t" = lifeguard ] && tail -20 "$WORK/lifeguard.log" >&2
    fi
    stop_pid "$TARGET_PID"; TARGET_PID=""
  done
done
echo >&2
echo "run.sh: $REPS repetition(s) of [$TARGETS] in $(($(date +%s) - START)) s; $FAILED failed run(s)" >&2
"$RELAY" report --input "$RESULTS" --markdown "$OUT/table.md"
{
  echo
  echo "command: benches/run.sh $([ "$QUICK" = 1 ] && echo --quick) (reps $REPS)"
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(uname -r)"
  echo "nginx: $(nginx -v 2>&1 | cut -d/ -f2 || true); haproxy: $(haproxy -v 2>/dev/null | head -1 | cut -d' ' -f3 || true)"
} | tee -a "$OUT/table.md"
[ "$FAILED" = 0 ]
