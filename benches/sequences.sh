#!/usr/bin/env bash
# Ids per second from each kind of global sequence through one node of a
# 3-node Chorus cluster (`chorus demo`): pgbench runs `SELECT nextval(...)`
# (snowflake and galloc) and `SELECT chorus.uuidv7()` through node 1, and,
# for reference, the snowflake sequence and a plain local sequence straight
# on node 1's backend.
#
# Usage: benches/sequences.sh      (DURATION=10 CLIENTS=8 PORT=17432)
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-8}
PORT=${PORT:-17432}
PGBENCH=$(ls /usr/lib/postgresql/*/bin/pgbench 2>/dev/null | sort -V | tail -1)
PGBENCH=${PGBENCH:-pgbench}
PSQL=$(ls /usr/lib/postgresql/*/bin/psql 2>/dev/null | sort -V | tail -1)
PSQL=${PSQL:-psql}

# shellcheck source=benches/demo.sh
. benches/demo.sh
NODE="postgres://postgres@127.0.0.1:$PORT/postgres"
BACKEND=$(awk '/^backend 1: /{print $3}' "$WORK/demo.out")

"$PSQL" -X -q "$NODE" -c "CREATE SEQUENCE bench_snowflake"
"$PSQL" -X -q "$NODE" -c "CREATE SEQUENCE bench_galloc AS integer"
"$PSQL" -X -q "$BACKEND" -c "SET chorus.ddl_scope = 'local'; CREATE SEQUENCE bench_local"
"$PSQL" -X -At "$NODE" -c "SELECT seq || ' ' || kind FROM chorus.global_sequence WHERE seq LIKE 'public.bench%' ORDER BY 1"

run() {
    local name=$1 url=$2 sql=$3
    echo "$sql" >"$WORK/$name.sql"
    local tps
    tps=$("$PGBENCH" -n -M prepared -c "$CLIENTS" -j 2 -T "$DURATION" -f "$WORK/$name.sql" "$url" 2>/dev/null |
        awk '/^tps = /{print $3}')
    printf '%-28s %10.0f ids/s\n' "$name" "$tps"
}
run "snowflake (node 1)" "$NODE" "SELECT nextval('bench_snowflake');"
run "galloc (node 1)" "$NODE" "SELECT nextval('bench_galloc');"
run "uuidv7 (node 1)" "$NODE" "SELECT chorus.uuidv7();"
run "snowflake (backend 1)" "$BACKEND" "SELECT nextval('bench_snowflake');"
run "local sequence (backend 1)" "$BACKEND" "SELECT nextval('bench_local');"
