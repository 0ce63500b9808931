"""The alert as a value: everything on-call needs to act without opening a dashboard.

Built from the decision and the check that caused it; the notifiers only format it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from controller.core.enums import AlertKind, Severity
from controller.core.results import CheckResult
from controller.core.schedule import Weights
from controller.core.text import redact_urls

__all__ = ["MAX_OUTBOX", "Alert", "OutboxEntry", "alert_from_dict", "build_alert", "decode_outbox", "encode_outbox"]

#: Undelivered alerts kept per policy; beyond it the oldest are dropped (and logged by the runner).
MAX_OUTBOX = 50


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert. ``dedup_key`` (and so ``id``) is the same for repeats of the same event."""

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

    @property
    def id(self) -> str:
        """Stable id of the event: the idempotency key receivers see, the same after a restart."""
        return hashlib.sha256(f"{self.policy}/{self.dedup_key}".encode()).hexdigest()[:20]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (generic webhook body, logs, the outbox)."""
        return {
            "id": self.id,
            "dedupKey": self.dedup_key,
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
            "failingGates": [_finite(gate) for gate in self.failing_gates],
            "source": _finite(self.source_numbers),
            "target": _finite(self.target_numbers),
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
            if gate.get("detail"):
                lines.append(f"  grew most: {gate['detail']}")
            if gate.get("query"):
                lines.append(f"  PromQL: {gate['query']}")
        if self.target_numbers:
            lines.append(f"target {self.target_service}: {_numbers(self.target_numbers)}")
        if self.source_numbers:
            lines.append(f"source {self.source_service}: {_numbers(self.source_numbers)}")
        return "\n".join(lines)


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    """NaN and infinities as null: JSON has no such numbers, and a receiver must not choke on one."""
    return {key: None if isinstance(v, float) and not math.isfinite(v) else v for key, v in values.items()}


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
    AlertKind.CLOUD_NOT_APPLIED: "{policy}: the cloud has not applied the last weight change",
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
        reason=redact_urls(reason),
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


def alert_from_dict(data: dict[str, Any]) -> Alert:
    """The alert ``as_dict`` wrote (an outbox entry); ValueError when it is not one."""
    try:

        def weights(value: Any) -> Weights | None:
            return None if value is None else Weights(int(value["target"]), _opt_int(value["source"]))

        return Alert(
            kind=AlertKind(data["kind"]),
            severity=Severity(data["severity"]),
            policy=str(data["policy"]),
            summary=str(data["summary"]),
            reason=str(data["reason"]),
            at=datetime.fromisoformat(str(data["at"])),
            source_service=str(data["sourceService"]),
            target_service=str(data["targetService"]),
            weights_before=weights(data.get("weightsBefore")),
            weights_after=weights(data.get("weightsAfter")),
            failing_gates=tuple(dict(gate) for gate in data.get("failingGates", ())),
            source_numbers=dict(data.get("source") or {}),
            target_numbers=dict(data.get("target") or {}),
            dedup_key=str(data["dedupKey"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not an alert: {exc}") from exc


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """An alert not yet delivered to ``receivers`` (names), first queued at ``queued_at``."""

    alert: Alert
    receivers: tuple[str, ...]
    queued_at: datetime


def encode_outbox(entries: tuple[OutboxEntry, ...]) -> str:
    """Compact, stable JSON for the state object's ``outbox`` key."""
    return json.dumps(
        [
            {"alert": e.alert.as_dict(), "receivers": list(e.receivers), "queuedAt": e.queued_at.isoformat()}
            for e in entries[-MAX_OUTBOX:]
        ],
        sort_keys=True,
        separators=(",", ":"),
    )


def decode_outbox(text: str) -> tuple[OutboxEntry, ...]:
    """What ``encode_outbox`` wrote; ValueError (with why) for anything else."""
    try:
        raw = json.loads(text)
        if not isinstance(raw, list):
            raise ValueError("not a list")
        return tuple(
            OutboxEntry(
                alert=alert_from_dict(item["alert"]),
                receivers=tuple(str(name) for name in item["receivers"]),
                queued_at=datetime.fromisoformat(str(item["queuedAt"])),
            )
            for item in raw[-MAX_OUTBOX:]
        )
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"unreadable outbox: {exc}") from exc
