"""The embedded default: a whole migration against simulated gateways, in seconds, no cluster.

It runs the production path (policy loader, ControllerService, APScheduler, collector, gates,
decision, dispatcher) with two stand-ins at the outer boundary: an in-memory pair of Services
and a traffic model that answers the same queries Prometheus would. Time is compressed so a
policy with ordinary durations (10s checks, 1m bakes) plays out in a few seconds.
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from controller.adapters.memory import InMemoryCloud, InMemoryGatewayPair, InMemoryStateStore
from controller.core.alerts import Alert
from controller.core.cloud import BackendMode, Backends, Split, split
from controller.core.enums import GatewayRole, Measure, Phase
from controller.core.results import RenderedQuery
from controller.runtime.clock import CompressedClock
from controller.runtime.service import ControllerService
from controller.settings import Settings

__all__ = ["DEMO_POLICY", "CollectingNotifier", "DemoResult", "SimulatedGateways", "run_demo"]

DEMO_POLICY = """\
apiVersion: gateway-canary.io/v1alpha1
kind: CanaryPolicy
metadata:
  name: demo-shop
spec:
  source: {service: istio-system/istio-ingressgateway}
  target: {service: istio-system/istio-ingressgateway-asm}
  schedule:
    steps: [5, 10, 25, 50, 75, 100]
    bakeTime: 1m
  analysis:
    interval: 10s
    window: 1m
    minRequests: 50
    failureThreshold: 2
  gates:
    errorRate: {max: 0.02, maxIncrease: 0.01}
    latency: {p99Ms: {max: 400}, maxRatio: 1.5}
"""


@dataclass
class SimulatedGateways:
    """Two gateways behind one CLB: requests split as the CLB does at the pair's weights, faults switchable."""

    pair: InMemoryGatewayPair
    #: both gateways run on every node of a 20-node cluster (Cluster mode): the cloud controller
    #: gives each node max(1, w // 20), so small weights are rounded up (the issue's example)
    backends: Backends = field(default_factory=lambda: Backends(BackendMode.CLUSTER, nodes=20))
    window_seconds: float = 60.0
    total_rps: float = 200.0
    error_ratio: dict[GatewayRole, float] = field(
        default_factory=lambda: {GatewayRole.SOURCE: 0.002, GatewayRole.TARGET: 0.002}
    )
    p99_ms: dict[GatewayRole, float] = field(
        default_factory=lambda: {GatewayRole.SOURCE: 120.0, GatewayRole.TARGET: 110.0}
    )
    seed: int = 7
    _random: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def split(self) -> Split:
        """Requested and effective share at the current weights (the cloud controller's spread)."""
        return split(self.pair.target_weight or 0, self.pair.source_weight, self.backends, self.backends)

    def share(self, role: GatewayRole) -> float:
        """The share of requests a gateway gets from the CLB: the effective one, not the requested one."""
        target = self.split().effective or 0.0
        return target if role is GatewayRole.TARGET else 1.0 - target

    def query(self, query: RenderedQuery) -> float | None:
        """Answer like Prometheus would for our queries: empty when there is no traffic."""
        requests = self.total_rps * self.window_seconds * self.share(query.role)
        if query.measure is Measure.CUSTOM or requests <= 0:
            return None
        if query.measure is Measure.REQUESTS:
            return requests
        if query.measure is Measure.ERROR_RATE:
            jitter = self._random.uniform(0.8, 1.2)
            return min(1.0, self.error_ratio[query.role] * jitter)
        return self.p99_ms[query.role] * self._random.uniform(0.95, 1.05)


class CollectingNotifier:
    """A receiver that hands alerts to a callback (the demo shows them on the terminal)."""

    name = "terminal"

    def __init__(self, on_alert: Callable[[Alert], None]) -> None:
        self._on_alert = on_alert
        self.alerts: list[Alert] = []
        self.received = threading.Event()

    def send(self, alert: Alert, *, timeout: float = 0.0) -> None:
        """Keep, forward, and flag that an alert arrived."""
        self.alerts.append(alert)
        self._on_alert(alert)
        self.received.set()


@dataclass(frozen=True, slots=True)
class DemoResult:
    """How the demo ended."""

    rolled_back: bool
    highest_weight: int
    alerts: tuple[Alert, ...]
    seconds: float


def run_demo(
    *,
    speed: float = 60.0,
    inject_at_weight: int = 25,
    inject_after_seconds: float = 0.5,
    error_ratio: float = 0.12,
    deadline_seconds: float = 50.0,
    on_change: Callable[[str], None] = lambda line: None,
    on_alert: Callable[[Alert], None] = lambda alert: None,
) -> DemoResult:
    """Climb, inject 5xx on the target once it reaches ``inject_at_weight``, expect a rollback."""
    started = time.monotonic()
    pair = InMemoryGatewayPair(target_weight=0, source_weight=100)
    store = InMemoryStateStore()
    gateways = SimulatedGateways(pair)
    notifier = CollectingNotifier(on_alert)
    with tempfile.TemporaryDirectory(prefix="gateway-canary-demo-") as tmp:
        (Path(tmp) / "demo.yaml").write_text(DEMO_POLICY, encoding="utf-8")
        settings = Settings(
            policies_dir=Path(tmp),
            reload_interval_seconds=60.0,
            failure_recheck_seconds=5.0,
            notify_backoff_seconds=0.05,
        )
        clock = CompressedClock(speed)
        service = ControllerService(
            settings,
            pair=pair,
            store=store,
            metrics_for=lambda policy: gateways,
            clock=clock,
            cloud=InMemoryCloud(clock, default_backends=gateways.backends),
            time_scale=speed,
            extra_receivers=[notifier],
            serve_http=False,
        )
        service.start()
        highest = 0
        injected_at: float | None = None
        last_seen: tuple[int | None, int | None] = (None, None)
        try:
            while time.monotonic() - started < deadline_seconds:
                weights = (pair.target_weight, pair.source_weight)
                if weights != last_seen:
                    last_seen = weights
                    state = store.state_of("demo-shop")
                    phase = state.phase.value if state is not None else "-"
                    shares = gateways.split().describe()
                    on_change(f"weights target={weights[0]} source={weights[1]} phase={phase}: {shares}")
                highest = max(highest, pair.target_weight or 0)
                if injected_at is None and (pair.target_weight or 0) >= inject_at_weight:
                    injected_at = time.monotonic()
                elif (
                    injected_at is not None
                    and gateways.error_ratio[GatewayRole.TARGET] != error_ratio
                    and time.monotonic() - injected_at >= inject_after_seconds
                ):
                    gateways.error_ratio[GatewayRole.TARGET] = error_ratio
                    on_change(f"injecting {error_ratio:.0%} 5xx on the ASM gateway at weight {pair.target_weight}")
                state = store.state_of("demo-shop")
                if state is not None and state.phase is Phase.ROLLED_BACK and notifier.received.is_set():
                    break
                time.sleep(0.02)
        finally:
            service.stop()
    final = store.state_of("demo-shop")
    rolled_back = final is not None and final.phase is Phase.ROLLED_BACK and pair.target_weight == 0
    return DemoResult(rolled_back, highest, tuple(notifier.alerts), time.monotonic() - started)
