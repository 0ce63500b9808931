"""Scenarios 2 and 3 of the fault suite: Prometheus killed, slow, erroring or talking nonsense.

The controller runs in-process (``ControllerService``, as its ServiceAccount on the real
kube-apiserver) against a real Prometheus scraping traffic that follows the weights the controller
writes. Its log lines go to a file scenario 7 scans for secrets, and it is given every secret of
``report.SECRETS``.

2. Prometheus SIGKILLed mid-rollout (6-8 s in CI, 60 s large) and restarted on its port and data:
   three policies watch it. ``patient`` has an ``onMetricsUnavailable`` limit longer than the
   outage, ``holder`` and ``retreater`` shorter ones, with ``hold`` and ``rollback``. While it is
   down no weight goes up (no Service write at all but the retreater's rollback); the shorter
   limits act once, with exactly one alert each (StuckInconclusive, RolledBack; the holder's
   "checks pass again" once after); the patient policy says nothing, and when Prometheus is back
   it and the holder raise again while the retreater stays at 0.
3. A loopback proxy in front of the real Prometheus answers slowly (past the controller's timeout),
   500, or malformed bodies: every check then is INCONCLUSIVE (MetricsUnavailable), no tick
   crashes, the weight stays, and once the proxy passes queries through again the rollout raises.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from controller.adapters.kube_api import build_api_client
from controller.adapters.kube_state import KubernetesStateStore
from controller.adapters.kubernetes import KubernetesGatewayPair
from controller.adapters.prometheus import PrometheusMetricsSource
from controller.core.policy import CanaryPolicy
from controller.runtime.clock import SystemClock
from controller.runtime.service import ControllerService
from controller.settings import PrometheusConnection, Settings
from tests.faults.report import LARGE, SECRETS, sized, tally
from tests.faults.rig import (
    SECRET_ALERTS,
    Fault,
    PrometheusProxy,
    RestartablePrometheus,
    RobotSink,
    json_logs,
    log_lines,
    secret_env,
)
from tests.kube_cluster import CLB_READY, Cluster, ControlPlane
from tests.servers import WEIGHT, GatewayTraffic, TrafficExporter, WebhookSink, wait_for

POLICY = """\
metadata: {{name: {name}}}
spec:
  source: {{service: {ns}/{source}, workload: {source_workload}}}
  target: {{service: {ns}/{target}, workload: {target_workload}}}
  schedule: {{steps: [5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 60, 70, 80, 90, 100], bakeTime: {bake}}}
  analysis:
    interval: 1s
    window: 10s
    minRequests: 10
    onMissingData: {{action: hold, afterChecks: 1000}}
    onMetricsUnavailable: {{action: {action}, afterChecks: {after}}}
  gates: {{errorRate: {{max: 0.05}}}}
"""


@dataclass
class Rollout:
    """One policy of a test: its Services, its traffic, its limit for Prometheus errors."""

    name: str
    source: str
    target: str
    bake: str
    action: str
    after: int
    traffic: TrafficExporter
    workloads: tuple[str, str]

    def document(self, ns: str) -> str:
        spec = POLICY.format(
            name=self.name,
            ns=ns,
            source=self.source,
            target=self.target,
            source_workload=self.workloads[0],
            target_workload=self.workloads[1],
            bake=self.bake,
            action=self.action,
            after=self.after,
        )
        return spec + SECRET_ALERTS


def share_of(plane: ControlPlane, ns: str, target: str, source: str) -> Callable[[], float]:
    """The target's share at its Services' weights, read through a session of its own (an exporter
    calls it from its server thread on every scrape)."""
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {plane.admin_token}"
    lock = threading.Lock()

    def weight(name: str) -> int:
        url = f"{plane.url}/api/v1/namespaces/{ns}/services/{name}"
        answer = session.get(url, verify=str(plane.ca_file), timeout=5).json()
        return int((answer["metadata"].get("annotations") or {}).get(WEIGHT, "100"))

    def share() -> float:
        with lock:
            target_weight, source_weight = weight(target), weight(source)
        total = target_weight + source_weight
        return 0.0 if total == 0 else target_weight / total

    return share


@dataclass
class Rig:
    """The controller under test, what it talks to, and the policies (``add``) it runs."""

    kube: Cluster
    traffic: TrafficExporter
    gateways: tuple[str, str]
    sink: WebhookSink
    robot: RobotSink
    log: Path
    policies: Path
    settings: Settings | None = None
    rollouts: dict[str, Rollout] = field(default_factory=dict)
    services: list[ControllerService] = field(default_factory=list)
    exporters: list[TrafficExporter] = field(default_factory=list)
    closed: bool = False

    def add(self, name: str, source: str, target: str, *, bake: str, action: str, after: int) -> Rollout:
        """A policy on two new Services, with traffic that follows their weights: the first one on the
        session's exporter (this test's fresh workloads), the others on exporters of their own."""
        if not self.rollouts:
            exporter, workloads = self.traffic, self.gateways
        else:
            exporter = TrafficExporter(
                GatewayTraffic(f"{self.gateways[0]}-{name}"), GatewayTraffic(f"{self.gateways[1]}-{name}")
            )
            self.exporters.append(exporter)
            workloads = (exporter.source.workload, exporter.target.workload)
        exporter.move_to(self.kube.ns)
        self.kube.add_service(target, {**CLB_READY, WEIGHT: "0"})
        self.kube.add_service(source, {**CLB_READY, WEIGHT: "100"})
        exporter.share = share_of(self.kube.plane, self.kube.ns, target, source)
        rollout = self.rollouts[name] = Rollout(name, source, target, bake, action, after, exporter, workloads)
        return rollout

    def configure(self, prometheus_url: str, **settings: Any) -> None:
        """Write the policies, grant their RBAC, and settle the settings (the secrets: the environment)."""
        kube = self.kube
        for rollout in self.rollouts.values():
            (self.policies / f"{rollout.name}.yaml").write_text(rollout.document(kube.ns))
        kube.grant(*(kube.policy(r.source, r.target, name=r.name) for r in self.rollouts.values()))
        self.settings = Settings(
            policies_dir=self.policies,
            reload_interval_seconds=0.5,
            prometheus_url=prometheus_url,
            namespace=kube.ns,
            notify_backoff_seconds=0.2,
            notify_backoff_max_seconds=1.0,
            **settings,
        )

    def start(self) -> ControllerService:
        settings = self.settings
        assert settings is not None, "configure() first"
        api = build_api_client(self.kube.write_kubeconfig())
        sources: dict[tuple[object, ...], PrometheusMetricsSource] = {}

        def metrics_for(policy: CanaryPolicy) -> PrometheusMetricsSource:
            connection = PrometheusConnection(settings, policy.spec.prometheus)
            if connection.key() not in sources:
                sources[connection.key()] = PrometheusMetricsSource(connection)
            return sources[connection.key()]

        service = ControllerService(
            settings,
            pair=KubernetesGatewayPair(api, state_namespace=self.kube.ns),
            store=KubernetesStateStore(api, self.kube.ns),
            metrics_for=metrics_for,
            clock=SystemClock(),
            serve_http=False,
        )
        self.services.append(service)
        service.start()
        return service

    def close(self) -> None:
        """Stop the controllers (their alerts flushed) and the servers; again: nothing."""
        if self.closed:
            return
        self.closed = True
        for service in self.services:
            service.stop()
        self.traffic.share = lambda: 0.0
        for exporter in self.exporters:
            exporter.close()
        self.sink.close()
        self.robot.close()

    def weight(self, name: str) -> int:
        return int(self.kube.annotations(self.rollouts[name].target)[WEIGHT])

    def weights(self) -> dict[str, int]:
        return {name: self.weight(name) for name in self.rollouts}

    def writes(self, name: str) -> list[str]:
        """Every weight the controller wrote to the policy's target Service (from the audit log)."""
        return self.kube.weight_writes(self.rollouts[name].target, WEIGHT)

    def alerts(self, policy: str | None = None) -> list[dict[str, Any]]:
        """The alerts the global webhook got, of ``policy`` or all (each has its id and kind)."""
        return [b for p, b in self.sink.received if p.startswith("/global/") and policy in (None, b.get("policy"))]

    def copies(self, alert_id: str) -> tuple[int, int]:
        """How many times the Slack receiver and the policy's robot got the alert ``alert_id``."""
        slack = [b for p, b in self.sink.received if p.startswith("/slack/") and alert_id in str(b.get("text"))]
        return len(slack), len([text for text in self.robot.texts() if alert_id in text])

    def crashes(self, service: ControllerService) -> list[str]:
        """Ticks that crashed: the telemetry's count and the log's words for it."""
        counted = sum(service.telemetry.errors.labels(name, "crash")._value.get() for name in self.rollouts)
        said = [
            str(line["event"])
            for line in log_lines(self.log)
            if "tick failed unexpectedly" in str(line.get("event")) or "tick crashed" in str(line.get("event"))
        ]
        return [f"{counted:g} crash(es) counted", *said] if counted or said else []


@pytest.fixture
def rig(
    kube: Cluster,
    traffic: TrafficExporter,
    gateways: tuple[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Rig]:
    sink, robot = WebhookSink(), RobotSink()
    for name, value in secret_env(sink.url, robot.url).items():
        monkeypatch.setenv(name, value)
    policies = tmp_path / "policies"
    policies.mkdir()
    with json_logs(tmp_path / "controller.log") as log:
        rig = Rig(kube, traffic, gateways, sink, robot, log, policies)
        try:
            yield rig
        finally:
            rig.close()


def waited(violations: list[str], condition: Callable[[], Any], *, timeout: float, what: str) -> Any:
    """``wait_for``, a timeout recorded as a violation (for the tally) instead of raised."""
    try:
        return wait_for(condition, timeout=timeout, interval=0.1, what=what)
    except AssertionError as exc:
        violations.append(str(exc))
        return None


def watch(rig: Rig, seconds: float, ceiling: dict[str, int], violations: dict[str, list[str]], what: str) -> None:
    """Sample the weights for ``seconds`` (the fault's length: a timed fault, not a stand-in for a
    condition); a weight above its ``ceiling`` is a violation of its policy."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for name, weight in rig.weights().items():
            if weight > ceiling[name]:
                violations[name].append(f"{name}: weight raised to {weight} (from {ceiling[name]}) while {what}")
                ceiling[name] = weight
        time.sleep(0.1)


# --- scenario 2 --------------------------------------------------------------------------------------

OUTAGE_SECONDS = sized(7, 60)
#: the shorter limit, in checks (interval 1s)
SHORT_LIMIT = 3


def test_prometheus_killed_mid_rollout_no_raise_while_down_one_alert_per_policy_then_resume(
    rig: Rig, tmp_path: Path
) -> None:
    scenario = tally(2, "Prometheus killed mid-rollout")
    rig.add("patient", "istio-ingressgateway", "istio-ingressgateway-asm", bake="2s", action="hold",
            after=4 * OUTAGE_SECONDS)  # fmt: skip
    rig.add("holder", "holder-gw", "holder-gw-asm", bake="6s", action="hold", after=SHORT_LIMIT)
    rig.add("retreater", "retreat-gw", "retreat-gw-asm", bake="6s", action="rollback", after=SHORT_LIMIT)
    violations: dict[str, list[str]] = {name: [] for name in rig.rollouts}
    prometheus = RestartablePrometheus(tmp_path, [rollout.traffic.server.port for rollout in rig.rollouts.values()])
    try:
        prometheus.start()
        rig.configure(prometheus.url)
        service = rig.start()
        wait_for(lambda: min(rig.weights().values()) >= 5, timeout=60, what="all three rollouts to start")
        first = rig.weight("patient")
        wait_for(lambda: rig.weight("patient") > first, timeout=60, what="the patient rollout to raise")

        # Mid-rollout, right after a raise (a 2 s bake, the others' 6 s: none is covered, so no raise
        # can stem from a check before the kill): kill -9, and watch for the outage's length.
        ceiling = rig.weights()
        writes = {name: len(rig.writes(name)) for name in rig.rollouts}
        prometheus.kill()
        killed_at = time.monotonic()
        watch(rig, OUTAGE_SECONDS, dict(ceiling), violations, "Prometheus was down")
        while_down = {name: rig.writes(name)[writes[name] :] for name in rig.rollouts}
        said_while_down = {name: [a["kind"] for a in rig.alerts(name)] for name in rig.rollouts}
        prometheus.start()
        back_at = time.monotonic()
        down_for = back_at - killed_at

        waited(
            violations["patient"],
            lambda: rig.weight("patient") > ceiling["patient"],
            timeout=60,
            what="the patient rollout to raise once Prometheus is back",
        )
        resumed_after = time.monotonic() - back_at
        waited(
            violations["holder"],
            lambda: rig.weight("holder") > ceiling["holder"],
            timeout=60,
            what="the holding rollout to raise once Prometheus is back",
        )
        waited(
            violations["holder"],
            lambda: [a for a in rig.alerts("holder") if a["kind"] == "Recovered"],
            timeout=30,
            what="the holder's 'checks pass again' alert",
        )
        retreater = rig.kube.state("retreater") or {}
        crashes = rig.crashes(service)
    finally:
        prometheus.close()
    rig.close()  # every alert flushed: none can come later

    # While down: no write at all but the retreater's one rollback; the short limits acted.
    for name in ("patient", "holder"):
        if while_down[name]:
            violations[name].append(f"{name}: wrote {while_down[name]} to its target while Prometheus was down")
    if while_down["retreater"] != ["0"]:
        violations["retreater"].append(f"retreater: wrote {while_down['retreater']} while down, not one rollback")
    expected_while_down = {"patient": [], "holder": ["StuckInconclusive"], "retreater": ["RolledBack"]}
    for name, kinds in said_while_down.items():
        if kinds != expected_while_down[name]:
            violations[name].append(f"{name}: alerts while Prometheus was down: {kinds}")
    # In all: exactly that alert per policy (the holder's limit also says once that it passes again),
    # each delivered once to each receiver (Slack, the policy's robot) under its id.
    expected = {"patient": [], "holder": ["Recovered", "StuckInconclusive"], "retreater": ["RolledBack"]}
    for name in rig.rollouts:
        alerts = rig.alerts(name)
        if sorted(a["kind"] for a in alerts) != expected[name]:
            violations[name].append(f"{name}: alerts {[(a['kind'], a['id']) for a in alerts]}")
        for alert in alerts:
            if rig.copies(alert["id"]) != (1, 1):
                violations[name].append(f"{name}: alert {alert['id']} reached (Slack, robot) {rig.copies(alert['id'])}")
    slack = [path for path, _ in rig.sink.received if path.startswith("/slack/")]
    sent = {"webhook": len(rig.alerts()), "Slack": len(slack), "robot": len(rig.robot.received)}
    if len(set(sent.values())) != 1:
        violations["patient"].append(f"the receivers got different numbers of alerts: {sent}")
    if rig.weight("retreater") != 0 or retreater.get("phase") != "RolledBack":
        violations["retreater"].append(f"retreater: at {rig.weight('retreater')}, {retreater.get('phase')} after")
    violations["patient"].extend(crashes)

    for found in violations.values():
        scenario.run(found)
    scenario.figure("outage", f"{down_for:.0f}s")
    scenario.figure("raise after Prometheus returned", f"{resumed_after:.1f}s")
    assert violations == {name: [] for name in rig.rollouts}
    assert down_for >= OUTAGE_SECONDS


# --- scenario 3 --------------------------------------------------------------------------------------

#: the controller's Prometheus timeout and how long a slow answer takes: just past it in CI, 30 s large
TIMEOUT_SECONDS = 5.0 if LARGE else 0.5
SLOW_SECONDS = 30.0 if LARGE else TIMEOUT_SECONDS + 0.5
#: inconclusive checks judged in each fault before the proxy passes queries through again
CHECKS_PER_FAULT = sized(2, 5)
#: what a check's reason says in each fault
SAID = {
    Fault.SLOW: re.compile(rf"did not answer within {TIMEOUT_SECONDS:g}s"),
    Fault.ERROR_500: re.compile(r"answered an error: .*500"),
    Fault.MALFORMED: re.compile(r"malformed answer|not a number|unexpected query result"),
}


def judged(service: ControllerService, verdict: str) -> float:
    """How many checks of the scenario-3 policy were judged ``verdict``."""
    return float(service.telemetry.checks.labels("steady", verdict)._value.get())


def one_fault(rig: Rig, service: ControllerService, proxy: PrometheusProxy, fault: Fault) -> list[str]:
    """Raise once with queries passing through; then, right after the raise (a 1 s bake needs two
    passes after it: no raise can be pending), the fault until it judged ``CHECKS_PER_FAULT`` checks;
    what went wrong."""
    violations: list[str] = []
    before = rig.weight("steady")
    waited(violations, lambda: rig.weight("steady") > before, timeout=60, what=f"a raise before {fault}")
    ceiling = {"steady": rig.weight("steady")}
    writes = len(rig.writes("steady"))
    checks = {verdict: judged(service, verdict) for verdict in ("PASS", "FAIL", "INCONCLUSIVE")}
    logged = len(log_lines(rig.log))
    proxy.set(fault, SLOW_SECONDS if fault is Fault.SLOW else 0.0)

    def judged_enough() -> bool:
        watch(rig, 0.0, ceiling, {"steady": violations}, f"Prometheus was {fault}")
        # one more than asked: the check under way at the switch may have passed
        return judged(service, "INCONCLUSIVE") >= checks["INCONCLUSIVE"] + CHECKS_PER_FAULT + 1

    waited(violations, judged_enough, timeout=CHECKS_PER_FAULT * 60, what=f"inconclusive checks ({fault})")
    proxy.set(Fault.PASS)
    during = [line for line in log_lines(rig.log)[logged:] if line.get("event") == "check"]
    inconclusive = [line for line in during if line["verdict"] == "INCONCLUSIVE"]
    if judged(service, "FAIL") > checks["FAIL"] or judged(service, "PASS") > checks["PASS"] + 1:
        violations.append(f"{fault}: checks judged PASS or FAIL: {[line['reason'] for line in during]}")
    unexplained = [
        line["reason"]
        for line in inconclusive
        if line.get("cause") != "MetricsUnavailable" or not SAID[fault].search(line["reason"])
    ]
    if unexplained or not inconclusive:
        violations.append(f"{fault}: inconclusive checks that do not say why: {unexplained[:2]}")
    took = [line["seconds"] for line in inconclusive]
    if fault is Fault.SLOW and any(seconds < TIMEOUT_SECONDS for seconds in took[1:]):
        violations.append(f"slow: checks gave up before the {TIMEOUT_SECONDS}s timeout: {took}")
    if rig.writes("steady")[writes:]:
        violations.append(f"{fault}: wrote {rig.writes('steady')[writes:]} while Prometheus was {fault}")
    return violations + rig.crashes(service)


def test_prometheus_slow_erroring_or_malformed_is_inconclusive_never_a_crash_nor_a_raise(
    rig: Rig, prometheus: str
) -> None:
    scenario = tally(3, "Prometheus slow, 500s or malformed")
    proxy = PrometheusProxy(prometheus)
    rig.add("steady", "istio-ingressgateway", "istio-ingressgateway-asm", bake="1s", action="hold", after=10_000)
    try:
        rig.configure(proxy.url, prometheus_timeout_seconds=TIMEOUT_SECONDS)
        service = rig.start()
        wait_for(lambda: rig.weight("steady") >= 5, timeout=60, what="the rollout to start")
        for fault in (Fault.SLOW, Fault.ERROR_500, Fault.MALFORMED):
            violations = one_fault(rig, service, proxy, fault)
            scenario.run(violations)
            assert not violations, violations
            assert proxy.answered[fault] > 0
        last = rig.weight("steady")
        wait_for(lambda: rig.weight("steady") > last, timeout=60, what="a raise after the last fault")
        assert f"Bearer {SECRETS['prometheus token']}" in proxy.authorizations  # the token was in use
    finally:
        proxy.close()
