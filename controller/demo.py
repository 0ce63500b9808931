"""The embedded default: a whole migration against simulated gateways, in seconds, no cluster.

It runs the production path (policy loader, ControllerService, APScheduler, collector, gates,
decision, dispatcher) with two stand-ins at the outer boundary: an in-memory pair of Services
and a traffic model that answers the same queries Prometheus would. Time is compressed so a
policy with ordinary durations (10s checks, 1m bakes) plays out in a few seconds.
"""

from __future__ import annotations

import json
import random
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from controller.adapters.memory import InMemoryCloud, InMemoryGatewayPair, InMemoryStateStore
from controller.core.alerts import Alert
from controller.core.cloud import BackendMode, Backends, Split, split
from controller.core.enums import GatewayRole, Measure, Phase
from controller.core.results import RenderedQuery
from controller.runtime.clock import CompressedClock
from controller.runtime.service import ControllerService
from controller.settings import Settings

__all__ = ["DEMO_POLICY", "SCENARIOS", "CollectingNotifier", "DemoResult", "SimulatedGateways", "run_demo"]

#: What the demo breaks on the ASM gateway, and how the ending is told.
SCENARIOS = {"errors": "errors (5xx)", "missing-route": "404 NR grew on the ASM gateway"}

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
    # the demo starts 2 minutes before its window opens: the first raise waits, saying why
    advanceWindows: {timeZone: UTC, windows: [{hours: "@HOURS@"}]}
  analysis:
    interval: 10s
    window: 1m
    minRequests: 50
    failureThreshold: 2
  gates:
    errorRate: {max: 0.02, maxIncrease: 0.01}
    latency: {p99Ms: {max: 400}, maxRatio: 1.5}
"""


def demo_policy(now: datetime, closed_minutes: int = 2) -> str:
    """The demo's policy, its advance window closed for the next ``closed_minutes`` from ``now``."""
    opens = (now + timedelta(minutes=closed_minutes)).strftime("%H:%M")
    closes = (now - timedelta(minutes=1)).strftime("%H:%M")
    return DEMO_POLICY.replace("@HOURS@", f"{opens}-{closes}")


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
    #: share of each gateway's requests answered 404 NR (a missing route) or 403 (a missing policy)
    no_route: dict[GatewayRole, float] = field(default_factory=lambda: dict.fromkeys(GatewayRole, 0.0))
    denied: dict[GatewayRole, float] = field(default_factory=lambda: dict.fromkeys(GatewayRole, 0.0))
    not_found: float = 0.005
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

    def responses(self, role: GatewayRole) -> dict[tuple[str, str, str], float]:
        """The share of each kind of response (code, Envoy flags, destination) on a gateway."""
        no_route, denied = self.no_route[role], self.denied[role]
        return {
            ("404", "-", "productpage"): self.not_found,  # ordinary 404s, the same on both gateways
            ("404", "NR", "unknown"): no_route,  # a host with no route on this gateway
            ("403", "-", "reviews"): denied,  # an AuthorizationPolicy not carried over
            ("200", "-", "productpage"): max(0.0, 1.0 - self.not_found - no_route - denied),
        }

    def _counts(self, role: GatewayRole, kind: str) -> dict[tuple[str, str, str], float]:
        requests = self.total_rps * self.window_seconds * self.share(role)
        return {key: requests * share for key, share in self.responses(role).items() if _is_kind(kind, key[0], key[1])}

    def query_vector(self, query: RenderedQuery) -> list[tuple[dict[str, str], float]]:
        """The breakdown of a kind of response by code, flags and destination, as Prometheus has it."""
        kind = (query.gate or "").split(":", 1)[0]
        return [
            ({"response_code": code, "response_flags": flags, "destination_service_name": dest}, count)
            for (code, flags, dest), count in self._counts(query.role, kind).items()
            if count > 0
        ]

    def query(self, query: RenderedQuery) -> float | None:
        """Answer like Prometheus would for our queries: empty when there is no traffic."""
        requests = self.total_rps * self.window_seconds * self.share(query.role)
        if query.measure in (Measure.CUSTOM, Measure.TLS) or requests <= 0:
            return None  # no custom gates here, and Envoy's TLS stats are not exported
        if query.measure is Measure.REQUESTS:
            return requests
        if query.measure is Measure.RESPONSES:
            return sum(self._counts(query.role, query.gate or "").values())
        if query.measure is Measure.ERROR_RATE:
            jitter = self._random.uniform(0.8, 1.2)
            return min(1.0, self.error_ratio[query.role] * jitter)
        return self.p99_ms[query.role] * self._random.uniform(0.95, 1.05)


def _is_kind(kind: str, code: str, flags: str) -> bool:
    """Whether a response (code, Envoy flags) counts as ``kind`` (4xx, auth, noRoute), as the queries say."""
    if kind == "4xx":
        return code.startswith("4")
    if kind == "auth":
        return code in ("401", "403")
    return "NR" in flags.split(",")


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
    #: the stored state (JSON) and the status the controller wrote, as ``status`` shows them
    state_json: dict[str, Any] | None = None
    status: dict[str, Any] | None = None


def run_demo(
    *,
    speed: float = 60.0,
    inject_at_weight: int = 25,
    inject_after_seconds: float = 0.5,
    error_ratio: float = 0.12,
    scenario: str = "errors",
    deadline_seconds: float = 50.0,
    on_change: Callable[[str], None] = lambda line: None,
    on_alert: Callable[[Alert], None] = lambda alert: None,
) -> DemoResult:
    """Climb, break the target once it reaches ``inject_at_weight``, expect a rollback.

    ``scenario``: ``errors`` (``error_ratio`` of 5xx) or ``missing-route`` (the ASM gateway lacks
    a host: that share of its requests is answered 404 with Envoy's flag NR, no 5xx at all).
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}: {', '.join(SCENARIOS)}")
    started = time.monotonic()
    pair = InMemoryGatewayPair(target_weight=0, source_weight=100)
    store = InMemoryStateStore()
    gateways = SimulatedGateways(pair)
    notifier = CollectingNotifier(on_alert)
    with tempfile.TemporaryDirectory(prefix="gateway-canary-demo-") as tmp:
        clock = CompressedClock(speed)
        (Path(tmp) / "demo.yaml").write_text(demo_policy(clock.now().astimezone(UTC)), encoding="utf-8")
        settings = Settings(
            policies_dir=Path(tmp),
            reload_interval_seconds=60.0,
            failure_recheck_seconds=5.0,
            notify_backoff_seconds=0.05,
            status_refresh_seconds=0.0,
        )
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
        broken = False
        last_seen: tuple[int | None, int | None] = (None, None)
        waiting = ""
        try:
            while time.monotonic() - started < deadline_seconds:
                weights = (pair.target_weight, pair.source_weight)
                if weights != last_seen:
                    last_seen = weights
                    state = store.state_of("demo-shop")
                    phase = state.phase.value if state is not None else "-"
                    shares = gateways.split().describe()
                    on_change(f"weights target={weights[0]} source={weights[1]} phase={phase}: {shares}")
                held = _waiting(store, "demo-shop")
                if held != waiting:
                    waiting = held
                    if held.startswith("window:"):
                        on_change(f"held: {held.removeprefix('window: ')}")
                highest = max(highest, pair.target_weight or 0)
                if injected_at is None and (pair.target_weight or 0) >= inject_at_weight:
                    injected_at = time.monotonic()
                elif not broken and injected_at is not None and time.monotonic() - injected_at >= inject_after_seconds:
                    broken = True
                    what = _break(gateways, scenario, error_ratio)
                    on_change(f"breaking the ASM gateway at weight {pair.target_weight}: {what}")
                state = store.state_of("demo-shop")
                if state is not None and state.phase is Phase.ROLLED_BACK and notifier.received.is_set():
                    break
                time.sleep(0.02)
        finally:
            service.stop()
    return _result(store, pair, highest, notifier, time.monotonic() - started)


def _result(
    store: InMemoryStateStore, pair: InMemoryGatewayPair, highest: int, notifier: CollectingNotifier, seconds: float
) -> DemoResult:
    final = store.state_of("demo-shop")
    stored = store.texts.get("demo-shop")
    status = store.statuses.get("demo-shop")
    return DemoResult(
        final is not None and final.phase is Phase.ROLLED_BACK and pair.target_weight == 0,
        highest,
        tuple(notifier.alerts),
        seconds,
        state_json=None if stored is None else json.loads(stored),
        status=None if status is None else json.loads(status),
    )


def _break(gateways: SimulatedGateways, scenario: str, ratio: float) -> str:
    """Break the ASM gateway as the scenario says; what was done, in words."""
    if scenario == "missing-route":
        gateways.no_route[GatewayRole.TARGET] = ratio
        return f"{ratio:.0%} of its requests get 404 NR (a host without a route)"
    gateways.error_ratio[GatewayRole.TARGET] = ratio
    return f"{ratio:.0%} 5xx"


def _waiting(store: InMemoryStateStore, name: str) -> str:
    """'kind: reason' of what the rollout waits for, from the status the controller wrote."""
    text = store.statuses.get(name)
    if text is None:
        return ""
    waiting = json.loads(text).get("waiting") or {}
    return f"{waiting.get('kind')}: {waiting.get('reason')}"
