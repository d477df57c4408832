#!/usr/bin/env bash
# Build drvkite with cargo and print the binary's path, wherever cargo put
# it (CARGO_TARGET_DIR, build.target-dir in a cargo config, or target/).
#
#   scripts/build.sh             # dev profile (what scripts/test.sh builds)
#   scripts/build.sh --release   # release profile
#
# Cargo's messages go to stderr; stdout is the path alone.
set -euo pipefail
# A relative CARGO_TARGET_DIR is relative to the caller's folder, as for cargo.
if [ -n "${CARGO_TARGET_DIR:-}" ]; then
  CARGO_TARGET_DIR=$(realpath -m -s -- "$CARGO_TARGET_DIR")
  export CARGO_TARGET_DIR
fi
cd "$(dirname "$0")/.."
# Cargo names each artifact it builds or finds fresh in a JSON message;
# the binary's carries its path as "executable".
exe=$(cargo build --quiet --bin drvkite --message-format=json-render-diagnostics "$@" \
  | grep -o '"executable":"[^"]*"' | tail -n 1 | sed 's/^"executable":"//; s/"$//')
if [ -z "$exe" ] || [ ! -x "$exe" ]; then
  echo "build.sh: cargo did not report where it put drvkite" >&2
  exit 1
fi
printf '%s\n' "$exe"
