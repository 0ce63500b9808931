"""The on-call commands against a running controller: real kube-apiserver, real Prometheus.

The controller runs in-process (``ControllerService``, as its ServiceAccount); the commands run
as an administrator's kubeconfig through the CLI's entry point, as a person at a terminal would.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.adapters.kube_api import build_api_client
from controller.adapters.kube_state import KubernetesStateStore
from controller.adapters.kubernetes import KubernetesGatewayPair
from controller.adapters.prometheus import PrometheusMetricsSource
from controller.cli import kubectl_plugin, main
from controller.core.commands import COMMAND_ANNOTATION
from controller.core.state import decode_state
from controller.runtime.clock import SystemClock
from controller.runtime.service import ControllerService
from controller.settings import PrometheusConnection, Settings
from tests.conftest import kubectl_binary
from tests.helpers import make_policy
from tests.kube_cluster import Cluster
from tests.servers import MEASURED, WEIGHT, TrafficExporter, WebhookSink, wait_for

SRC, TGT = "istio-ingressgateway", "istio-ingressgateway-asm"
POLICY = """\
metadata: {{name: shop, labels: {{env: test}}}}
spec:
  source: {{service: {ns}/{src}, workload: {sw}}}
  target: {{service: {ns}/{tgt}, workload: {tw}}}
  schedule: {{steps: [10, 50, 100], bakeTime: 2s, approvalAt: [50]}}
  analysis: {{interval: 1s, window: 10s, minRequests: 10, failureThreshold: 40}}
  gates: {{errorRate: {{max: 0.05}}}}
"""


@pytest.fixture
def rig(
    kube: Cluster, traffic: TrafficExporter, gateways: tuple[str, str], prometheus: str, tmp_path: Path
) -> Iterator[dict[str, Any]]:
    kube.add_gateways()
    traffic.share = kube.target_share
    traffic.move_to(kube.ns)
    traffic.target.error_ratio = 0.0
    sink = WebhookSink()
    kube.grant(make_policy("shop", source={"service": f"{kube.ns}/{SRC}"}, target={"service": f"{kube.ns}/{TGT}"}))
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "shop.yaml").write_text(POLICY.format(ns=kube.ns, src=SRC, tgt=TGT, sw=gateways[0], tw=gateways[1]))
    settings = Settings(
        policies_dir=policies,
        reload_interval_seconds=0.5,
        http_host="127.0.0.1",
        http_port=0,
        webhook_url=f"{sink.url}/global",
        prometheus_url=prometheus,
        namespace=kube.ns,
        command_poll_seconds=0.2,
        status_refresh_seconds=0,
    )
    api = build_api_client(kube.write_kubeconfig())
    made: list[ControllerService] = []

    def start() -> ControllerService:
        service = ControllerService(
            settings,
            pair=KubernetesGatewayPair(api, state_namespace=kube.ns),
            store=KubernetesStateStore(api, kube.ns),
            metrics_for=lambda policy: PrometheusMetricsSource(PrometheusConnection(settings, None)),
            clock=SystemClock(),
        )
        made.append(service)
        service.start()
        return service

    admin = tmp_path / "admin.kubeconfig"
    admin.write_text(kube.admin_kubeconfig())
    yield {"kube": kube, "traffic": traffic, "sink": sink, "start": start, "admin": admin, "policies": policies}
    for service in made:
        service.stop()
    sink.close()


def cli(rig: dict[str, Any], capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run a CLI command as the administrator; (exit code, stdout + stderr)."""
    code = main([*args, "--kubeconfig", str(rig["admin"]), "-n", rig["kube"].ns])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def weight(kube: Cluster) -> int:
    return int(kube.annotations(TGT)[WEIGHT])


def state(kube: Cluster) -> dict[str, Any]:
    stored = kube.state("shop")
    assert stored is not None
    return stored


def checks_seen(kube: Cluster) -> str:
    status = json.loads(kube.configmap("gateway-canary-shop")["data"]["status"])
    return str((status.get("lastCheck") or {}).get("at"))


def kinds(sink: WebhookSink) -> list[str]:
    return [body["kind"] for body in sink.bodies("/global")]


def test_pause_resume_approve_promote_abort_retry_against_a_running_controller(
    rig: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    kube, traffic, sink = rig["kube"], rig["traffic"], rig["sink"]
    rig["start"]()
    wait_for(lambda: weight(kube) == 10, timeout=60, what="the rollout to start at 10")

    # pause holds the weight: several checks later it is still 10
    given = time.monotonic()
    code, out = cli(rig, capsys, "pause", "shop", "--by", "alice")
    MEASURED.setdefault("command given -> answered (poll 0.2s, interval 1s)", []).append(time.monotonic() - given)
    assert code == 0 and "pause shop: applied" in out
    assert state(kube)["phase"] == "Paused"
    assert state(kube)["history"][-1]["action"] == "Pause" and state(kube)["history"][-1]["by"] == "alice"
    seen = {checks_seen(kube)}
    wait_for(lambda: seen.add(checks_seen(kube)) or len(seen) >= 4, timeout=30, what="three more checks")
    assert weight(kube) == 10 and state(kube)["phase"] == "Paused"

    # resume continues; the raise to 50 waits for an approval, said once
    code, out = cli(rig, capsys, "resume", "shop", "--by", "alice")
    assert code == 0 and "resume shop: applied" in out
    wait_for(lambda: state(kube)["awaiting"] == 50, timeout=30, what="the wait for approval at 50")
    code, out = cli(rig, capsys, "status", "shop")
    assert code == 0 and "waiting: approval" in out and "approvalAt 50" in out
    seen = {checks_seen(kube)}
    wait_for(lambda: seen.add(checks_seen(kube)) or len(seen) >= 4, timeout=30, what="checks while waiting")
    assert weight(kube) == 10 and kinds(sink).count("AwaitingApproval") == 1

    code, out = cli(rig, capsys, "approve", "shop", "--by", "bob")
    assert code == 0 and "approve shop: applied: approved the raise to 50" in out
    wait_for(lambda: weight(kube) == 50, timeout=30, what="the raise to 50 after the approval")

    # promote --full is refused while the checks fail, and reaches 100 only after a pass
    traffic.target.error_ratio = 0.5
    wait_for(lambda: state(kube)["last_verdict"] == "FAIL", timeout=40, what="a failing check")
    code, out = cli(rig, capsys, "promote", "shop", "--full", "--yes")
    assert code == 1 and "rejected" in out and "passing check" in out
    assert weight(kube) == 50
    traffic.target.error_ratio = 0.0
    wait_for(lambda: state(kube)["last_verdict"] == "PASS", timeout=60, what="checks passing again")
    code, out = cli(rig, capsys, "promote", "shop", "--full", "--yes")
    assert code == 0 and "promote shop: applied" in out
    wait_for(lambda: weight(kube) == 100, timeout=30, what="the promotion to 100")
    assert state(kube)["phase"] == "Promoted"

    # abort after promotion rolls back to 0 and alerts
    code, out = cli(rig, capsys, "abort", "shop")
    assert code == 0 and "abort shop: applied" in out
    wait_for(lambda: weight(kube) == 0, timeout=30, what="the abort's rollback to 0")
    aborted = [entry for entry in state(kube)["history"] if entry["action"] == "Rollback"]
    assert aborted and aborted[-1]["by"] not in ("gateway-canary", "operator")  # the administrator's name
    assert kube.annotations(SRC)[WEIGHT] == "100"
    wait_for(lambda: "RolledBack" in kinds(sink), timeout=20, what="the rollback alert")
    rolled = [body for body in sink.bodies("/global") if body["kind"] == "RolledBack"]
    assert "aborted by an operator" in rolled[0]["reason"] and rolled[0]["runbookUrl"].endswith("#rolled-back")

    # a pipeline waiting on the rollout learns it rolled back: --watch exits 1 at once
    code, out = cli(rig, capsys, "status", "shop", "--watch", "--timeout", "30s")
    assert code == 1 and "RolledBack" in out
    # status says RolledBack (exit 1); -o json gives the stored state, which decodes back
    code, out = cli(rig, capsys, "status", "shop", "-o", "json")
    assert code == 1
    shown = json.loads(out)
    stored = kube.configmap("gateway-canary-shop")["data"]["state"]
    assert decode_state(json.dumps(shown["state"])) == decode_state(stored)
    assert shown["status"]["phase"] == "RolledBack"

    # retry starts again from the first step
    code, out = cli(rig, capsys, "retry", "shop")
    assert code == 0 and "retry shop: applied" in out
    wait_for(lambda: weight(kube) == 10, timeout=60, what="the retried rollout to start at 10")

    # every command is in the history (who, what) and is an Event
    retried = state(kube)["history"]
    assert any(entry["action"] == "Retry" and entry["by"] not in ("gateway-canary", "operator") for entry in retried)
    reasons = [event["reason"] for event in kube.events]
    for command in ("Pause", "Resume", "Approve", "Promote", "Abort", "Retry"):
        assert f"Command{command}" in reasons
    code, out = cli(rig, capsys, "status")
    assert code == 0 and "shop" in out and "Progressing" in out


def test_a_command_without_a_controller_times_out_and_is_taken_back(
    rig: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    kube = rig["kube"]
    service = rig["start"]()
    wait_for(lambda: weight(kube) == 10, timeout=60, what="the rollout to start at 10")
    service.stop()

    code, out = cli(rig, capsys, "pause", "shop", "--wait", "2s")
    assert code == 3 and "no answer from a controller within 2s" in out and "taken back" in out
    code, out = cli(rig, capsys, "status", "shop", "--watch", "--timeout", "1s")
    assert code == 3 and "--timeout 1s passed" in out  # still Progressing: a pipeline stops waiting
    annotations = kube.configmap("gateway-canary-shop")["metadata"].get("annotations") or {}
    assert COMMAND_ANNOTATION not in annotations
    code, out = cli(rig, capsys, "pause", "nosuch")
    assert code == 2 and "no state object gateway-canary-nosuch" in out


def test_kubectl_annotate_and_the_kubectl_plugin_work_without_the_cli(
    rig: dict[str, Any], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    kube = rig["kube"]
    rig["start"]()
    wait_for(lambda: weight(kube) == 10, timeout=60, what="the rollout to start at 10")
    kubectl = kubectl_binary()
    env = {
        "HOME": str(tmp_path),
        "KUBECONFIG": str(rig["admin"]),
        "PATH": f"{Path(__file__).parents[1] / '.venv' / 'bin'}:/usr/bin:/bin",
    }
    # the runbook's line, exactly: a bare command word on the state object
    annotate = [
        str(kubectl), "-n", kube.ns, "annotate", "configmap", "gateway-canary-shop",
        f"{COMMAND_ANNOTATION}=pause", "--overwrite",
    ]  # fmt: skip
    subprocess.run(annotate, env=env, check=True, capture_output=True, timeout=30)
    wait_for(lambda: state(kube)["phase"] == "Paused", timeout=30, what="the annotated pause")
    answered = state(kube)["last_command"]
    assert answered["command"] == "pause" and answered["applied"] and answered["by"] == "kubectl annotate"

    # kubectl finds the plugin on PATH (KUBECONFIG honoured, -n given as to kubectl)
    plugin = subprocess.run(
        [str(kubectl), "gateway-canary", "status", "shop", "-n", kube.ns],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert plugin.returncode == 0, plugin.stderr
    assert "shop" in plugin.stdout and "Paused" in plugin.stdout
    # and the entry point itself, with --context as kubectl users give it
    context = yaml.safe_load(rig["admin"].read_text())["contexts"][0]["name"]
    code = kubectl_plugin(
        ["status", "--kubeconfig", str(rig["admin"]), "--context", context, "-n", kube.ns, "-o", "yaml"]
    )
    out = capsys.readouterr().out
    assert code == 0 and "phase: Paused" in out


VERIFYING = """\
metadata: {{name: shop}}
spec:
  source: {{service: {ns}/{src}, workload: {sw}}}
  target: {{service: {ns}/{tgt}, workload: {tw}}}
  schedule:
    steps: [{{weight: 50, bakeTime: 2s}}]
    bakeTime: 1h
    advanceWindows: {{timeZone: UTC, windows: [{{hours: "00:00-24:00"}}], freezeDates: [{frozen}]}}
  promotion: {{verifyFor: 4s}}
  analysis: {{interval: 1s, window: 10s, minRequests: 10, failureThreshold: 2}}
  gates: {{errorRate: {{max: 0.05}}}}
"""


def test_a_window_per_step_bake_and_post_promotion_verification_end_to_end(
    rig: dict[str, Any], capsys: pytest.CaptureFixture[str], gateways: tuple[str, str]
) -> None:
    kube, traffic, sink = rig["kube"], rig["traffic"], rig["sink"]
    policy_file = rig["policies"] / "shop.yaml"
    fields = {"ns": kube.ns, "src": SRC, "tgt": TGT, "sw": gateways[0], "tw": gateways[1]}
    today = datetime.now(UTC).date().isoformat()
    policy_file.write_text(VERIFYING.format(frozen=f'"{today}"', **fields))
    rig["start"]()

    # a freeze date holds the start, saying so in status; the weight stays 0
    def waiting() -> dict[str, Any]:
        return dict(json.loads(kube.configmap("gateway-canary-shop")["data"]["status"])["waiting"])

    wait_for(lambda: kube.state("shop") and waiting()["kind"] == "window", timeout=30, what="the window hold")
    assert "a freeze date" in waiting()["reason"] and weight(kube) == 0
    code, out = cli(rig, capsys, "status", "shop")
    assert code == 0 and "waiting: window" in out and "freeze date" in out

    # lifting the freeze (no restart of the evidence: windows do not steer it) lets it start; the
    # step's own 2s bake, then 100, verified for 4s of passing checks before it is Promoted
    policy_file.write_text(VERIFYING.format(frozen="", **fields))
    wait_for(lambda: weight(kube) == 50, timeout=30, what="the start at 50")
    wait_for(lambda: weight(kube) == 100, timeout=30, what="the raise to 100")
    assert state(kube)["phase"] == "Verifying" and "Promoted" not in kinds(sink)
    wait_for(lambda: state(kube)["phase"] == "Promoted", timeout=30, what="the verification to pass")
    wait_for(lambda: "Promoted" in kinds(sink), timeout=20, what="the Promoted alert")
    assert kinds(sink).count("Promoted") == 1

    # again, and this time the ASM gateway fails at 100: back to the last step's split, then to 0
    assert cli(rig, capsys, "abort", "shop")[0] == 0
    wait_for(lambda: weight(kube) == 0, timeout=30, what="the abort")
    assert cli(rig, capsys, "retry", "shop")[0] == 0
    wait_for(lambda: weight(kube) == 100 and state(kube)["phase"] == "Verifying", timeout=60, what="verifying again")
    traffic.target.error_ratio = 0.5
    wait_for(lambda: weight(kube) == 0, timeout=60, what="the rollback after the step back")
    writes = kube.weight_writes(TGT, WEIGHT)
    assert writes[-3:] == ["100", "50", "0"]  # stepped back to the last step's split, then rolled back
    assert state(kube)["phase"] == "RolledBack"
    stepped = [b for b in sink.bodies("/global") if b["kind"] == "RolledBack" and "stepped back" in b["reason"]]
    assert stepped and stepped[0]["severity"] == "critical"


def test_the_operator_is_who_the_api_server_says(kube: Cluster) -> None:
    """Without --by, a command is recorded under the name the API server authenticates (a
    SelfSubjectReview), before the kubeconfig's user name: here the ServiceAccount's full name."""
    from controller.adapters.operator import KubernetesOperator

    operator = KubernetesOperator(build_api_client(kube.write_kubeconfig()), kube.ns)
    try:
        assert operator.who_am_i() == kube.controller_user
    finally:
        operator.close()
