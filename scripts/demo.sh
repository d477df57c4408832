#!/usr/bin/env bash
# The demo: run drvkite on the bundled example depot (examples/depot) and
# show what it makes of it. Installs Nix when missing.
#
#   scripts/demo.sh [OUTPUT_DIR]     # default: demo-output in this checkout
#
# Builds drvkite with cargo's dev profile (what scripts/test.sh builds too),
# wherever CARGO_TARGET_DIR says, unless DRVKITE_BIN names a binary.
set -euo pipefail
# Paths the caller gives are relative to the caller's folder.
out=$(realpath -m -- "${1:-$(dirname "$0")/../demo-output}")
if [ -n "${DRVKITE_BIN:-}" ]; then DRVKITE_BIN=$(realpath -- "$DRVKITE_BIN"); fi
if [ -n "${CARGO_TARGET_DIR:-}" ]; then
  CARGO_TARGET_DIR=$(realpath -m -s -- "$CARGO_TARGET_DIR")
  export CARGO_TARGET_DIR
fi
cd "$(dirname "$0")/.."
scripts/ensure-nix.sh
bin=${DRVKITE_BIN:-$(scripts/build.sh)}
mkdir -p "$out"

echo "--- drvkite drvmap --depot examples/depot --out $out/drvmap.json"
"$bin" drvmap --depot examples/depot --out "$out/drvmap.json"
echo "--- drvkite pipeline --depot examples/depot --out $out/pipeline"
"$bin" pipeline --depot examples/depot --out "$out/pipeline"
ls "$out/pipeline"

echo "--- a build that changed lib/greeting: only it and its dependents build"
# A copy of the depot in its own git checkout, as an agent would have it
# (drvkite checks there that the steps' out-links are ignored).
changed=$(mktemp -d)
trap 'rm -rf "$changed"' EXIT
cp -r examples/depot "$changed/depot"
git -C "$changed/depot" init --quiet
sed -i 's/text = "hello";/text = "hello, demo";/' "$changed/depot/lib/greeting.nix"
"$bin" pipeline --depot "$changed/depot" --out "$out/pipeline-changed" --parent-map "$out/drvmap.json"
"$bin" diff "$out/drvmap.json" "$out/pipeline-changed/drvmap.json"
echo "--- why did tools/hello change?"
"$bin" explain tools/hello --parent-map "$out/drvmap.json" --depot "$changed/depot"

cat <<DONE
--- done
The demo's output is in $out:
  drvmap.json         the example depot's derivation map (TVL's format)
  pipeline/           its Buildkite pipeline: chunk files, manifest.json,
                      summary.json, drvmap.json (everything builds: no parent map)
  pipeline-changed/   the pipeline after lib/greeting changed, against drvmap.json

Try next:
  $bin annotate --dir $out/pipeline-changed --dry-run   # the build page's summary
  $bin upload --dir $out/pipeline-changed --dry-run     # what the upload would run
  $bin init --depot DIR    # adopt drvkite in your depot's checkout (docs/nix.md)
  $bin --help              # every command; the reference is in docs/
DONE
