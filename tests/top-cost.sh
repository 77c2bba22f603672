#!/usr/bin/env bash
# What `cacheprobe top` costs (BENCHMARKS.md, "cacheprobe top"): the daemon's CPU under a
# memcaslap load on loopback with and without an interactive `top` attached (tmux, 120x40,
# 1 s refresh), alternating, and top's own CPU. Root; bounded: ROUNDS x 2 windows of RUN_S.
#   tests/top-cost.sh [path/to/cacheprobe]
set -euo pipefail
BIN=${1:-target/release/cacheprobe}
PORT=${PORT:-27311}
ROUNDS=${ROUNDS:-3}
RUN_S=${RUN_S:-30}
MEASURE_S=${MEASURE_S:-20}
DIR=$(mktemp -d /tmp/cacheprobe-top-cost.XXXXXX)
TICKS=$(getconf CLK_TCK)
SESSION=cacheprobe-top-cost-$$
cleanup() {
    tmux kill-session -t "$SESSION" 2>/dev/null || true
    [[ -n ${AGENT:-} ]] && kill -TERM "$AGENT" 2>/dev/null && wait "$AGENT" 2>/dev/null || true
    [[ -n ${MEMCACHED:-} ]] && kill "$MEMCACHED" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

memcached -u root -l 127.0.0.1 -p "$PORT" -U 0 -t 2 &
MEMCACHED=$!
printf 'sample_interval_seconds = 5\n[[services]]\nname = "memcached"\nport = %s\nprotocol = "memcache"\n' "$PORT" >"$DIR/config.toml"
"$BIN" run --config "$DIR/config.toml" --listen 127.0.0.1:0 --control-socket "$DIR/control.sock" --log warn &
AGENT=$!
for _ in $(seq 100); do [[ -S $DIR/control.sock ]] && break; sleep 0.1; done
printf 'key\n25 25 1\nvalue\n100 100 1\ncmd\n0 0.10\n1 0.90\n' >"$DIR/memcaslap.cfg"

window() { # $1: label, $2: pid of top or empty
    memcaslap -s "127.0.0.1:$PORT" -t "${RUN_S}s" -c 32 -T 1 -F "$DIR/memcaslap.cfg" >"$DIR/load.txt" 2>&1 &
    local load=$!
    sleep 5
    local a0 t0=0
    a0=$(cpu_ticks "$AGENT")
    [[ -n $2 ]] && t0=$(cpu_ticks "$2")
    sleep "$MEASURE_S"
    local a1 t1=0
    a1=$(cpu_ticks "$AGENT")
    [[ -n $2 ]] && t1=$(cpu_ticks "$2")
    wait "$load" || true
    local tps
    tps=$(grep -oE 'TPS: [0-9]+' "$DIR/load.txt" | tail -1 | awk '{print $2}')
    awk -v l="$1" -v a="$((a1 - a0))" -v t="$((t1 - t0))" -v s="$MEASURE_S" -v hz="$TICKS" -v tps="${tps:-?}" \
        'BEGIN { printf "%-8s ops/s %-8s daemon %5.2f%% of a core   top %5.2f%%\n", l, tps, 100*a/hz/s, 100*t/hz/s }'
}

for round in $(seq "$ROUNDS"); do
    window "off" ""
    tmux new-session -d -s "$SESSION" -x 120 -y 40 "$BIN top --socket $DIR/control.sock --config $DIR/config.toml"
    sleep 2
    TOP=$(cat "/proc/$(tmux display-message -p -t "$SESSION" '#{pane_pid}')/task/$(tmux display-message -p -t "$SESSION" '#{pane_pid}')/children" | awk '{print $1}')
    [[ -z $TOP ]] && TOP=$(tmux display-message -p -t "$SESSION" '#{pane_pid}')
    window "top 1s" "$TOP"
    tmux kill-session -t "$SESSION"
done
