#!/usr/bin/env bash
# Memory of a Chorus node holding many idle client connections, in
# transaction pooling: CLIENTS clients (default 10 000) log in (trust), each
# gets its ReadyForQuery and stays idle; the node's resident memory (VmRSS)
# is read before and with them, and the server connections the backend
# sees. Then each client runs one query, to show they all are served by
# the pool's few server connections.
#
# Usage: CLIENTS=10000 bash benches/clients.sh
# Needs: PostgreSQL server programs, python3.
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-10000}
SIZE=${SIZE:-20}
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" -lt $((CLIENTS + 1000)) ]; then
    echo "open files limit $(ulimit -n) is too low for $CLIENTS clients" >&2
    exit 1
fi

cargo build --release -q -p chorus-proxy
WORK=$(mktemp -d /tmp/chorus-clients-XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# A backend from the demo command (a plain proxy in front of it, unused),
# and the node measured: the demo's configuration, in transaction pooling,
# taking the clients.
DEMO_PORT=$(free_port)
RUST_LOG=warn ./target/release/chorus demo --nodes 1 --proxy-only --port "$DEMO_PORT" --dir "$WORK/cluster" > "$WORK/demo.out" 2> "$WORK/demo.err" &
PIDS+=($!)
for _ in $(seq 1 300); do grep -q '^ready$' "$WORK/demo.out" 2>/dev/null && break; sleep 0.1; done
grep -q '^ready$' "$WORK/demo.out" || { cat "$WORK/demo.err" >&2; exit 1; }
PG_PORT=$(sed -n 's|^backend 1: postgres://postgres@127.0.0.1:\([0-9]*\)/postgres$|\1|p' "$WORK/demo.out")
PORT=$(free_port)
awk -v port="$PORT" -v clients="$CLIENTS" -v size="$SIZE" '
    /^\[/ { section = $0 }
    section == "[node]" && /^listen = / { print "listen = \"127.0.0.1:" port "\""; next }
    section == "[node]" && /^metrics_listen = / { next }
    section == "[node]" && /^max_client_connections = / { print "max_client_connections = " clients + 100; next }
    section == "[pool]" && /^mode = / { print "mode = \"transaction\""; next }
    section == "[pool]" && /^size = / { print "size = " size; next }
    { print }' "$WORK/cluster/node1.toml" > "$WORK/node.toml"
RUST_LOG=warn ./target/release/chorus run --config "$WORK/node.toml" > "$WORK/node.log" 2>&1 &
NODE=$!
PIDS+=($NODE)
for _ in $(seq 1 100); do (echo > "/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done

rss_mb() { awk '/^VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$NODE/status"; }
servers() {
    /usr/lib/postgresql/*/bin/psql -At -h 127.0.0.1 -p "$PG_PORT" -U postgres postgres -c \
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()" 2>/dev/null \
        || psql -At -h 127.0.0.1 -p "$PG_PORT" -U postgres postgres -c \
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
}
BEFORE=$(rss_mb)

# The clients: raw protocol (trust), asyncio. Logs in all of them, signals
# "idle" and waits for a line on stdin; then one query each, and "done".
mkfifo "$WORK/go"
cat > "$WORK/clients.py" <<'PY'
import asyncio, struct, sys
port, count = int(sys.argv[1]), int(sys.argv[2])

def startup():
    body = struct.pack("!I", 196608) + b"user\0postgres\0database\0postgres\0\0"
    return struct.pack("!I", len(body) + 4) + body

async def until_ready(reader):
    while True:
        tag = await reader.readexactly(1)
        length = struct.unpack("!I", await reader.readexactly(4))[0]
        body = await reader.readexactly(length - 4)
        if tag == b"E":
            raise RuntimeError(body.decode(errors="replace"))
        if tag == b"Z":
            return

async def login(limit):
    async with limit:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(startup())
        await until_ready(reader)
        return reader, writer

async def main():
    limit = asyncio.Semaphore(200)
    sessions = await asyncio.gather(*(login(limit) for _ in range(count)))
    print("idle", len(sessions), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    async def one(session):
        reader, writer = session
        query = b"SELECT 1\0"
        writer.write(b"Q" + struct.pack("!I", len(query) + 4) + query)
        await until_ready(reader)
    await asyncio.gather(*(one(s) for s in sessions))
    print("done", len(sessions), flush=True)
    for _, writer in sessions:
        writer.write(b"X\0\0\0\4")
        writer.close()

asyncio.run(main())
PY
python3 "$WORK/clients.py" "$PORT" "$CLIENTS" < "$WORK/go" > "$WORK/clients.out" 2>&1 &
CLIENTS_PID=$!
exec 3> "$WORK/go"
for _ in $(seq 1 1200); do grep -q '^idle' "$WORK/clients.out" && break; sleep 0.1; done
grep -q '^idle' "$WORK/clients.out" || { cat "$WORK/clients.out" >&2; exit 1; }
sleep "${SETTLE:-3}"   # (idle sessions give their read buffers back after 1 s)
IDLE=$(rss_mb)
IDLE_SERVERS=$(servers)
echo >&3
for _ in $(seq 1 1200); do grep -q '^done' "$WORK/clients.out" && break; sleep 0.1; done
grep -q '^done' "$WORK/clients.out" || { cat "$WORK/clients.out" >&2; exit 1; }
sleep "${SETTLE:-3}"
AFTER=$(rss_mb)
AFTER_SERVERS=$(servers)
exec 3>&-
wait "$CLIENTS_PID"

echo "| clients | pool.size | RSS before MB | RSS with idle clients MB | RSS after one query each MB | server connections idle / after |"
echo "|---:|---:|---:|---:|---:|---|"
echo "| $(grep '^done' "$WORK/clients.out" | awk '{print $2}') | $SIZE | $BEFORE | $IDLE | $AFTER | $IDLE_SERVERS / $AFTER_SERVERS |"
