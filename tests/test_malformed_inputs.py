"""What the kernel reads can be wrong: malformed Prometheus answers, garbage state, crashing ticks.

Each case asserts a clear outcome (a reason naming what was wrong) and a live service (the next
tick runs), never an exception out of a tick.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from controller.adapters.memory import InMemoryGatewayPair, InMemoryStateStore
from controller.adapters.prometheus import PrometheusMetricsSource
from controller.core.decision import Action, Observation, initial_state
from controller.core.enums import AlertKind, GatewayRole, InconclusiveCause, Measure, Phase, Verdict
from controller.core.results import RenderedQuery
from controller.core.state import (
    MAX_REASON_CHARS,
    MAX_STATE_BYTES,
    Intent,
    StateUnreadable,
    decode_state,
    encode_state,
)
from controller.errors import MetricsUnavailable
from controller.notify.dispatcher import AlertDispatcher, DeliveryPolicy
from controller.runtime.clock import SystemClock
from controller.runtime.collector import Collector
from controller.runtime.reconciler import PolicyRunner
from controller.runtime.service import ControllerService
from controller.settings import PrometheusConnection, Settings
from tests.helpers import T0, RecordingNotifier, make_policy, runner_for
from tests.servers import MalformedPrometheus, wait_for

POLICY = make_policy(schedule={"steps": [10, 100], "bakeTime": 0}, analysis={"failureThreshold": 1})
QUERY = RenderedQuery("sum(up)", Measure.REQUESTS, GatewayRole.TARGET)


@pytest.fixture(scope="module")
def bad_prometheus() -> Iterator[MalformedPrometheus]:
    server = MalformedPrometheus()
    yield server
    server.close()


def _vector(*values: object) -> dict:
    return {
        "status": "success",
        "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, v]} for v in values]},
    }


@pytest.mark.parametrize(
    ("status", "body", "needle"),
    [
        (200, {"status": "success"}, "malformed answer: KeyError"),
        (200, {"status": "success", "data": {"resultType": "vector"}}, "malformed answer: KeyError"),
        (200, b"<html>gateway</html>", "malformed answer"),
        (200, {"status": "success", "data": {"resultType": "string", "result": [1, "hello"]}}, "not a number"),
        (200, _vector("+Inf"), "no finite value"),
        (200, _vector("-Inf"), "no finite value"),
        (200, _vector("1", "2", "3"), "returned 3 series"),
        (200, _vector("abc"), "not a number"),
        (
            200,
            {"status": "success", "data": {"resultType": "matrix", "result": [{"metric": {}, "values": []}]}},
            "range",
        ),
        (200, {"status": "success", "data": {"resultType": "vector", "result": [{"value": "x"}]}}, "malformed sample"),
        (200, {"status": "success", "data": {"result": {"a": 1}}}, "unexpected query result"),
        (500, b"x" * 100_000, "answered an error"),
    ],
)
def test_a_malformed_answer_is_metrics_unavailable_with_its_reason(
    bad_prometheus: MalformedPrometheus, status: int, body: object, needle: str
) -> None:
    bad_prometheus.status, bad_prometheus.body = status, body
    source = PrometheusMetricsSource(PrometheusConnection(Settings(prometheus_url=bad_prometheus.url), None))
    with pytest.raises(MetricsUnavailable, match=needle) as caught:
        source.query(QUERY)
    assert len(str(caught.value)) < 500  # an error body never floods a reason, an Event or an alert
    # and through the collector: an INCONCLUSIVE check against that limit, never an exception
    check = Collector().check(POLICY, source)
    assert check.verdict is Verdict.INCONCLUSIVE and check.cause is InconclusiveCause.METRICS_UNAVAILABLE


def test_nan_stays_a_judged_not_a_number(bad_prometheus: MalformedPrometheus) -> None:
    bad_prometheus.status, bad_prometheus.body = 200, _vector("NaN")
    source = PrometheusMetricsSource(PrometheusConnection(Settings(prometheus_url=bad_prometheus.url), None))
    value = source.query(QUERY)
    assert value is not None and math.isnan(value)  # NaN: 0/0 is a legitimate PromQL answer


# --- the stored state ---------------------------------------------------------------------------------

GOOD = json.loads(encode_state(initial_state(POLICY, Observation(0, 100), T0)))


def _with(**changes: object) -> str:
    return json.dumps({**GOOD, **changes})


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"v": 2, "target_weight": Infinity}', "Infinity"),
        ('{"v": 2, "baked_seconds": NaN}', "NaN"),
        (_with(changed_at="2026-11-24T12:00:00"), "changed_at"),  # no offset
        (_with(surprise=1), "surprise"),
        (_with(reason="x" * (MAX_REASON_CHARS + 1)), "reason"),
        ("x" * (MAX_STATE_BYTES + 1), "larger than"),
        (_with(target_weight=101), "target_weight"),
        (_with(target_weight=True), "target_weight"),
        (_with(target_weight="10"), "target_weight"),
        (_with(phase="Exploded"), "phase"),
        (_with(v=3), "newer than this controller"),
        (_with(v="two"), "unknown version"),
        (_with(pending={"target": 10}), "pending"),
        ("[" * 10_000, "not JSON"),  # nested past the parser's recursion limit
    ],
)
def test_garbage_state_is_unreadable_with_a_reason(text: str, needle: str) -> None:
    with pytest.raises(StateUnreadable, match=needle):
        decode_state(text)


def test_a_good_state_round_trips_and_the_reason_is_bounded() -> None:
    state = decode_state(json.dumps(GOOD)).evolve(
        reason="y" * 10_000, pending=Intent(10, 90, 0, None), refusal="z" * 5000
    )
    assert len(state.reason) <= MAX_REASON_CHARS and state.refusal is not None
    assert len(state.refusal) <= MAX_REASON_CHARS
    again = decode_state(encode_state(state))
    assert again == state.evolve(last_pass_at=None)


def test_version_1_state_from_the_annotation_is_migrated() -> None:
    v1 = {
        "v": 1,
        "policy": "shop",
        "fingerprint": "abc",
        "phase": "Progressing",
        "reason": "target weight 10 -> 50 after a passing bake",
        "target_weight": 50,
        "source_weight": 50,
        "changed_at": "2026-11-24T12:00:00+00:00",
        "step_started_at": "2026-11-24T12:00:00+00:00",
        "first_pass_at": "2026-11-24T12:00:30+00:00",
        "consecutive_failures": 1,
        "consecutive_inconclusive": 3,
        "inconclusive_cause": "NoData",
        "stuck_reported": False,
        "last_verdict": "FAIL",
        "last_failed_gate": "errorRate",
        "source_weight_before": 90,
    }
    state = decode_state(json.dumps(v1))
    assert (state.phase, state.target_weight, state.source_weight) == (Phase.PROGRESSING, 50, 50)
    assert state.consecutive_failures == 1 and state.inconclusive_count(InconclusiveCause.NO_DATA) == 3
    assert state.pending == Intent(target=50, source=50, from_target=50, from_source=90)  # an unfinished write
    assert state.covered_seconds == 0  # the bake was not recorded: it starts again, never shorter
    assert json.loads(encode_state(state))["v"] == 2


# --- the runner keeps running ---------------------------------------------------------------------------


class Exploding:
    """A metrics source with a bug in it (not a MetricsUnavailable): the kind of error nothing expects."""

    def __init__(self) -> None:
        self.armed = True

    def query(self, query: RenderedQuery) -> float | None:
        if self.armed:
            raise RuntimeError("bug in a metrics adapter")
        return 1000.0 if query.measure is Measure.REQUESTS else 0.0


def _runner(store, metrics, receiver, pair=None) -> PolicyRunner:
    pair = pair or InMemoryGatewayPair(target_weight=0, source_weight=100)
    dispatcher = AlertDispatcher(DeliveryPolicy(backoff_seconds=0.01))
    return runner_for(POLICY, pair=pair, store=store, metrics=metrics, receivers=[receiver], dispatcher=dispatcher)


def test_no_exception_escapes_a_tick_it_is_reported_once_and_the_next_tick_runs() -> None:
    metrics, receiver = Exploding(), RecordingNotifier()
    runner = _runner(InMemoryStateStore(), metrics, receiver)
    outcomes = [runner.tick() for _ in range(3)]
    assert all(o.decision is None and o.error and "bug in a metrics adapter" in o.error for o in outcomes)
    assert runner.failing_since is not None
    wait_for(lambda: receiver.alerts, timeout=5, what="the tick-failed alert")
    assert [a.kind for a in receiver.alerts] == [AlertKind.TICK_FAILED]  # once, not per tick
    metrics.armed = False
    assert runner.tick().decision is not None and runner.failing_since is None


@pytest.mark.parametrize("garbage", ['{"v": 2, "target_weight": Infinity}', "not json", _with(v=99)])
def test_a_garbage_state_holds_and_alerts_once_and_never_restarts_a_rollout(garbage: str) -> None:
    store, receiver = InMemoryStateStore(), RecordingNotifier()
    store.texts["shop"], store.versions["shop"] = garbage, 1
    runner = _runner(store, Exploding(), receiver)
    runner._metrics.armed = False  # a healthy source: a fresh state would Start here
    outcomes = [runner.tick() for _ in range(3)]
    assert all(o.error is None and o.decision is not None for o in outcomes)
    assert all(o.decision.action is not Action.START for o in outcomes)
    state = store.state_of("shop")
    assert state is not None and state.phase is Phase.PAUSED and "stored state cannot be used" in state.reason
    wait_for(lambda: receiver.alerts, timeout=5, what="the refusal alert")
    assert [a.kind for a in receiver.alerts] == [AlertKind.POLICY_REFUSED]


def test_healthz_turns_unhealthy_when_ticks_keep_failing(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "metadata: {name: shop}\nspec:\n  source: {service: a/b}\n  target: {service: a/c}\n"
        "  schedule: {steps: [10, 100]}\n  analysis: {interval: 1s}\n  gates: {errorRate: {max: 0.01}}\n"
    )
    metrics = Exploding()
    settings = Settings(policies_dir=tmp_path, http_host="127.0.0.1", http_port=0, unhealthy_after_seconds=1.5)
    service = ControllerService(
        settings,
        pair=InMemoryGatewayPair(),
        store=InMemoryStateStore(),
        metrics_for=lambda policy: metrics,
        clock=SystemClock(),
    )
    service.start()
    try:
        assert service.http is not None
        url = f"http://127.0.0.1:{service.http.port}/healthz"
        assert requests.get(url, timeout=2).status_code == 200
        wait_for(lambda: requests.get(url, timeout=2).status_code == 503, timeout=15, what="/healthz to fail")
        metrics.armed = False
        wait_for(lambda: requests.get(url, timeout=2).status_code == 200, timeout=15, what="/healthz to recover")
        crashes = service.telemetry.errors.labels("shop", "crash")._value.get()
        assert crashes >= 2
    finally:
        service.stop()
