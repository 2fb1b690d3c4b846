#!/usr/bin/env bash
# PostgreSQL's own regression suite (pg_regress, installcheck-parallel
# schedule) through node 1 of a three-node `chorus demo` that replicates
# the database "regression", then a comparison of every backend: the same
# schema (pg_dump --schema-only) and the same rows (pg_dump --data-only,
# Chorus's own schema left out). Not part of CI.
#
# Usage: PG_SRC=DIR [PLAIN=1] bash scripts/pg-regress.sh
#   PLAIN=1: the baseline instead, the same run against one plain
#   PostgreSQL (the backend of a one-node demo, directly): which tests fail
#   on this machine whatever Chorus does (psql and server minor versions
#   other than the tests').
#   DIR: PostgreSQL's source of the backends' major version (the Debian
#   source package: apt-get source postgresql-15), with
#   src/test/regress/regress.so built (the script builds it with the server
#   headers of postgresql-server-dev-15 when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${PG_SRC:?set PG_SRC to a PostgreSQL source tree}"
PORT=${PORT:-27432}
BINDIR=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
LIBDIR=$(dirname "$BINDIR")/lib
PG_REGRESS=${PG_REGRESS:-$LIBDIR/pgxs/src/test/regress/pg_regress}
REGRESS=$PG_SRC/src/test/regress
INC=$("$BINDIR/pg_config" --includedir-server 2>/dev/null || pg_config --includedir-server)
if [ ! -f "$REGRESS/regress.so" ]; then
    cc -O2 -fPIC -shared -I"$INC" "$REGRESS/regress.c" -o "$REGRESS/regress.so"
fi
# The trigger functions the "triggers" test loads (contrib/spi).
for spi in autoinc refint; do
    if [ ! -f "$REGRESS/$spi.so" ] && [ -f "$PG_SRC/contrib/spi/$spi.c" ]; then
        cc -O2 -fPIC -shared -I"$INC" "$PG_SRC/contrib/spi/$spi.c" -o "$REGRESS/$spi.so"
    fi
done

cargo build --release -q -p chorus-proxy
WORK=$(mktemp -d /tmp/chorus-regress-XXXXXX)
chmod 755 "$WORK"
if [ -n "${PLAIN:-}" ]; then DEMO_ARGS=(--nodes 1 --proxy-only); else DEMO_ARGS=(); fi
RUST_LOG=${RUST_LOG:-warn} ./target/release/chorus demo --port "$PORT" --dir "$WORK/demo" --database regression \
    "${DEMO_ARGS[@]}" > "$WORK/demo.out" 2> "$WORK/demo.err" &
DEMO=$!
trap 'kill -INT $DEMO 2>/dev/null || true; wait $DEMO 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 1 600); do grep -q '^ready$' "$WORK/demo.out" 2>/dev/null && break; sleep 0.1; done
grep -q '^ready$' "$WORK/demo.out" || { cat "$WORK/demo.err" >&2; exit 1; }
port() { sed -n "s|^backend $1: postgres://postgres@127.0.0.1:\([0-9]*\)/regression$|\1|p" "$WORK/demo.out"; }
# The suite's target: node 1, or for the baseline backend 1 itself.
TARGET=$PORT
[ -n "${PLAIN:-}" ] && TARGET=$(port 1)

# What pg_regress sets when it creates the database itself.
for setting in "lc_messages TO 'C'" "lc_monetary TO 'C'" "lc_numeric TO 'C'" "lc_time TO 'C'" \
    "bytea_output TO 'hex'" "timezone_abbreviations TO 'Default'"; do
    psql -X -q -h 127.0.0.1 -p "$TARGET" -U postgres -d regression -c "ALTER DATABASE regression SET $setting"
done

OUT=${OUT:-$WORK/out}
# (results/ too: the backends, run as another user when this runs as
# root, write COPY TO files there.)
mkdir -p "$OUT/results"
chmod 777 "$OUT" "$OUT/results"
( cd "$REGRESS" && "$PG_REGRESS" --inputdir=. --bindir="$BINDIR" --dlpath=. \
    --schedule=parallel_schedule --host=127.0.0.1 --port="$TARGET" --user=postgres \
    --use-existing --dbname=regression --outputdir="$OUT" --max-concurrent-tests=20 ) \
    > "$WORK/regress.log" 2>&1 || true
# One line a test: "name ... ok" or "... FAILED" (PostgreSQL 15), or TAP
# "ok N - name" / "not ok N - name" (16 and later).
grep -E '\.\.\. (ok|FAILED|failed)|^(ok|not ok) [0-9]' "$WORK/regress.log" > "$WORK/results" || true
passed=$(grep -cE '\.\.\. ok|^ok [0-9]' "$WORK/results" || true)
if [ -n "${PLAIN:-}" ]; then LABEL="on plain PostgreSQL"; else LABEL="through node 1"; fi
echo "pg_regress $LABEL: $passed of $(wc -l < "$WORK/results") tests pass"
grep -vE '\.\.\. ok|^ok [0-9]' "$WORK/results" | sed 's/^/  /' || true
[ -n "${KEEP_DIFFS:-}" ] && cp "$OUT/regression.diffs" "$KEEP_DIFFS" 2>/dev/null || true

[ -n "${PLAIN:-}" ] && exit 0
# Every backend, once replication has settled: the same schema and rows.
# What is per backend by design is left out of the comparison: the ranges
# and positions of global sequences (each backend hands out its own
# values: START WITH, MINVALUE and MAXVALUE lines, setval calls), and the
# rows of unlogged tables (not replicated, see docs/compatibility.md).
# Rows are compared as sets: each table's rows sorted, since the physical
# order differs from backend to backend.
sleep "${SETTLE:-20}"
[ -n "${KEEP_LOG:-}" ] && cp "$WORK/demo.err" "$KEEP_LOG" 2>/dev/null || true
sort_rows() {
    awk '/^COPY .* FROM stdin;$/ { print; fflush(); copying = 1; next }
         copying && $0 == "\\." { close(sorter); print; copying = 0; next }
         copying { sorter = "LC_ALL=C sort"; print | sorter; next }
         { print }'
}
# A dump fails when the catalog changes under it (a backend still applying
# the suite's last DDL): tried again, up to a minute.
dump_schema() {
    "$BINDIR/pg_dump" -h 127.0.0.1 -p "$(port "$1")" -U postgres --schema-only --no-owner \
        --exclude-schema=chorus regression > "$WORK/schema$1.raw"
}
for b in 1 2 3; do
    for attempt in 1 2 3 4 5 6; do
        dump_schema "$b" && break
        echo "backend $b: schema dump failed (attempt $attempt); its catalog is still changing"
        sleep 10
    done
    grep -v -E '^\\(un)?restrict' "$WORK/schema$b.raw" \
        | grep -v -E '^    (START WITH|MINVALUE|MAXVALUE|NO MINVALUE|NO MAXVALUE)' > "$WORK/schema$b.sql"
    "$BINDIR/pg_dump" -h 127.0.0.1 -p "$(port "$b")" -U postgres --data-only --exclude-schema=chorus \
        --no-unlogged-table-data regression 2>/dev/null | grep -v -E '^\\(un)?restrict' \
        | grep -v '^SELECT pg_catalog.setval(' | sort_rows > "$WORK/data$b.sql" || true
done
for b in 2 3; do
    if cmp -s "$WORK/schema1.sql" "$WORK/schema$b.sql"; then echo "backend $b: schema identical to backend 1"
    else echo "backend $b: schema differs from backend 1 ($(diff "$WORK/schema1.sql" "$WORK/schema$b.sql" | grep -c '^[<>]') lines)"; fi
    if cmp -s "$WORK/data1.sql" "$WORK/data$b.sql"; then echo "backend $b: data identical to backend 1"
    else echo "backend $b: data differs from backend 1 ($(diff "$WORK/data1.sql" "$WORK/data$b.sql" | grep -c '^[<>]') lines)"; fi
done
[ -n "${KEEP_DUMPS:-}" ] && cp "$WORK"/schema*.sql "$WORK"/data*.sql "$KEEP_DUMPS" 2>/dev/null || true
[ -n "${KEEP_LOG:-}" ] && cp "$WORK/demo.err" "$KEEP_LOG" 2>/dev/null || true
