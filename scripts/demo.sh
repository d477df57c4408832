#!/usr/bin/env bash
# The demo: evaluate the bundled example depot and show what drvkite makes
# of it. Installs Nix when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-nix.sh
out=${1:-demo-output}
cargo build --quiet --release
bin=target/release/drvkite
mkdir -p "$out"
echo "--- drvkite drvmap --depot examples/depot --out $out/drvmap.json"
"$bin" drvmap --depot examples/depot --out "$out/drvmap.json"
echo "--- every target is new against an empty parent map"
echo '{}' > "$out/empty-map.json"
"$bin" diff "$out/empty-map.json" "$out/drvmap.json"
