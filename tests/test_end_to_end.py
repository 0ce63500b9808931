"""``gateway-canary run`` as a subprocess: real Prometheus, Alertmanager and kube-apiserver.

The controller runs as a ServiceAccount bound only to the Role ``gateway-canary rbac`` prints.

Traffic follows the weight annotations the controller writes (the exporter reads them), so the
ASM gateway only gets requests once the controller gives it weight, as behind a real CLB.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from controller.core.cloud import BackendMode, Backends
from tests.ccm_emulator import CcmEmulator
from tests.kube_cluster import CLB, Cluster
from tests.kube_cluster import SOURCE as SRC
from tests.kube_cluster import TARGET as TGT
from tests.servers import (
    MEASURED,
    STATE,
    WEIGHT,
    LaggedShare,
    ManagedProcess,
    TrafficExporter,
    WebhookSink,
    free_port,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[1]

POLICY = """\
apiVersion: gateway-canary.io/v1alpha1
kind: CanaryPolicy
metadata:
  name: {name}
spec:
  source: {{service: {ns}/istio-ingressgateway, workload: {source}}}
  target: {{service: {ns}/istio-ingressgateway-asm, workload: {target}}}
  schedule:
    steps: {steps}
    bakeTime: {bake}
  analysis:
    interval: 1s
    window: 10s
    minRequests: 10
    failureThreshold: 2
  gates:
    errorRate: {{max: 0.05}}
    latency: {{p99Ms: {{max: 900}}}}
  routes: {{check: false}}   # no Istio Gateways here; route parity has its own end-to-end test
  alerts:
    - type: webhook
      name: e2e
      url: {hook}
"""


class Controller(ManagedProcess):
    """A ``gateway-canary run`` process and its JSON log."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.http_port = int(env["GATEWAY_CANARY_HTTP_PORT"])
        super().__init__([sys.executable, "-m", "controller", "run"], log, env=env, cwd=ROOT)

    def lines(self) -> list[dict]:
        out = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def get(self, path: str) -> requests.Response | None:
        try:
            return requests.get(f"http://127.0.0.1:{self.http_port}{path}", timeout=1)
        except requests.RequestException:
            return None


@pytest.fixture
def setup(
    kube: Cluster,
    traffic: TrafficExporter,
    gateways: tuple[str, str],
    prometheus: str,
    alertmanager: str,
    tmp_path: Path,
) -> Iterator[dict]:
    kube.add_gateways()
    kube.grant(*(kube.policy(name=name) for name in ("e2e-resume", "e2e-secrets", "e2e-rollback")))

    # The cloud (EMULATED: tests/ccm_emulator.py) confirms each weight change with its Events and
    # applies it to the CLB; the traffic follows the CLB's applied weights over 20 nodes, a little late.
    ccm = CcmEmulator(kube.plane, kube.ns, lag=0.2)
    ccm.__enter__()
    for name in (TGT, SRC):
        ccm.provision(name, Backends(BackendMode.CLUSTER, nodes=20))
    traffic.share = LaggedShare(ccm.clb_target_share, 0.5)
    traffic.move_to(kube.ns)
    sink = WebhookSink()
    policies = tmp_path / "policies"
    policies.mkdir()
    env = {
        **os.environ,
        "GATEWAY_CANARY_POLICIES_DIR": str(policies),
        "GATEWAY_CANARY_PROMETHEUS_URL": prometheus,
        "GATEWAY_CANARY_KUBECONFIG": str(kube.write_kubeconfig()),
        "GATEWAY_CANARY_NAMESPACE": kube.ns,
        "GATEWAY_CANARY_ALERTMANAGER_URL": alertmanager,
        "GATEWAY_CANARY_HTTP_HOST": "127.0.0.1",
        "GATEWAY_CANARY_HTTP_PORT": str(free_port()),
        "GATEWAY_CANARY_LOG_FORMAT": "json",
        "GATEWAY_CANARY_RELOAD_INTERVAL_SECONDS": "0.5",
    }
    started: list[Controller] = []

    def start() -> Controller:
        controller = Controller(env, tmp_path / f"controller-{len(started)}.log")
        started.append(controller)
        return controller

    def write_policy(name: str, steps: str, bake: str, hook: str) -> None:
        text = POLICY.format(
            ns=kube.ns, name=name, steps=steps, bake=bake, source=gateways[0], target=gateways[1], hook=hook
        )
        (policies / "e2e.yaml").write_text(text)

    yield {
        "write_policy": write_policy,
        "kube": kube,
        "traffic": traffic,
        "policies": policies,
        "sink": sink,
        "start": start,
        "env": env,
        "tmp": tmp_path,
    }
    for controller in started:
        controller.stop(signal.SIGKILL)
    sink.close()
    ccm.__exit__(None, None, None)


def target_weight(kube: Cluster) -> int:
    return int(kube.annotations(TGT)[WEIGHT])


def test_weight_climbs_then_rolls_back_to_zero_with_alert(setup: dict, alert_sink: WebhookSink) -> None:
    kube, traffic, sink = setup["kube"], setup["traffic"], setup["sink"]
    setup["write_policy"]("e2e-rollback", "[10, 25, 50, 100]", "3s", f"{sink.url}/hook/s3cr3t-webhook-token")
    controller = setup["start"]()
    wait_for(lambda: (controller.get("/readyz") or requests.Response()).status_code == 200, timeout=30, what="/readyz")
    wait_for(lambda: target_weight(kube) >= 25, timeout=60, interval=0.1, what="the weight to climb to 25")
    assert kube.weight_writes(TGT, WEIGHT)[:2] == ["10", "25"]
    # the source's patch follows the target's (a few ms later)
    wait_for(lambda: kube.annotations(SRC)[WEIGHT] == "75", timeout=5, what="the source to follow at 75")

    traffic.target.error_ratio = 0.5
    injected = time.monotonic()
    wait_for(lambda: target_weight(kube) == 0, timeout=60, interval=0.05, what="the rollback to weight 0")
    rollback_seconds = time.monotonic() - injected
    # one figure of it; bench/rollback.py measures it against the floor, many times
    MEASURED.setdefault("5xx injection -> target weight 0 (1 s checks, 10 s window, threshold 2)", []).append(
        rollback_seconds
    )
    assert kube.annotations(SRC)[WEIGHT] == "100"
    state = wait_for(lambda: (s := kube.state("e2e-rollback")) and s["pending"] is None and s, timeout=10)
    assert state["phase"] == "RolledBack" and state["last_failed_gate"] == "errorRate"
    # the gateway Services received weight changes and nothing else (the state has its own object)
    assert kube.patches and all(set(annotations) == {WEIGHT} for annotations in kube.service_patches())

    delivered = wait_for(
        lambda: [
            a
            for body in alert_sink.bodies("/alertmanager")
            for a in body["alerts"]
            if a["labels"].get("policy") == "e2e-rollback" and a["labels"]["alertname"] == "GatewayCanaryRolledBack"
        ],
        timeout=30,
        what="the rollback alert through Alertmanager",
    )
    assert delivered[0]["annotations"]["failing_gate"] == "errorRate"
    assert float(delivered[0]["annotations"]["value"]) > 0.05
    hook = wait_for(
        lambda: [b for b in sink.bodies("/hook/s3cr3t-webhook-token") if b["kind"] == "RolledBack"],
        timeout=20,
        what="the webhook alert",
    )
    assert hook[0]["weightsBefore"]["target"] >= 25 and hook[0]["weightsAfter"] == {"target": 0, "source": 100}
    assert hook[0]["target"]["errorRate"] > 0.05 and hook[0]["source"]["requests"] > 0

    reasons = [(e["type"], e["reason"]) for e in kube.events]
    assert ("Normal", "Started") in reasons and ("Normal", "WeightRaised") in reasons
    assert ("Warning", "RolledBack") in reasons

    metrics = controller.get("/metrics")
    assert metrics is not None and 'gateway_canary_target_weight{policy="e2e-rollback"} 0.0' in metrics.text
    assert 'gateway_canary_rollbacks_total{policy="e2e-rollback"} 1.0' in metrics.text
    assert 'gateway_canary_gate_threshold{gate="errorRate",policy="e2e-rollback"} 0.05' in metrics.text
    assert 'gateway_canary_notifications_total{kind="RolledBack",outcome="delivered",receiver="webhook:e2e"} 1.0' in (
        metrics.text
    )
    assert "gateway_canary_oldest_undelivered_alert_seconds 0.0" in metrics.text

    checks = [line for line in controller.lines() if line.get("event") == "check"]
    assert checks and all(line["policy"] == "e2e-rollback" for line in checks)
    assert any(line["verdict"] == "FAIL" and line["target"]["errorRate"] > 0.05 for line in checks)
    assert controller.stop() == 0
    assert any(line.get("event") == "stopped" for line in controller.lines())
    assert "s3cr3t" not in controller.log.read_text()  # receiver URLs are secrets


class Annotator(threading.Thread):
    """Another client (like ``kubectl annotate --overwrite`` in a loop) writing its own annotation
    on both Services every 50 ms while the controller works."""

    KEY = "team.example.com/last-touch"

    def __init__(self, kube: Cluster) -> None:
        super().__init__(daemon=True)
        self.kube, self.count, self.done = kube, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.count += 1
            for name in (TGT, SRC):
                self.kube.edit(name, {self.KEY: str(self.count)})

    def stop(self) -> int:
        self.done.set()
        self.join(10)
        return self.count


def test_killed_controller_resumes_at_its_step_beside_a_concurrent_writer(setup: dict) -> None:
    kube = setup["kube"]
    setup["write_policy"]("e2e-resume", "[10, 20, 30, 100]", "4s", f"{setup['sink'].url}/hook")
    annotator = Annotator(kube)
    annotator.start()
    first = setup["start"]()
    wait_for(lambda: target_weight(kube) == 20, timeout=60, interval=0.1, what="the weight to reach 20")
    before = kube.state("e2e-resume")
    first.stop(signal.SIGKILL)
    writes_before = len(kube.patches)

    second = setup["start"]()
    wait_for(lambda: target_weight(kube) == 30, timeout=60, interval=0.1, what="the resumed controller to reach 30")
    after_restart = [p for _, p in kube.patches[writes_before:]]
    # the target's writes (the source's of the last step may still be finished by the new controller,
    # when the kill came between the two)
    target_weights = [
        p["metadata"]["annotations"][WEIGHT]
        for name, p in kube.patches[writes_before:]
        if name == TGT and WEIGHT in p["metadata"]["annotations"]
    ]
    assert target_weights[0] == "30"  # no restart from 10, no drop to 0
    # the transition is logged just after the write lands: wait for the line, do not race it
    transitions = wait_for(
        lambda: [line["action"] for line in second.lines() if line.get("event") == "transition"],
        timeout=10,
        what="the resumed controller's first transition in its log",
    )
    assert "Start" not in transitions and transitions[0] == "Advance"
    first_check = next(line for line in second.lines() if line.get("event") == "check")
    assert first_check["target_weight"] == 20
    assert all(set(p["metadata"]["annotations"]) == {WEIGHT} for p in after_restart)
    assert before is not None and before["target_weight"] == 20 and before["phase"] == "Progressing"
    assert second.stop() == 0
    touches = annotator.stop()
    assert touches > 20
    for name in (TGT, SRC):  # neither writer lost the other's annotations
        assert kube.annotations(name)[Annotator.KEY] == str(touches)
    assert kube.state("e2e-resume")["target_weight"] == 30 and STATE not in kube.annotations(TGT)
    assert not any(e["reason"] in ("Paused", "WeightChangedExternally") for e in kube.events)


SECRET = "s3cr3t"  # every secret below contains it; no output may


def test_no_secret_reaches_any_log_line_alert_event_state_or_metric(
    setup: dict, alert_sink: WebhookSink, prometheus: str
) -> None:
    """A noisy rollout (a refusal, an unreachable Prometheus, a rollback) with secrets everywhere."""
    kube, traffic, sink, env = setup["kube"], setup["traffic"], setup["sink"], setup["env"]
    kube.add_service("dead-gw", {**CLB, WEIGHT: "100"})
    kube.add_service("dead-gw-asm", {**CLB, WEIGHT: "0"})
    kube.grant(kube.policy(name="e2e-secrets"), kube.policy("dead-gw", "dead-gw-asm", name="e2e-dead"))
    host = prometheus.removeprefix("http://")
    env.update(
        {
            "GATEWAY_CANARY_PROMETHEUS_URL": f"http://canary:PROMPASS-{SECRET}@{host}",
            "GATEWAY_CANARY_PROMETHEUS_TOKEN": f"PROMTOKEN-{SECRET}",
            "GATEWAY_CANARY_WEBHOOK_URL": f"{sink.url}/global/GLOBALPATH-{SECRET}?token=GLOBALQ-{SECRET}",
            "GATEWAY_CANARY_POLICY_HOOK": f"{sink.url}/hook/POLICYPATH-{SECRET}?key=POLICYQ-{SECRET}",
            "GATEWAY_CANARY_POLICY_DEAD_TOKEN": f"DEADTOKEN-{SECRET}",
            "HOME_SECRET": f"NOTALLOWED-{SECRET}",
        }
    )
    setup["write_policy"]("e2e-secrets", "[10, 25, 50, 100]", "2s", f"{sink.url}/inline/INLINEPATH-{SECRET}")
    dead_port = free_port()
    (setup["policies"] / "dead.yaml").write_text(
        f"""\
metadata: {{name: e2e-dead}}
spec:
  source: {{service: {kube.ns}/dead-gw}}
  target: {{service: {kube.ns}/dead-gw-asm}}
  schedule: {{steps: [10, 100]}}
  analysis: {{interval: 1s, onMetricsUnavailable: {{action: hold, afterChecks: 2}}}}
  gates: {{errorRate: {{max: 0.05}}}}
  prometheus:
    url: http://user:DEADPASS-{SECRET}@127.0.0.1:{dead_port}/prom?t=DEADQ-{SECRET}
    tokenFromEnv: GATEWAY_CANARY_POLICY_DEAD_TOKEN
  alerts:
    - {{type: webhook, urlFromEnv: GATEWAY_CANARY_POLICY_HOOK}}
    - {{type: webhook, name: sneaky, urlFromEnv: HOME_SECRET}}
"""
    )
    controller = setup["start"]()
    wait_for(lambda: target_weight(kube) >= 25, timeout=60, interval=0.1, what="the rollout to reach 25")
    traffic.target.error_ratio = 0.5
    wait_for(lambda: target_weight(kube) == 0, timeout=60, interval=0.1, what="the rollback")
    wait_for(lambda: [b for b in sink.bodies() if b.get("kind") == "RolledBack"], timeout=30, what="the alert")
    wait_for(
        lambda: [b for b in sink.bodies() if b.get("kind") == "StuckInconclusive" and b["policy"] == "e2e-dead"],
        timeout=30,
        what="the dead Prometheus to be reported",
    )
    refused = [b for b in sink.bodies() if b.get("kind") == "PolicyRefused" and b["policy"] == "e2e-dead"]
    assert refused and "HOME_SECRET may not be read by a policy" in refused[0]["reason"]
    metrics = controller.get("/metrics")
    assert metrics is not None
    assert controller.stop() == 0

    outputs = {
        "log": controller.log.read_text(),
        "webhook bodies": json.dumps(sink.bodies()),
        "webhook headers": json.dumps([headers for _, headers in sink.headers]),
        "alertmanager": json.dumps(alert_sink.bodies("/alertmanager")),
        "events": json.dumps(kube.events),
        "state objects": json.dumps([kube.state("e2e-secrets"), kube.state("e2e-dead")]),
        "annotations": json.dumps([kube.annotations(name) for name in (TGT, SRC, "dead-gw", "dead-gw-asm")]),
        "metrics": metrics.text,
    }
    # the secrets were in use (requests went to the secret paths) and their URLs were said, shortened
    paths = [path for path, _ in sink.received]
    assert any(f"GLOBALPATH-{SECRET}" in p for p in paths) and any(f"POLICYPATH-{SECRET}" in p for p in paths)
    assert any(f"INLINEPATH-{SECRET}" in p for p in paths)
    said = " ".join(json.dumps(line) for line in controller.lines())
    assert f"Prometheus at http://127.0.0.1:{dead_port}/\\u2026 unreachable" in said
    leaked = {where: text.count(SECRET) for where, text in outputs.items() if SECRET in text}
    assert leaked == {}, leaked
    assert sum(1 for line in outputs["log"].splitlines() if "Retrying" in line) == 0  # urllib3's noise is off
    assert all(line.startswith("{") for line in outputs["log"].splitlines() if line.strip())  # all JSON
