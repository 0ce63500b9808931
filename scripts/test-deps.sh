#!/usr/bin/env bash
# Installs what the tests need: the Python package with its test extras in .venv, and the real
# Prometheus and Alertmanager binaries from Debian. Idempotent, and quick when all is there.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/bin/prometheus ] || [ ! -x /usr/bin/prometheus-alertmanager ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "prometheus and prometheus-alertmanager are missing; run this script as root (apt-get)" >&2
    exit 1
  fi
  apt-get update -q
  # --no-install-recommends: the binaries only; the packaged services are started by the tests.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus prometheus-alertmanager
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
