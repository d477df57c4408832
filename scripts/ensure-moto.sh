#!/usr/bin/env bash
# Make sure moto_server (a real S3 server, PyPI's moto[server]) is there for
# the ephemera S3 store test, and print its path. Installs it into a virtual
# environment when missing (Debian's system Python refuses `pip install`).
set -euo pipefail

if command -v moto_server >/dev/null 2>&1; then
  command -v moto_server
  exit 0
fi

venv="${DRVKITE_MOTO_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/drvkite/moto-venv}"
if [ ! -x "$venv/bin/moto_server" ]; then
  if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
      sudo=""
      if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
      echo "--- installing python3-venv (needed for moto[server])" >&2
      $sudo apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3 python3-venv >/dev/null
    else
      echo "python3 with venv is missing: install it, or moto[server] (pip), and run this again" >&2
      exit 1
    fi
  fi
  echo "--- installing moto[server] into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'moto[server]>=5,<6' >&2
fi
echo "$venv/bin/moto_server"
