#!/usr/bin/env bash
# Compare two Chorus builds on the client path, in one run: for each, a
# one-node `chorus demo` with replication on (so every stamp and the rest of
# the session policy run), pgbench initialised once per build, then
# alternating rounds of the same pgbench command against each build.
# Prints one line per round: TPS, and the CPU time the Chorus process spent
# per transaction (user + system, from /proc; steadier than TPS on a shared
# machine), then the ratios of the sums.
#
# Usage: benches/ab.sh OLD/chorus NEW/chorus
#        ROUNDS=3 DURATION=10 CLIENTS=32 SCALE=10 PGBENCH_ARGS="-S -M prepared" benches/ab.sh A B
# Needs: PostgreSQL server programs and pgbench.
set -euo pipefail
cd "$(dirname "$0")/.."

OLD=${1:?usage: benches/ab.sh OLD/chorus NEW/chorus}
NEW=${2:?usage: benches/ab.sh OLD/chorus NEW/chorus}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-32}
SCALE=${SCALE:-10}
PGBENCH_ARGS=${PGBENCH_ARGS:-"-S -M prepared"}
PGBENCH=$(ls /usr/lib/postgresql/*/bin/pgbench 2>/dev/null | sort -V | tail -1)
PGBENCH=${PGBENCH:-pgbench}

WORK=$(mktemp -d /tmp/chorus-ab-XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start NAME BINARY: a one-node demo; sets PORT_<NAME> and PID_<NAME>.
start() {
    local name=$1 binary=$2 port
    port=$(free_port)
    RUST_LOG=warn "$binary" demo --nodes 1 --port "$port" --dir "$WORK/$name" \
        > "$WORK/$name.out" 2> "$WORK/$name.err" &
    PIDS+=($!)
    eval "PID_$name=$!"
    for _ in $(seq 1 600); do grep -q '^ready$' "$WORK/$name.out" 2>/dev/null && break; sleep 0.1; done
    grep -q '^ready$' "$WORK/$name.out" || { cat "$WORK/$name.err" >&2; exit 1; }
    "$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "$port" -U postgres postgres > /dev/null 2>&1
    eval "PORT_$name=$port"
}

# CPU ticks (user + system) of a process so far.
ticks() {
    awk '{print $14 + $15}' "/proc/$1/stat"
}

# run PORT PID: prints "TPS CPU-µs-per-transaction".
run() {
    local before after out tps txns
    before=$(ticks "$2")
    # shellcheck disable=SC2086
    out=$("$PGBENCH" -n -T "$DURATION" -c "$CLIENTS" -j 2 $PGBENCH_ARGS -h 127.0.0.1 -p "$1" -U postgres postgres)
    after=$(ticks "$2")
    tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' <<< "$out")
    txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<< "$out")
    python3 -c "print($tps, round(($after - $before) * 1e6 / $(getconf CLK_TCK) / $txns, 2))"
}

start old "$OLD"
start new "$NEW"
echo "pgbench $PGBENCH_ARGS -c $CLIENTS -T $DURATION, scale $SCALE, $ROUNDS rounds"
SUMS="0 0 0 0"
for round in $(seq 1 "$ROUNDS"); do
    read -r a_tps a_cpu <<< "$(run "$PORT_old" "$PID_old")"
    read -r b_tps b_cpu <<< "$(run "$PORT_new" "$PID_new")"
    echo "round $round: old $a_tps tps, $a_cpu us CPU/txn; new $b_tps tps, $b_cpu us CPU/txn"
    SUMS=$(python3 -c "s=[float(x) for x in '$SUMS'.split()]; print(s[0]+$a_tps, s[1]+$a_cpu, s[2]+$b_tps, s[3]+$b_cpu)")
done
python3 -c "s=[float(x) for x in '$SUMS'.split()]; print('new / old: tps %.3f, CPU per transaction %.3f' % (s[2]/s[0], s[3]/s[1]))"
