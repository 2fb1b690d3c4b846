#!/usr/bin/env bash
# Compare, in one run on one machine, pgbench against:
#   direct     PostgreSQL itself
#   pgb-sess   PgBouncer, session pooling
#   pgb-tx     PgBouncer, transaction pooling (not with -M prepared: PgBouncer
#              1.18 cannot keep prepared statements in transaction mode)
#   chorus     a Chorus node (release build) in front of the same PostgreSQL
#   chorus-tx  a second Chorus node on it, in transaction pooling
#              (pool.mode = "transaction", pool.size = 64, as PgBouncer's)
# for the select-only (-S) and simple-update (-N) scripts, -M simple|extended|
# prepared, with 8 and 32 clients. Prints a Markdown table.
#
# Two more targets, only when named in TARGETS, measure read routing on a
# replicating 3-node demo in transaction pooling (its own pgbench tables,
# at scale RR_SCALE, default 1, loaded through node 1 and waited for on
# every backend), through node 1:
#   chorus-rr-home  read-only transactions on node 1's home backend
#   chorus-rr-any   the same sessions with PGOPTIONS='-c chorus.read_routing=any':
#                   read-only transactions taking turns on the three backends
# Compare those two with each other only: the other targets have no
# replication and a larger table.
#
# Usage: benches/pgbench.sh            (DURATION=10 SCALE=10 by default)
#        DURATION=5 CLIENTS="32" MODES="prepared" SCRIPTS="select-only" benches/pgbench.sh
#        TARGETS="chorus-rr-home chorus-rr-any" SCRIPTS=select-only benches/pgbench.sh
# Needs: PostgreSQL server programs and pgbench, pgbouncer (installed with
# apt-get when running as root and missing).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
SCALE=${SCALE:-10}
CLIENTS=${CLIENTS:-"8 32"}
MODES=${MODES:-"simple extended prepared"}
SCRIPTS=${SCRIPTS:-"select-only simple-update"}
TARGETS=${TARGETS:-"direct pgb-sess pgb-tx chorus chorus-tx"}
THREADS=${THREADS:-2}
RR_SCALE=${RR_SCALE:-1}

if ! command -v pgbouncer >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null
    else
        echo "pgbouncer is not installed (Debian: apt-get install pgbouncer)" >&2
        exit 1
    fi
fi
PGBENCH=$(ls /usr/lib/postgresql/*/bin/pgbench 2>/dev/null | sort -V | tail -1)
PGBENCH=${PGBENCH:-pgbench}

cargo build --release -q -p chorus-proxy
WORK=$(mktemp -d /tmp/chorus-bench-XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
    for f in "$WORK"/pgb-*/pgbouncer.pid; do
        [ -f "$f" ] && kill -TERM "$(cat "$f")" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 100); do
        alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# One backend and one Chorus node (a plain proxy: no replication, so the
# backend is the same stock PostgreSQL for every target), from the demo command.
CHORUS_PORT=$(free_port)
RUST_LOG=warn ./target/release/chorus demo --nodes 1 --proxy-only --port "$CHORUS_PORT" --dir "$WORK/cluster" > "$WORK/demo.out" 2> "$WORK/demo.err" &
PIDS+=($!)
for _ in $(seq 1 300); do grep -q '^ready$' "$WORK/demo.out" 2>/dev/null && break; sleep 0.1; done
grep -q '^ready$' "$WORK/demo.out" || { cat "$WORK/demo.err" >&2; exit 1; }
PG_PORT=$(sed -n 's|^backend 1: postgres://postgres@127.0.0.1:\([0-9]*\)/postgres$|\1|p' "$WORK/demo.out")

# The same node's configuration, on another port, in transaction pooling.
CHORUS_TX_PORT=$(free_port)
awk -v port="$CHORUS_TX_PORT" '
    /^\[/ { section = $0 }
    section == "[node]" && /^listen = / { print "listen = \"127.0.0.1:" port "\""; next }
    section == "[node]" && /^metrics_listen = / { next }
    section == "[pool]" && /^mode = / { print "mode = \"transaction\""; next }
    section == "[pool]" && /^size = / { print "size = 64"; next }
    { print }' "$WORK/cluster/node1.toml" > "$WORK/chorus-tx.toml"
grep -q '^mode = "transaction"' "$WORK/chorus-tx.toml" || { echo "no [pool] in the demo's configuration" >&2; exit 1; }
RUST_LOG=warn ./target/release/chorus run --config "$WORK/chorus-tx.toml" > "$WORK/chorus-tx.log" 2>&1 &
PIDS+=($!)

# PgBouncer, one instance per pooling mode, as the postgres user when root.
start_pgbouncer() { # name mode port
    local dir="$WORK/$1"
    mkdir -p "$dir"
    echo '"postgres" ""' > "$dir/users.txt"
    cat > "$dir/pgbouncer.ini" <<INI
[databases]
postgres = host=127.0.0.1 port=$PG_PORT dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $3
unix_socket_dir =
auth_type = trust
auth_file = $dir/users.txt
pool_mode = $2
max_client_conn = 500
default_pool_size = 64
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
INI
    if [ "$(id -u)" -eq 0 ]; then
        chown -R postgres "$dir"
        runuser -u postgres -- pgbouncer "$dir/pgbouncer.ini" >/dev/null 2>&1 &
    else
        pgbouncer "$dir/pgbouncer.ini" >/dev/null 2>&1 &
    fi
    PIDS+=($!)
}
PGB_SESS_PORT=$(free_port); start_pgbouncer pgb-sess session "$PGB_SESS_PORT"
PGB_TX_PORT=$(free_port); start_pgbouncer pgb-tx transaction "$PGB_TX_PORT"
wait_port() { for _ in $(seq 1 100); do (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }
wait_port "$PGB_SESS_PORT"; wait_port "$PGB_TX_PORT"; wait_port "$CHORUS_PORT"; wait_port "$CHORUS_TX_PORT"

# The replicating demo of the read-routing targets, when they are asked for.
RR_PORT=
case " $TARGETS " in
    *" chorus-rr-"*)
        RR_PORT=$(free_port)
        RUST_LOG=warn ./target/release/chorus demo --nodes 3 --pool-mode transaction --port "$RR_PORT" \
            --dir "$WORK/rr" > "$WORK/rr.out" 2> "$WORK/rr.err" &
        PIDS+=($!)
        for _ in $(seq 1 600); do grep -q '^ready$' "$WORK/rr.out" 2>/dev/null && break; sleep 0.1; done
        grep -q '^ready$' "$WORK/rr.out" || { cat "$WORK/rr.err" >&2; exit 1; }
        "$PGBENCH" -i -q -s "$RR_SCALE" -h 127.0.0.1 -p "$RR_PORT" -U postgres postgres > "$WORK/rr-init.log" 2>&1 \
            || { cat "$WORK/rr-init.log" >&2; exit 1; }
        rows=$((RR_SCALE * 100000))
        for backend in $(sed -n 's|^backend [0-9]*: postgres://postgres@127.0.0.1:\([0-9]*\)/postgres$|\1|p' "$WORK/rr.out"); do
            for _ in $(seq 1 600); do
                n=$(psql -X -At -h 127.0.0.1 -p "$backend" -U postgres postgres \
                    -c "SELECT count(*) FROM pgbench_accounts" 2>/dev/null || true)
                [ "$n" = "$rows" ] && break
                sleep 0.5
            done
            [ "$n" = "$rows" ] || { echo "backend on port $backend has $n of $rows rows" >&2; exit 1; }
        done
        ;;
esac

# Transactions committed on each backend of the replicating demo so far.
rr_commits() {
    for backend in $(sed -n 's|^backend [0-9]*: postgres://postgres@127.0.0.1:\([0-9]*\)/postgres$|\1|p' "$WORK/rr.out"); do
        psql -X -At -h 127.0.0.1 -p "$backend" -U postgres postgres \
            -c "SELECT xact_commit FROM pg_stat_database WHERE datname = 'postgres'"
    done
}

port_of() {
    case $1 in
        direct) echo "$PG_PORT" ;;
        pgb-sess) echo "$PGB_SESS_PORT" ;;
        pgb-tx) echo "$PGB_TX_PORT" ;;
        chorus) echo "$CHORUS_PORT" ;;
        chorus-tx) echo "$CHORUS_TX_PORT" ;;
        chorus-rr-home | chorus-rr-any) echo "$RR_PORT" ;;
    esac
}

"$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U postgres postgres > "$WORK/init.log" 2>&1 \
    || { cat "$WORK/init.log" >&2; exit 1; }

echo "| script | mode | clients | target | tps | avg latency ms | failed |"
echo "|---|---|---|---|---:|---:|---:|"
for script in $SCRIPTS; do
    flag=$([ "$script" = select-only ] && echo -S || echo -N)
    for mode in $MODES; do
        for clients in $CLIENTS; do
            for target in $TARGETS; do
                if [ "$target" = pgb-tx ] && [ "$mode" = prepared ]; then continue; fi
                options=
                [ "$target" = chorus-rr-any ] && options='-c chorus.read_routing=any'
                case $target in chorus-rr-*) before=$(rr_commits) ;; esac
                out=$(PGOPTIONS="$options" "$PGBENCH" -n "$flag" -M "$mode" -c "$clients" -j "$THREADS" -T "$DURATION" \
                      -h 127.0.0.1 -p "$(port_of "$target")" -U postgres postgres 2>&1) || true
                case $target in
                    chorus-rr-*)
                        spread=$(paste -d' ' <(echo "$before") <(rr_commits) | awk '{ printf "%s%d", (NR > 1 ? " / " : ""), $2 - $1 }')
                        echo "$script $mode $clients $target: commits per backend $spread" >> "$WORK/notes"
                        ;;
                esac
                tps=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1)
                lat=$(echo "$out" | sed -n 's/^latency average = \([0-9.]*\) ms/\1/p')
                failed=$(echo "$out" | sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p')
                echo "| $script | $mode | $clients | $target | ${tps:-error} | ${lat:-} | ${failed:-} |"
            done
        done
    done
done
if [ -s "$WORK/notes" ]; then
    echo
    cat "$WORK/notes"
fi
