"""The alert as a value: everything on-call needs to act without opening a dashboard.

Built from the decision and the check that caused it; the notifiers only format it. Each alert
links to its section of ``docs/runbook.md`` (``RUNBOOK_ANCHORS``), carries the environment labels
the policy declares, and may carry a text rendered from the policy's own template.

Templates use the ``{{ field }}`` placeholders the custom gates' PromQL uses, and nothing else: no
Jinja. On-call engineers edit them in a ConfigMap, and a template language that can call methods or
loop is code run by the controller with its secrets in reach; a fixed list of fields substituted
once cannot do anything but print. A typo is an error when the policy loads
(``template_problems``, from ``controller.core.templates``), not a blank in a page at 3 a.m.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from controller.core.enums import AlertKind, Severity
from controller.core.results import CheckResult
from controller.core.schedule import Weights
from controller.core.templates import MISSING, TEMPLATE_FIELDS, fill_template, template_problems
from controller.core.text import redact_urls

__all__ = [
    "MAX_OUTBOX",
    "MAX_RENDERED_CHARS",
    "RUNBOOK_ANCHORS",
    "TEMPLATE_FIELDS",
    "Alert",
    "OutboxEntry",
    "alert_from_dict",
    "build_alert",
    "decode_outbox",
    "encode_outbox",
    "render_template",
    "runbook_link",
    "template_problems",
    "template_values",
]

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
    #: the alert kind's section of the runbook; "" when the controller was given no runbook base URL
    runbook_url: str = ""
    #: the environment labels the policy declares (``{"env": "prod", "region": "cn-hangzhou"}``)
    labels: dict[str, str] = field(default_factory=dict)
    #: the text rendered from the policy's template; None: the default text
    rendered: str | None = None

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
            "runbookUrl": self.runbook_url,
            "labels": dict(self.labels),
            "rendered": self.rendered,
        }

    def text(self) -> str:
        """The text people read (terminal, Alertmanager's description): ``body()`` and the runbook.

        A template's text is the author's whole message (it may place ``{{ runbook_url }}`` itself);
        the default text ends with the runbook link when there is one.
        """
        if self.rendered is not None:
            return self.rendered
        body = self.body()
        return f"{body}\nrunbook: {self.runbook_url}" if self.runbook_url else body

    def body(self) -> str:
        """The message without the runbook line, for receivers that add their own (clickable) link.

        The first line is a title: chat receivers show it in bold.
        """
        if self.rendered is not None:
            return self.rendered
        lines = [f"[{self.severity.value.upper()}] {self.summary}", f"policy: {self.policy}", self.reason]
        if self.labels:
            lines.append("labels: " + ", ".join(f"{key}={value}" for key, value in sorted(self.labels.items())))
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
    AlertKind.AWAITING_APPROVAL: "{policy}: rollout waits for an operator's approval before the next raise",
    AlertKind.RECOVERED: "{policy}: the condition reported earlier has cleared",
}

#: Each kind's section of ``docs/runbook.md``; an alert links to base URL + "#" + anchor.
RUNBOOK_ANCHORS: Mapping[AlertKind, str] = {
    AlertKind.ROLLED_BACK: "rolled-back",
    AlertKind.PROMOTED: "promoted",
    AlertKind.POLICY_REFUSED: "refused",
    AlertKind.STUCK_INCONCLUSIVE: "stuck",
    AlertKind.POLICY_REMOVED: "policy-removed",
    AlertKind.WEIGHT_CHANGED_EXTERNALLY: "weight-changed",
    AlertKind.POLICY_INVALID: "policy-invalid",
    AlertKind.TICK_FAILED: "ticksfailing",
    AlertKind.CLOUD_NOT_APPLIED: "cloud-not-applied",
    AlertKind.AWAITING_APPROVAL: "awaiting-approval",
    AlertKind.RECOVERED: "recovered",
}

#: A rendered text longer than this is cut (a receiver refuses an oversized message, and loses it).
MAX_RENDERED_CHARS = 8000


def template_values(alert: Alert) -> dict[str, str]:
    """Each placeholder's text for ``alert``; "n/a" for what it does not have (no failing gate)."""
    gate = alert.failing_gates[0] if alert.failing_gates else {}
    after = alert.weights_after
    values = {
        "policy": alert.policy,
        "kind": alert.kind.value,
        "severity": alert.severity.value,
        "summary": alert.summary,
        "reason": alert.reason,
        "weights_before": MISSING if alert.weights_before is None else str(alert.weights_before),
        "weights_after": MISSING if after is None else str(after),
        "target_weight": MISSING if after is None else str(after.target),
        "source_weight": MISSING if after is None else "unchanged" if after.source is None else str(after.source),
        "gate": _fmt(gate.get("gate")),
        "value": _fmt(gate.get("value")),
        "threshold": _fmt(gate.get("threshold")),
        "baseline": _fmt(gate.get("baseline")),
        "promql": _fmt(gate.get("query") or None),
        "runbook_url": alert.runbook_url or MISSING,
        "alert_id": alert.id,
        "at": alert.at.isoformat(),
        "source_service": alert.source_service,
        "target_service": alert.target_service,
    }
    values.update({f"labels.{key}": value for key, value in alert.labels.items()})
    return values


def render_template(template: str, alert: Alert) -> str:
    """``template`` with each ``{{ field }}`` replaced by the alert's value, in one pass.

    One pass: a value that itself contains ``{{ ... }}`` (a reason quoting a template) is printed,
    never expanded. A placeholder that is not a field (a template that skipped
    ``template_problems``) renders as "n/a"; the result is cut to ``MAX_RENDERED_CHARS``.
    (The syntax lives in ``controller.core.templates``, which the policy model imports too.)
    """
    text = fill_template(template, template_values(alert))
    return text if len(text) <= MAX_RENDERED_CHARS else text[: MAX_RENDERED_CHARS - 15] + " …[truncated]"


def runbook_link(base: str, kind: AlertKind) -> str:
    """``base#anchor`` for ``kind`` (a fragment already on ``base`` is replaced); "" without a base."""
    return f"{base.split('#', 1)[0]}#{RUNBOOK_ANCHORS[kind]}" if base else ""


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
    runbook_base_url: str = "",
    labels: Mapping[str, str] | None = None,
    template: str | None = None,
) -> Alert:
    """Assemble an alert; ``dedup_suffix`` distinguishes events of the same kind (e.g. each rollback).

    ``runbook_base_url`` is where ``docs/runbook.md`` is published (the alert links to its kind's
    section); ``labels`` are the policy's environment labels; ``template`` (checked by
    ``template_problems`` when the policy loaded) replaces the default text.
    """
    failing = tuple(gate.as_dict() for gate in check.failing) if check is not None else ()
    alert = Alert(
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
        runbook_url=runbook_link(runbook_base_url, kind),
        labels=dict(labels or {}),
    )
    if template is None:
        return alert
    return dataclasses.replace(alert, rendered=render_template(template, alert))


def alert_from_dict(data: dict[str, Any]) -> Alert:
    """The alert ``as_dict`` wrote (an outbox entry); ValueError when it is not one.

    Entries written before alerts had a runbook link, labels or a rendered text read back without.
    """
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
            runbook_url=str(data.get("runbookUrl") or ""),
            labels=_labels(data.get("labels")),
            rendered=None if data.get("rendered") is None else str(data["rendered"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not an alert: {exc}") from exc


def _labels(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("labels is not a mapping")
    return {str(key): str(text) for key, text in value.items()}


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
