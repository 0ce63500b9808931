#!/usr/bin/env bash
# The README's test command: install test dependencies, then lint, type-check, guard the
# layering, and run every test against real Prometheus, Alertmanager and kube-apiserver + etcd.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/test-deps.sh
export GATEWAY_CANARY_REQUIRE_BINARIES=1
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/lint-imports
.venv/bin/python -m pytest "$@"
