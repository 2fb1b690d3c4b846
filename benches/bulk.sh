#!/usr/bin/env bash
# One transaction of N rows into a table with a primary key: its time on a
# plain PostgreSQL, its time through node 1 of a three-node Chorus cluster,
# and how long after its commit every backend holds the same rows, and the
# nodes' peak memory. Both setups run in this one run, one after the other
# (the plain one alone, then the cluster), on this machine. With ALL=1 the
# cluster then also runs an UPDATE of every row, a DELETE of every row and
# a COPY (psql's \copy) of N rows, each one transaction through node 1.
# POOL_MODE=transaction runs the cluster's nodes in transaction pooling;
# ROLE=name makes an ordinary role (LOGIN, CREATE on schema public) through
# node 1 and sends the cluster's table and steps as it. UNIQUE=1 gives
# the table a unique index besides its key (on v, as an ORM's `email
# UNIQUE`). REFILL=1 first fills the cluster's table with N rows, deletes
# them all and vacuums it on every backend (keeping its pages), so that
# each backend believes it empty when the measured load arrives.
#
# Usage: [ALL=1] [POOL_MODE=transaction] [ROLE=app] [UNIQUE=1] [REFILL=1] N=1000000 bash benches/bulk.sh
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-1000000}
POOL_MODE=${POOL_MODE:-session}
ROLE=${ROLE:-postgres}
PSQL=$(ls /usr/lib/postgresql/*/bin/psql 2>/dev/null | sort -V | tail -1)
PSQL=${PSQL:-psql}
cargo build --release -q -p chorus-proxy
WORK=$(mktemp -d /tmp/chorus-bulk-XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

# start NAME PORT ARGS...: a demo, waited for until ready.
start() {
    local name=$1 port=$2
    shift 2
    RUST_LOG=warn ./target/release/chorus demo --port "$port" --dir "$WORK/$name" "$@" \
        > "$WORK/$name.out" 2> "$WORK/$name.err" &
    PIDS+=($!)
    for _ in $(seq 1 600); do grep -q '^ready$' "$WORK/$name.out" 2>/dev/null && break; sleep 0.1; done
    grep -q '^ready$' "$WORK/$name.out" || { cat "$WORK/$name.err" >&2; exit 1; }
}
port_of() { sed -n "s|^$2: postgres://postgres@127.0.0.1:\([0-9]*\)/.*|\1|p" "$WORK/$1.out"; }
q() { "$PSQL" -X -qAt -h 127.0.0.1 -U "${AS:-postgres}" -d postgres "$@"; }
now() { date +%s.%N; }
table="CREATE TABLE bulk (id bigint PRIMARY KEY, v text${UNIQUE:+ UNIQUE})${REFILL:+ WITH (vacuum_truncate = false)}"
load="INSERT INTO bulk SELECT g, 'row ' || g FROM generate_series(1, $N) g"

start plain 17432 --nodes 1 --proxy-only
direct=$(port_of plain "backend 1")
q -p "$direct" -c "$table"
t0=$(now)
q -p "$direct" -c "$load"
t1=$(now)
echo "plain PostgreSQL: $N rows in one transaction in $(echo "$t1 - $t0" | bc) s"
kill -INT "${PIDS[0]}"
wait "${PIDS[0]}" 2>/dev/null || true
PIDS=()

start cluster 18432 --pool-mode "$POOL_MODE"
node1=$(port_of cluster "node 1")
if [ "$ROLE" != postgres ]; then
    q -p "$node1" -c "CREATE ROLE $ROLE LOGIN" -c "GRANT CREATE ON SCHEMA public TO $ROLE"
fi
AS=$ROLE q -p "$node1" -c "$table"
# The demo runs its three nodes in one process: its resident memory, every
# 0.2 s, from the load's start until the last step has converged.
demo=${PIDS[0]}
( peak=0; while kill -0 "$demo" 2>/dev/null; do
      rss=$(ps -o rss= -p "$demo" 2>/dev/null | tr -d ' ')
      [ -n "$rss" ] && [ "$rss" -gt "$peak" ] && { peak=$rss; echo "$peak" > "$WORK/rss"; }
      sleep 0.2
  done ) &
sampler=$!
rss_before=$(ps -o rss= -p "$demo" | tr -d ' ')
# step NAME ARGS...: run psql ARGS through node 1 (one transaction), then
# wait until all three backends hold the same rows; print both times.
state="SELECT count(*) || md5(coalesce(string_agg(id || v, ',' ORDER BY id), '')) FROM bulk"
step() {
    local name=$1
    shift
    local t0 t1 t2 want p
    t0=$(now)
    AS=$ROLE q -p "$node1" "$@"
    t1=$(now)
    want=$(q -p "$(port_of cluster "backend 1")" -c "$state")
    for b in 2 3; do
        p=$(port_of cluster "backend $b")
        until [ "$(q -p "$p" -c "$state" 2>/dev/null)" = "$want" ]; do sleep 0.5; done
    done
    t2=$(now)
    echo "$name through node 1 of 3 ($POOL_MODE pooling, as $ROLE): $(echo "$t1 - $t0" | bc) s; every backend identical $(echo "$t2 - $t1" | bc) s after its commit"
}
if [ -n "${REFILL:-}" ]; then
    step "(refill: first load)" -c "$load"
    step "(refill: DELETE of every row)" -c "DELETE FROM bulk"
    for b in 1 2 3; do q -p "$(port_of cluster "backend $b")" -c "VACUUM bulk"; done
fi
step "INSERT of $N rows in one transaction" -c "$load"
if [ -n "${ALL:-}" ]; then
    step "UPDATE of every row" -c "UPDATE bulk SET v = v || ' updated'"
    step "DELETE of every row" -c "DELETE FROM bulk"
    seq 1 "$N" | sed 's/.*/&\tcopied &/' > "$WORK/rows.tsv"
    step "COPY of $N rows" -c "\\copy bulk FROM '$WORK/rows.tsv'"
fi
kill "$sampler" 2>/dev/null || true
echo "chorus demo process (3 nodes) resident memory: $((rss_before / 1024)) MiB before, peak $(($(cat "$WORK/rss") / 1024)) MiB"
