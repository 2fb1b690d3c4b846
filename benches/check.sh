#!/usr/bin/env bash
# `chorus check`'s scan rate: N rows in a keyed table on a three-node
# `chorus demo` (loaded through node 1 in statements of 100 000 and waited
# for on every backend), then `chorus check` over the three backends, as an
# operator would run it. Prints its report (rows, buckets, seconds, rows
# per second).
#
# Usage: N=1000000 bash benches/check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-1000000}
STEP=100000
PORT=${PORT:-19532}
source benches/demo.sh

node1=$(port_of "node 1")

# A configuration naming the demo's backends, as any node's would.
{
    printf '[node]\nid = 1\nlisten = "127.0.0.1:1"\nhome_backend = "pg1"\n'
    for b in 1 2 3; do
        printf '[[backends]]\nname = "pg%s"\nport = %s\n' "$b" "$(port_of "backend $b")"
    done
    printf '[replication]\nuser = "postgres"\n'
    printf '[cluster]\nraft_listen = "127.0.0.1:1"\nsecret = "unused"\ndata_dir = "%s/raft"\n' "$WORK"
} > "$WORK/check.toml"

q -p "$node1" -c "CREATE TABLE accounts (id bigint PRIMARY KEY, owner text, balance numeric, opened date)"
for ((lo = 1; lo <= N; lo += STEP)); do
    hi=$((lo + STEP - 1 < N ? lo + STEP - 1 : N))
    q -p "$node1" -c "INSERT INTO accounts SELECT g, 'owner ' || g, g * 1.5, date '2020-01-01' + g % 1000 \
                      FROM generate_series($lo, $hi) g"
done
for b in 1 2 3; do
    until [ "$(q -p "$(port_of "backend $b")" -c 'SELECT count(*) FROM accounts' 2>/dev/null)" = "$N" ]; do sleep 1; done
done
./target/release/chorus check --config "$WORK/check.toml"
