#!/usr/bin/env bash
# Key operations (issue 4), in one run: the raw rates (criterion, pinned to CPU 0: the
# core the server gets), then over HTTP against `keyvault dev` pinned to CPU 0 with the
# load generator on CPU 1: gateway verifications single and batched (100 per request),
# transit sign and encrypt.
#
#   ./scripts/bench-keyops.sh [duration] [connections]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_debs softhsm2 util-linux jq

DURATION=${1:-8s}
CONNS=${2:-32}
echo "== raw rates (one thread, CPU 0)"
# The name line, then the first "thrpt:" line after it (later ones compare with an
# earlier run), middle estimate.
taskset -c 0 cargo bench --quiet -p keyvault --bench keyops -- --noplot 2>/dev/null | \
    awk '/^keyops\// {name=$1; want=1; next} want && /thrpt:/ {print name, $(NF-3), $(NF-2); want=0}'

cargo build --release --quiet -p keyvault --bin keyvault
KV=target/release/keyvault
WORK=$(mktemp -d /tmp/keyvault-bench-keyops.XXXXXX)
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
start_dev
echo "== over HTTP (server on CPU 0, load on CPU 1)"
for scenario in gateway-verify gateway-verify-batch transit-sign transit-encrypt; do
    KEYVAULT_TOKEN=$TOKEN taskset -c 1 "$KV" bench --address "$ADDR" --ca-file "$CA" --scenario "$scenario" \
        --connections "$CONNS" --duration "$DURATION" --setup --json \
        | jq -c '{scenario, requests_per_second: (.requests_per_second|floor), items_per_second: (.items_per_second|floor), p50_ms, p99_ms, errors}'
done
