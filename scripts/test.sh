#!/usr/bin/env bash
# The test command: installs Nix when missing, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-nix.sh
cargo test --locked "$@"
