#!/usr/bin/env bash
# Two builds of `keyvault`, side by side in one run: token calls through tokio's
# `spawn_blocking` (before) and through the dedicated token workers (after). Each server
# is `keyvault dev` pinned to CPU 0; the load generator (the "after" build's `keyvault
# bench`) runs on CPU 1; 32 connections, every scenario for `duration`.
#
#   ./scripts/bench-token-workers.sh BEFORE_BINARY AFTER_BINARY [duration]
#
# The figures in docs/PERFORMANCE.md: BEFORE built from commit ff33ff1 (the last with
# `spawn_blocking`: `git worktree add /tmp/before ff33ff1 && (cd /tmp/before && cargo build
# --release -p keyvault)`), AFTER from the commit that added the token workers.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_debs softhsm2 util-linux jq
BEFORE=$1
AFTER=$2
DURATION=${3:-8s}
for round in 1 2; do
    for build in before after; do
        if [ "$build" = before ]; then KV=$BEFORE; else KV=$AFTER; fi
        WORK=$(mktemp -d /tmp/keyvault-bench-workers.XXXXXX)
        start_dev
        for sc in read transit-encrypt transit-sign approle-login; do
            KEYVAULT_TOKEN=$TOKEN taskset -c 1 "$AFTER" bench --address "$ADDR" --ca-file "$CA" --scenario "$sc" \
                --path secret/bench --connections 32 --duration "$DURATION" --setup --json \
                | jq -c --arg b "$build" --arg r "$round" '{round: $r, build: $b, scenario, requests_per_second, p50_ms, p99_ms, errors}'
        done
        kill "$PID"
        wait "$PID" 2>/dev/null || true
        rm -rf "$WORK"
    done
done
