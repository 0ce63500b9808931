#!/usr/bin/env bash
# The README's first command: install the package in .venv and run the embedded demo.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/gateway-canary ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q -e .
fi
exec .venv/bin/gateway-canary demo "$@"
