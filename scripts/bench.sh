#!/usr/bin/env bash
# Benchmark drvkite against the floor (one bare nix-instantiate of every
# target's and extra-step command's drvPath) on synthetic depots.
# Also `drvkite pipeline --skip-cached` against a loopback binary cache.
#
#   scripts/bench.sh                 # 1000, 4000 and 16000 targets
#   scripts/bench.sh 2000 8000       # other sizes (or BENCH_SIZES="2000 8000")
#   scripts/bench.sh --smoke         # 50 targets, one run: checks the script works
#
# Builds drvkite with `cargo build --release` (wherever CARGO_TARGET_DIR
# says) unless DRVKITE_BIN names a binary. Needs nix-instantiate, nix and
# python3 (stdlib only). Prints a Markdown table; see docs/performance.md.
set -euo pipefail
# DRVKITE_BIN and CARGO_TARGET_DIR may be relative to the caller's folder.
if [ -n "${DRVKITE_BIN:-}" ]; then DRVKITE_BIN=$(realpath "$DRVKITE_BIN"); fi
if [ -n "${CARGO_TARGET_DIR:-}" ]; then
  CARGO_TARGET_DIR=$(realpath -m -s -- "$CARGO_TARGET_DIR")
  export CARGO_TARGET_DIR
fi
cd "$(dirname "$0")/.."

smoke=0
sizes=()
for arg in "$@"; do
  case "$arg" in
    --smoke) smoke=1 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *[!0-9]*|'') echo "bench.sh: unknown argument $arg: pass target counts or --smoke" >&2; exit 2 ;;
    *) sizes+=("$arg") ;;
  esac
done
if [ ${#sizes[@]} -eq 0 ]; then
  if [ "$smoke" = 1 ]; then
    sizes=(50)
  else
    read -r -a sizes <<< "${BENCH_SIZES:-1000 4000 16000}"
  fi
fi

command -v nix-instantiate >/dev/null || { echo "bench.sh: nix-instantiate not found: run scripts/ensure-nix.sh" >&2; exit 1; }
command -v python3 >/dev/null || { echo "bench.sh: python3 not found: install it (apt-get install python3)" >&2; exit 1; }

bin="${DRVKITE_BIN:-}"
if [ -z "$bin" ]; then
  bin=$(scripts/build.sh --release)
fi

runs=()
[ "$smoke" = 1 ] && runs=(--runs 1)
exec python3 bench/run.py --drvkite "$bin" --skip-cached "${runs[@]}" "${sizes[@]}"
