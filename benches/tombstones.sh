#!/usr/bin/env bash
# Tombstones under a delete-heavy workload, with the default pruning
# settings (`replication.prune_interval_ms` 60 s, `tombstone_min_age_ms`
# 5 min): N rows inserted through node 1 and then every one deleted through
# node 2 (in statements of 100 000 rows), on a three-node `chorus demo`.
# Prints, on each backend, the tombstones and the size of
# chorus.row_version after the inserts, after the deletes, and once they
# are pruned, and how long after the last delete that took.
#
# Usage: N=1000000 bash benches/tombstones.sh
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-1000000}
STEP=100000
PORT=${PORT:-19432}
source benches/demo.sh

now() { date +%s.%N; }
node1=$(port_of "node 1")
node2=$(port_of "node 2")
backends=("$(port_of "backend 1")" "$(port_of "backend 2")" "$(port_of "backend 3")")

# report LABEL: tombstones and chorus.row_version's size on each backend.
report() {
    for b in 0 1 2; do
        q -p "${backends[$b]}" -c "SELECT format('%s, backend %s: %s tombstones, %s version rows, chorus.row_version %s', \
            '$1', $b + 1, count(*) FILTER (WHERE deleted AND pk <> '{}'), count(*), \
            pg_size_pretty(pg_total_relation_size('chorus.row_version'))) FROM chorus.row_version"
    done
}
# wait_all SQL VALUE: until SQL gives VALUE on every backend.
wait_all() {
    for p in "${backends[@]}"; do
        until [ "$(q -p "$p" -c "$1" 2>/dev/null)" = "$2" ]; do sleep 1; done
    done
}

q -p "$node1" -c "CREATE TABLE doomed (id bigint PRIMARY KEY, v text)"
for ((lo = 1; lo <= N; lo += STEP)); do
    q -p "$node1" -c "INSERT INTO doomed SELECT g, 'row ' || g FROM generate_series($lo, $((lo + STEP - 1 < N ? lo + STEP - 1 : N))) g"
done
wait_all "SELECT count(*) FROM doomed" "$N"
report "after $N inserts"
for ((lo = 1; lo <= N; lo += STEP)); do
    q -p "$node2" -c "DELETE FROM doomed WHERE id BETWEEN $lo AND $((lo + STEP - 1))"
done
deleted=$(now)
wait_all "SELECT count(*) FROM doomed" "0"
echo "every backend applied the deletes $(echo "$(now) - $deleted" | bc) s after the last one"
report "after $N deletes"
wait_all "SELECT count(*) FROM chorus.row_version WHERE deleted AND pk <> '{}'" "0"
echo "every tombstone pruned $(echo "$(now) - $deleted" | bc) s after the last delete"
for p in "${backends[@]}"; do q -p "$p" -c "VACUUM chorus.row_version"; done
report "pruned, after VACUUM"
