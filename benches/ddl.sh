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

# shellcheck source=benches/demo.sh
. benches/demo.sh
URLS=$(for i in 0 1 2; do echo "postgres://postgres@127.0.0.1:$((PORT + i))/postgres"; done)
# shellcheck disable=SC2086
./target/release/ddl_latency "$N" $URLS
