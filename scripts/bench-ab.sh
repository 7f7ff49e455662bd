#!/usr/bin/env bash
# Two builds of KeyVault side by side: the same scenario on each, alternating, a fresh
# `keyvault dev` per run (pinned to CPU 0) and `keyvault bench` on CPU 1. Besides the
# rate, perf counts what the server spends per request in the middle 3 s of each run:
# system calls, context switches and CPU time (these vary less than the rate on a shared
# machine). The run fails if any response was not 2xx.
#
#   ./scripts/bench-ab.sh BASE_BINARY NEW_BINARY SCENARIO [rounds] [duration]
#
# Build the two binaries first, e.g. the commit before a change in a worktree sharing
# target/ (`git worktree add /tmp/base HEAD~1; cd /tmp/base;
# CARGO_TARGET_DIR=$OLDPWD/target cargo build --release -p keyvault --bin keyvault`)
# and copy each target/release/keyvault aside. SCENARIO is one of `keyvault bench`'s
# (read, approle-login, transit-encrypt, transit-sign, gateway-verify, ...).
# BASE_DEV_ARGS and NEW_DEV_ARGS add options to each side's `keyvault dev` (one binary
# in two configurations: pass it twice, e.g. NEW_DEV_ARGS="--audit-mode buffered").
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_debs softhsm2 util-linux jq linux-perf

[ $# -ge 3 ] || { sed -n 2,16p "$0"; exit 2; }
BASE=$(realpath "$1")
NEW=$(realpath "$2")
SCENARIO=$3
ROUNDS=${4:-3}
DURATION=${5:-8}
[ "$DURATION" -ge 6 ] || { echo "duration: at least 6 (seconds)" >&2; exit 2; }
WORK=$(mktemp -d /tmp/keyvault-ab.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

failed=0
for round in $(seq "$ROUNDS"); do
    for build in base new; do
        if [ "$build" = base ]; then KV=$BASE; ARGS=${BASE_DEV_ARGS:-}; else KV=$NEW; ARGS=${NEW_DEV_ARGS:-}; fi
        # shellcheck disable=SC2086 # the options are words
        start_dev $ARGS
        PIDS+=("$PID")
        KEYVAULT_TOKEN=$TOKEN taskset -c 1 "$KV" bench --address "$ADDR" --ca-file "$CA" --scenario "$SCENARIO" \
            --connections 32 --duration "${DURATION}s" --setup --json > "$WORK/bench.json" &
        BENCH=$!
        sleep 3
        perf stat -x, -e raw_syscalls:sys_enter,context-switches,task-clock -p "$PID" -- sleep 3 2> "$WORK/perf.csv"
        wait "$BENCH"
        kill "$PID"; wait "$PID" 2>/dev/null || true
        rate=$(jq '.requests_per_second' "$WORK/bench.json")
        errors=$(jq '.errors' "$WORK/bench.json")
        [ "$errors" = 0 ] || failed=1
        awk -F, -v rate="$rate" -v b="$build" -v r="$round" -v s="$SCENARIO" -v e="$errors" -v j="$(jq -c '{p50_ms, p99_ms}' "$WORK/bench.json")" '
            /sys_enter/ {sys = $1} /context-switches/ {cs = $1} /task-clock/ {tc = $1}
            END {
                n = rate * 3
                printf "%s round %s %-4s %8.0f req/s  %s  errors %s  per request: %5.1f syscalls, %4.2f context switches, %6.1f us CPU (server at %3.0f%% of its core)\n",
                    s, r, b, rate, j, e, sys / n, cs / n, tc * 1000 / n, tc / 30
            }' "$WORK/perf.csv"
    done
done
if [ "$failed" != 0 ]; then
    echo "FAILED: some responses were not 2xx" >&2
    exit 1
fi
