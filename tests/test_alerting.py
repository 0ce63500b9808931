"""Alert delivery: a REAL Alertmanager routes the rollback alert to a webhook; retries and dedup."""

from __future__ import annotations

import threading
import time

from controller.core.alerts import build_alert
from controller.core.enums import AlertKind, Severity, Verdict
from controller.core.schedule import Weights
from controller.errors import NotificationError
from controller.notify.alertmanager import AlertmanagerNotifier
from controller.notify.dispatcher import AlertDispatcher
from controller.notify.slack import SlackNotifier
from controller.notify.webhook import WebhookNotifier
from tests.helpers import T0, check
from tests.servers import WebhookSink, wait_for


def rollback_alert(suffix: str = "1"):
    return build_alert(
        kind=AlertKind.ROLLED_BACK,
        severity=Severity.CRITICAL,
        policy=f"shop-{suffix}",
        reason="2 failed checks",
        at=T0,
        source_service="istio-system/gw",
        target_service="istio-system/gw-asm",
        weights_before=Weights(25, 75),
        weights_after=Weights(0, 100),
        check=check(Verdict.FAIL),
        dedup_suffix=suffix,
    )


def test_rollback_alert_reaches_a_receiver_through_real_alertmanager(
    alertmanager: str, alert_sink: WebhookSink
) -> None:
    AlertmanagerNotifier(alertmanager).send(rollback_alert("am"))
    delivered = wait_for(
        lambda: [
            b
            for b in alert_sink.bodies("/alertmanager")
            if any(a["labels"].get("policy") == "shop-am" for a in b["alerts"])
        ],
        timeout=20,
        what="Alertmanager to deliver the alert",
    )
    alert = next(a for a in delivered[0]["alerts"] if a["labels"]["policy"] == "shop-am")
    assert alert["labels"]["alertname"] == "GatewayCanaryRolledBack"
    assert alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["failing_gate"] == "errorRate"
    assert alert["annotations"]["threshold"] == "0.01"
    assert "target=25 source=75 -> target=0 source=100" in alert["annotations"]["description"]


def test_webhook_and_slack_bodies() -> None:
    sink = WebhookSink()
    try:
        WebhookNotifier(f"{sink.url}/hook").send(rollback_alert())
        SlackNotifier(f"{sink.url}/services/T000/B000/SECRET").send(rollback_alert())
        hook = sink.bodies("/hook")[0]
        assert hook["kind"] == "RolledBack" and hook["weightsAfter"] == {"target": 0, "source": 100}
        assert hook["failingGates"][0]["value"] == 0.5
        slack = sink.bodies("/services/T000/B000/SECRET")[0]
        assert slack["text"].startswith(":rotating_light: *[CRITICAL]")
    finally:
        sink.close()


def test_receiver_names_never_contain_the_secret_url() -> None:
    assert "SECRET" not in SlackNotifier("https://hooks.slack.com/services/T/B/SECRET").name
    assert WebhookNotifier("https://user:pw@hooks.example.com/x?token=SECRET").name == "webhook:hooks.example.com"


class Flaky:
    """A receiver failing its first attempts (an in-process receiver: the dispatcher is the subject)."""

    name = "flaky"

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.delivered = threading.Event()

    def send(self, alert) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise NotificationError("flaky: HTTP 503")
        self.delivered.set()


def test_dispatcher_retries_with_backoff_and_deduplicates() -> None:
    outcomes: list[tuple[str, str]] = []
    dispatcher = AlertDispatcher(attempts=4, backoff_seconds=0.01, on_outcome=lambda r, o: outcomes.append((r, o)))
    flaky = Flaky(failures=2)
    dispatcher.submit(rollback_alert("x"), [flaky])
    assert flaky.delivered.wait(5)
    assert flaky.calls == 3
    dispatcher.submit(rollback_alert("x"), [flaky])  # same dedup key
    wait_for(lambda: ("flaky", "deduplicated") in outcomes, timeout=5, what="dedup outcome")
    assert flaky.calls == 3
    dispatcher.close()


def test_a_hanging_receiver_never_delays_submit() -> None:
    release = threading.Event()

    class Hanging:
        name = "hanging"

        def send(self, alert) -> None:
            release.wait(10)

    dispatcher = AlertDispatcher(attempts=1)
    started = time.perf_counter()
    dispatcher.submit(rollback_alert("h"), [Hanging()])
    assert time.perf_counter() - started < 0.5
    release.set()
    dispatcher.close()


def test_a_failing_http_receiver_is_reported_as_failed() -> None:
    sink = WebhookSink(status=500)
    outcomes: list[tuple[str, str]] = []
    try:
        dispatcher = AlertDispatcher(attempts=2, backoff_seconds=0.01, on_outcome=lambda r, o: outcomes.append((r, o)))
        dispatcher.submit(rollback_alert("f"), [WebhookNotifier(f"{sink.url}/down", name="down")])
        wait_for(lambda: ("webhook:down", "failed") in outcomes, timeout=5, what="failed outcome")
        assert len(sink.bodies("/down")) == 2
        dispatcher.close()
    finally:
        sink.close()
