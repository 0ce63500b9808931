"""Alertmanager v2 API, so routing to PagerDuty, Opsgenie or DingTalk reuses the team's config."""

from __future__ import annotations

from controller.core.alerts import Alert
from controller.notify.http import post_json, safe_host

__all__ = ["AlertmanagerNotifier"]


class AlertmanagerNotifier:
    """POSTs one alert to ``/api/v2/alerts``; labels route it, annotations carry the evidence."""

    def __init__(self, url: str, *, name: str | None = None, timeout: float = 5.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError("an Alertmanager URL must start with http:// or https://")
        self._endpoint = url.rstrip("/") + "/api/v2/alerts"
        self._timeout = timeout
        self.name = f"alertmanager:{name or safe_host(url)}"

    def send(self, alert: Alert) -> None:
        """One delivery attempt."""
        namespace, _, service = alert.target_service.partition("/")
        annotations = {
            "summary": alert.summary,
            "description": alert.text(),
            "reason": alert.reason,
            "weights_before": str(alert.weights_before),
            "weights_after": str(alert.weights_after),
        }
        if alert.failing_gates:
            gate = alert.failing_gates[0]
            annotations.update(
                failing_gate=str(gate["gate"]),
                value=str(gate.get("value")),
                threshold=str(gate.get("threshold")),
                promql=str(gate.get("query") or ""),
            )
        body = [
            {
                "labels": {
                    "alertname": f"GatewayCanary{alert.kind.value}",
                    "severity": alert.severity.value,
                    "policy": alert.policy,
                    "namespace": namespace,
                    "service": service,
                },
                "annotations": annotations,
                "startsAt": alert.at.isoformat(),
            }
        ]
        post_json(self.name, self._endpoint, body, timeout=self._timeout)
