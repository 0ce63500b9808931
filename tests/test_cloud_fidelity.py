"""Cloud fidelity end to end: the real runner, the real kube-apiserver and Prometheus, an EMULATED cloud.

The controller's PolicyRunner runs as its ServiceAccount (bound to what ``gateway-canary rbac``
prints) with the real adapters: Services, state object, Prometheus, the cloud inspector. The
Alibaba Cloud controller cannot run here: ``tests/ccm_emulator.py`` plays it (Events after each
annotation change, the weights the CLB really applies, backends as Nodes and EndpointSlices). The
traffic simulator's split follows the CLB's APPLIED weights by the CCM's arithmetic, with a lag,
and Prometheus scrapes it: what the controller observes is what a CLB would have sent.
"""

from __future__ import annotations

import io
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from controller.adapters.cloud import KubernetesCloudInspector
from controller.adapters.istio_routes import KubernetesIstioRoutes
from controller.adapters.kube_api import build_api_client
from controller.adapters.kube_state import KubernetesStateStore
from controller.adapters.kubernetes import KubernetesGatewayPair
from controller.adapters.prometheus import PrometheusMetricsSource
from controller.checklist import preflight_main
from controller.core.cloud import FORCE_OVERRIDE, SCHEDULER, BackendMode, Backends
from controller.core.enums import AlertKind, Phase, Severity, Verdict
from controller.core.policy import CanaryPolicy
from controller.migrate import migrate_config_main
from controller.runtime.cloud_watch import CloudWatch
from controller.settings import PrometheusConnection, Settings
from tests.ccm_emulator import CcmEmulator, Mode
from tests.helpers import RecordingNotifier, make_policy, runner_for
from tests.kube_cluster import CLB, SOURCE, TARGET, Cluster
from tests.servers import MEASURED, WEIGHT, LaggedShare, TrafficExporter, wait_for
from tests.test_routes import create_gateway, gateway, server

#: the Services as the runbook wants them (the tests break one thing at a time)
READY = {**CLB, FORCE_OVERRIDE: "false", SCHEDULER: "wrr"}
NODES = 20  # Cluster mode: weights 10/90 give the ASM gateway max(1, 10 // 20) * 20 = 20 of 100


def policy_for(kube: Cluster, gateways: tuple[str, str], **spec: Any) -> CanaryPolicy:
    tag = {"gateway-canary-test": kube.ns}  # Istio Gateways are listed cluster-wide: this test's own
    body: dict[str, Any] = {
        "source": {
            "service": f"{kube.ns}/{SOURCE}",
            "workload": gateways[0],
            "gatewaySelector": {"istio": "ingressgateway", **tag},
        },
        "target": {
            "service": f"{kube.ns}/{TARGET}",
            "workload": gateways[1],
            "gatewaySelector": {"istio": "ingressgateway-asm", **tag},
        },
        "schedule": {"steps": [10, 50, 100], "bakeTime": "3s"},
        "analysis": {"interval": "1s", "window": "4s", "minRequests": 5, "failureThreshold": 2},
        "gates": {"errorRate": {"max": 0.05}},
        "cloud": {"confirmTimeout": "4s", "settleTimeout": "6s", "shareTolerance": 0.05, "deficitGrace": "6s"},
        "routes": {"check": False},
    }
    body.update(spec)
    return CanaryPolicy.model_validate({"metadata": {"name": "shop"}, "spec": body})


@dataclass
class Rig:
    """One policy's runner against the real servers and the emulated cloud, ticked by the test."""

    kube: Cluster
    ccm: CcmEmulator
    traffic: TrafficExporter
    policy: CanaryPolicy
    runner: Any
    notifier: RecordingNotifier
    outcomes: list[Any] = field(default_factory=list)

    def tick(self) -> Any:
        outcome = self.runner.tick()
        self.outcomes.append(outcome)
        return outcome

    def tick_until(self, condition: Callable[[Any], bool], *, timeout: float, what: str) -> Any:
        """Tick every 0.25 s (the policy's interval is 1 s) until ``condition(outcome)``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            outcome = self.tick()
            if condition(outcome):
                return outcome
            time.sleep(0.25)  # the pace of the controller's scheduler, not a wait for a condition
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {self.runner._memory}")

    def weights(self) -> tuple[int, int]:
        return int(self.kube.annotations(TARGET)[WEIGHT]), int(self.kube.annotations(SOURCE)[WEIGHT])

    def alerts(self, kind: AlertKind) -> list[Any]:
        """The alerts of ``kind`` delivered so far (delivery is asynchronous: poll for them)."""
        return [alert for alert in self.notifier.alerts if alert.kind is kind]


@pytest.fixture
def rig_for(
    kube: Cluster, traffic: TrafficExporter, gateways: tuple[str, str], prometheus: str
) -> Iterator[Callable[..., Rig]]:
    """Builds a Rig: Services as the runbook wants them (``target``/``source`` annotations override)."""
    built: list[CcmEmulator] = []

    def build(
        *, target: dict[str, str | None] | None = None, source: dict[str, str | None] | None = None, **spec: Any
    ) -> Rig:
        def annotations(changes: dict[str, str | None] | None, weight: str) -> dict[str, str]:
            merged = {**READY, WEIGHT: weight, **(changes or {})}
            return {key: value for key, value in merged.items() if value is not None}

        kube.add_service(TARGET, annotations(target, "0"))
        kube.add_service(SOURCE, annotations(source, "100"))
        policy = policy_for(kube, gateways, **spec)
        kube.grant(policy)
        ccm = CcmEmulator(kube.plane, kube.ns, lag=0.3, retry_after=1.0).__enter__()
        built.append(ccm)
        for name in (TARGET, SOURCE):
            ccm.provision(name, Backends(BackendMode.CLUSTER, nodes=NODES))
        traffic.move_to(kube.ns)
        traffic.share = LaggedShare(ccm.clb_target_share, 1.0)
        api = build_api_client(kube.write_kubeconfig())
        notifier = RecordingNotifier()
        runner = runner_for(
            policy,
            pair=KubernetesGatewayPair(api, state_namespace=kube.ns),
            store=KubernetesStateStore(api, kube.ns),
            metrics=PrometheusMetricsSource(PrometheusConnection(Settings(prometheus_url=prometheus), None)),
            receivers=[notifier],
            cloud=CloudWatch(KubernetesCloudInspector(api), KubernetesIstioRoutes(api, api)),
        )
        return Rig(kube, ccm, traffic, policy, runner, notifier)

    yield build
    for ccm in built:
        ccm.__exit__(None, None, None)


def started(outcome: Any) -> bool:
    return outcome.decision is not None and outcome.decision.state.target_weight == 10 and outcome.decision.transition


def counted_pass(outcome: Any) -> bool:
    return outcome.decision is not None and outcome.decision.state.last_verdict is Verdict.PASS


# --- a healthy step: written, confirmed, settled, baked ------------------------------------------------


def test_a_step_is_confirmed_then_settles_then_bakes_at_the_effective_share(rig_for: Callable[..., Rig]) -> None:
    rig = rig_for()
    rig.tick_until(started, timeout=30, what="the start at 10 (a real baseline on the source)")
    written = time.monotonic()
    assert rig.weights() == (10, 90)
    # requested 10 %, effective 20 %: the CCM gives each of the 20 nodes max(1, 10 // 20) = 1 and 4
    assert rig.runner.split is not None
    rig.tick_until(lambda o: rig.runner.split.target_weight == 10, timeout=5, what="the split at 10/90")
    assert rig.runner.split.requested == pytest.approx(0.10)
    assert rig.runner.split.effective == pytest.approx(0.20)
    assert rig.runner._telemetry.effective_share.labels("shop")._value.get() == pytest.approx(0.20)
    rig.tick_until(lambda o: rig.runner.confirmation is not None and rig.runner.confirmation.applied, timeout=10,
                   what="the cloud's EnsuredLoadBalancer")  # fmt: skip
    confirmed = time.monotonic() - written
    settled_at = rig.tick_until(counted_pass, timeout=30, what="the observed share within 5 points of 20 %")
    settled = time.monotonic() - written
    reasons = [o.decision.state.reason for o in rig.outcomes if o.decision is not None]
    assert any("Settling" in reason for reason in reasons)  # passes before it were not counted
    share = settled_at.check.observed_target_share
    assert share == pytest.approx(0.20, abs=0.05)  # traffic follows the CLB's split, not the weights
    rig.tick_until(lambda o: rig.weights()[0] == 50, timeout=30, what="the raise to 50 after a covered bake")
    MEASURED.setdefault("step write -> confirmed by the cloud", []).append(confirmed)
    MEASURED.setdefault("step write -> confirmed and settled", []).append(settled)
    assert rig.alerts(AlertKind.POLICY_REFUSED) == []


# --- the cloud does not apply a write: hold, alert, never advance --------------------------------------


@pytest.mark.parametrize(
    ("mode", "said"),
    [
        (Mode.FAIL, "SyncLoadBalancerFailed"),
        (Mode.SKIP, "SkipSyncBackends"),
        (Mode.SILENT, "no EnsuredLoadBalancer"),
    ],
)
def test_a_write_the_cloud_does_not_apply_holds_and_alerts_until_it_does(
    rig_for: Callable[..., Rig], mode: Mode, said: str
) -> None:
    rig = rig_for()
    rig.ccm.set_mode(TARGET, mode)
    rig.tick_until(started, timeout=30, what="the start at 10")
    rig.tick_until(lambda o: rig.alerts(AlertKind.CLOUD_NOT_APPLIED), timeout=20, what="the alert")
    (alert,) = rig.alerts(AlertKind.CLOUD_NOT_APPLIED)
    assert said in alert.reason and "did not confirm the last weight write" in alert.reason
    assert alert.severity is Severity.WARNING
    # held: well past the bake time, still 10/90 and never a second alert for the same refusal
    hold_until = time.monotonic() + 6
    rig.tick_until(lambda o: time.monotonic() > hold_until, timeout=12, what="six seconds of holding")
    assert rig.weights() == (10, 90)
    assert len(rig.alerts(AlertKind.CLOUD_NOT_APPLIED)) == 1
    assert rig.ccm.applied_weight(TARGET) == 0  # the CLB never had 10: holding was right
    # the cloud recovers (its retry, or a new reconcile): confirmed, settled, baked, raised
    rig.ccm.set_mode(TARGET, Mode.SUCCEED)
    if mode is Mode.SILENT:  # a silent reconcile is not retried: the next change makes it reconcile
        rig.kube.edit(TARGET, {"gateway-canary-test/nudge": "1"})
    rig.tick_until(lambda o: rig.weights()[0] == 50, timeout=40, what="the raise once the cloud applied 10")
    assert rig.runner._memory.cloud_refusal is None


def test_a_weight_that_silently_does_not_apply_is_a_traffic_deficit_and_rolled_back(
    rig_for: Callable[..., Rig],
) -> None:
    rig = rig_for()
    # the cloud says "Ensured", but the CLB keeps sending everything to the old gateway
    rig.traffic.share = lambda: 0.0
    rig.tick_until(started, timeout=30, what="the start at 10")
    written = time.monotonic()
    rig.tick_until(lambda o: rig.weights() == (0, 100), timeout=40, what="the rollback on the traffic deficit")
    MEASURED.setdefault("weight not applied -> weight 0", []).append(time.monotonic() - written)
    assert rig.runner.confirmation is not None and rig.runner.confirmation.applied  # confirmed, yet no traffic
    (alert,) = rig.alerts(AlertKind.ROLLED_BACK)
    assert "(TrafficDeficit)" in alert.reason and "the ASM gateway gets 0.0% of requests" in alert.reason
    assert "the CLB not applying the weight" in alert.reason
    state = rig.runner._memory
    assert state.phase is Phase.ROLLED_BACK and state.covered_seconds == 0


# --- preflight and route parity before the first raise ---------------------------------------------------


def run_preflight(kube: Cluster, policy: CanaryPolicy, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    path = kube.workdir / "policy.yaml"
    path.write_text(yaml.safe_dump(policy.model_dump(mode="json", by_alias=True, exclude_defaults=True)))
    monkeypatch.setenv("GATEWAY_CANARY_KUBECONFIG", str(kube.write_kubeconfig()))
    monkeypatch.setenv("GATEWAY_CANARY_NAMESPACE", kube.ns)
    out, err = io.StringIO(), io.StringIO()
    code = preflight_main([str(path)], output=out, errors=err)
    assert err.getvalue() == "", err.getvalue()
    return code, out.getvalue()


def test_preflight_refuses_the_first_raise_and_the_command_prints_the_checklist(
    rig_for: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = rig_for(target={FORCE_OVERRIDE: "true"}, source={SCHEDULER: None})
    rig.tick_until(lambda o: rig.alerts(AlertKind.POLICY_REFUSED), timeout=30, what="the preflight refusal")
    (alert,) = rig.alerts(AlertKind.POLICY_REFUSED)
    assert f"listeners kept on {rig.kube.ns}/{TARGET}" in alert.reason and '"false"' in alert.reason
    assert f"weighted scheduler on {rig.kube.ns}/{SOURCE}" in alert.reason and "wrr" in alert.reason
    assert rig.weights() == (0, 100)

    code, printed = run_preflight(rig.kube, rig.policy, monkeypatch)
    assert code == 1
    assert f"✗ listeners kept on {rig.kube.ns}/{TARGET}" in printed
    assert f"✗ weighted scheduler on {rig.kube.ns}/{SOURCE}" in printed
    assert "✓ same CLB: both use lb-test" in printed
    assert "weight  10/90: requested 10.0%, effective 20.0%" in printed  # the plan at today's 20 nodes
    assert "2 item(s) failed" in printed

    rig.kube.edit(TARGET, {FORCE_OVERRIDE: "false"})
    rig.kube.edit(SOURCE, {SCHEDULER: "wrr"})
    code, printed = run_preflight(rig.kube, rig.policy, monkeypatch)
    assert code == 0 and "✗" not in printed and printed.rstrip().endswith("every item passed")
    rig.tick_until(started, timeout=30, what="the start once preflight passes")


@pytest.mark.usefixtures("istio_gateway_api")
def test_route_parity_refuses_a_missing_host_until_migrate_config_is_applied(
    rig_for: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = rig_for(routes={"check": True})
    selectors = (rig.policy.spec.source.routing_selector(), rig.policy.spec.target.routing_selector())
    ns = rig.kube.ns
    create_gateway(rig.kube, gateway("shop", selectors[0], server(80, ["a.example.com", "b.example.com"]), ns=ns))
    create_gateway(rig.kube, gateway("shop-asm", selectors[1], server(80, ["a.example.com"]), ns=ns))
    rig.tick_until(lambda o: rig.alerts(AlertKind.POLICY_REFUSED), timeout=30, what="the route parity refusal")
    (alert,) = rig.alerts(AlertKind.POLICY_REFUSED)
    assert "b.example.com:80" in alert.reason and "a.example.com" not in alert.reason.split("missing:")[1]
    assert "migrate-config" in alert.reason
    assert rig.weights() == (0, 100)

    admin = rig.kube.workdir / "admin-kubeconfig"
    admin.write_text(rig.kube.admin_kubeconfig())
    monkeypatch.setenv("GATEWAY_CANARY_KUBECONFIG", str(admin))
    policy_file = rig.kube.workdir / "routes-policy.yaml"
    policy_file.write_text(yaml.safe_dump(rig.policy.model_dump(mode="json", by_alias=True, exclude_defaults=True)))
    out = io.StringIO()
    assert migrate_config_main([str(policy_file)], output=out, errors=io.StringIO()) == 0
    documents = [doc for doc in yaml.safe_load_all(out.getvalue()) if doc]
    assert len(documents) == 1 and documents[0]["spec"]["selector"] == selectors[1]
    for document in documents:  # what an engineer applies after review
        create_gateway(rig.kube, document, version=document["apiVersion"].split("/")[1])
    rig.tick_until(started, timeout=30, what="the start once the ASM gateway serves every host")
    assert rig.runner._memory.refusal is None


@pytest.fixture(autouse=True)
def _no_leftover_nodes(kube: Cluster) -> Iterator[None]:
    yield
    nodes = kube.plane.call("GET", "/api/v1/nodes")["items"]
    assert nodes == [], "the CCM emulator leaves no Nodes behind (they are cluster-wide)"


# --- the failures a gateway migration really has (configuration left behind in the runbook's step 2) ---


@pytest.mark.parametrize(
    ("break_it", "gate", "said"),
    [
        (lambda gw: gw.missing_route(0.3), "responsesNoRoute", "404 NR (no route)"),
        (lambda gw: gw.missing_authz(0.3), "responsesAuth", "401/403"),
        (lambda gw: gw.missing_cert(0.6), "TrafficDeficit", "TLS certificate (credentialName)"),
    ],
    ids=["missing-route", "missing-authz", "missing-cert"],
)
def test_a_misconfiguration_left_behind_is_rolled_back_with_its_reason(
    rig_for: Callable[..., Rig], break_it: Callable[[Any], Any], gate: str, said: str
) -> None:
    rig = rig_for()
    rig.tick_until(started, timeout=30, what="the start at 10")
    break_it(rig.traffic.target)  # no 5xx at all: the 5xx and latency gates see nothing
    broken = time.monotonic()
    rig.tick_until(lambda o: rig.weights() == (0, 100), timeout=40, what=f"the rollback on {gate}")
    MEASURED.setdefault(f"{gate} injected -> weight 0", []).append(time.monotonic() - broken)
    (alert,) = rig.alerts(AlertKind.ROLLED_BACK)
    assert gate in alert.reason and said in alert.reason
    if gate != "TrafficDeficit":  # the alert names which responses grew, and the 5xx gate passed
        (failing,) = [g for g in alert.failing_gates if g["gate"] == gate]
        assert failing.get("detail")
        assert not [g for g in alert.failing_gates if g["gate"].startswith("errorRate")]


def measured_only(name: str, gateways: tuple[str, str], **spec: Any) -> CanaryPolicy:
    """A policy over this test's simulated gateways, for checks without a cluster (a collector only)."""
    return make_policy(
        name,
        source={"service": "istio-system/old", "workload": gateways[0]},
        target={"service": "istio-system/asm", "workload": gateways[1]},
        **{"gates": {"errorRate": {"max": 0.05}}, **spec},
    )


def test_a_healthy_noisy_pair_at_low_traffic_does_not_trip_the_response_mix_gate(
    traffic: TrafficExporter, gateways: tuple[str, str], prometheus: str
) -> None:
    """5 requests/s to the ASM gateway beside 45 to the old one, both with the same ordinary 404s and
    denials, Poisson noise on every kind: the defaults must not trip (the count is printed)."""
    from controller.runtime.collector import Collector
    from tests.servers import Response

    healthy = [Response(200, fraction=0.975), Response(404, fraction=0.02), Response(403, fraction=0.005)]
    traffic.source.responses, traffic.target.responses = list(healthy), list(healthy)
    traffic.noise = random.Random(7)
    traffic.total_rps = 50.0
    traffic.share = lambda: 0.1
    policy = measured_only("quiet", gateways, analysis={"interval": "1s", "window": "10s", "minRequests": 20})
    metrics = PrometheusMetricsSource(PrometheusConnection(Settings(prometheus_url=prometheus), None))
    collector = Collector()
    wait_for(lambda: collector.check(policy, metrics).target.requests.value, timeout=30, what="the target's traffic")
    wait_for(  # the window holds only the noisy healthy mix (the source's 4xx: ten times the traffic)
        lambda: (collector.check(policy, metrics).source.mix["4xx"].value or 0) > 0, timeout=30, what="the 404s"
    )
    started, checks, trips, rollbacks, in_a_row = time.monotonic(), 0, 0, 0, 0
    while time.monotonic() - started < 60:  # 60 checks of 10-second windows, one a second
        result = collector.check(policy, metrics)
        mix_failed = [g for g in result.gates if g.gate.startswith("responses") and g.verdict is Verdict.FAIL]
        checks += 1
        trips += bool(mix_failed)
        in_a_row = in_a_row + 1 if mix_failed else 0
        rollbacks += in_a_row == 2  # failureThreshold 2
        time.sleep(1.0)  # the check interval: the pace of the controller, not a wait for a condition
    collector.close()
    print(f"\nMEASURED healthy pair at 5 rps to the target: {trips} failing checks, {rollbacks} rollbacks in {checks}")
    assert checks >= 50 and trips == 0 and rollbacks == 0


def test_the_tls_handshake_gate_reads_each_gateways_own_envoy_stats(
    traffic: TrafficExporter, gateways: tuple[str, str], prometheus: str
) -> None:
    """With Envoy's listener TLS stats exported, a missing certificate fails the handshake gate; the
    source's pod pattern does not match the ASM gateway's pods (``gw-x`` vs ``gw-x-asm``)."""
    from controller.runtime.collector import Collector

    traffic.share = lambda: 0.5
    traffic.target.missing_cert(0.3)
    policy = measured_only(
        "tls",
        gateways,
        analysis={"window": "5s", "minRequests": 20},
        gates={"errorRate": {"max": 0.05}, "tlsHandshake": {"maxIncrease": 0.01}},
    )
    metrics = PrometheusMetricsSource(PrometheusConnection(Settings(prometheus_url=prometheus), None))
    collector = Collector()

    def judged() -> Any:
        gate = next(g for g in collector.check(policy, metrics).gates if g.gate == "tlsHandshakeFailures")
        return gate if gate.verdict is not Verdict.INCONCLUSIVE else None

    gate = wait_for(judged, timeout=30, what="both gateways' TLS stats in Prometheus")
    collector.close()
    assert gate.verdict is Verdict.FAIL and gate.baseline == 0.0  # the source's own pods: no failures
    assert gate.value == pytest.approx(0.3, abs=0.05)
