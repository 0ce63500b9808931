#!/usr/bin/env bash
# The fault suite with its figures: scenario -> runs -> violations (docs/reliability.md).
#   bash scripts/faults.sh            the CI size (as the README's test command runs it)
#   bash scripts/faults.sh --large    the issue's sizes: 60 s outages, 10 000 fuzzed policies, ...
# Needs what scripts/test-deps.sh installs (run the README's test command once first).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--large" ]]; then
  export GATEWAY_CANARY_FAULTS=large
  shift
fi
export GATEWAY_CANARY_REQUIRE_BINARIES=1
report="${GATEWAY_CANARY_FAULTS_REPORT:-.cache/faults-report.json}"
export GATEWAY_CANARY_FAULTS_REPORT="$report"
status=0
.venv/bin/python -m pytest -q -p no:cacheprovider tests/faults "$@" || status=$?
.venv/bin/python - "$report" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
print(f"\n| scenario ({report['size']} size) | runs | violations | figures |")
print("| --- | ---: | ---: | --- |")
for row in report["scenarios"]:
    figures = "; ".join(f"{k}: {v}" for k, v in row["figures"].items())
    print(f"| {row['scenario']}. {row['title']} | {row['runs']} | {row['violations']} | {figures} |")
PY
exit "$status"
