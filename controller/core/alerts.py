"""The alert as a value: everything on-call needs to act without opening a dashboard.

Built from the decision and the check that caused it; the notifiers only format it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from controller.core.enums import AlertKind, Severity
from controller.core.results import CheckResult
from controller.core.schedule import Weights

__all__ = ["Alert", "build_alert"]


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert. ``dedup_key`` is the same for repeats of the same event."""

    kind: AlertKind
    severity: Severity
    policy: str
    summary: str
    reason: str
    at: datetime
    source_service: str
    target_service: str
    weights_before: Weights | None = None
    weights_after: Weights | None = None
    failing_gates: tuple[dict[str, Any], ...] = ()
    source_numbers: dict[str, float | None] = field(default_factory=dict)
    target_numbers: dict[str, float | None] = field(default_factory=dict)
    dedup_key: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (generic webhook body, logs)."""
        return {
            "kind": self.kind.value,
            "severity": self.severity.value,
            "policy": self.policy,
            "summary": self.summary,
            "reason": self.reason,
            "at": self.at.isoformat(),
            "sourceService": self.source_service,
            "targetService": self.target_service,
            "weightsBefore": _weights(self.weights_before),
            "weightsAfter": _weights(self.weights_after),
            "failingGates": list(self.failing_gates),
            "source": self.source_numbers,
            "target": self.target_numbers,
        }

    def text(self) -> str:
        """A plain multi-line rendering (Slack, terminal)."""
        lines = [f"[{self.severity.value.upper()}] {self.summary}", f"policy: {self.policy}", self.reason]
        if self.weights_before is not None or self.weights_after is not None:
            lines.append(f"weights: {self.weights_before} -> {self.weights_after}")
        for gate in self.failing_gates:
            lines.append(
                f"gate {gate['gate']}: {_fmt(gate.get('value'))} breaks {gate.get('comparator', '<=')} "
                f"{_fmt(gate.get('threshold'))} (source {_fmt(gate.get('baseline'))})"
            )
            if gate.get("query"):
                lines.append(f"  PromQL: {gate['query']}")
        if self.target_numbers:
            lines.append(f"target {self.target_service}: {_numbers(self.target_numbers)}")
        if self.source_numbers:
            lines.append(f"source {self.source_service}: {_numbers(self.source_numbers)}")
        return "\n".join(lines)


def _weights(weights: Weights | None) -> dict[str, int | None] | None:
    return None if weights is None else {"target": weights.target, "source": weights.source}


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _numbers(numbers: dict[str, float | None]) -> str:
    return ", ".join(f"{key}={_fmt(value)}" for key, value in numbers.items())


_SUMMARIES = {
    AlertKind.ROLLED_BACK: "{policy}: ASM gateway rolled back to weight 0",
    AlertKind.PROMOTED: "{policy}: ASM gateway promoted to weight 100",
    AlertKind.POLICY_REFUSED: "{policy}: policy refused, no weights changed",
    AlertKind.STUCK_INCONCLUSIVE: "{policy}: rollout stuck, checks inconclusive",
    AlertKind.POLICY_REMOVED: "{policy}: policy removed, weights left as they are",
    AlertKind.WEIGHT_CHANGED_EXTERNALLY: "{policy}: weights changed outside gateway-canary, rollout paused",
    AlertKind.POLICY_INVALID: "{policy}: policy file invalid, last good version keeps running",
    AlertKind.TICK_FAILED: "{policy}: a check failed unexpectedly, the next one runs as scheduled",
}


def build_alert(
    *,
    kind: AlertKind,
    severity: Severity,
    policy: str,
    reason: str,
    at: datetime,
    source_service: str,
    target_service: str,
    weights_before: Weights | None = None,
    weights_after: Weights | None = None,
    check: CheckResult | None = None,
    dedup_suffix: str = "",
) -> Alert:
    """Assemble an alert; ``dedup_suffix`` distinguishes events of the same kind (e.g. each rollback)."""
    failing = tuple(gate.as_dict() for gate in check.failing) if check is not None else ()
    return Alert(
        kind=kind,
        severity=severity,
        policy=policy,
        summary=_SUMMARIES[kind].format(policy=policy),
        reason=reason,
        at=at,
        source_service=source_service,
        target_service=target_service,
        weights_before=weights_before,
        weights_after=weights_after,
        failing_gates=failing,
        source_numbers=check.source.summary() if check is not None and check.source is not None else {},
        target_numbers=check.target.summary() if check is not None and check.target is not None else {},
        dedup_key=f"{policy}/{kind.value}/{dedup_suffix}",
    )
