"""Measurements and verdicts as values: status, value, threshold and reason, never a bare bool.

A query result is either a number, "no data" (an empty vector), or an error; all three are
values here so that fetching (an adapter) and judging (``gates``) stay separate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from controller.core.enums import GatewayRole, InconclusiveCause, Measure, Verdict
from controller.core.sequential import Evidence

__all__ = [
    "CheckResult",
    "CounterSeries",
    "GateResult",
    "GatewaySamples",
    "QueryOutcome",
    "RenderedQuery",
]


@dataclass(frozen=True, slots=True)
class RenderedQuery:
    """A PromQL string with what it means, so a simulated source can answer it without parsing."""

    promql: str
    measure: Measure
    role: GatewayRole
    gate: str | None = None
    #: a query shared by many gateways (``controller.runtime.sharing``): the label sets it groups
    #: by, one per gateway, so that a simulated source can answer each; empty for a gateway's own
    groups: tuple[tuple[tuple[str, str], ...], ...] = ()


@dataclass(frozen=True, slots=True)
class QueryOutcome:
    """One query's answer: a value, no data (empty vector), or an error message."""

    query: RenderedQuery
    value: float | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def has_number(self) -> bool:
        """True when the answer is a real number (not None, NaN or infinite)."""
        return self.error is None and self.value is not None and math.isfinite(self.value)


@dataclass(frozen=True, slots=True)
class CounterSeries:
    """A gateway's answer to its counters query (``queries.counters_query``): each counter's value
    per scrape target, ``(counter name, instance) -> value``, or the error that stood for it."""

    query: RenderedQuery
    values: dict[tuple[str, str], float] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class GatewaySamples:
    """Everything measured on one gateway in one check."""

    role: GatewayRole
    requests: QueryOutcome
    error_rate: QueryOutcome
    latency: QueryOutcome
    custom: dict[str, QueryOutcome] = field(default_factory=dict)
    #: counts of kinds of responses and TLS counters (4xx, auth, noRoute, tlsErrors, connections)
    mix: dict[str, QueryOutcome] = field(default_factory=dict)
    #: raw counters for the sequential gates, per scrape target, as read now: the increments
    #: between checks are their evidence (None: not asked)
    counters: CounterSeries | None = None

    @property
    def served(self) -> float | None:
        """Requests in the window: no series at all is none (0.0); an error or NaN is unknown (None)."""
        outcome = self.requests
        if outcome.error is None and outcome.value is None:
            return 0.0
        return outcome.value if outcome.has_number else None

    def outcomes(self) -> list[QueryOutcome]:
        """All query outcomes, built-in first."""
        return [self.requests, self.error_rate, self.latency, *self.mix.values(), *self.custom.values()]

    def summary(self) -> dict[str, float | None]:
        """Numbers for logs and alerts."""
        numbers: dict[str, float | None] = {
            "requests": self.requests.value,
            "errorRate": self.error_rate.value,
            "latencyMs": self.latency.value,
        }
        for name, outcome in (*self.mix.items(), *self.custom.items()):
            numbers[name] = outcome.value
        return numbers


@dataclass(frozen=True, slots=True)
class GateResult:
    """One gate's verdict with the evidence behind it."""

    gate: str
    verdict: Verdict
    reason: str
    value: float | None = None
    threshold: float | None = None
    comparator: str = "<="
    baseline: float | None = None
    cause: InconclusiveCause | None = None
    query: str | None = None
    #: what on-call needs beyond the numbers (e.g. which responses grew, per route)
    detail: str | None = None
    #: a FAIL that carries its own false-alarm control (a sequential gate's rejection): it rolls
    #: back at once, failureThreshold does not apply
    decisive: bool = False

    def as_dict(self) -> dict[str, Any]:
        """For logs, alerts and the persisted last verdict."""
        return {
            "gate": self.gate,
            "verdict": self.verdict.value,
            "value": self.value,
            "threshold": self.threshold,
            "comparator": self.comparator,
            "baseline": self.baseline,
            "reason": self.reason,
            "query": self.query,
            **({"detail": self.detail} if self.detail else {}),
        }


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The verdict of one check over both gateways.

    Any FAIL makes the check FAIL (an inconclusive sibling never hides a failure); otherwise any
    INCONCLUSIVE makes it INCONCLUSIVE; PASS needs every gate to pass.
    """

    verdict: Verdict
    gates: tuple[GateResult, ...]
    reason: str
    cause: InconclusiveCause | None = None
    #: gateways with fewer requests than ``minRequests`` in the window
    starved: tuple[GatewayRole, ...] = ()
    source: GatewaySamples | None = None
    target: GatewaySamples | None = None
    #: the sequential gates' evidence after this check (the state keeps it for the next one)
    evidence: tuple[Evidence, ...] = ()
    #: whether the source is a real baseline: every query answered and enough source traffic (R7)
    baseline: GateResult = field(
        default_factory=lambda: GateResult(
            gate="baseline", verdict=Verdict.INCONCLUSIVE, reason="baseline: not measured", cause=None
        )
    )

    @property
    def failing(self) -> tuple[GateResult, ...]:
        """The gates that failed, first the one that decided."""
        return tuple(gate for gate in self.gates if gate.verdict is Verdict.FAIL)

    @property
    def observed_target_share(self) -> float | None:
        """The share of requests the target actually got: the CLB weight as traffic sees it."""
        if self.source is None or self.target is None:
            return None
        # No series at all for the target is no request at all: a weight that never reached the
        # CLB shows exactly so. The source must have answered a number.
        on_target, on_source = self.target.served, self.source.served
        if on_target is None or on_source is None or not self.source.requests.has_number:
            return None
        total = on_target + on_source
        return None if total <= 0 else on_target / total
