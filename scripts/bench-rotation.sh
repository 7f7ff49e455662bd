#!/usr/bin/env bash
# Master key rotation (issue 6), in one run:
#  1. in process, pinned to CPU 0: the token's raw unwrap+wrap rate (before and after),
#     and a rotation of N stored secrets driven to the end (`cargo bench --bench rotation`);
#  2. against `keyvault dev` pinned to CPU 0, load generator on CPU 1: fill N secrets,
#     read latency before any rotation, a rotation with no other load (re-wrap rate), then
#     a rotation while the same read load runs (read latency during it, re-wrap rate under
#     load), then retirement of the old versions.
#
#   ./scripts/bench-rotation.sh [duration] [connections] [records]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_debs softhsm2 util-linux jq

DURATION=${1:-8s}
CONNS=${2:-16}
RECORDS=${3:-100000}

echo "== in process (one thread on CPU 0, $RECORDS secrets, sled)"
ROTATION_RECORDS=$RECORDS taskset -c 0 cargo bench --quiet -p keyvault --bench rotation 2>/dev/null | grep '^rotation/'

cargo build --release --quiet -p keyvault --bin keyvault
KV=target/release/keyvault
WORK=$(mktemp -d /tmp/keyvault-bench-rotation.XXXXXX)
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
start_dev
export KEYVAULT_ADDR=$ADDR KEYVAULT_CACERT=$CA KEYVAULT_TOKEN=$TOKEN
load() { taskset -c 1 "$KV" bench "$@"; }
now() { date +%s.%N; }
rate() { awk -v r="$RECORDS" -v a="$1" -v b="$2" 'BEGIN {printf "\"seconds\": %.1f, \"records_per_second\": %d", b - a, r / (b - a)}'; }
wait_idle() {
    while [ "$(load_status | jq -r .data.state)" != idle ]; do sleep 0.2; done
}
load_status() {
    curl -s --cacert "$KEYVAULT_CACERT" -H @<(printf 'X-Vault-Token: %s\n' "$KEYVAULT_TOKEN") \
        "$KEYVAULT_ADDR/v1/sys/rotate/status"
}
rotate() {
    curl -s --fail --cacert "$KEYVAULT_CACERT" -H @<(printf 'X-Vault-Token: %s\n' "$KEYVAULT_TOKEN") \
        -X POST --json '{}' "$KEYVAULT_ADDR/v1/sys/rotate" > /dev/null
}

echo "== over HTTP (server on CPU 0, load on CPU 1)"
load --scenario write --path secret/fill --requests "$RECORDS" --connections 32 --duration 1h --warmup 0s --json \
    | jq -c '{fill: .requests, seconds: ((.seconds*10|floor)/10), writes_per_second: (.requests_per_second|floor), errors}'
READ=(--scenario read --connections "$CONNS" --duration "$DURATION" --json)
SUMMARY='{rps: (.requests_per_second|floor), p50_ms, p90_ms, p99_ms, max_ms, errors}'
load "${READ[@]}" --setup | jq -c "{reads: \"before rotation\"} + $SUMMARY"

T0=$(now); rotate; wait_idle; T1=$(now)
echo "{\"rotation\": 1, \"load\": \"none\", \"records\": $RECORDS, $(rate "$T0" "$T1")}"

T0=$(now); rotate
load "${READ[@]}" --warmup 0.5s > "$WORK/during.json"
STATE=$(load_status | jq -r .data.state)
wait_idle; T1=$(now)
jq -c "{reads: \"during rotation\", rotation_still_running_at_the_end: (\"$STATE\" == \"rewrapping\")} + $SUMMARY" "$WORK/during.json"
echo "{\"rotation\": 2, \"load\": \"reads during the first $DURATION\", \"records\": $RECORDS, $(rate "$T0" "$T1")}"
load "${READ[@]}" | jq -c "{reads: \"after rotation\"} + $SUMMARY"
curl -s --fail --cacert "$KEYVAULT_CACERT" -H @<(printf 'X-Vault-Token: %s\n' "$KEYVAULT_TOKEN") \
    -X POST --json '{}' "$KEYVAULT_ADDR/v1/sys/rotate/retire" | jq -c '{retired: .data.retired}'
load_status | jq -c '.data | {active_version, versions_in_use, state}'
