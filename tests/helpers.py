"""Builders shared by the unit tests."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

from controller.adapters.memory import InMemoryGatewayPair, InMemoryStateStore
from controller.core.decision import Decision, Observation, decide, initial_state
from controller.core.enums import Command, GatewayRole, InconclusiveCause, Measure, Verdict
from controller.core.lease import LeaseRecord, LeaseTiming
from controller.core.policy import CanaryPolicy
from controller.core.results import CheckResult, GateResult, GatewaySamples, QueryOutcome, RenderedQuery
from controller.core.state import RolloutState
from controller.errors import ClusterUnavailable, Conflict
from controller.ports import MetricsSource
from controller.runtime.clock import SystemClock
from controller.runtime.leader import LeaderElector
from controller.runtime.service import ControllerService
from controller.settings import Settings

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def make_policy(name: str = "shop", **spec_overrides: Any) -> CanaryPolicy:
    """A valid policy; top-level spec keys can be replaced."""
    spec: dict[str, Any] = {
        "source": {"service": "istio-system/istio-ingressgateway"},
        "target": {"service": "istio-system/istio-ingressgateway-asm"},
        "schedule": {"steps": [10, 50, 100], "bakeTime": "5m"},
        "analysis": {"interval": "30s", "window": "1m", "minRequests": 50, "failureThreshold": 2},
        "gates": {"errorRate": {"max": 0.01}},
    }
    spec.update(spec_overrides)
    return CanaryPolicy.model_validate({"metadata": {"name": name}, "spec": spec})


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def check(
    verdict: Verdict,
    cause: InconclusiveCause | None = None,
    starved: tuple[GatewayRole, ...] = (),
    *,
    baseline: Verdict = Verdict.PASS,
) -> CheckResult:
    """A check with one gate; ``baseline`` says whether the source was a real baseline (R7)."""
    gate = GateResult(
        gate="errorRate", verdict=verdict, reason=f"errorRate {verdict.value}", value=0.5, threshold=0.01, cause=cause
    )
    base = GateResult(gate="baseline", verdict=baseline, reason=f"baseline: {baseline.value}", threshold=50.0)
    return CheckResult(verdict=verdict, gates=(gate,), reason=gate.reason, cause=cause, starved=starved, baseline=base)


PASS = check(Verdict.PASS)
FAIL = check(Verdict.FAIL)
TARGET_QUIET = check(Verdict.INCONCLUSIVE, InconclusiveCause.TOO_FEW_REQUESTS, (GatewayRole.TARGET,))
#: the target is quiet (weight 0) and the source's queries errored: looks "ready" but is not (R7)
SOURCE_ERRORING = check(
    Verdict.INCONCLUSIVE,
    InconclusiveCause.TOO_FEW_REQUESTS,
    (GatewayRole.TARGET,),
    baseline=Verdict.INCONCLUSIVE,
)
PROM_DOWN = check(Verdict.INCONCLUSIVE, InconclusiveCause.METRICS_UNAVAILABLE, baseline=Verdict.INCONCLUSIVE)
NO_DATA = check(Verdict.INCONCLUSIVE, InconclusiveCause.NO_DATA)


def outcome(
    role: GatewayRole, measure: Measure, value: float | None = None, error: str | None = None, gate: str | None = None
) -> QueryOutcome:
    return QueryOutcome(
        RenderedQuery(f"q_{role.value}_{measure.value}", measure, role, gate=gate), value=value, error=error
    )


def samples(
    role: GatewayRole,
    requests: float | None = 1000.0,
    error_rate: float | None = 0.0,
    latency: float | None = 100.0,
    error: str | None = None,
    custom: dict[str, float | None] | None = None,
    mix: dict[str, float | None] | None = None,
) -> GatewaySamples:
    """One gateway's numbers; ``mix`` counts responses by kind (4xx, auth, noRoute; none by default)."""
    counts = {"4xx": 0.0, "auth": 0.0, "noRoute": 0.0, **(mix or {})}
    return GatewaySamples(
        role=role,
        requests=outcome(role, Measure.REQUESTS, requests, error),
        error_rate=outcome(role, Measure.ERROR_RATE, error_rate, error),
        latency=outcome(role, Measure.LATENCY, latency, error),
        # the collector always answers every custom gate; default to the one the gate tests define
        custom={
            name: outcome(role, Measure.CUSTOM, value, error, gate=name)
            for name, value in (custom if custom is not None else {"resets": 0.0}).items()
        },
        mix={
            kind: outcome(
                role, Measure.TLS if kind in ("tlsErrors", "connections") else Measure.RESPONSES, v, error, kind
            )
            for kind, v in counts.items()
        },
    )


def runner_for(policy: CanaryPolicy, *, pair: Any, store: Any, metrics: Any, **overrides: Any) -> Any:
    """A PolicyRunner with in-process defaults (no receivers, a fresh dispatcher, the wall clock)."""
    import threading

    from controller.notify.dispatcher import AlertDispatcher
    from controller.runtime.clock import SystemClock
    from controller.runtime.collector import Collector
    from controller.runtime.reconciler import PolicyRunner
    from controller.runtime.telemetry import Telemetry

    arguments: dict[str, Any] = {
        "receivers": [],
        "dispatcher": AlertDispatcher(),
        "collector": Collector(),
        "clock": SystemClock(),
        "telemetry": Telemetry(),
        "stopping": threading.Event(),
        **overrides,
    }
    return PolicyRunner(policy, pair=pair, store=store, metrics=metrics, **arguments)


class RecordingNotifier:
    """A receiver that keeps what it is sent (the in-process end of an alert)."""

    def __init__(self, name: str = "recorder") -> None:
        self.name = name
        self.alerts: list[Any] = []

    def send(self, alert: Any, *, timeout: float) -> None:
        self.alerts.append(alert)


class ScriptedChecks:
    """A collector that answers every check with ``next`` (set it between ticks)."""

    def __init__(self, first: CheckResult | None = None) -> None:
        self.next: CheckResult = first if first is not None else TARGET_QUIET

    def check(
        self, policy: CanaryPolicy, metrics: object, *, absolute_only: bool = False, evidence: object = None
    ) -> CheckResult:
        return self.next


class HandClock:
    """A clock moved by the test's hand (``at``), from T0."""

    def __init__(self) -> None:
        self.at: datetime = T0

    def now(self) -> datetime:
        return self.at


class FlakyPair(InMemoryGatewayPair):
    """The in-memory pair, whose weight patches fail while ``failing`` (an API server brownout)."""

    failing: bool = False

    def write_weights(self, policy, seen, weights, *, force=False, drop_legacy_state=False):  # type: ignore[no-untyped-def]
        if self.failing:
            raise ClusterUnavailable("patch Service: API server answered 500: etcdserver: request timed out")
        super().write_weights(policy, seen, weights, force=force, drop_legacy_state=drop_legacy_state)


@dataclass
class Rollout:
    """A policy's state and the Services' weights, advanced one decision at a time (the pure decision)."""

    policy: CanaryPolicy
    state: RolloutState
    target: int | None = 0
    source: int | None = 100
    decisions: list[Decision] = field(default_factory=list)
    #: the policy ``fresh()`` starts without one (None: ``make_policy()``), and who gives commands
    DEFAULT_POLICY: ClassVar[CanaryPolicy | None] = None
    OPERATOR: ClassVar[str] = "operator"

    @classmethod
    def fresh(cls, policy: CanaryPolicy | None = None, target: int = 0, source: int = 100) -> Rollout:
        chosen = policy or cls.DEFAULT_POLICY or make_policy()
        return cls(chosen, initial_state(chosen, Observation(target, source), at(0)), target, source)

    def tick(
        self,
        check: CheckResult | None,
        t: float,
        *,
        command: Command | None = None,
        by: str | None = None,
        refusal: str | None = None,
        write: bool = True,
        settling: str | None = None,
        cloud_refusal: str | None = None,
        cloud_detail: str | None = None,
        deficit: str | None = None,
    ) -> Decision:
        observed = Observation(
            self.target,
            self.source,
            check,
            command,
            refusal,
            settling=settling,
            cloud_refusal=cloud_refusal,
            cloud_detail=cloud_detail,
            deficit=deficit,
            command_by=by or self.OPERATOR,
        )
        decision = decide(self.policy, self.state, observed, at(t))
        if command is not None:
            assert decision.outcome is not None, f"{command} got no answer"  # R9: every command, every tick
        self.decisions.append(decision)
        self.state = decision.state
        if decision.weights is not None and write:
            self.target = decision.weights.target
            if decision.weights.source is not None:
                self.source = decision.weights.source
            self.state = self.state.evolve(pending=None)
        return decision

    def every(self, check: CheckResult, start: float, end: float, step: float = 30) -> list[Decision]:
        t, out = start, []
        while t <= end:
            out.append(self.tick(check, t))
            t += step
        return out

    @property
    def weights(self) -> tuple[int | None, int | None]:
        return self.target, self.source

    def share(self) -> float:
        """The ASM gateway's share of the CLB at the Services' weights."""
        return (self.target or 0) / ((self.target or 0) + (self.source or 0))


#: the shipped election timings
TIMING = LeaseTiming(lease_duration=15.0, renew_deadline=10.0, retry_period=2.0)


# -- an in-memory Lease shared by replicas, each through its own connection ------------------------


@dataclass
class SharedLease:
    """One Lease object as the API server keeps it (create fails when it exists; update when the
    version moved)."""

    record: LeaseRecord | None = None
    versions: int = 0
    created: datetime = T0 - timedelta(days=300)
    uid: str = "uid-gateway-canary"

    def store(self, record: LeaseRecord) -> LeaseRecord:
        self.versions += 1
        self.record = replace(record, version=str(self.versions), created=self.created, uid=self.uid)
        return self.record


@dataclass
class Connection:
    """One replica's view of the shared Lease: it may be cut off (``down``), and its next read may be
    slow (``during_read`` runs while the read is in flight: time passes, others write)."""

    lease: SharedLease
    down: bool = False
    during_read: Any = None

    def get(self) -> LeaseRecord | None:
        if self.down:
            raise ClusterUnavailable("test: this replica cannot reach the API server")
        hook, self.during_read = self.during_read, None
        if hook is not None:
            hook()
        return self.lease.record

    def create(self, record: LeaseRecord) -> LeaseRecord:
        if self.down:
            raise ClusterUnavailable("test: this replica cannot reach the API server")
        if self.lease.record is not None:
            raise Conflict("test: exists")
        return self.lease.store(record)

    def update(self, record: LeaseRecord) -> LeaseRecord:
        if self.down:
            raise ClusterUnavailable("test: this replica cannot reach the API server")
        if self.lease.record is None or record.version != self.lease.record.version:
            raise Conflict("test: version moved")
        return self.lease.store(record)


class Seconds:
    """One monotonic clock for every replica (they run at the same rate; only what they saw differs)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def hand_elector(
    leases: Any, seconds: Seconds, name: str, timing: LeaseTiming = TIMING
) -> tuple[LeaderElector, list[str]]:
    """An elector whose rounds the test runs itself (its thread is not started), and what it said."""
    said: list[str] = []
    made = LeaderElector(leases, name, timing, clock=HandClock(), monotonic=seconds)
    made._on_started = lambda token: said.append(f"started {token.term}")
    made._on_stopped = lambda why: said.append(f"stopped: {why}")
    return made, said


def memory_service(settings: Settings, metrics: MetricsSource | None = None, store: Any = None) -> ControllerService:
    """A service over in-memory Services and state (no HTTP server), every policy on ``metrics``
    (None: the test never lets a check run)."""
    return ControllerService(
        settings,
        pair=InMemoryGatewayPair(),
        store=store if store is not None else InMemoryStateStore(),
        metrics_for=lambda policy: metrics,  # type: ignore[arg-type,return-value]
        clock=SystemClock(),
        serve_http=False,
    )
