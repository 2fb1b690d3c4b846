#!/usr/bin/env bash
# Large values: COUNT concurrent INSERTs of one SIZE_MB text value each
# (made on the server, so the client's statement is small) through node 1
# of a three-node `chorus demo`, release build. Prints the demo process's
# resident memory (its three nodes) before, at its peak, and after every
# backend holds every row and the streams have been idle for 5 s; and
# whether the backends are identical.
#
# Usage: [COUNT=8] [SIZE_MB=16] bash benches/large.sh
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT=${COUNT:-8}
SIZE_MB=${SIZE_MB:-16}
PSQL=$(ls /usr/lib/postgresql/*/bin/psql 2>/dev/null | sort -V | tail -1)
PSQL=${PSQL:-psql}
cargo build --release -q -p chorus-proxy
WORK=$(mktemp -d /tmp/chorus-large-XXXXXX)
chmod 755 "$WORK"
DEMO=
cleanup() {
    [ -n "$DEMO" ] && { kill -INT "$DEMO" 2>/dev/null || true; wait "$DEMO" 2>/dev/null || true; }
    rm -rf "$WORK"
}
trap cleanup EXIT

RUST_LOG=warn ./target/release/chorus demo --port 19432 --dir "$WORK/cluster" \
    > "$WORK/demo.out" 2> "$WORK/demo.err" &
DEMO=$!
for _ in $(seq 1 600); do grep -q '^ready$' "$WORK/demo.out" 2>/dev/null && break; sleep 0.1; done
grep -q '^ready$' "$WORK/demo.out" || { cat "$WORK/demo.err" >&2; exit 1; }
port_of() { sed -n "s|^$1: postgres://postgres@127.0.0.1:\([0-9]*\)/.*|\1|p" "$WORK/demo.out"; }
q() { "$PSQL" -X -qAt -h 127.0.0.1 -U postgres -d postgres "$@"; }
rss() { ps -o rss= -p "$DEMO" | tr -d ' '; }
node1=$(port_of "node 1")

q -p "$node1" -c "CREATE TABLE big (id int PRIMARY KEY, v text)"
( peak=0; while kill -0 "$DEMO" 2>/dev/null; do
      r=$(ps -o rss= -p "$DEMO" 2>/dev/null | tr -d ' ')
      [ -n "$r" ] && [ "$r" -gt "$peak" ] && { peak=$r; echo "$peak" > "$WORK/peak"; }
      sleep 0.2
  done ) &
sampler=$!
before=$(rss)
# A value of SIZE_MB MiB: md5 texts (32 bytes each) repeated.
value="repeat(md5(i::text), $SIZE_MB * 1024 * 1024 / 32)"
inserts=()
for i in $(seq 1 "$COUNT"); do
    q -p "$node1" -c "INSERT INTO big SELECT i, $value FROM (SELECT $i AS i) s" &
    inserts+=($!)
done
for pid in "${inserts[@]}"; do wait "$pid"; done
state="SELECT count(*) || ' ' || md5(coalesce(string_agg(md5(v), ',' ORDER BY id), '')) FROM big"
want=$(q -p "$(port_of "backend 1")" -c "$state")
[ "${want%% *}" = "$COUNT" ] || { echo "backend 1 holds ${want%% *} rows, not $COUNT" >&2; exit 1; }
for b in 2 3; do
    p=$(port_of "backend $b")
    for _ in $(seq 1 600); do [ "$(q -p "$p" -c "$state" 2>/dev/null)" = "$want" ] && break; sleep 0.5; done
    [ "$(q -p "$p" -c "$state")" = "$want" ] || { echo "backend $b differs" >&2; exit 1; }
done
sleep 5
after=$(rss)
kill "$sampler" 2>/dev/null || true
echo "$COUNT values of $SIZE_MB MiB through node 1 of 3: every backend identical ($want)"
echo "chorus demo process (3 nodes) resident memory: $((before / 1024)) MiB before, peak $(($(cat "$WORK/peak") / 1024)) MiB, $((after / 1024)) MiB idle after"
