#!/usr/bin/env bash
# Start a working KeyVault for development: installs SoftHSM2 when missing, builds, and
# runs `keyvault dev` (SoftHSM token, TLS certificates, sled storage and keys created on
# first start under ./keyvault-dev; a root token is printed). Extra arguments go to
# `keyvault dev`, e.g. ./scripts/dev.sh --address 127.0.0.1:8300
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_debs softhsm2
exec cargo run --release --quiet -p keyvault --bin keyvault -- dev "$@"
