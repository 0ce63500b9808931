"""Benchmark: what the Kubernetes side of a tick costs against a real kube-apiserver + etcd.

Starts the test control plane (binaries from scripts/test-deps.sh), runs the adapter as the
controller's ServiceAccount under its documented Role, and prints medians of: a steady-state read
of both Services, a weight raise (two merge patches), a forced rollback write, the first read of a
policy (with its four SelfSubjectAccessReviews), and the control plane's start-up. Asserts nothing.
Usage: .venv/bin/python scripts/bench_kube.py [N]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controller.adapters.kubernetes import KubernetesGatewayPair, build_api_client  # noqa: E402
from controller.core.decision import Observation, initial_state  # noqa: E402
from controller.core.schedule import Weights  # noqa: E402
from tests.helpers import T0  # noqa: E402
from tests.kube_cluster import Cluster, ControlPlane, binary_paths  # noqa: E402


def median_ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:.1f} ms (min {min(samples) * 1000:.1f}, max {max(samples) * 1000:.1f})"


def timed(fn: Callable[..., object], *args: object, **kwargs: object) -> float:
    started = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - started


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    binaries = binary_paths(ROOT / ".cache" / "bin")
    with tempfile.TemporaryDirectory() as tmp, ControlPlane(Path(tmp) / "cp", binaries).running() as plane:
        print(f"control plane start-up (certificates, etcd, kube-apiserver /readyz): {plane.startup_seconds:.2f} s")
        kube = Cluster(plane, plane.create_namespace("bench"), Path(tmp))
        kube.add_gateways()
        policy = kube.policy()
        kube.grant(policy)
        config = kube.write_kubeconfig()
        first_reads = [
            timed(lambda: KubernetesGatewayPair(build_api_client(config)).observe(policy)) for _ in range(10)
        ]
        pair = KubernetesGatewayPair(build_api_client(config))
        pair.observe(policy)
        reads, raises, rollbacks = [], [], []
        state = initial_state(policy, Observation(0, 100), T0)
        for i in range(n):
            reads.append(timed(pair.observe, policy))
            seen = pair.observe(policy)
            up = state.evolve(target_weight=10 + i % 50, source_weight=90 - i % 50)
            raises.append(timed(pair.apply, policy, seen, Weights(up.target_weight, up.source_weight), up))
            seen = pair.observe(policy)
            down = up.evolve(target_weight=0, source_weight=100)
            rollbacks.append(timed(pair.apply, policy, seen, Weights(0, 100), down, force=True))
        print(f"first read of a policy (2 GETs + 4 access reviews, new client): {median_ms(first_reads)}")
        print(f"steady read of both Services (2 GETs): {median_ms(reads)}  n={n}")
        print(f"weight raise (2 merge patches, target then source): {median_ms(raises)}  n={n}")
        print(f"rollback write (2 merge patches, forced): {median_ms(rollbacks)}  n={n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
