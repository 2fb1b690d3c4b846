#!/usr/bin/env bash
# CPU used by an idle three-node `chorus demo`: the Chorus process and every
# PostgreSQL process of its backends, over SECONDS seconds after SETTLE
# seconds of warm-up, with no client connected. Each binary given is
# measured in turn, in this one run (default: this tree's release build),
# so that builds can be compared on the same machine at the same time.
#
# Usage: SECONDS_IDLE=60 bash benches/idle.sh [path/to/chorus ...]
set -euo pipefail
cd "$(dirname "$0")/.."

IDLE=${SECONDS_IDLE:-60}
SETTLE=${SETTLE:-15}
if [ $# -eq 0 ]; then
    cargo build --release -q -p chorus-proxy
    set -- ./target/release/chorus
fi
WORK=$(mktemp -d /tmp/chorus-idle-XXXXXX)
chmod 755 "$WORK"
DEMO=
cleanup() {
    [ -n "$DEMO" ] && { kill -INT "$DEMO" 2>/dev/null || true; wait "$DEMO" 2>/dev/null || true; }
    rm -rf "$WORK"
}
trap cleanup EXIT
HZ=$(getconf CLK_TCK)

# ticks PID...: user and system CPU ticks of these processes.
ticks() {
    local total=0 p fields
    for p in "$@"; do
        fields=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null) || continue
        total=$((total + fields))
    done
    echo "$total"
}
# backend_pids: every process of the demo's PostgreSQL servers.
backend_pids() {
    local pm
    for pm in $(pgrep -f "postgres -D $WORK/demo"); do
        echo "$pm"
        pgrep -P "$pm" || true
    done
}

for bin in "$@"; do
    rm -rf "$WORK/demo"
    RUST_LOG=warn "$bin" demo --port 27800 --dir "$WORK/demo" > "$WORK/demo.out" 2> "$WORK/demo.err" &
    DEMO=$!
    for _ in $(seq 1 600); do grep -q '^ready$' "$WORK/demo.out" 2>/dev/null && break; sleep 0.1; done
    grep -q '^ready$' "$WORK/demo.out" || { cat "$WORK/demo.err" >&2; exit 1; }
    sleep "$SETTLE"
    # (Backend processes that start or end meanwhile are missed: at idle
    # there are none.)
    pids=$(backend_pids)
    c0=$(ticks "$DEMO"); b0=$(ticks $pids)
    sleep "$IDLE"
    c1=$(ticks "$DEMO"); b1=$(ticks $pids)
    chorus_ms=$(((c1 - c0) * 1000 / HZ))
    backend_ms=$(((b1 - b0) * 1000 / HZ))
    total=$((chorus_ms + backend_ms))
    echo "$bin: idle ${IDLE} s: chorus ${chorus_ms} ms, backends ${backend_ms} ms, total ${total} ms" \
         "($(awk -v t="$total" -v s="$IDLE" 'BEGIN { printf "%.2f", t / (s * 10) }')% of one core)"
    kill -INT "$DEMO"
    wait "$DEMO" 2>/dev/null || true
    DEMO=
done
