"""The service in-process: reloads, bad files, removals, refusals. Real Prometheus, real kube-apiserver."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.adapters.kube_api import build_api_client
from controller.adapters.kube_state import KubernetesStateStore
from controller.adapters.kubernetes import KubernetesGatewayPair
from controller.adapters.prometheus import PrometheusMetricsSource
from controller.core.enums import Verdict
from controller.core.results import RenderedQuery
from controller.runtime.clock import SystemClock
from controller.runtime.service import ControllerService, _staggered, after_scrape
from controller.settings import PrometheusConnection, Settings
from tests.helpers import make_policy, memory_service
from tests.kube_cluster import CLB, Cluster
from tests.servers import LB_ID, STATE, WEIGHT, TrafficExporter, WebhookSink, wait_for

PAIRS = (("istio-ingressgateway", "istio-ingressgateway-asm"), ("old-gw", "new-gw"))
GOOD = """\
metadata: {{name: {name}}}
spec:
  source: {{service: {ns}/{source}, workload: {sw}}}
  target: {{service: {ns}/{target}, workload: {tw}}}
  schedule: {{steps: [10, 50, 100], bakeTime: {bake}}}
  analysis: {{interval: 1s, window: 10s, minRequests: 10}}
  gates: {{errorRate: {{max: 0.05}}}}
"""


@pytest.fixture
def service(
    kube: Cluster, traffic: TrafficExporter, gateways: tuple[str, str], prometheus: str, tmp_path: Path
) -> Iterator[dict]:
    kube.add_gateways()
    kube.add_service("new-gw", {LB_ID: "lb-2", WEIGHT: "0"})  # no vgroup-port: must be refused
    kube.add_service("old-gw", {**CLB, WEIGHT: "100"})

    traffic.share = kube.target_share
    traffic.move_to(kube.ns)
    sink = WebhookSink()
    kube.grant(
        *(
            make_policy(name, source={"service": f"{kube.ns}/{s}"}, target={"service": f"{kube.ns}/{t}"})
            for name, (s, t) in zip(("good", "refused"), PAIRS, strict=True)
        )
    )
    policies = tmp_path / "policies"
    policies.mkdir()
    settings = Settings(
        policies_dir=policies,
        reload_interval_seconds=0.2,
        http_host="127.0.0.1",
        http_port=0,
        webhook_url=f"{sink.url}/global",
        prometheus_url=prometheus,
    )
    api = build_api_client(kube.write_kubeconfig())
    pair = KubernetesGatewayPair(api, state_namespace=kube.ns)
    store = KubernetesStateStore(api, kube.ns)
    metrics = PrometheusMetricsSource(PrometheusConnection(settings, None))
    made: list[ControllerService] = []

    def start() -> ControllerService:
        svc = ControllerService(
            settings, pair=pair, store=store, metrics_for=lambda policy: metrics, clock=SystemClock()
        )
        made.append(svc)
        svc.start()
        return svc

    yield {
        "kube": kube,
        "policies": policies,
        "sink": sink,
        "start": start,
        "workloads": {"sw": gateways[0], "tw": gateways[1]},
    }
    for svc in made:
        svc.stop()
    sink.close()


def kinds(sink: WebhookSink) -> list[str]:
    return [body["kind"] for body in sink.bodies("/global")]


def _count(svc: ControllerService, histogram: str) -> float:
    return svc.telemetry.registry.get_sample_value(f"{histogram}_count") or 0.0


def test_policies_loaded_together_start_apart_each_within_its_interval() -> None:
    assert _staggered({"one": 5.0}) == {"one": 0.0}
    many = _staggered({f"p{i:03}": 5.0 for i in range(500)})
    assert sorted(many.values()) == pytest.approx([i * 0.01 for i in range(500)])  # over the whole interval
    few = _staggered({"a": 60.0, "b": 1.0, "c": 0.03})
    assert few == pytest.approx({"a": 0.0, "b": 0.02, "c": 0.02})  # 20 ms apart, c within its interval
    for intervals in ({f"q{i}": 0.5 + i for i in range(50)}, {"x": 1.0, "y": 1.0}):
        for name, after in _staggered(intervals).items():
            assert 0 <= after < intervals[name]


def test_bad_file_beside_good_one_refused_policy_beside_running_one(service: dict) -> None:
    kube, policies, sink = service["kube"], service["policies"], service["sink"]
    (policies / "a-good.yaml").write_text(
        GOOD.format(
            ns=kube.ns,
            name="good",
            source="istio-ingressgateway",
            target="istio-ingressgateway-asm",
            bake="30s",
            **service["workloads"],
        )
    )
    (policies / "b-refused.yaml").write_text(
        GOOD.format(ns=kube.ns, name="refused", source="old-gw", target="new-gw", bake="1s", sw="old", tw="new")
    )
    (policies / "d-no-secret.yaml").write_text(
        GOOD.format(ns=kube.ns, name="no-secret", source="third-gw", target="fourth-gw", bake="1s", sw="o", tw="p")
        + "  alerts:\n    - {type: slack, urlFromEnv: GATEWAY_CANARY_POLICY_TEST_UNSET}\n"
    )
    (policies / "c-broken.yaml").write_text("metadata: {name: broken}\nspec:\n  schedule: {steps: [50, 10]}\n")
    svc = service["start"]()
    wait_for(
        lambda: kube.annotations("istio-ingressgateway-asm")[WEIGHT] == "10",
        timeout=30,
        what="the good policy to start",
    )
    # every tick's lateness and duration are measured (docs/benchmarks.md reads them)
    ticks = sum(svc.telemetry.checks.labels("good", v.value)._value.get() for v in Verdict)
    assert ticks >= 1
    assert _count(svc, "gateway_canary_check_lateness_seconds") >= ticks
    assert _count(svc, "gateway_canary_tick_seconds") >= ticks
    wait_for(
        lambda: "PolicyInvalid" in kinds(sink),
        timeout=20,
        what="alerts for the broken file and the refused policy",
    )
    invalid = [b for b in sink.bodies("/global") if b["kind"] == "PolicyInvalid"]
    assert any("c-broken.yaml:3: spec.schedule.steps" in b["reason"] for b in invalid)
    refused = wait_for(
        lambda: next(
            (b for b in sink.bodies("/global") if b["kind"] == "PolicyRefused" and b["policy"] == "refused"), None
        ),
        timeout=20,
        what="the refusal of the policy whose Service lacks vgroup-port",
    )
    assert f"{kube.ns}/new-gw lacks" in refused["reason"] and "vgroup-port" in refused["reason"]
    assert kube.annotations("new-gw")[WEIGHT] == "0" and STATE not in kube.annotations("new-gw")
    assert kube.state("refused") is None or kube.state("refused")["target_weight"] == 0
    assert kube.annotations("old-gw")[WEIGHT] == "100"
    assert any(e["reason"] == "PolicyRefused" and e["involvedObject"]["name"] == "new-gw" for e in kube.events)
    unset = wait_for(
        lambda: [b for b in sink.bodies("/global") if b["kind"] == "PolicyRefused" and b["policy"] == "no-secret"],
        timeout=20,
        what="the refusal of the policy whose secret is missing, on the global receiver",
    )
    assert "urlFromEnv: environment variable GATEWAY_CANARY_POLICY_TEST_UNSET is not set" in unset[0]["reason"]


def test_running_policy_survives_a_broken_edit_restarts_bake_on_change_and_alerts_removal(service: dict) -> None:
    kube, policies, sink = service["kube"], service["policies"], service["sink"]
    path = policies / "good.yaml"
    text = GOOD.format(
        ns=kube.ns,
        name="good",
        source="istio-ingressgateway",
        target="istio-ingressgateway-asm",
        bake="1h",
        **service["workloads"],
    )
    path.write_text(text)
    svc = service["start"]()
    wait_for(
        lambda: kube.annotations("istio-ingressgateway-asm")[WEIGHT] == "10", timeout=30, what="the policy to start"
    )
    runner = svc.runners["good"]

    # a healthy bake writes nothing: once checks pass, more passing checks add no API writes at all
    # (neither the Services nor the state object: the bake's covered time is written with the step)
    wait_for(
        lambda: (s := kube.state("good")) and s["last_verdict"] == "PASS" and s["run_started_at"],
        timeout=30,
        what="a passing check at weight 10",
    )
    passes = svc.telemetry.checks.labels("good", "PASS")
    wait_for(lambda: passes._value.get() >= 2, timeout=30, what="two passing checks")
    writes = len(kube.controller_writes())
    seen = passes._value.get()
    wait_for(lambda: passes._value.get() >= seen + 3, timeout=30, what="three more passing checks")
    assert len(kube.controller_writes()) == writes

    path.write_text(text.replace("gates:", "gatez:"))  # an on-call typo
    wait_for(lambda: "PolicyInvalid" in kinds(sink), timeout=20, what="the invalid-file alert")
    assert svc.runners["good"] is runner  # last good version keeps running...
    assert runner.file_problem is not None and "gatez" in runner.file_problem  # ...refusing raises (R3)
    passes = svc.telemetry.checks.labels("good", "PASS")
    seen = passes._value.get()
    wait_for(lambda: passes._value.get() >= seen + 3, timeout=30, what="checks go on with the file invalid")
    invalid = [b for b in sink.bodies("/global") if b["kind"] == "PolicyInvalid"]
    assert len(invalid) == 2  # exactly one alert per error (spec.gates missing; spec.gatez unknown)...
    assert all(b["reason"].startswith(f"{path}:") for b in invalid)  # ...each naming file and line
    assert not [b for b in sink.bodies("/global") if b["kind"] == "PolicyRefused"]  # and nothing twice
    events = [e for e in kube.events if e["reason"] == "PolicyInvalid"]
    assert len(events) == 2 and all(f"{path}:" in e["message"] for e in events)

    state_before = kube.state("good")
    path.write_text(text.replace("bakeTime: 1h", "bakeTime: 2h"))
    wait_for(lambda: svc.runners["good"] is not runner, timeout=20, what="the changed policy to be installed")
    state_after = wait_for(
        lambda: (s := kube.state("good"))["fingerprint"] != state_before["fingerprint"] and s,
        timeout=20,
        what="the bake to restart under the new policy",
    )
    assert state_after["step_started_at"] > state_before["step_started_at"]
    assert kube.annotations("istio-ingressgateway-asm")[WEIGHT] == "10"  # kept its weight

    path.unlink()
    wait_for(lambda: "PolicyRemoved" in kinds(sink), timeout=20, what="the removal alert")
    assert "good" not in svc.runners
    assert kube.annotations("istio-ingressgateway-asm")[WEIGHT] == "10"  # left where it was


class _Runner:
    """What the look for commands reads of a runner: its policy's name and when it read its object."""

    def __init__(self, name: str, read_at: float | None) -> None:
        self.policy = make_policy(name)
        self.read_at = read_at


def test_the_look_for_commands_reads_each_object_at_most_so_often(tmp_path: Path) -> None:
    """A few policies: every object at every look (as before). Hundreds: the objects nobody read for
    policies / 50 seconds, oldest first, 50 reads a second at most (a tick's read counts)."""
    settings = Settings(policies_dir=tmp_path, command_poll_seconds=2)
    svc = memory_service(settings)
    few = {f"p{i}": _Runner(f"p{i}", read_at=99.9) for i in range(5)}
    assert sorted(svc._unread_for_commands(few, now=100.0)) == sorted(few)  # read 0.1 s ago: read again
    many = {f"p{i:03}": _Runner(f"p{i:03}", read_at=100.0 - (i % 20)) for i in range(500)}  # 0-19 s ago
    asked = svc._unread_for_commands(many, now=100.0)
    # period 500 / 50 = 10 s: read again when 8 s old at this look (10 s at the next), oldest first
    assert len(asked) == 100  # 50 a second x 2 s
    assert all(100.0 - many[name].read_at >= 8 for name in asked)
    assert {100.0 - many[name].read_at for name in asked} == {19.0, 18.0, 17.0, 16.0}  # 25 of each age
    svc._polled.update(dict.fromkeys(asked, 100.0))  # (what look_for_commands does after reading them)
    later = svc._unread_for_commands(many, now=102.0)
    assert not set(later) & set(asked) and len(later) == 100


def test_ticks_that_cannot_keep_up_are_counted_as_skipped(tmp_path: Path) -> None:
    """A tick still running when its next one is due: the next is dropped, and counted (overload)."""
    (tmp_path / "p.yaml").write_text(
        "metadata: {name: shop}\nspec:\n  source: {service: a/b}\n  target: {service: a/c}\n"
        "  schedule: {steps: [10, 100]}\n  analysis: {interval: 1s}\n  gates: {errorRate: {max: 0.01}}\n"
    )
    released = threading.Event()

    class Stuck:
        def query(self, query: RenderedQuery) -> float | None:
            released.wait(30)
            return None

        def query_vector(self, query: RenderedQuery) -> list[tuple[dict[str, str], float]]:
            return []

    stuck = Stuck()
    svc = memory_service(Settings(policies_dir=tmp_path, command_poll_seconds=0), stuck)
    svc.start()
    try:
        wait_for(lambda: svc.telemetry.ticks_skipped._value.get() >= 1, timeout=10, what="a skipped tick")
    finally:
        released.set()
        svc.stop()


def test_checks_can_be_phased_just_after_the_scrapes(tmp_path: Path) -> None:
    """CHECK_AFTER_SCRAPE_SECONDS: the next check moves to the grid `newest sample + margin + k x
    interval`, less than an interval later than it was due and never sooner (a check sooner than a
    scrape after the last one would judge the same samples twice)."""
    assert after_scrape(phase=100.2, interval=1.0, due=205.7) == pytest.approx(206.2)  # later, never sooner
    assert after_scrape(phase=100.2, interval=1.0, due=205.2) == pytest.approx(205.2)  # on the grid already
    assert after_scrape(phase=100.2, interval=5.0, due=205.7) == pytest.approx(210.2)
    (tmp_path / "p.yaml").write_text(
        "metadata: {name: shop}\nspec:\n  source: {service: a/b}\n  target: {service: a/c}\n"
        "  schedule: {steps: [10, 100]}\n  analysis: {interval: 2s}\n  gates: {errorRate: {max: 0.01}}\n"
    )
    scraped = time.time() - 0.37  # Prometheus's newest sample of the ASM gateway

    class Newest:
        def query(self, query: RenderedQuery) -> float | None:
            return scraped if query.gate == "newestSample" else None

        def query_vector(self, query: RenderedQuery) -> list[tuple[dict[str, str], float]]:
            return []

    svc = memory_service(
        Settings(policies_dir=tmp_path, command_poll_seconds=0, check_after_scrape_seconds=0.25), Newest()
    )
    svc.start()
    try:

        def phase() -> float | None:
            job = svc._scheduler.get_job("shop")
            if job is None or "shop" not in svc._phased or job.next_run_time is None:
                return None
            return (job.next_run_time.timestamp() - (scraped + 0.25)) % 2.0

        offset = wait_for(lambda: (p := phase()) is not None and p + 1, timeout=10, what="the checks phased") - 1
        assert min(offset, 2.0 - offset) < 0.002  # on the grid of the scrapes, 0.25 s after them
    finally:
        svc.stop()


@given(
    phase=st.floats(0, 1e9, allow_nan=False),
    interval=st.floats(0.5, 3600, allow_nan=False),
    due=st.floats(0, 1e9, allow_nan=False),
)
def test_phasing_after_the_scrapes_never_brings_a_check_forward(phase: float, interval: float, due: float) -> None:
    """The rule of CHECK_AFTER_SCRAPE_SECONDS, for any grid and due time: on the grid, not sooner
    than due, less than an interval later."""
    moved = after_scrape(phase, interval, due)
    assert due - 1e-6 * max(1.0, abs(due)) <= moved < due + interval * (1 + 1e-6)
    steps = (moved - phase) / interval
    assert abs(steps - round(steps)) < 1e-6 * max(1.0, abs(steps))
