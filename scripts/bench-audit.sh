#!/usr/bin/env bash
# Audit log cost (issue 5): secret-read throughput with the audit log in each mode, at
# 32 and at 128 connections, measured in one run against `keyvault dev` pinned to CPU 0 (data key cache on, so that
# the HSM does not hide the audit cost), load generator pinned to CPU 1.
#
#   ./scripts/bench-audit.sh [duration] [connections]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_debs softhsm2 util-linux jq

DURATION=${1:-8s}
CONNS=${2:-32}
cargo build --release --quiet -p keyvault --bin keyvault
KV=target/release/keyvault
WORK=$(mktemp -d /tmp/keyvault-bench-audit.XXXXXX)
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

for mode in dangerous_off fail_closed buffered; do
    start_dev --dek-cache-ttl 30s --audit-mode "$mode"
    for conns in $CONNS 128; do
        KEYVAULT_TOKEN=$TOKEN taskset -c 1 "$KV" bench --address "$ADDR" --ca-file "$CA" --scenario read \
            --connections "$conns" --duration "$DURATION" --setup --json \
            | jq -c --arg m "$mode" '{audit: $m, connections, rps: (.requests_per_second|floor), p50_ms, p99_ms, errors}'
    done
    kill "$PID"; wait "$PID" 2>/dev/null || true
    PID=
done
