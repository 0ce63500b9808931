"""Benchmark: cost of the pure core per check (judging gates, deciding) and the demo's footprint.

Prints figures; asserts nothing. Usage: .venv/bin/python scripts/bench_core.py
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controller.core.decision import Observation, decide, initial_state  # noqa: E402
from controller.core.enums import GatewayRole  # noqa: E402
from controller.core.gates import judge  # noqa: E402
from tests.helpers import PASS, at, make_policy, samples  # noqa: E402


def per_call(fn, n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - started) / n * 1e6


def main() -> int:
    policy = make_policy(
        gates={"errorRate": {"max": 0.05, "maxIncrease": 0.01}, "latency": {"p99Ms": {"max": 500}, "maxRatio": 1.5}}
    )
    source, target = samples(GatewayRole.SOURCE, custom={}), samples(GatewayRole.TARGET, custom={})
    state = initial_state(policy, Observation(10, 90), at(0))
    n = 20_000
    judged = per_call(lambda i: judge(policy, source, target), n)
    decided = per_call(lambda i: decide(policy, state, Observation(10, 90, PASS), at(i)), n)
    fingerprint = per_call(lambda i: policy.rollout_fingerprint(), n)
    print(f"judge (4 gates, both gateways): {judged:.1f} us per check")
    print(f"decide:                         {decided:.1f} us per decision (of which fingerprint {fingerprint:.1f} us)")
    started = time.perf_counter()
    demo = subprocess.run(
        [sys.executable, "-m", "controller", "demo"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"demo: exit {demo.returncode}, {wall:.1f}s wall, peak RSS {peak_kib / 1024:.0f} MiB")
    return demo.returncode


if __name__ == "__main__":
    sys.exit(main())
