"""DingTalk, Feishu and WeCom robots, runbook links and alert templates.

The robots are a real loopback HTTP server that behaves as each service documents: it checks the
exact payload, recomputes each signature from the timestamp it received and the secret it knows
(refusing a wrong one with the service's own code), and answers with errcode/code as the service
does (HTTP 200 even for a refusal). Nothing here trusts the sender's own signing code.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import ValidationError

from controller.core.alerts import (
    RUNBOOK_ANCHORS,
    TEMPLATE_FIELDS,
    Alert,
    OutboxEntry,
    alert_from_dict,
    build_alert,
    decode_outbox,
    encode_outbox,
    render_template,
    template_problems,
)
from controller.core.enums import AlertKind, Severity, Verdict
from controller.core.receivers import DingTalkReceiver, FeishuReceiver, WeComReceiver
from controller.core.results import CheckResult, GateResult
from controller.core.schedule import Weights
from controller.errors import NotificationError
from controller.notify.alertmanager import AlertmanagerNotifier
from controller.notify.dingtalk import DingTalkNotifier
from controller.notify.factory import chat_receiver
from controller.notify.feishu import FeishuNotifier
from controller.notify.slack import SlackNotifier
from controller.notify.webhook import WebhookNotifier
from controller.notify.wecom import MAX_CONTENT_BYTES, WeComNotifier
from controller.settings import Settings
from tests.helpers import T0
from tests.servers import WebhookSink, _Quiet, _Server, free_port

DING_TOKEN = "d1n6t0k3n0000000000000000000000000000000000000000000000000000abc"
DING_SECRET = "SEC0123456789abcdef0123456789abcdef0123456789abcdef0123456789ab"
FEISHU_TOKEN = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
FEISHU_SECRET = "fs3cr3tFs3cr3tFs3cr3t"
WECOM_KEY = "693a91f6-7xxx-4bc4-97a0-0ec2sifa5aaa"
RUNBOOK = "https://git.example.com/gateway-canary/blob/main/docs/runbook.md"
PROMQL = 'sum(rate(istio_requests_total{source_workload="gw-asm",response_code=~"5.."}[1m]))'


# --- a loopback emulator of the three robots -------------------------------------------------------------


@dataclass
class Robots:
    """What the robots were sent, and how they are set up (their secrets, a forced refusal)."""

    url: str = ""
    ding_secret: str | None = DING_SECRET
    feishu_secret: str | None = FEISHU_SECRET
    #: answer this code instead of judging (a rate limit)
    forced: int | None = None
    #: Feishu as older deployments answer: {"StatusCode": 0}
    feishu_legacy: bool = False
    #: answer 200 with an HTML page (a proxy in the way)
    html: bool = False
    #: echo the token in the refusal's message (a careless service)
    echo_token: bool = False
    received: list[tuple[str, dict[str, list[str]], Any]] = field(default_factory=list)
    verified: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ding_url(self) -> str:
        return f"{self.url}/robot/send?access_token={DING_TOKEN}"

    def feishu_url(self) -> str:
        return f"{self.url}/open-apis/bot/v2/hook/{FEISHU_TOKEN}"

    def wecom_url(self) -> str:
        return f"{self.url}/cgi-bin/webhook/send?key={WECOM_KEY}"

    def answer(self, path: str, query: dict[str, list[str]], body: Any) -> Any:
        with self.lock:
            self.received.append((path, query, body))
        if path == "/robot/send":
            return self._dingtalk(query, body)
        if path.startswith("/open-apis/bot/v2/hook/"):
            return self._feishu(path.rsplit("/", 1)[1], body)
        if path == "/cgi-bin/webhook/send":
            return self._wecom(query, body)
        return {"errcode": 404, "errmsg": "no such robot"}

    def _dingtalk(self, query: dict[str, list[str]], body: Any) -> Any:
        token = query.get("access_token", [""])[0]
        if token != DING_TOKEN:
            return {"errcode": 300001, "errmsg": f"token is not exist: {token}" if self.echo_token else "token"}
        if self.forced is not None:
            return {"errcode": self.forced, "errmsg": "send too fast, exceed 20 times per minute"}
        if self.ding_secret is not None:
            timestamp, sign = query.get("timestamp", [""])[0], query.get("sign", [""])[0]
            if not timestamp.isdigit() or abs(int(timestamp) / 1000 - time.time()) > 3600:
                return {"errcode": 310000, "errmsg": "invalid timestamp"}
            expected = base64.b64encode(
                hmac.new(
                    self.ding_secret.encode(), f"{timestamp}\n{self.ding_secret}".encode(), hashlib.sha256
                ).digest()
            ).decode()
            # parse_qs already undid the URL encoding: compare with the raw base64
            if not hmac.compare_digest(sign, expected):
                return {"errcode": 310000, "errmsg": "sign not match"}
            self.verified.append("dingtalk")
        markdown = body.get("markdown") if isinstance(body, dict) else None
        if (
            not isinstance(markdown, dict)
            or set(body) != {"msgtype", "markdown"}
            or body["msgtype"] != "markdown"
            or set(markdown) != {"title", "text"}
            or not all(isinstance(markdown[key], str) and markdown[key] for key in ("title", "text"))
        ):
            return {"errcode": 40035, "errmsg": "missing parameter"}
        return {"errcode": 0, "errmsg": "ok"}

    def _feishu(self, token: str, body: Any) -> Any:
        def answer(code: int, msg: str) -> Any:
            if self.feishu_legacy:
                return {"StatusCode": code, "StatusMessage": msg}
            return {"code": code, "msg": msg, "data": {}}

        if token != FEISHU_TOKEN:
            return answer(19001, "param invalid: incoming webhook access token invalid")
        if self.forced is not None:
            return answer(self.forced, "too many request")
        allowed = {"msg_type", "content", "timestamp", "sign"}
        if not isinstance(body, dict) or not set(body) <= allowed:
            return answer(9499, "Bad Request")
        if self.feishu_secret is not None:
            timestamp, sign = body.get("timestamp"), body.get("sign")
            if not isinstance(timestamp, str) or not timestamp.isdigit() or abs(int(timestamp) - time.time()) > 3600:
                return answer(19021, "sign match fail or timestamp is not within one hour from current time")
            key = f"{timestamp}\n{self.feishu_secret}".encode()
            expected = base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()
            if not isinstance(sign, str) or not hmac.compare_digest(sign, expected):
                return answer(19021, "sign match fail or timestamp is not within one hour from current time")
            self.verified.append("feishu")
        content = body.get("content")
        if (
            body.get("msg_type") != "text"
            or not isinstance(content, dict)
            or set(content) != {"text"}
            or not isinstance(content["text"], str)
        ):
            return answer(9499, "Bad Request")
        return answer(0, "success")

    def _wecom(self, query: dict[str, list[str]], body: Any) -> Any:
        if query.get("key", [""])[0] != WECOM_KEY:
            return {"errcode": 93000, "errmsg": "invalid webhook url"}
        if self.forced is not None:
            return {"errcode": self.forced, "errmsg": "api freq out of limit"}
        markdown = body.get("markdown") if isinstance(body, dict) else None
        if (
            not isinstance(markdown, dict)
            or set(body) != {"msgtype", "markdown"}
            or body["msgtype"] != "markdown"
            or set(markdown) != {"content"}
            or not isinstance(markdown["content"], str)
        ):
            return {"errcode": 40008, "errmsg": "invalid message type"}
        if len(markdown["content"].encode()) > MAX_CONTENT_BYTES:
            return {"errcode": 40058, "errmsg": "markdown.content exceed max length 4096"}
        return {"errcode": 0, "errmsg": "ok"}

    def bodies(self, prefix: str) -> list[Any]:
        with self.lock:
            return [body for path, _, body in self.received if path.startswith(prefix)]

    def queries(self, prefix: str) -> list[dict[str, list[str]]]:
        with self.lock:
            return [query for path, query, _ in self.received if path.startswith(prefix)]


@pytest.fixture
def robots() -> Iterator[Robots]:
    state = Robots()

    class Handler(_Quiet):
        def do_POST(self) -> None:
            parts = urlsplit(self.path)
            answer = state.answer(parts.path, parse_qs(parts.query), self.body())
            if state.html:
                self.reply(200, b"<html>proxy</html>", "text/html")
            else:
                self.reply(200, answer)

    server = _Server(Handler)
    state.url = server.url
    try:
        yield state
    finally:
        server.close()


def alert(**overrides: Any) -> Alert:
    """A rollback with one failing gate (value, threshold, baseline, PromQL) and a runbook link."""
    gate = GateResult(
        gate="errorRate",
        verdict=Verdict.FAIL,
        reason="errorRate 0.05 > 0.01",
        value=0.05,
        threshold=0.01,
        comparator="<=",
        baseline=0.002,
        query=PROMQL,
    )
    arguments: dict[str, Any] = {
        "kind": AlertKind.ROLLED_BACK,
        "severity": Severity.CRITICAL,
        "policy": "shop",
        "reason": "2 failed checks in a row",
        "at": T0,
        "source_service": "istio-system/gw",
        "target_service": "istio-system/gw-asm",
        "weights_before": Weights(25, 75),
        "weights_after": Weights(0, 100),
        "check": CheckResult(verdict=Verdict.FAIL, gates=(gate,), reason=gate.reason),
        "dedup_suffix": "1",
        "runbook_base_url": RUNBOOK,
        "labels": {"env": "prod", "region": "cn-hangzhou"},
    }
    arguments.update(overrides)
    return build_alert(**arguments)


def secrets_absent(text: str, *secrets: str) -> bool:
    return not any(secret in text for secret in secrets)


# --- DingTalk --------------------------------------------------------------------------------------------


def test_dingtalk_signed_markdown_is_accepted_and_carries_what_on_call_needs(robots: Robots) -> None:
    sent = alert()
    DingTalkNotifier(robots.ding_url(), secret=DING_SECRET).send(sent, timeout=5)
    assert robots.verified == ["dingtalk"]  # the emulator recomputed the HMAC itself
    (body,) = robots.bodies("/robot/send")
    assert body["msgtype"] == "markdown"
    assert body["markdown"]["title"] == f"[CRITICAL] {sent.summary}"
    text = body["markdown"]["text"]
    for expected in (
        sent.summary,
        "2 failed checks in a row",
        "target=25 source=75 -> target=0 source=100",
        "gate errorRate: 0.05 breaks <= 0.01 (source 0.002)",
        f"PromQL: {PROMQL}",
        "labels: env=prod, region=cn-hangzhou",
        f"[runbook]({RUNBOOK}#rolled-back)",
        f"alert id {sent.id}",
    ):
        assert expected in text


def test_dingtalk_wrong_secret_is_a_failure_naming_the_code_not_the_secret(robots: Robots) -> None:
    wrong = "SEC" + "f" * 61
    notifier = DingTalkNotifier(robots.ding_url(), secret=wrong)
    with pytest.raises(NotificationError) as raised:
        notifier.send(alert(), timeout=5)
    message = str(raised.value)
    assert "310000" in message and message.startswith(notifier.name)
    # the host is in the name by design (receiver_name); the token, the secret and the path are not
    assert secrets_absent(message + notifier.name, wrong, DING_TOKEN, robots.url, "/robot/send")
    assert robots.verified == []


def test_dingtalk_rate_limit_errcode_is_a_failure(robots: Robots) -> None:
    robots.forced = 130101
    with pytest.raises(NotificationError, match="code 130101"):
        DingTalkNotifier(robots.ding_url(), secret=DING_SECRET).send(alert(), timeout=5)


def test_dingtalk_timestamp_comes_from_the_injected_clock_in_milliseconds(robots: Robots) -> None:
    now = time.time()
    DingTalkNotifier(robots.ding_url(), secret=DING_SECRET, clock=lambda: now).send(alert(), timeout=5)
    assert robots.queries("/robot/send")[0]["timestamp"] == [str(round(now * 1000))]
    # two hours off: DingTalk refuses the signature's timestamp, and so is it a failure here
    stale = DingTalkNotifier(robots.ding_url(), secret=DING_SECRET, clock=lambda: now - 7200)
    with pytest.raises(NotificationError, match="310000"):
        stale.send(alert(), timeout=5)


def test_dingtalk_unsigned_to_a_signing_robot_is_refused_and_unsigned_robot_accepts(robots: Robots) -> None:
    with pytest.raises(NotificationError, match="310000"):
        DingTalkNotifier(robots.ding_url()).send(alert(), timeout=5)
    robots.ding_secret = None
    DingTalkNotifier(robots.ding_url()).send(alert(), timeout=5)
    assert "sign" not in robots.queries("/robot/send")[-1]


def test_a_robot_that_echoes_the_token_does_not_leak_it_into_the_error(robots: Robots) -> None:
    robots.echo_token = True
    other = "a" * 40 + "SECRETTOKEN"
    with pytest.raises(NotificationError, match="300001") as raised:
        DingTalkNotifier(f"{robots.url}/robot/send?access_token={other}").send(alert(), timeout=5)
    assert "SECRETTOKEN" not in str(raised.value) and "***" in str(raised.value)


def test_unreachable_robot_fails_without_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}/robot/send?access_token={DING_TOKEN}"
    with pytest.raises(NotificationError) as raised:
        DingTalkNotifier(url, secret=DING_SECRET).send(alert(), timeout=2)
    assert secrets_absent(str(raised.value), DING_TOKEN, DING_SECRET)


def test_an_answer_without_a_code_is_not_a_delivery(robots: Robots) -> None:
    robots.html = True
    with pytest.raises(NotificationError, match="without a code"):
        WeComNotifier(robots.wecom_url()).send(alert(), timeout=5)


# --- Feishu ----------------------------------------------------------------------------------------------


def test_feishu_signed_text_is_accepted_with_the_timestamp_in_seconds(robots: Robots) -> None:
    now = time.time()
    sent = alert()
    FeishuNotifier(robots.feishu_url(), secret=FEISHU_SECRET, clock=lambda: now).send(sent, timeout=5)
    assert robots.verified == ["feishu"]
    (body,) = robots.bodies("/open-apis/")
    assert set(body) == {"msg_type", "content", "timestamp", "sign"}
    assert body["timestamp"] == str(int(now))
    text = body["content"]["text"]
    assert text.startswith(f"[CRITICAL] {sent.summary}\n")
    assert f"runbook: {RUNBOOK}#rolled-back" in text and text.endswith(f"alert id {sent.id}")
    assert "0.05 breaks <= 0.01 (source 0.002)" in text


def test_feishu_wrong_secret_is_a_failure_without_the_secret(robots: Robots) -> None:
    notifier = FeishuNotifier(robots.feishu_url(), secret="not-the-secret")
    with pytest.raises(NotificationError, match="19021") as raised:
        notifier.send(alert(), timeout=5)
    assert secrets_absent(str(raised.value) + notifier.name, "not-the-secret", FEISHU_TOKEN, robots.url)


def test_feishu_older_deployments_answer_statuscode(robots: Robots) -> None:
    robots.feishu_legacy = True
    FeishuNotifier(robots.feishu_url(), secret=FEISHU_SECRET).send(alert(), timeout=5)
    robots.forced = 11232
    with pytest.raises(NotificationError, match="code 11232"):
        FeishuNotifier(robots.feishu_url(), secret=FEISHU_SECRET).send(alert(), timeout=5)


# --- WeCom -----------------------------------------------------------------------------------------------


def test_a_template_with_a_blank_first_line_still_has_a_title(robots: Robots) -> None:
    sent = alert(template="   \n{{ labels.env }} {{ reason }}")
    DingTalkNotifier(robots.ding_url(), secret=DING_SECRET).send(sent, timeout=5)
    assert robots.bodies("/robot/send")[0]["markdown"]["title"] == sent.summary


def test_wecom_markdown_is_accepted(robots: Robots) -> None:
    sent = alert()
    WeComNotifier(robots.wecom_url()).send(sent, timeout=5)
    (body,) = robots.bodies("/cgi-bin/")
    content = body["markdown"]["content"]
    assert content.startswith(f"**[CRITICAL] {sent.summary}**\n")
    assert f"[runbook]({RUNBOOK}#rolled-back)" in content and content.endswith(f"alert id {sent.id}")


def test_wecom_long_text_is_cut_to_4096_bytes_between_characters_keeping_link_and_id(robots: Robots) -> None:
    # three-byte characters, so a cut at a byte count can fall inside one
    sent = alert(template="{{ summary }}\n" + "回滚原因" * 2000 + "\nEND-OF-TEXT")
    assert len(sent.text().encode()) > MAX_CONTENT_BYTES  # the emulator would refuse it uncut (40058)
    WeComNotifier(robots.wecom_url()).send(sent, timeout=5)
    content = robots.bodies("/cgi-bin/")[0]["markdown"]["content"]
    assert len(content.encode()) <= MAX_CONTENT_BYTES
    assert "END-OF-TEXT" not in content and "…[truncated]" in content
    assert content.endswith(f"[runbook]({RUNBOOK}#rolled-back)\nalert id {sent.id}")


def test_wecom_wrong_key_and_rate_limit_are_failures_without_the_key(robots: Robots) -> None:
    wrong = f"{robots.url}/cgi-bin/webhook/send?key=00000000-wrong-key-0000-000000000000"
    notifier = WeComNotifier(wrong)
    with pytest.raises(NotificationError, match="93000") as raised:
        notifier.send(alert(), timeout=5)
    assert secrets_absent(str(raised.value) + notifier.name, "wrong-key", robots.url)
    robots.forced = 45009
    with pytest.raises(NotificationError, match="45009"):
        WeComNotifier(robots.wecom_url()).send(alert(), timeout=5)


# --- the policy's receiver models and the factory --------------------------------------------------------


def test_receiver_models_take_camel_case_and_exactly_one_url() -> None:
    ding = DingTalkReceiver.model_validate(
        {"type": "dingtalk", "urlFromEnv": "GATEWAY_CANARY_POLICY_DING", "secretFromEnv": "GATEWAY_CANARY_POLICY_S"}
    )
    assert ding.secret_from_env == "GATEWAY_CANARY_POLICY_S" and ding.url is None
    inline = FeishuReceiver.model_validate({"type": "feishu", "url": f"https://open.feishu.cn/hook/{FEISHU_TOKEN}"})
    assert FEISHU_TOKEN not in repr(inline)  # a SecretStr
    with pytest.raises(ValidationError, match="exactly one of url or urlFromEnv"):
        WeComReceiver.model_validate({"type": "wecom"})
    with pytest.raises(ValidationError, match="exactly one of url or urlFromEnv"):
        WeComReceiver.model_validate({"type": "wecom", "url": "https://x.example", "urlFromEnv": "A"})
    with pytest.raises(ValidationError) as bad_url:
        DingTalkReceiver.model_validate({"type": "dingtalk", "url": f"ftp://oapi.dingtalk.com/?t={DING_TOKEN}"})
    assert DING_TOKEN not in str(bad_url.value)
    with pytest.raises(ValidationError, match=r"secretFromEnv|secret_from_env|extra"):
        WeComReceiver.model_validate({"type": "wecom", "urlFromEnv": "A", "secretFromEnv": "B"})
    with pytest.raises(ValidationError, match="pattern"):
        FeishuReceiver.model_validate({"type": "feishu", "urlFromEnv": "A", "secretFromEnv": "NOT-A-NAME"})


def test_factory_builds_signed_robots_and_a_missing_secret_is_a_problem(
    robots: Robots, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_CANARY_POLICY_DING_URL", robots.ding_url())
    monkeypatch.setenv("GATEWAY_CANARY_POLICY_DING_SECRET", DING_SECRET)
    settings = Settings()
    receiver = DingTalkReceiver.model_validate(
        {
            "type": "dingtalk",
            "name": "oncall",
            "urlFromEnv": "GATEWAY_CANARY_POLICY_DING_URL",
            "secretFromEnv": "GATEWAY_CANARY_POLICY_DING_SECRET",
        }
    )
    notifier = chat_receiver(receiver, 0, settings)
    assert notifier.name == "dingtalk:oncall"
    notifier.send(alert(), timeout=5)
    assert robots.verified == ["dingtalk"]
    missing = receiver.model_copy(update={"secret_from_env": "GATEWAY_CANARY_POLICY_UNSET"})
    with pytest.raises(ValueError, match=r"alerts\[3\]\.secretFromEnv: environment variable .* is not set"):
        chat_receiver(missing, 3, settings)
    wecom = WeComReceiver.model_validate({"type": "wecom", "urlFromEnv": "GATEWAY_CANARY_POLICY_UNSET"})
    with pytest.raises(ValueError, match=r"alerts\[1\]\.urlFromEnv"):
        chat_receiver(wecom, 1, settings)


# --- runbook links on every receiver ---------------------------------------------------------------------


def test_every_alert_kind_has_a_runbook_anchor_and_a_summary() -> None:
    assert set(RUNBOOK_ANCHORS) == set(AlertKind)
    assert len(set(RUNBOOK_ANCHORS.values())) == len(AlertKind)
    for kind in AlertKind:
        built = alert(kind=kind, check=None)
        assert built.runbook_url == f"{RUNBOOK}#{RUNBOOK_ANCHORS[kind]}"
        assert built.summary.startswith("shop: ")
    assert alert(runbook_base_url="").runbook_url == ""


def test_default_text_ends_with_the_runbook_line_only_when_there_is_a_url() -> None:
    assert alert().text().endswith(f"\nrunbook: {RUNBOOK}#rolled-back")
    assert "runbook" not in alert(runbook_base_url="").text()


def test_slack_webhook_and_alertmanager_carry_the_runbook_url() -> None:
    sink = WebhookSink()
    try:
        sent = alert(template="{{ labels.env }}: {{ summary }}")
        SlackNotifier(f"{sink.url}/slack").send(sent, timeout=5)
        WebhookNotifier(f"{sink.url}/hook").send(sent, timeout=5)
        AlertmanagerNotifier(sink.url).send(sent, timeout=5)
        slack = sink.bodies("/slack")[0]["text"]
        assert f"<{RUNBOOK}#rolled-back|runbook>" in slack and f"prod: {sent.summary}" in slack
        hook = sink.bodies("/hook")[0]
        assert hook["runbookUrl"] == f"{RUNBOOK}#rolled-back" and hook["text"] == f"prod: {sent.summary}"
        (posted,) = sink.bodies("/api/v2/alerts")[0]
        assert posted["annotations"]["runbook_url"] == f"{RUNBOOK}#rolled-back"
        assert posted["annotations"]["description"] == f"prod: {sent.summary}"
        assert posted["labels"]["env"] == "prod" and posted["labels"]["severity"] == "critical"
    finally:
        sink.close()


def test_policy_labels_never_replace_the_controllers_own_alertmanager_labels() -> None:
    sink = WebhookSink()
    try:
        AlertmanagerNotifier(sink.url).send(alert(labels={"severity": "info", "bad-name": "x"}), timeout=5)
        (posted,) = sink.bodies("/api/v2/alerts")[0]
        assert posted["labels"]["severity"] == "critical" and "bad-name" not in posted["labels"]
    finally:
        sink.close()


# --- templates -------------------------------------------------------------------------------------------


def test_a_template_renders_labels_and_the_failing_gate() -> None:
    template = (
        "[{{ labels.env }}/{{ labels.region }}] {{ policy }} {{kind}} {{ severity }}\n"
        "{{ gate }}={{ value }} threshold {{ threshold }} baseline {{ baseline }}\n"
        "{{ promql }}\n{{ weights_before }} -> {{ weights_after }} ({{ target_weight }}/{{ source_weight }})\n"
        "{{ runbook_url }} {{ alert_id }} {{ at }} {{ source_service }} {{ target_service }}"
    )
    sent = alert(template=template)
    assert sent.rendered == (
        "[prod/cn-hangzhou] shop RolledBack critical\n"
        "errorRate=0.05 threshold 0.01 baseline 0.002\n"
        f"{PROMQL}\ntarget=25 source=75 -> target=0 source=100 (0/100)\n"
        f"{RUNBOOK}#rolled-back {sent.id} 2026-11-24T12:00:00+00:00 istio-system/gw istio-system/gw-asm"
    )
    assert sent.text() == sent.rendered
    assert template_problems(template, ["env", "region"]) == []


def test_missing_values_render_as_na_and_values_are_never_expanded_again() -> None:
    sent = alert(
        check=None,
        weights_after=None,
        runbook_base_url="",
        reason="quoted {{ labels.env }}",
        template="{{ gate }} {{ value }} {{ target_weight }} {{ runbook_url }} | {{ reason }}",
    )
    assert sent.rendered == "n/a n/a n/a n/a | quoted {{ labels.env }}"


def test_template_problems_name_the_unknown_placeholder_and_what_is_allowed() -> None:
    (typo,) = template_problems("{{ valeu }} and {{ value }}", ["env"])
    assert "{{ valeu }}" in typo and "{{ value }}" in typo and "{{ labels.env }}" in typo
    (undeclared,) = template_problems("{{ labels.zone }}", ["env", "region"])
    assert "zone" in undeclared and "env, region" in undeclared
    assert template_problems("{{ value", []) != []
    assert template_problems("{{ promql }} {{ labels.env }}", ["env"]) == []
    assert set(TEMPLATE_FIELDS) >= {"policy", "gate", "value", "threshold", "baseline", "promql", "runbook_url"}


def test_render_template_leaves_no_placeholder_even_for_an_unchecked_template() -> None:
    assert render_template("{{ nope }}|{{ policy }}", alert()) == "n/a|shop"


# --- the outbox ------------------------------------------------------------------------------------------


def test_outbox_keeps_runbook_labels_and_rendered_text_and_reads_old_entries() -> None:
    sent = alert(template="{{ labels.env }} {{ summary }}")
    entries = (OutboxEntry(alert=sent, receivers=("dingtalk:oncall",), queued_at=T0),)
    (back,) = decode_outbox(encode_outbox(entries))
    assert back.alert == sent
    assert back.alert.runbook_url.endswith("#rolled-back") and back.alert.labels == {
        "env": "prod",
        "region": "cn-hangzhou",
    }
    assert back.alert.rendered == f"prod {sent.summary}"
    # an entry written before alerts had these fields
    old = sent.as_dict()
    for key in ("runbookUrl", "labels", "rendered"):
        del old[key]
    legacy = alert_from_dict(json.loads(json.dumps(old)))
    assert (legacy.runbook_url, legacy.labels, legacy.rendered) == ("", {}, None)
    assert legacy.id == sent.id and legacy.text().startswith(f"[CRITICAL] {sent.summary}")


def test_an_outbox_entry_with_malformed_labels_is_unreadable_not_a_crash() -> None:
    broken = {**alert().as_dict(), "labels": ["env", "prod"]}
    with pytest.raises(ValueError, match="not an alert"):
        alert_from_dict(broken)
