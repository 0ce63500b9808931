"""Alertmanager v2 API, so routing to PagerDuty, Opsgenie or DingTalk reuses the team's config."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from controller.core.alerts import Alert
from controller.notify.http import post_json, receiver_name

__all__ = ["AlertmanagerNotifier"]

#: How long an event stays firing in Alertmanager (it is an event, not a condition).
_LIFETIME = timedelta(hours=1)
#: Label names Alertmanager accepts (one invalid name loses the whole alert); "__" is reserved.
_LABEL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class AlertmanagerNotifier:
    """POSTs one alert to ``/api/v2/alerts``; labels route it, annotations carry the evidence."""

    def __init__(self, url: str, *, name: str | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError("an Alertmanager URL must start with http:// or https://")
        self._endpoint = url.rstrip("/") + "/api/v2/alerts"
        self.name = receiver_name("alertmanager", name, url)

    def send(self, alert: Alert, *, timeout: float) -> None:
        """One delivery attempt.

        Each event is its own Alertmanager alert: the ``event_id`` label (the alert's stable id)
        keeps a second rollback from merging into the first (which would page nobody), while a
        repeat of the same event has the same labels and is de-duplicated by Alertmanager. The
        ``endsAt`` (an hour after this delivery) lets an event resolve on its own instead of
        lingering for the resolve timeout, and never resolves one that arrives late.

        The policy's environment labels (``env``, ``region``) become labels too, so routes can
        match them; they never replace the controller's own (``severity``, ``policy`` and the rest).
        The runbook link is the ``runbook_url`` annotation, as Prometheus alerting rules have it.
        """
        namespace, _, service = alert.target_service.partition("/")
        annotations = {
            "summary": alert.summary,
            "description": alert.text(),
            "reason": alert.reason,
            "weights_before": str(alert.weights_before),
            "weights_after": str(alert.weights_after),
        }
        if alert.runbook_url:
            annotations["runbook_url"] = alert.runbook_url
        if alert.failing_gates:
            gate = alert.failing_gates[0]
            annotations.update(
                failing_gate=str(gate["gate"]),
                value=str(gate.get("value")),
                threshold=str(gate.get("threshold")),
                promql=str(gate.get("query") or ""),
            )
        labels = {
            key: value
            for key, value in alert.labels.items()
            if _LABEL_NAME.match(key) and not key.startswith("__") and value
        }
        labels.update(
            alertname=f"GatewayCanary{alert.kind.value}",
            severity=alert.severity.value,
            policy=alert.policy,
            namespace=namespace,
            service=service,
            event_id=alert.id,
        )
        body = [
            {
                "labels": labels,
                "annotations": annotations,
                "startsAt": alert.at.isoformat(),
                # from the delivery, not the event: a page delayed by an outage must still fire
                "endsAt": (datetime.now(UTC) + _LIFETIME).isoformat(),
            }
        ]
        post_json(self.name, self._endpoint, body, timeout=timeout)
