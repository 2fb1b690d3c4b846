#!/usr/bin/env bash
# psycopg 3's own test suite, in one run, against plain PostgreSQL (the
# backend of a one-node `chorus demo --proxy-only`, no Chorus objects on it)
# and through node 1 of a three-node `chorus demo` (replication on). Prints
# passed/failed/skipped for both and lists the tests that pass directly but
# fail through Chorus. Not part of CI (it takes several minutes).
#
# Usage: PSYCOPG_SRC=DIR [CHORUS_DEMO_ARGS="--pool-mode transaction"] \
#          bash scripts/psycopg-suite.sh [extra pytest args]
#   DIR holds psycopg's source at a release tag (git clone, checkout 3.3.4).
# Needs python3 with venv; installs psycopg (pure Python, the system libpq)
# and its test dependencies into a virtualenv under $WORK.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${PSYCOPG_SRC:?set PSYCOPG_SRC to a psycopg source tree}"
MARKERS=${MARKERS:-"not slow"}
LIMIT=${LIMIT:-2400}

cargo build --release -q -p chorus-proxy
WORK=$(mktemp -d /tmp/chorus-psycopg-XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q "$PSYCOPG_SRC/psycopg[test]" "$PSYCOPG_SRC/psycopg_pool"

demo() { # dir port args…
    local dir=$1 port=$2
    shift 2
    RUST_LOG=warn ./target/release/chorus demo --port "$port" --dir "$WORK/$dir" "$@" \
        > "$WORK/$dir.out" 2> "$WORK/$dir.err" &
    PIDS+=($!)
    for _ in $(seq 1 600); do grep -q '^ready$' "$WORK/$dir.out" 2>/dev/null && break; sleep 0.1; done
    grep -q '^ready$' "$WORK/$dir.out" || { cat "$WORK/$dir.err" >&2; exit 1; }
}
demo plain 26432 --nodes 1 --proxy-only
PLAIN_PORT=$(sed -n 's|^backend 1: postgres://postgres@127.0.0.1:\([0-9]*\)/postgres$|\1|p' "$WORK/plain.out")
# (CHORUS_DEMO_ARGS: more `chorus demo` options for the Chorus side, e.g.
# "--pool-mode transaction".)
# shellcheck disable=SC2086
demo chorus 26632 ${CHORUS_DEMO_ARGS:-}

run() { # name dsn
    echo "== psycopg $(cat "$PSYCOPG_SRC/TAG" 2>/dev/null || true) tests: $1 ($2)"
    (cd "$PSYCOPG_SRC" && PSYCOPG_IMPL=python timeout "$LIMIT" "$WORK/venv/bin/python" -m pytest \
        -p no:randomly -q -m "$MARKERS" --junitxml="$WORK/$1.xml" \
        --test-dsn "$2" "${@:3}" tests > "$WORK/$1.log" 2>&1) || true
    tail -1 "$WORK/$1.log"
}
run plain "host=127.0.0.1 port=$PLAIN_PORT user=postgres dbname=postgres" "$@"
run chorus "host=127.0.0.1 port=26632 user=postgres dbname=postgres" "$@"

"$WORK/venv/bin/python" - "$WORK/plain.xml" "$WORK/chorus.xml" <<'PY'
import sys
import xml.etree.ElementTree as ET

def outcomes(path):
    result = {}
    for case in ET.parse(path).iter("testcase"):
        name = case.get("classname", "") + "::" + case.get("name", "")
        if case.find("skipped") is not None:
            result[name] = "skipped"
        elif case.find("failure") is not None or case.find("error") is not None:
            result[name] = "failed"
        else:
            result[name] = "passed"
    return result

plain, chorus = outcomes(sys.argv[1]), outcomes(sys.argv[2])
for label, o in (("plain PostgreSQL", plain), ("through Chorus", chorus)):
    counts = {k: sum(1 for v in o.values() if v == k) for k in ("passed", "failed", "skipped")}
    print(f"{label}: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
both = [t for t, v in plain.items() if v == "passed"]
kept = [t for t in both if chorus.get(t) == "passed"]
print(f"of the {len(both)} tests passing on plain PostgreSQL, {len(kept)} pass through Chorus "
      f"({100 * len(kept) / max(len(both), 1):.1f}%)")
lost = sorted(t for t in both if chorus.get(t) != "passed")
print("passing directly, not through Chorus:")
for t in lost:
    print("  " + t)
PY
