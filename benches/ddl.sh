#!/usr/bin/env bash
# Latency of replicated DDL through a 3-node Chorus cluster on this
# machine: `chorus demo` (3 backends, 3 nodes, one Raft group), then N
# CREATE TABLE and N ALTER TABLE ... ADD COLUMN, one at a time, round robin
# over the three nodes. Prints median and p99 per kind.
#
# Usage: benches/ddl.sh      (N=200 PORT=16432)
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-200}
PORT=${PORT:-16432}

cargo build --release -q -p chorus-proxy -p chorus-examples
WORK=$(mktemp -d)
trap 'kill -INT $DEMO 2>/dev/null || true; wait $DEMO 2>/dev/null || true; rm -rf "$WORK"' EXIT
./target/release/chorus demo --port "$PORT" --dir "$WORK/demo" >"$WORK/demo.out" 2>"$WORK/demo.err" &
DEMO=$!
for _ in $(seq 1 600); do
    grep -q '^ready' "$WORK/demo.out" 2>/dev/null && break
    sleep 0.1
done
grep -q '^ready' "$WORK/demo.out" || { cat "$WORK/demo.err"; exit 1; }
URLS=$(for i in 0 1 2; do echo "postgres://postgres@127.0.0.1:$((PORT + i))/postgres"; done)
# shellcheck disable=SC2086
./target/release/ddl_latency "$N" $URLS
