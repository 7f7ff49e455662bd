#!/usr/bin/env bash
# The Rust client's benchmark against `keyvault dev` (docs/PERFORMANCE.md, "Client"):
#   - gateway checks per second through the verify layer, batched (1 ms window) and one
#     verify request per check, next to the server's own batched verify rate
#     (`keyvault bench --scenario gateway-verify-batch`), in one run;
#   - a unit's start-up (mutual TLS handshake, AppRole login, ten secrets) p50/p99.
#
#   ./scripts/bench-client.sh [seconds] [startups]
#
# The layer is measured at 32 and at 256 producer connections (checks in flight: the
# server's own figure has 400 in flight, 4 connections of 100).
#
# KeyVault is pinned to CPU 0; the benchmark process (producers, the gateway with its
# layer, the units) and the load generator run on CPU 1.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_debs softhsm2 util-linux jq

SECONDS_PER_CASE=${1:-8}
STARTUPS=${2:-300}
cargo build --release --quiet -p keyvault --bin keyvault -p keyvault-client --example bench_client
KV=target/release/keyvault
WORK=$(mktemp -d /tmp/keyvault-bench-client.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
OUT=target/bench-client.json
: > "$OUT"

start_dev
PIDS+=("$PID")
read -r CERT KEY < <(sed -n 's/.*export KEYVAULT_CLIENT_CERT=\([^ ]*\) KEYVAULT_CLIENT_KEY=\([^ ]*\).*/\1 \2/p' "$WORK/kv.out")
export KEYVAULT_ADDR=$ADDR KEYVAULT_CACERT=$CA KEYVAULT_CLIENT_CERT=$CERT KEYVAULT_CLIENT_KEY=$KEY
KEYVAULT_TOKEN=$TOKEN taskset -c 1 "$KV" bench --scenario gateway-verify-batch --connections 4 \
    --duration "${SECONDS_PER_CASE}s" --setup --json | jq -c '{case: "server, batched verify (100 per request)"} + .' | tee -a "$OUT"
KEYVAULT_TOKEN=$TOKEN taskset -c 1 target/release/examples/bench_client "$SECONDS_PER_CASE" 32 "$STARTUPS" | tee -a "$OUT"
KEYVAULT_TOKEN=$TOKEN taskset -c 1 target/release/examples/bench_client "$SECONDS_PER_CASE" 256 0 | tee -a "$OUT"

echo
jq -rs '
  (map(select(.case == "server, batched verify (100 per request)")) | .[0]) as $s |
  ($s.items_per_second) as $server |
  "server batched verify: \($server | floor) checks/s (errors \($s.errors))",
  ( map(select(.case | startswith("layer"))) | group_by(.connections)[] | INDEX(.case) as $t |
    ($t["layer, batched (1 ms window)"]) as $b | ($t["layer, one verify request per check"]) as $o |
    "\($b.connections) connections: layer batched \($b.checks_per_second | floor) checks/s p50 \($b.p50_ms) ms p99 \($b.p99_ms) ms (errors \($b.errors)) = \(($b.checks_per_second / $server * 100 | floor) / 100)x the server batched rate; one verify per check \($o.checks_per_second | floor) checks/s (errors \($o.errors)): batching gives \(($b.checks_per_second / $o.checks_per_second * 100 | floor) / 100)x" ),
  ( .[] | select(.case | startswith("unit start-up")) |
    "unit start-up (\(.startups) times): p50 \(.p50_ms) ms p99 \(.p99_ms) ms (errors \(.errors)); p50 of its phases: client built \(.p50_build_ms) ms, handshake and login \(.p50_handshake_login_ms) ms, ten reads \(.p50_ten_reads_ms) ms" )
' "$OUT"
