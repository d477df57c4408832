#!/usr/bin/env bash
# Make sure Nix's command-line tools are on this machine. On Debian (and
# derivatives) they come from the nix-bin package; elsewhere, say what to do.
set -euo pipefail

if command -v nix-instantiate >/dev/null 2>&1; then
  exit 0
fi

if command -v apt-get >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  echo "--- installing nix-bin (nix-instantiate is missing)" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nix-bin >/dev/null
fi

if ! command -v nix-instantiate >/dev/null 2>&1; then
  echo "nix-instantiate is missing: install Nix (https://nixos.org/download) and run this again" >&2
  exit 1
fi
