#!/usr/bin/env bash
# Identity benchmarks (issue 3): full TLS 1.3 handshakes per second without and with a
# client certificate, and certificate logins (token issuance) per second, against
# `keyvault dev` pinned to CPU 0, load generator pinned to CPU 1.
#
#   ./scripts/bench-identity.sh [duration] [connections]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_debs softhsm2 util-linux jq

DURATION=${1:-8s}
CONNS=${2:-16}
cargo build --release --quiet -p keyvault --bin keyvault
KV=target/release/keyvault
WORK=$(mktemp -d /tmp/keyvault-bench-id.XXXXXX)
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

start_dev
CERT="$WORK/kv/tls/client.pem"
KEY="$WORK/kv/tls/client-key.pem"

# CPU time (user + system, in clock ticks) the server has used so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
HZ=$(getconf CLK_TCK)

bench() { # label args...
    local label=$1; shift
    local before after out
    before=$(cpu_ticks)
    out=$(taskset -c 1 "$KV" bench --address "$ADDR" --ca-file "$CA" --connections "$CONNS" --duration "$DURATION" --warmup 0s --json "$@")
    after=$(cpu_ticks)
    # Server CPU use over the run, as a share of its one core: near 1.0 means the server
    # was the bottleneck; well below means the load generator (on the other core) was.
    echo "$out" | jq -c --arg l "$label" --argjson cpu "$(( after - before ))" --argjson hz "$HZ" \
        '{what: $l, rps: (.requests_per_second|floor), p50_ms, p99_ms, errors, server_cpu: (($cpu / $hz / .seconds * 100 | floor) / 100)}'
}
bench "TLS 1.3 full handshake, no client certificate" --scenario handshake
bench "TLS 1.3 full handshake, client certificate verified" --scenario handshake --client-cert "$CERT" --client-key "$KEY"
bench "cert login (token issued, signed in SoftHSM), keep-alive mTLS" --scenario cert-login --role dev-client --client-cert "$CERT" --client-key "$KEY"
