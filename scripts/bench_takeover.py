"""Benchmark: how long two replicas are without a leader when the leader dies or leaves.

Runs tests/faults/test_two_replicas.py's SIGKILL and rolling-restart tests N times with the shipped
election timings (15 s lease, 10 s renew deadline, 2 s retry period; or those given as
``--timing LEASE,DEADLINE,RETRY``) and prints each takeover and the median: after SIGKILL a
candidate must see the Lease silent for the lease duration; after SIGTERM the leader releases it.
Usage: .venv/bin/python scripts/bench_takeover.py [N] [--timing 15,10,2]
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
    args = sys.argv[1:]
    timing = "15,10,2"
    if "--timing" in args:
        at = args.index("--timing")
        timing = args[at + 1]
        del args[at : at + 2]
    runs = int(args[0]) if args else 3
    env = {**os.environ, "GATEWAY_CANARY_TAKEOVER_TIMING": timing}
    figures: dict[str, list[float]] = {}
    for run in range(runs):
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/faults/test_two_replicas.py",
             "-k", "killed or rolling"],
            cwd=ROOT, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            sys.stderr.write(result.stdout[-3000:] + result.stderr[-2000:])
            return 1
        for label, values in re.findall(r"MEASURED ((?:takeover|leader handover)[^:]*): (.*)", result.stdout):
            seconds = [float(v.rstrip("s")) for v in values.split(", ")]
            figures.setdefault(label, []).extend(seconds)
            sys.stdout.write(f"run {run + 1}: {label}: {', '.join(f'{s:.2f}s' for s in seconds)}\n")
    for label, seconds in figures.items():
        sys.stdout.write(f"{label}: median {statistics.median(seconds):.2f}s, max {max(seconds):.2f}s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
