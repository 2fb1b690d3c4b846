#!/usr/bin/env bash
# Replicated DDL through a 3-node Chorus cluster on this machine
# (`chorus demo`: 3 backends, 3 nodes, one Raft group):
#   1. `pgbench -i -s $SCALE` through node 1, against the same load on one
#      plain PostgreSQL directly (a `chorus demo --nodes 1 --proxy-only`
#      backend): time to load, and through Chorus also the time until every
#      backend holds every pgbench_accounts row, has the load's DDL, and
#      every stream has read past the load's WAL;
#   2. N CREATE TABLE and N ALTER TABLE ... ADD COLUMN, one at a time,
#      round robin over the three nodes: median and p99 per kind;
#   3. the same with backend 3 stopped, through nodes 1 and 2.
#
# Usage: benches/ddl.sh      (N=200 SCALE=10 PORT=16432)
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-200}
SCALE=${SCALE:-10}
PORT=${PORT:-16432}
PLAIN_PORT=${PLAIN_PORT:-16732}
PGBENCH=$(ls /usr/lib/postgresql/*/bin/pgbench 2>/dev/null | sort -V | tail -1)
PGBENCH=${PGBENCH:-pgbench}

# shellcheck source=benches/demo.sh
. benches/demo.sh
./target/release/chorus demo --nodes 1 --proxy-only --port "$PLAIN_PORT" --dir "$WORK/plain" \
    >"$WORK/plain.out" 2>"$WORK/plain.err" &
PLAIN=$!
trap 'kill -INT $DEMO $PLAIN 2>/dev/null || true; wait $DEMO $PLAIN 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 1 600); do grep -q '^ready' "$WORK/plain.out" 2>/dev/null && break; sleep 0.1; done
backend_port() { sed -n "s|^backend $2: postgres://postgres@127.0.0.1:\([0-9]*\)/postgres$|\1|p" "$1"; }
DIRECT=$(backend_port "$WORK/plain.out" 1)
now() { date +%s.%N; }
secs() { echo "$1 $2" | awk '{printf "%.1f", $2 - $1}'; }

echo "== pgbench -i -s $SCALE"
t0=$(now)
"$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "$DIRECT" -U postgres postgres >/dev/null 2>"$WORK/direct.err" || { cat "$WORK/direct.err"; exit 1; }
t1=$(now)
echo "directly on one PostgreSQL: $(secs "$t0" "$t1") s"
t0=$(now)
"$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "$PORT" -U postgres postgres >/dev/null 2>"$WORK/pgbench.err" \
    || { cat "$WORK/pgbench.err"; exit 1; }
t1=$(now)
echo "through node 1: $(secs "$t0" "$t1") s"
ROWS=$((SCALE * 100000))
for b in 1 2 3; do
    p=$(backend_port "$WORK/demo.out" "$b")
    for _ in $(seq 1 6000); do
        n=$(psql -X -At -h 127.0.0.1 -p "$p" -U postgres -c "SELECT count(*) FROM pgbench_accounts" postgres 2>/dev/null || echo 0)
        [ "$n" = "$ROWS" ] && break
        sleep 0.1
    done
    [ "$n" = "$ROWS" ] || { echo "backend $b has $n of $ROWS rows after 10 minutes"; exit 1; }
done
t2=$(now)
echo "every backend holds all $ROWS rows: $(secs "$t0" "$t2") s after the start"
# The load's last DDL (its primary keys) is built on each backend after
# its rows: the latency below is measured once every backend has it.
ddl_index() { psql -X -At -h 127.0.0.1 -p "$(backend_port "$WORK/demo.out" "$1")" -U postgres \
    -c "SELECT coalesce(max(seq), 0) FROM chorus.ddl_history" postgres 2>/dev/null || echo x; }
for _ in $(seq 1 6000); do
    i1=$(ddl_index 1); i2=$(ddl_index 2); i3=$(ddl_index 3)
    [ "$i1" = "$i2" ] && [ "$i2" = "$i3" ] && [ "$i1" != x ] && break
    sleep 0.1
done
[ "$i1" = "$i2" ] && [ "$i2" = "$i3" ] || { echo "backends' DDL indexes differ after 10 minutes: $i1 $i2 $i3"; exit 1; }
t3=$(now)
echo "every backend has the load's DDL too: $(secs "$t0" "$t3") s after the start"
# And each origin's streams have read past the load's WAL (its index
# builds and vacuum, which logical decoding still reads through): DDL
# through a node waits for the peers to have the DDL before it.
behind() { psql -X -At -h 127.0.0.1 -p "$(backend_port "$WORK/demo.out" "$1")" -U postgres \
    -c "SELECT coalesce(max(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)), 0)::bigint FROM pg_replication_slots" \
    postgres 2>/dev/null || echo 999999999; }
for _ in $(seq 1 6000); do
    [ "$(behind 1)" -lt 1048576 ] && [ "$(behind 2)" -lt 1048576 ] && [ "$(behind 3)" -lt 1048576 ] && break
    sleep 0.1
done
t4=$(now)
echo "every stream has read past the load: $(secs "$t0" "$t4") s after the start"

URL() { echo "postgres://postgres@127.0.0.1:$((PORT + $1 - 1))/postgres"; }
echo "== DDL latency, all backends up (through nodes 1, 2, 3)"
./target/release/ddl_latency "$N" "$(URL 1)" "$(URL 2)" "$(URL 3)"
echo "== DDL latency, backend 3 stopped (through nodes 1, 2)"
PG3=$(head -1 "$WORK/demo/pg3/data/postmaster.pid")
kill -INT "$PG3"
for _ in $(seq 1 100); do kill -0 "$PG3" 2>/dev/null || break; sleep 0.1; done
./target/release/ddl_latency "$N" "$(URL 1)" "$(URL 2)"
