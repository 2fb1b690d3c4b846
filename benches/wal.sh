#!/usr/bin/env bash
# The WAL a write costs: on a plain PostgreSQL, and through node 1 of a
# three-node Chorus cluster (on node 1's backend, where the capture runs),
# measured with pg_current_wal_lsn() before and after:
#   1. one UPDATE of every row of a table of N rows (one statement);
#   2. N/10 transactions updating one row each (pgbench, 2 clients).
# Both setups in this one run, one after the other, on the same machine.
# Each measurement starts right after a CHECKPOINT, so both pay the same
# full-page images.
#
# Usage: N=100000 bash benches/wal.sh
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-100000}
T=$((N / 10))
PSQL=$(ls /usr/lib/postgresql/*/bin/psql 2>/dev/null | sort -V | tail -1)
PSQL=${PSQL:-psql}
PGBENCH=$(ls /usr/lib/postgresql/*/bin/pgbench 2>/dev/null | sort -V | tail -1)
PGBENCH=${PGBENCH:-pgbench}
cargo build --release -q -p chorus-proxy
WORK=$(mktemp -d /tmp/chorus-wal-XXXXXX)
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
q() { "$PSQL" -X -qAt -h 127.0.0.1 -U postgres -d postgres "$@"; }
lsn() { q -p "$1" -c "SELECT pg_current_wal_lsn()"; }
bytes() { q -p "$1" -c "SELECT pg_wal_lsn_diff('$3', '$2')::bigint"; }
printf '\\set id random(1, %d)\nUPDATE kv SET v = v + 1 WHERE id = :id;\n' "$N" > "$WORK/one.sql"

# measure NAME CLIENT_PORT BACKEND_PORT: both workloads, WAL on the backend.
measure() {
    local name=$1 via=$2 backend=$3
    q -p "$via" -c "CREATE TABLE kv (id int PRIMARY KEY, v int NOT NULL)"
    q -p "$via" -c "INSERT INTO kv SELECT g, 0 FROM generate_series(1, $N) g"
    sleep 2
    q -p "$backend" -c "CHECKPOINT"
    local a b
    a=$(lsn "$backend")
    q -p "$via" -c "UPDATE kv SET v = v + 1"
    b=$(lsn "$backend")
    local stmt
    stmt=$(bytes "$backend" "$a" "$b")
    q -p "$backend" -c "CHECKPOINT"
    a=$(lsn "$backend")
    "$PGBENCH" -h 127.0.0.1 -p "$via" -U postgres -n -c 2 -j 2 -t $((T / 2)) -f "$WORK/one.sql" postgres \
        > "$WORK/$name.pgbench" 2>&1 || { cat "$WORK/$name.pgbench" >&2; exit 1; }
    b=$(lsn "$backend")
    local txns
    txns=$(bytes "$backend" "$a" "$b")
    echo "$name: one UPDATE of $N rows: $stmt bytes of WAL ($((stmt / N)) per row); $T one-row transactions: $txns bytes ($((txns / T)) per transaction)"
}

start plain 19432 --nodes 1 --proxy-only
direct=$(port_of plain "backend 1")
measure "plain PostgreSQL" "$direct" "$direct"
kill -INT "${PIDS[0]}"
wait "${PIDS[0]}" 2>/dev/null || true
PIDS=()

start cluster 19532
measure "through node 1 of 3" "$(port_of cluster "node 1")" "$(port_of cluster "backend 1")"
