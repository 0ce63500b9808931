"""Benchmark: time from 5xx injection on the ASM gateway to its weight annotation reading "0".

Runs the end-to-end test (real Prometheus with a 1 s scrape, real Alertmanager, the controller as
a subprocess with 1 s checks, a 10 s window and failureThreshold 2) N times and prints each run
and the median. Usage: .venv/bin/python scripts/bench_rollback.py [N]
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    env = {**os.environ, "GATEWAY_CANARY_E2E_RUNS": str(runs)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-s",
            "-p",
            "no:cacheprovider",
            "tests/test_end_to_end.py::test_weight_climbs_then_rolls_back_to_zero_with_alert",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = [float(m) for m in re.findall(r"MEASURED error injection -> target weight 0: ([0-9.]+)s", result.stdout)]
    if result.returncode != 0 or len(seconds) != runs:
        print(result.stdout[-3000:], result.stderr[-2000:])
        print(f"benchmark failed: exit {result.returncode}, {len(seconds)} of {runs} measurements")
        return 1
    for index, value in enumerate(seconds, 1):
        print(f"run {index}: {value:.2f}s")
    print(
        f"error injection -> weight 0 over {runs} runs: median {statistics.median(seconds):.2f}s, "
        f"min {min(seconds):.2f}s, max {max(seconds):.2f}s "
        "(scrape 1s, check interval 1s, window 10s, failureThreshold 2, 0% -> 50% 5xx at weight 25)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
