#!/usr/bin/env bash
# Reads at 1,000 and at N secrets (default 1,000,000) on sled or PostgreSQL: the server
# (`keyvault dev`, default configuration; with PostgreSQL, a throwaway cluster on the same
# CPU) pinned to CPU 0, the load generator to CPU 1. Reports read p50/p99 spread over all
# the secrets, bytes on disk per secret, resident memory, and the time a restart takes to
# serve with N secrets stored.
#
#   ./scripts/bench-scale.sh [N] [read duration] [sled|postgres]
#
# KEYVAULT_BIN runs that binary instead of building this tree's. WRITE_CONNECTIONS
# (default 32) sets the connections that fill the store: a write waits
# for durable steps in sequence, so more connections fill it faster (the reads always use
# 32).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_debs softhsm2 util-linux jq

N=${1:-1000000}
DURATION=${2:-8s}
STORE=${3:-sled}
# KEYVAULT_BIN: a binary built elsewhere (to compare two builds); by default this tree's.
if [ -n "${KEYVAULT_BIN:-}" ]; then
    KV=$(realpath "$KEYVAULT_BIN")
else
    cargo build --release --quiet -p keyvault --bin keyvault
    KV=target/release/keyvault
fi
WORK=$(mktemp -d /tmp/keyvault-bench-scale.XXXXXX)
PID=
PGBIN=
cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null
    [ -n "$PGBIN" ] && as_root runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/pg/data" -m immediate stop >/dev/null 2>&1
    rm -rf "$WORK"
}
trap cleanup EXIT
DEVARGS=()
STORAGE_DIR=$WORK/kv/storage
if [ "$STORE" = postgres ]; then
    need_debs postgresql
    PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
    chmod 755 "$WORK"
    mkdir -p "$WORK/pg/sock"
    as_root chown -R postgres:postgres "$WORK/pg"
    as_root runuser -u postgres -- "$PGBIN/initdb" -D "$WORK/pg/data" -U keyvault --auth=trust -E UTF8 --no-instructions >/dev/null
    as_root runuser -u postgres -- taskset -c 0 "$PGBIN/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/log" -w \
        -o "-p 5432 -c listen_addresses= -k $WORK/pg/sock" start >/dev/null
    DEVARGS=(--postgres "postgres://keyvault@localhost:5432/postgres?host=$WORK/pg/sock")
    STORAGE_DIR=$WORK/pg/data
fi

WRITE_CONNECTIONS=${WRITE_CONNECTIONS:-32}
bench() { KEYVAULT_TOKEN=$TOKEN taskset -c 1 "$KV" bench --address "$ADDR" --ca-file "$CA" --json "$@"; }
rss_mib() { awk '/VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$PID/status"; }
disk_bytes() { du -sb "$STORAGE_DIR" | cut -f1; }
report() { # label secrets
    local out
    out=$(bench --connections 32 --scenario read --path secret/scale --spread "$2" --duration "$DURATION")
    echo "$out" | jq -c --arg l "$1" --argjson rss "$(rss_mib)" --argjson disk "$(disk_bytes)" --argjson n "$2" \
        '{what: $l, secrets: $n, rps: (.requests_per_second|floor), p50_ms, p99_ms, errors, rss_mib: $rss, storage_bytes: $disk, bytes_per_secret: ($disk / $n | floor)}'
}
write() { # count
    local t0 t1
    t0=$(date +%s.%N)
    bench --connections "$WRITE_CONNECTIONS" --scenario write --path secret/scale --requests "$1" --duration 100000s --warmup 0s |
        jq -c --argjson c "$WRITE_CONNECTIONS" '{what: "write", connections: $c, requests, errors, rps: (.requests_per_second|floor), p50_ms, p99_ms}'
    t1=$(date +%s.%N)
    echo "{\"what\": \"write time\", \"seconds\": $(echo "$t1 - $t0" | bc)}"
}

start_dev "${DEVARGS[@]}"
write 1000
report "read, 1000 secrets" 1000
write "$N"
report "read, $N secrets" "$N"

# Restart on the same data: time until it serves.
kill "$PID"; wait "$PID" 2>/dev/null || true
t0=$(date +%s.%N)
taskset -c 0 "$KV" dev --data-dir "$WORK/kv" --address 127.0.0.1:0 --log warn "${DEVARGS[@]}" > "$WORK/kv.out" 2> "$WORK/kv.err" &
PID=$!
for _ in $(seq 600); do grep -q "the certificate is the credential" "$WORK/kv.out" 2>/dev/null && break; sleep 0.02; done
t1=$(date +%s.%N)
echo "{\"what\": \"start-up with $N secrets\", \"seconds\": $(echo "$t1 - $t0" | bc)}"
ADDR=$(awk '/Address:/ {print $2}' "$WORK/kv.out")
TOKEN=$(awk '/Root token:/ {print $3}' "$WORK/kv.out")
report "read after restart, $N secrets" "$N"
