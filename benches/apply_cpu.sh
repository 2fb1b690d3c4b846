#!/usr/bin/env bash
# What one large mixed transaction costs a peer to apply: through node 1 of
# a three-node `chorus demo`, one transaction inserts N rows into a new
# table, updates a third of them and deletes a tenth. Printed per build:
# the origin's commit time, the time from its commit until backend 2 holds
# the result, and the CPU (user and system) that backend 2's statements
# used meanwhile (from `log_statement_stats`: the apply's, nearly all of
# it). Each binary given is measured in turn, ROUNDS times alternating, in
# this one run (default: this tree's release build), so that builds can be
# compared on the same machine at the same time.
#
# Usage: [N=300000] [ROUNDS=2] bash benches/apply_cpu.sh [path/to/chorus ...]
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-300000}
ROUNDS=${ROUNDS:-2}
if [ $# -eq 0 ]; then
    cargo build --release -q -p chorus-proxy
    set -- ./target/release/chorus
fi
PSQL=$(ls /usr/lib/postgresql/*/bin/psql 2>/dev/null | sort -V | tail -1)
PSQL=${PSQL:-psql}
WORK=$(mktemp -d /tmp/chorus-apply-cpu-XXXXXX)
chmod 755 "$WORK"
DEMO=
cleanup() {
    [ -n "$DEMO" ] && { kill -INT "$DEMO" 2>/dev/null || true; wait "$DEMO" 2>/dev/null || true; }
    rm -rf "$WORK"
}
trap cleanup EXIT
q() { "$PSQL" -X -qAt -h 127.0.0.1 -U postgres -d postgres "$@"; }
now() { date +%s.%N; }
want=$((N - N / 10))

# measure BINARY: one round with this build.
measure() {
    local bin=$1 dir="$WORK/demo-$RANDOM"
    RUST_LOG=warn "$bin" demo --port 18800 --dir "$dir" > "$WORK/out" 2> "$WORK/err" &
    DEMO=$!
    for _ in $(seq 1 600); do grep -q '^ready$' "$WORK/out" 2>/dev/null && break; sleep 0.1; done
    grep -q '^ready$' "$WORK/out" || { cat "$WORK/err" >&2; exit 1; }
    local b2 log
    b2=$(sed -n 's|^backend 2: postgres://postgres@127.0.0.1:\([0-9]*\)/.*|\1|p' "$WORK/out")
    log=$(ls "$dir"/pg2/*.log | head -1)
    q -p 18800 -c "CREATE TABLE line (id bigint PRIMARY KEY, item bigint, qty int)"
    for _ in $(seq 1 300); do
        [ "$(q -p "$b2" -c "SELECT to_regclass('line') IS NOT NULL")" = t ] && break
        sleep 0.1
    done
    q -p "$b2" -c "ALTER SYSTEM SET log_statement_stats = on" -c "SELECT pg_reload_conf()" > /dev/null
    local from t0 t1 t2
    from=$(($(wc -c < "$log") + 1))
    t0=$(now)
    q -p 18800 -c "BEGIN; INSERT INTO line SELECT g, 1 + g % 50, g % 9 FROM generate_series(1, $N) g; \
                   UPDATE line SET qty = qty + 1 WHERE id % 3 = 0; DELETE FROM line WHERE id % 10 = 0; COMMIT"
    t1=$(now)
    for _ in $(seq 1 6000); do
        [ "$(q -p "$b2" -c "SELECT count(*) FROM line")" = "$want" ] && break
        sleep 0.1
    done
    t2=$(now)
    [ "$(q -p "$b2" -c "SELECT count(*) FROM line")" = "$want" ] || { echo "backend 2 never held $want rows" >&2; exit 1; }
    local cpu
    cpu=$(tail -c +"$from" "$log" |
        sed -n 's/.*!\s*\([0-9.]*\) s user, \([0-9.]*\) s system, [0-9.]* s elapsed.*/\1 \2/p' |
        awk '{u += $1; s += $2} END {printf "%.1f s user, %.1f s system", u, s}')
    printf '%s: commit %.1f s, backend 2 done %.1f s after it, its statements %s\n' \
        "$bin" "$(echo "$t1 - $t0" | bc)" "$(echo "$t2 - $t1" | bc)" "$cpu"
    kill -INT "$DEMO"
    wait "$DEMO" 2>/dev/null || true
    DEMO=
    rm -rf "$dir"
}

echo "one transaction through node 1: $N inserts, $((N / 3)) updates, $((N / 10)) deletes"
for _ in $(seq 1 "$ROUNDS"); do
    for bin in "$@"; do measure "$bin"; done
done
