#!/usr/bin/env bash
# The chaos soak: runs the chaos suite (proxy/tests/chaos.rs) over many
# seeds, each a fresh cluster with two faults under the workloads, and
# keeps going past a failing seed. Prints one line per seed and a summary;
# the full output (with the nodes' logs of failing seeds) goes to the
# report file.
#
#   SEEDS=1-300 bash scripts/chaos-soak.sh [report-file]
#
# A seed reproduces its faults, targets, timings, clock offsets and
# workload choices: SEEDS=42 runs seed 42 alone.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds="${SEEDS:-1-300}"
report="${1:-chaos-soak.log}"
echo "chaos soak: seeds $seeds, report in $report"
CHORUS_CHAOS_SEEDS="$seeds" cargo test -p chorus-proxy --test chaos -- \
    --ignored --nocapture --test-threads 1 soak >"$report" 2>&1 || true
grep -E '^(PASS|FAIL|[0-9]+ seeds)' "$report"
grep -q "test result: ok" "$report"
