#!/usr/bin/env bash
# Benchmarks: lifeguard side by side with a direct connection, nginx and HAProxy.
#
#   benches/run.sh                 full run: 5 interleaved repetitions of every target
#   benches/run.sh --quick         smoke run (a few seconds; debug build; 1 repetition;
#                                  nginx/haproxy only if already installed)
#   options: --reps N  --targets "direct lifeguard nginx haproxy floor"  --no-install
#            --release (quick run with release builds)  --out DIR (default target/bench)
#   env:     BENCH_SCENARIOS=idle,tput,rtt,rev,disable,detect,http (any subset; `rev` is
#            reverse WebSocket: the simulator dials, the load generator is the bots; direct and
#            lifeguard only; http: the HTTP transports, `relay http`, once after the WebSocket
#            targets, lifeguard vs direct)
#            BENCH_LIFEGUARD=/path/to/lifeguard (A/B runs of another build)
#            BENCH_LIFEGUARD_B=/path/to/lifeguard (target lifeguard-b: a second build in the
#            same interleaved run, e.g. before/after a change)
#
# `floor` is a reference, not a competitor: the relay bench binary copying bytes both ways
# (tokio copy_bidirectional, 64 KiB buffers), the cost of one user-space hop and nothing else.
# nginx and haproxy relay with 64 KiB buffers, like lifeguard and floor (see BENCHMARKS.md,
# "The HAProxy anchor"); `nginx-4k` and `haproxy-16k` (not in the default list) are the same
# proxies with their default buffer sizes, the configuration of earlier runs.
# Everything listens on 127.0.0.1 only. One simulator process (lifeguard::sim, driven by the
# `relay` bench binary) is the upstream of every target. Results: DIR/results.jsonl and the
# table in DIR/table.md (also printed).
set -euo pipefail
cd "$(dirname "$0")/.."
ARGS="$*"

QUICK=0
REPS=""
TARGETS="direct lifeguard nginx haproxy floor"
INSTALL=1
RELEASE=""
OUT=target/bench
# Per run, so that two runs on one machine never measure each other's processes.
BASE_PORT=${BENCH_BASE_PORT:-$((19100 + ($$ % 40) * 100))}
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --reps) REPS="$2"; shift ;;
    --targets) TARGETS="$2"; shift ;;
    --no-install) INSTALL=0 ;;
    --release) RELEASE=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
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
LG_REV_PORT=$((BASE_PORT + 12))
BOTS_PORT=$((BASE_PORT + 50))

# 9,000 sessions: the load generator holds 9,000 fds, the simulator 9,000, a proxy 18,000.
# They all come from 127.0.0.1, so lifeguard runs with LIFEGUARD_MAX_CONNECTIONS_PER_IP=20000 (the
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
    nginx|haproxy|nginx-4k|haproxy-16k)
      if command -v "${t%-*}" >/dev/null; then avail="$avail $t"; else echo "run.sh: ${t%-*} not installed, $t skipped" >&2; fi ;;
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

# worker_processes 2 (one per core); HAProxy nbthread 2; lifeguard: tokio's default of one
# worker thread per core (2). Plain WebSocket tunnels, no logging, and every relay reads up to
# 64 KiB per call, as lifeguard (one 64 KiB read buffer per worker thread) and floor do:
# - nginx: proxy_buffer_size 64k is the buffer of the upstream-to-client direction of an
#   upgraded connection (default: one page, 4 KiB = 9-10 message events per read). It is
#   allocated per connection; only pages that data touched count in RSS. proxy_buffers and
#   proxy_busy_buffers_size only satisfy nginx's check that they fit around it (a tunnel
#   does not use them).
# - HAProxy: tune.bufsize 65536 (default 16384 = 38 message events per read). Buffers come
#   from a pool and are held only while data is in flight, so idle sessions cost the same.
#   `mode http`, because routing the upgrade needs the HTTP layer; once upgraded the session
#   is a tunnel (`timeout tunnel`), and `mode tcp` measured the same CPU per event.
nginx_conf() { # dir extra_lines: an nginx prefix directory with its nginx.conf
  local d=$1
  mkdir -p "$d/logs" "$d/tmp"
  cat >"$d/nginx.conf" <<EOF
worker_processes 2;
worker_rlimit_nofile 20000;
pid $d/nginx.pid;
error_log $d/logs/error.log error;
events { worker_connections 19000; }
http {
  access_log off;
  client_body_temp_path $d/tmp/body;
  proxy_temp_path $d/tmp/proxy;
  fastcgi_temp_path $d/tmp/fastcgi;
  uwsgi_temp_path $d/tmp/uwsgi;
  scgi_temp_path $d/tmp/scgi;
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
$2
    }
  }
}
EOF
}
nginx_conf "$WORK/nginx" "      proxy_buffer_size 64k;
      proxy_buffers 4 64k;
      proxy_busy_buffers_size 128k;"
nginx_conf "$WORK/nginx-4k" ""
haproxy_cfg() { # file extra_global_lines
  cat >"$1" <<EOF
global
  maxconn 9600
  nbthread 2
$2
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
}
haproxy_cfg "$WORK/haproxy.cfg" "  tune.bufsize 65536"
haproxy_cfg "$WORK/haproxy-16k.cfg" ""

start_target() { # name: sets URL, PIDS, ADMIN_ARG, REV_ARG, TARGET_PID
  ADMIN_ARG=()
  REV_ARG=()
  case "$1" in
    direct)
      URL="ws://127.0.0.1:$SIM_PORT"; PIDS=""; TARGET_PID=""
      REV_ARG=(--reverse-dial "ws://127.0.0.1:$BOTS_PORT/onebot/v11/ws" --reverse-bots "127.0.0.1:$BOTS_PORT") ;;
    lifeguard|lifeguard-b)
      bin=$LIFEGUARD; [ "$1" = lifeguard-b ] && bin=${BENCH_LIFEGUARD_B:?lifeguard-b needs BENCH_LIFEGUARD_B=/path/to/another/lifeguard}
      # An older build (lifeguard-b) may predate reverse WebSocket: then no rev scenario.
      LG_REV=()
      if "$bin" --help 2>/dev/null | grep -q -- --reverse-listen; then
        LG_REV=(--reverse-listen "127.0.0.1:$LG_REV_PORT" --reverse-url "ws://127.0.0.1:$BOTS_PORT")
        REV_ARG=(--reverse-dial "ws://127.0.0.1:$LG_REV_PORT/onebot/v11/ws" --reverse-bots "127.0.0.1:$BOTS_PORT")
      fi
      LIFEGUARD_MAX_CONNECTIONS_PER_IP=20000 "$bin" --listen "127.0.0.1:$LG_PORT" --upstream "ws://127.0.0.1:$SIM_PORT" \
        --admin-listen "127.0.0.1:$LG_ADMIN" --probe-interval "$PROBE" "${LG_REV[@]}" >"$WORK/lifeguard.log" 2>&1 &
      TARGET_PID=$!
      wait_port "$LG_PORT"
      URL="ws://127.0.0.1:$LG_PORT"; PIDS=$TARGET_PID
      ADMIN_ARG=(--admin "127.0.0.1:$LG_ADMIN") ;;
    nginx|nginx-4k)
      nginx -p "$WORK/$1" -c "$WORK/$1/nginx.conf" -g 'daemon off;' &
      TARGET_PID=$!
      wait_port "$NGINX_PORT"
      sleep 0.2
      URL="ws://127.0.0.1:$NGINX_PORT"
      PIDS=$(echo "$TARGET_PID" $(pgrep -P "$TARGET_PID") | tr ' ' ',') ;;
    haproxy|haproxy-16k)
      haproxy -db -f "$WORK/$1.cfg" >"$WORK/$1.log" 2>&1 &
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
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
for rep in $(seq "$REPS"); do
  for i in $(seq 0 $((N - 1))); do
    t=${TLIST[$(((i + rep - 1) % N))]}
    start_target "$t"
    if ! timeout "$RUN_TIMEOUT" "$RELAY" run --target "$t" --url "$URL" --control "127.0.0.1:$CTL_PORT" \
        --pids "$PIDS" "${ADMIN_ARG[@]}" "${REV_ARG[@]}" --rep "$rep" --out "$RESULTS" "${QFLAG[@]}" \
        --scenarios "${BENCH_SCENARIOS:-idle,tput,rtt,rev,disable,detect}"; then
      echo "run.sh: $t rep $rep FAILED" >&2
      FAILED=$((FAILED + 1))
      [ "$t" = lifeguard ] && tail -20 "$WORK/lifeguard.log" >&2
    fi
    stop_pid "$TARGET_PID"; TARGET_PID=""
  done
done
if [[ ",${BENCH_SCENARIOS:-http}," == *",http,"* ]]; then
  : >"$OUT/http.jsonl"
  NGINX_ARG=(); command -v nginx >/dev/null && NGINX_ARG=(--nginx "$(command -v nginx)")
  if ! timeout "$RUN_TIMEOUT" "$RELAY" http --lifeguard "$LIFEGUARD" --reps "$REPS" "${QFLAG[@]}" \
      "${NGINX_ARG[@]}" --out "$OUT/http.jsonl" --markdown "$OUT/http.md"; then
    echo "run.sh: http FAILED" >&2
    FAILED=$((FAILED + 1))
  fi
fi
echo >&2
echo "run.sh: $REPS repetition(s) of [$TARGETS] in $(($(date +%s) - START)) s; $FAILED failed run(s)" >&2
"$RELAY" report --input "$RESULTS" --markdown "$OUT/table.md"
{
  echo
  echo "command: ${BENCH_SCENARIOS:+BENCH_SCENARIOS=$BENCH_SCENARIOS }benches/run.sh $ARGS (reps $REPS; targets$TARGETS)"
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- benches 2>/dev/null || echo ' (benches/ modified)'); load average at start $LOAD0, at end $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(uname -r)"
  echo "nginx: $(nginx -v 2>&1 | cut -d/ -f2 || true); haproxy: $(haproxy -v 2>/dev/null | head -1 | cut -d' ' -f3 || true)"
} | tee -a "$OUT/table.md"
[ "$FAILED" = 0 ]
