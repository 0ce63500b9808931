"""Slack incoming webhook."""

from __future__ import annotations

from controller.core.alerts import Alert
from controller.core.enums import Severity
from controller.notify.http import post_json, receiver_name

__all__ = ["SlackNotifier"]

_ICON = {
    Severity.CRITICAL: ":rotating_light:",
    Severity.WARNING: ":warning:",
    Severity.INFO: ":white_check_mark:",
}


class SlackNotifier:
    """Posts the alert as a message; the URL is a secret and never appears in names or logs."""

    def __init__(self, url: str, *, name: str | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError("a Slack webhook URL must start with http:// or https://")
        self._url = url
        self.name = receiver_name("slack", name, url)

    def send(self, alert: Alert, *, timeout: float) -> None:
        """One delivery attempt; the id is shown so a repeat after a lost answer can be recognised.

        The runbook is a link of its own below the code block (a URL inside one is not clickable).
        """
        title, _, rest = alert.body().partition("\n")
        lines = [f"{_ICON[alert.severity]} *{title}*"]
        if rest:
            lines.append(f"```{rest}```")
        if alert.runbook_url:
            lines.append(f"<{alert.runbook_url}|runbook>")
        lines.append(f"alert id {alert.id}")
        post_json(self.name, self._url, {"text": "\n".join(lines)}, timeout=timeout)
