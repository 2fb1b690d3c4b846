#!/usr/bin/env bash
# Multi-master write throughput and replication lag, in one run on one
# machine: pgbench -N spread over the 3 nodes of a Chorus cluster (3
# backends), against pgpool-II in native replication mode over 3 other
# backends (every write sent to every backend by the pooler itself).
#
# For each: TPS (sum over the pgbench processes), failed transactions, and
# whether the backends were identical afterwards (md5 of every pgbench
# table on every backend, read directly). For Chorus also the replication
# lag, origin commit to apply on a peer, p50/p99 over every transaction of
# the run, from the nodes' chorus_replication_delay_seconds histograms
# (interpolated within buckets). pgpool-II writes synchronously, so it has
# no lag to report.
#
# Usage: benches/replication.sh     (DURATION=30 SCALE=10 CLIENTS=12; KEEP=1
#        keeps the working directory with every server's log; RATE=N runs
#        both at a fixed total of N transactions a second, pgbench -R, to
#        read the lag below saturation)
# CLIENTS is the total; Chorus gets CLIENTS/3 per node. Needs PostgreSQL
# server programs, pgbench and pgpool2 (installed with apt-get when running
# as root and missing).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-30}
SCALE=${SCALE:-10}
CLIENTS=${CLIENTS:-12}
THREADS=${THREADS:-2}
PER_NODE=$((CLIENTS / 3))

if ! command -v pgpool >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgpool2 >/dev/null
    else
        echo "pgpool is not installed (Debian: apt-get install pgpool2)" >&2
        exit 1
    fi
fi
PGBENCH=$(ls /usr/lib/postgresql/*/bin/pgbench 2>/dev/null | sort -V | tail -1)
PGBENCH=${PGBENCH:-pgbench}
PSQL=$(ls /usr/lib/postgresql/*/bin/psql 2>/dev/null | sort -V | tail -1)
PSQL=${PSQL:-psql}

cargo build --release -q -p chorus-proxy
WORK=$(mktemp -d /tmp/chorus-repl-bench-XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
    [ -f "$WORK/pgpool/pgpool.pid" ] && kill -INT "$(tr -d '\0' < "$WORK/pgpool/pgpool.pid")" 2>/dev/null || true
    for pid in "${PIDS[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 100); do
        alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    pkill -INT -f "pgpool -n -f $WORK" 2>/dev/null || true
    if [ -n "${KEEP:-}" ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 300); do (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }

# start_demo NAME [flags]: a 3-node demo cluster; sets NAME_out to its output file.
start_demo() {
    local name=$1; shift
    local port; port=$(free_port)
    RUST_LOG=warn ./target/release/chorus demo --nodes 3 --port "$port" --dir "$WORK/$name" "$@" \
        > "$WORK/$name.out" 2> "$WORK/$name.err" &
    PIDS+=($!)
    for _ in $(seq 1 600); do grep -q '^ready$' "$WORK/$name.out" 2>/dev/null && break; sleep 0.1; done
    grep -q '^ready$' "$WORK/$name.out" || { cat "$WORK/$name.err" >&2; exit 1; }
}
ports_of() { # file kind -> ports of "kind i:" lines
    sed -n "s|^$2 [0-9]*: [a-z]*://[^@]*@\{0,1\}127.0.0.1:\([0-9]*\).*|\1|p" "$1"
}

# Every pgbench table's md5 on each backend port given; "identical" or "DIFFERENT".
compare_backends() {
    local first="" verdict=identical
    for p in "$@"; do
        local sum
        sum=$("$PSQL" -X -At -h 127.0.0.1 -p "$p" -U postgres postgres -c "
            SELECT md5(string_agg(h, ',')) FROM (
              SELECT md5(string_agg(a::text, ',' ORDER BY aid)) h FROM pgbench_accounts a
              UNION ALL SELECT md5(string_agg(b::text, ',' ORDER BY bid)) FROM pgbench_branches b
              UNION ALL SELECT md5(string_agg(t::text, ',' ORDER BY tid)) FROM pgbench_tellers t
              UNION ALL SELECT count(*)::text FROM pgbench_history) s")
        if [ -z "$first" ]; then first=$sum; elif [ "$sum" != "$first" ]; then verdict=DIFFERENT; fi
    done
    echo "$verdict"
}

# Wait (at most 120 s) until the backends are identical.
converge() {
    for _ in $(seq 1 240); do
        [ "$(compare_backends "$@")" = identical ] && return 0
        sleep 0.5
    done
    return 1
}

# caught_up PORT...: wait until every chorus slot on each backend has
# confirmed the WAL written there before the call: its walsender has read
# past everything, the apply of a bulk load included (its stream would
# otherwise still be decoding it when the measured run starts).
caught_up() {
    local port lsn
    for port in "$@"; do
        lsn=$("$PSQL" -X -qAt -h 127.0.0.1 -p "$port" -U postgres -d postgres -c "SELECT pg_current_wal_lsn()")
        for _ in $(seq 1 600); do
            [ "$("$PSQL" -X -qAt -h 127.0.0.1 -p "$port" -U postgres -d postgres -c \
                "SELECT bool_and(confirmed_flush_lsn >= '$lsn') FROM pg_replication_slots WHERE slot_name LIKE 'chorus%'")" = t ] && break
            sleep 0.5
        done
    done
}

# run_pgbench OUT PORT CLIENTS [SHARE]: pgbench -N in the background; with
# RATE, at RATE/SHARE transactions a second.
run_pgbench() {
    local rate=()
    [ -n "${RATE:-}" ] && rate=(-R "$((RATE / ${4:-1}))")
    "$PGBENCH" -n -N -c "$3" -j "$THREADS" -T "$DURATION" "${rate[@]}" -h 127.0.0.1 -p "$2" -U postgres postgres > "$1" 2>&1 &
}
sum_field() { # sed-expression files... -> sum of the numbers it prints
    local expr=$1; shift
    sed -n "$expr" "$@" | awk '{s += $1} END {printf "%.0f", s}'
}

# Histogram snapshot of every node: lines "le count", summed over peers and nodes.
delay_snapshot() {
    for url in $(sed -n 's|^metrics [0-9]*: \(http://[^ ]*\)|\1|p' "$WORK/chorus.out"); do
        curl -s "$url"
    done | python3 -c '
import sys, re, collections
acc = collections.Counter()
for line in sys.stdin:
    m = re.match(r"chorus_replication_delay_seconds_bucket\{.*le=\"([^\"]+)\".*\} (\S+)", line)
    if m:
        acc[m.group(1)] += float(m.group(2))
for le, n in acc.items():
    print(le, n)
'
}

# Quantiles from two snapshots (before, after).
delay_quantiles() {
    python3 - "$1" "$2" <<'PY'
import sys
def load(path):
    d = {}
    for line in open(path):
        le, n = line.split()
        d[float("inf") if le == "+Inf" else float(le)] = float(n)
    return d
a, b = load(sys.argv[1]), load(sys.argv[2])
buckets = sorted(b)
cum = [(le, b[le] - a.get(le, 0.0)) for le in buckets]
total = cum[-1][1] if cum else 0
def q(p):
    if total == 0:
        return float("nan")
    target = p * total
    prev_le, prev_n = 0.0, 0.0
    for le, n in cum:
        if n >= target:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (target - prev_n) / max(n - prev_n, 1e-9)
        prev_le, prev_n = le, n
    return prev_le
print(f"{q(0.5) * 1000:.1f} {q(0.99) * 1000:.1f} {int(total)}")
PY
}

echo "machine: $(nproc) CPUs; duration ${DURATION}s; scale $SCALE; $CLIENTS clients in all${RATE:+; $RATE transactions a second in all}" >&2

# --- Chorus: 3 nodes, 3 backends, replicating.
start_demo chorus
mapfile -t NODE_PORTS < <(ports_of "$WORK/chorus.out" node)
mapfile -t CHORUS_PG < <(ports_of "$WORK/chorus.out" backend)
"$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "${NODE_PORTS[0]}" -U postgres postgres > "$WORK/chorus-init.log" 2>&1 \
    || { cat "$WORK/chorus-init.log" >&2; exit 1; }
converge "${CHORUS_PG[@]}" || { echo "chorus backends did not converge after -i" >&2; exit 1; }
caught_up "${CHORUS_PG[@]}"
delay_snapshot > "$WORK/delay.before"
for i in 0 1 2; do run_pgbench "$WORK/chorus-$i.log" "${NODE_PORTS[$i]}" "$PER_NODE" 3; done
wait_jobs() { for job in $(jobs -p); do case " ${PIDS[*]} " in *" $job "*) ;; *) wait "$job" || true ;; esac; done; }
wait_jobs
start=$(date +%s.%N)
if converge "${CHORUS_PG[@]}"; then chorus_same=identical; else chorus_same=DIFFERENT; fi
settle=$(python3 -c "import time; print(f'{time.time() - $start:.1f}')")
delay_snapshot > "$WORK/delay.after"
read -r lag50 lag99 lagn < <(delay_quantiles "$WORK/delay.before" "$WORK/delay.after")
chorus_tps=$(sum_field 's/^tps = \([0-9.]*\).*/\1/p' "$WORK"/chorus-?.log)
chorus_failed=$(sum_field 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$WORK"/chorus-?.log)

# --- pgpool-II native replication over 3 plain backends.
start_demo plain --proxy-only
mapfile -t PLAIN_PG < <(ports_of "$WORK/plain.out" backend)
POOL_PORT=$(free_port)
mkdir -p "$WORK/pgpool"
{
    echo "backend_clustering_mode = 'native_replication'"
    echo "listen_addresses = '127.0.0.1'"
    echo "port = $POOL_PORT"
    echo "unix_socket_directories = '$WORK/pgpool'"
    echo "pcp_listen_addresses = ''"
    echo "pcp_port = $(free_port)"
    echo "pcp_socket_dir = '$WORK/pgpool'"
    echo "pid_file_name = '$WORK/pgpool/pgpool.pid'"
    echo "logdir = '$WORK/pgpool'"
    echo "num_init_children = $((CLIENTS + 4))"
    echo "max_pool = 1"
    echo "enable_pool_hba = off"
    echo "pool_passwd = ''"
    echo "health_check_period = 0"
    echo "failover_on_backend_error = off"
    echo "load_balance_mode = on"
    echo "replicate_select = off"
    echo "insert_lock = off"
    for i in 0 1 2; do
        echo "backend_hostname$i = '127.0.0.1'"
        echo "backend_port$i = ${PLAIN_PG[$i]}"
        echo "backend_weight$i = 1"
        echo "backend_flag$i = 'DISALLOW_TO_FAILOVER'"
    done
} > "$WORK/pgpool/pgpool.conf"
touch "$WORK/pgpool/pcp.conf"
if [ "$(id -u)" -eq 0 ]; then chown -R postgres "$WORK/pgpool"; fi
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
as_pg pgpool -n -f "$WORK/pgpool/pgpool.conf" -F "$WORK/pgpool/pcp.conf" > "$WORK/pgpool/pgpool.log" 2>&1 &
PIDS+=($!)
wait_port "$POOL_PORT"
"$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "$POOL_PORT" -U postgres postgres > "$WORK/pool-init.log" 2>&1 \
    || { cat "$WORK/pool-init.log" "$WORK/pgpool/pgpool.log" >&2; exit 1; }
run_pgbench "$WORK/pool.log" "$POOL_PORT" "$CLIENTS"
wait_jobs
pool_same=$(compare_backends "${PLAIN_PG[@]}")
pool_tps=$(sum_field 's/^tps = \([0-9.]*\).*/\1/p' "$WORK/pool.log")
pool_failed=$(sum_field 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$WORK/pool.log")
[ -n "$pool_tps" ] || { cat "$WORK/pool.log" >&2; }

echo "| target | clients | tps | failed | lag p50 ms | lag p99 ms | backends afterwards |"
echo "|---|---:|---:|---:|---:|---:|---|"
echo "| chorus, 3 nodes | $CLIENTS ($PER_NODE per node) | $chorus_tps | $chorus_failed | $lag50 | $lag99 | $chorus_same (${settle} s after the run; $lagn transactions measured) |"
echo "| pgpool-II native replication | $CLIENTS | $pool_tps | $pool_failed | - | - | $pool_same |"
python3 -c "print(f'chorus / pgpool-II TPS: {float(\"$chorus_tps\") / max(float(\"$pool_tps\" or 0), 1e-9):.2f}')"
