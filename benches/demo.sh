# Sourced by the benchmark scripts: build the release binary and start
# `chorus demo` on port $PORT in a temporary directory ($WORK), stopped and
# removed on exit. Sets DEMO (its pid), WORK, and waits for "ready";
# defines port_of ("node 1", "backend 2", …: its port, from the demo's
# output) and q (psql as postgres, the machine's newest).
PSQL=$(ls /usr/lib/postgresql/*/bin/psql 2>/dev/null | sort -V | tail -1)
PSQL=${PSQL:-psql}
port_of() { sed -n "s|^$1: postgres://postgres@127.0.0.1:\([0-9]*\)/.*|\1|p" "$WORK/demo.out"; }
q() { "$PSQL" -X -qAt -h 127.0.0.1 -U postgres -d postgres "$@"; }
cargo build --release -q -p chorus-proxy -p chorus-examples
WORK=$(mktemp -d)
trap 'kill -INT $DEMO 2>/dev/null || true; wait $DEMO 2>/dev/null || true; rm -rf "$WORK"' EXIT
./target/release/chorus demo --port "$PORT" --dir "$WORK/demo" >"$WORK/demo.out" 2>"$WORK/demo.err" &
DEMO=$!
for _ in $(seq 1 600); do
    grep -q '^ready' "$WORK/demo.out" 2>/dev/null && break
    sleep 0.1
done
grep -q '^ready' "$WORK/demo.out" || { cat "$WORK/demo.err"; exit 1; }
