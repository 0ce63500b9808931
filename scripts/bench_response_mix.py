"""How often does the response-mix gate trip on a HEALTHY pair? Prints figures (a benchmark, not a test).

Both gateways draw their 4xx, 401/403 and 404 NR responses from the same ratios (binomial noise,
drawn here), and the real gate (controller.core.gates.judge) judges each window. Printed: the
share of checks on which a response-mix gate failed, at several traffic levels, with the policy's
defaults. Usage: .venv/bin/python scripts/bench_response_mix.py [--windows 20000] [--seed 1]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controller.core.enums import GatewayRole, Measure, Verdict
from controller.core.gates import judge
from controller.core.policy import CanaryPolicy
from controller.core.results import GatewaySamples, QueryOutcome, RenderedQuery

#: a healthy gateway's response mix (shares of requests): ordinary 404s, denied, no route
HEALTHY = {"4xx": 0.02, "auth": 0.002, "noRoute": 0.0005}


def draw(rng: random.Random, n: int, p: float) -> int:
    """Binomial(n, p): exact Bernoulli draws for small n, a clipped normal approximation above."""
    if n * p < 30:
        # Poisson(np) by Knuth: close to the binomial for the small p here
        limit, k, product = math.exp(-n * p), 0, rng.random()
        while product > limit:
            k += 1
            product *= rng.random()
        return min(k, n)
    return max(0, min(n, round(rng.gauss(n * p, math.sqrt(n * p * (1 - p))))))


def samples(role: GatewayRole, requests: int, counts: dict[str, int]) -> GatewaySamples:
    def outcome(measure: Measure, value: float | None, gate: str | None = None) -> QueryOutcome:
        return QueryOutcome(RenderedQuery(f"{role}-{measure}-{gate}", measure, role, gate=gate), value=value)

    return GatewaySamples(
        role=role,
        requests=outcome(Measure.REQUESTS, float(requests)),
        error_rate=outcome(Measure.ERROR_RATE, 0.0),
        latency=outcome(Measure.LATENCY, 50.0),
        mix={kind: outcome(Measure.RESPONSES, float(count), kind) for kind, count in counts.items()},
    )


def trips(policy: CanaryPolicy, target_rps: float, source_rps: float, windows: int, rng: random.Random) -> float:
    seconds = policy.spec.analysis.window.total_seconds()
    n_target, n_source = round(target_rps * seconds), round(source_rps * seconds)
    failed = 0
    for _ in range(windows):
        # 4xx includes the auth and no-route responses, as the queries count them
        counts = []
        for n in (n_target, n_source):
            auth, no_route = draw(rng, n, HEALTHY["auth"]), draw(rng, n, HEALTHY["noRoute"])
            counts.append({"4xx": draw(rng, n, HEALTHY["4xx"]) + auth + no_route, "auth": auth, "noRoute": no_route})
        result = judge(
            policy, samples(GatewayRole.SOURCE, n_source, counts[1]), samples(GatewayRole.TARGET, n_target, counts[0])
        )
        failed += any(g.verdict is Verdict.FAIL and g.gate.startswith("responses") for g in result.gates)
    return failed / windows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--windows", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    policy = CanaryPolicy.model_validate(
        {
            "metadata": {"name": "bench"},
            "spec": {
                "source": {"service": "istio-system/old"},
                "target": {"service": "istio-system/asm"},
                "schedule": {"steps": [10, 100]},
                "analysis": {"window": "2m", "minRequests": 100},
                "gates": {"errorRate": {"max": 1.0}},
            },
        }
    )
    rng = random.Random(args.seed)
    print(f"healthy mix {HEALTHY}, window 2m, defaults {policy.spec.gates.response_mix.model_dump(by_alias=True)}")
    for target_rps, source_rps in ((1, 99), (5, 45), (5, 95), (20, 80), (100, 100)):
        started = time.perf_counter()
        rate = trips(policy, target_rps, source_rps, args.windows, rng)
        per_hour = rate * 120  # checks every 30 s
        print(
            f"MEASURED target {target_rps:>3} rps / source {source_rps:>3} rps: a response-mix gate failed on "
            f"{rate:.4%} of {args.windows} healthy checks (~{per_hour:.3f} failing checks/hour at 30 s; a rollback "
            f"needs 2 in a row) [{time.perf_counter() - started:.1f}s]"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
