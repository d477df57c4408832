#!/usr/bin/env bash
# The test command: installs Nix and moto (an S3 server) when missing, then
# runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-nix.sh
# A real S3 server for the ephemera S3 store test.
moto_server=$(scripts/ensure-moto.sh)
export DRVKITE_TEST_MOTO_SERVER="$moto_server"
cargo test --locked "$@"
