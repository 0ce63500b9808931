"""Generic JSON webhook: the alert's full structured form."""

from __future__ import annotations

from controller.core.alerts import Alert
from controller.notify.http import post_json, receiver_name

__all__ = ["WebhookNotifier"]


class WebhookNotifier:
    """POSTs ``Alert.as_dict()`` and its ``text``, with the alert's id as ``Idempotency-Key`` (and ``id``).

    ``text`` is what a person reads (the policy's template when it has one); ``runbookUrl`` the
    alert kind's runbook section.
    """

    def __init__(self, url: str, *, name: str | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError("a webhook URL must start with http:// or https://")
        self._url = url
        self.name = receiver_name("webhook", name, url)

    def send(self, alert: Alert, *, timeout: float) -> None:
        """One delivery attempt."""
        headers = {"Idempotency-Key": alert.id}
        post_json(self.name, self._url, {**alert.as_dict(), "text": alert.text()}, timeout=timeout, headers=headers)
