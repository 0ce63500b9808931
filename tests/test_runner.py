"""One policy's tick: the safety rules around the decision (stop, outages, dry run)."""

from __future__ import annotations

import threading
from pathlib import Path

from controller.adapters.dry_run import DryRunGatewayPair
from controller.adapters.kubernetes import KubernetesGatewayPair, build_api_client
from controller.adapters.memory import InMemoryGatewayPair
from controller.adapters.prometheus import PrometheusMetricsSource
from controller.core.enums import GatewayRole, Phase
from controller.core.results import RenderedQuery
from controller.demo import SimulatedGateways
from controller.notify.dispatcher import AlertDispatcher
from controller.runtime.clock import SystemClock
from controller.runtime.collector import Collector
from controller.runtime.reconciler import PolicyRunner
from controller.runtime.telemetry import Telemetry
from controller.settings import PrometheusConnection, Settings
from tests.helpers import make_policy
from tests.servers import LB_ID, STATE, VGROUP, WEIGHT, KubeStandIn, free_port, kubeconfig_for

POLICY = make_policy(schedule={"steps": [10, 100], "bakeTime": 0}, analysis={"failureThreshold": 1})


def runner(pair, metrics, stopping=None) -> PolicyRunner:
    return PolicyRunner(
        POLICY,
        pair=pair,
        metrics=metrics,
        receivers=[],
        dispatcher=AlertDispatcher(),
        collector=Collector(),
        clock=SystemClock(),
        telemetry=Telemetry(),
        stopping=stopping or threading.Event(),
    )


class StopDuringCheck:
    """Wraps the simulated gateways and raises the stop flag while a check is in flight.

    Hitting a SIGTERM exactly between a real Prometheus query and the write is not reproducible,
    so this boundary is simulated; everything after the query is the production path.
    """

    def __init__(self, inner: SimulatedGateways, stopping: threading.Event) -> None:
        self.inner, self.stopping = inner, stopping

    def query(self, query: RenderedQuery) -> float | None:
        self.stopping.set()
        return self.inner.query(query)


def test_stop_during_a_check_abandons_a_raise_but_writes_a_rollback() -> None:
    pair = InMemoryGatewayPair(target_weight=0, source_weight=100)
    gateways = SimulatedGateways(pair)
    stopping = threading.Event()
    outcome = runner(pair, StopDuringCheck(gateways, stopping), stopping).tick()
    assert outcome.decision is None and (pair.target_weight, pair.source_weight) == (0, 100)
    assert pair.writes == 0

    stopping.clear()
    runner(pair, gateways).tick()  # starts at 10
    assert pair.target_weight == 10
    gateways.error_ratio[GatewayRole.TARGET] = 0.5
    outcome = runner(pair, StopDuringCheck(gateways, stopping), stopping).tick()
    assert outcome.decision is not None and outcome.decision.state.phase is Phase.ROLLED_BACK
    assert (pair.target_weight, pair.source_weight) == (0, 100)


def test_unreachable_prometheus_never_raises_a_weight(kube: KubeStandIn, tmp_path: Path) -> None:
    kube.add_service("istio-system", "istio-ingressgateway-asm", {LB_ID: "lb", VGROUP: "v:80", WEIGHT: "10"})
    kube.add_service("istio-system", "istio-ingressgateway", {LB_ID: "lb", VGROUP: "v:80", WEIGHT: "90"})
    (tmp_path / "kubeconfig").write_text(kube.kubeconfig())
    pair = KubernetesGatewayPair(build_api_client(tmp_path / "kubeconfig"))
    dead = PrometheusMetricsSource(
        PrometheusConnection(
            Settings(prometheus_url=f"http://127.0.0.1:{free_port()}", prometheus_timeout_seconds=0.5), None
        )
    )
    policy_runner = runner(pair, dead)
    for _ in range(3):
        outcome = policy_runner.tick()
        assert outcome.check is not None and outcome.check.cause is not None
        assert outcome.check.cause.value == "MetricsUnavailable"
    assert kube.annotations("istio-system", "istio-ingressgateway-asm")[WEIGHT] == "10"
    assert all(WEIGHT not in p["metadata"]["annotations"] for _, p in kube.patches)


def test_unreachable_api_server_ends_the_tick_without_writes(tmp_path: Path) -> None:
    config = tmp_path / "kubeconfig"
    config.write_text(kubeconfig_for(f"http://127.0.0.1:{free_port()}"))
    pair = KubernetesGatewayPair(build_api_client(config))
    outcome = runner(pair, SimulatedGateways(InMemoryGatewayPair())).tick()
    assert outcome.decision is None and outcome.error is not None and "unreachable" in outcome.error


def test_dry_run_reads_the_cluster_progresses_in_memory_and_writes_nothing(kube: KubeStandIn, tmp_path: Path) -> None:
    kube.add_service("istio-system", "istio-ingressgateway-asm", {LB_ID: "lb", VGROUP: "v:80", WEIGHT: "0"})
    kube.add_service("istio-system", "istio-ingressgateway", {LB_ID: "lb", VGROUP: "v:80", WEIGHT: "100"})
    (tmp_path / "kubeconfig").write_text(kube.kubeconfig())
    pair = DryRunGatewayPair(KubernetesGatewayPair(build_api_client(tmp_path / "kubeconfig")))
    simulated = InMemoryGatewayPair(target_weight=0, source_weight=100)
    gateways = SimulatedGateways(simulated)
    policy_runner = runner(pair, gateways)
    first = policy_runner.tick()
    assert first.decision is not None and first.decision.weights is not None
    assert pair.observe(POLICY).target_weight == 10  # the intended write is remembered
    assert kube.patches == [] and kube.events == []
    assert STATE not in kube.annotations("istio-system", "istio-ingressgateway-asm")


def test_a_source_write_lost_to_an_api_error_is_completed_next_tick(kube: KubeStandIn, tmp_path: Path) -> None:
    kube.add_service("istio-system", "istio-ingressgateway-asm", {LB_ID: "lb", VGROUP: "v:80", WEIGHT: "0"})
    kube.add_service("istio-system", "istio-ingressgateway", {LB_ID: "lb", VGROUP: "v:80", WEIGHT: "100"})
    (tmp_path / "kubeconfig").write_text(kube.kubeconfig())
    pair = KubernetesGatewayPair(build_api_client(tmp_path / "kubeconfig"))
    simulated = InMemoryGatewayPair(target_weight=0, source_weight=100)
    policy_runner = runner(pair, SimulatedGateways(simulated))
    kube.fail_patch_of["istio-system/istio-ingressgateway"] = 500
    first = policy_runner.tick()
    assert first.error is not None and "500" in first.error
    assert kube.annotations("istio-system", "istio-ingressgateway-asm")[WEIGHT] == "10"
    assert kube.annotations("istio-system", "istio-ingressgateway")[WEIGHT] == "100"
    second = policy_runner.tick()
    assert second.decision is not None and second.decision.action.value == "CompleteWrite"
    assert kube.annotations("istio-system", "istio-ingressgateway")[WEIGHT] == "90"
    third = policy_runner.tick()
    assert third.decision is not None and third.decision.state.phase is Phase.PROGRESSING
    assert not any(e["reason"] in ("Paused", "WeightChangedExternally") for e in kube.events)
