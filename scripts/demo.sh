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
echo "--- drvkite pipeline --depot examples/depot --out $out/pipeline"
"$bin" pipeline --depot examples/depot --out "$out/pipeline"
ls "$out/pipeline"
echo "--- a build that changed lib/greeting: only it and its dependents build"
changed=$(mktemp -d)
trap 'rm -rf "$changed"' EXIT
cp -r examples "$changed/examples" && cp -r nix "$changed/nix"
sed -i 's/text = "hello";/text = "hello, demo";/' "$changed/examples/depot/lib/greeting.nix"
"$bin" pipeline --depot "$changed/examples/depot" --out "$out/pipeline-changed" --parent-map "$out/drvmap.json"
"$bin" diff "$out/drvmap.json" "$out/pipeline-changed/drvmap.json"
echo "--- why did tools/hello change?"
"$bin" explain tools/hello --parent-map "$out/drvmap.json" --depot "$changed/examples/depot"
