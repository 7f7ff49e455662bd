#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 60), one after the other, and print a
# line per target: executions, coverage, corpus size, crashes. Not part of CI.
#
#   fuzz/run.sh [seconds-per-target] [target...]
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`), and SoftHSM2
# (the stateful targets open a real token; ./scripts/test.sh installs it). The corpus grows
# in fuzz/corpus/<target>/ (not committed); fuzz/seeds/<target>/ is read as well. A crash
# leaves its input in fuzz/artifacts/<target>/: fix the bug, then copy the input into
# fuzz/regressions/<target>/, which the normal test suite runs
# (tests/tests/fuzz_regressions.rs).
set -euo pipefail
cd "$(dirname "$0")"

SECS=${1:-60}
shift || true
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    TARGETS=(barrier_record wrapped_key transit_strings token gateway_request policy config audit_log pipeline)
fi

# The stateful targets open a real SoftHSM token: without it they die on their first input.
. ../scripts/lib.sh
need_debs softhsm2

command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz is missing: cargo install cargo-fuzz" >&2; exit 1; }
rustup toolchain list | grep -q '^nightly' || { echo "the nightly toolchain is missing: rustup toolchain install nightly" >&2; exit 1; }

echo "building the fuzz targets (nightly, address sanitizer)..."
cargo +nightly fuzz build >/dev/null

TRIPLE=$(rustc +nightly -vV | sed -n 's/^host: //p')
# Leaks inside OpenSSL under SoftHSM are not ours (fuzz/lsan.supp); ours are still found.
export LSAN_OPTIONS="suppressions=$PWD/lsan.supp${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
mkdir -p logs
status=0
printf '%-16s %8s %12s %10s %8s %8s %s\n' target seconds executions exec/s cov corpus crashes
for t in "${TARGETS[@]}"; do
    mkdir -p "corpus/$t" "seeds/$t" "artifacts/$t"
    log="logs/$t.log"
    # -rss_limit_mb: SoftHSM and sled share the process; -timeout: a hang is a finding.
    # The binary built above, run directly: a source change during a long run does not
    # trigger a rebuild in the middle of it.
    if "target/$TRIPLE/release/$t" -artifact_prefix="artifacts/$t/" "corpus/$t" "seeds/$t" \
        -max_total_time="$SECS" -rss_limit_mb=4096 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        crashed=0
    else
        crashed=1
        status=1
    fi
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || true)
    corpus=$(find "corpus/$t" -type f | wc -l)
    printf '%-16s %8s %12s %10s %8s %8s %s\n' "$t" "$SECS" "${execs:-?}" "${rate:-?}" "${cov:-?}" "$corpus" \
        "$([ $crashed = 1 ] && echo "CRASH: see $log and artifacts/$t/" || echo none)"
done
exit $status
