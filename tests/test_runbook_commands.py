"""Every command line of docs/runbook.md's bash blocks, executed, in document order.

The lines are read from the runbook itself (a new line there is run here without a change to this
file) and run with ``bash -o pipefail -c LINE`` from the repository root, as on-call would at a
terminal: ``gateway-canary`` and ``kubectl-gateway_canary`` from the venv, the pinned ``kubectl``
and ``helm`` (symlinked under those names), ``KUBECONFIG`` an administrator's kubeconfig with two
contexts (its current one and ``asm-control-plane``, both the test API server), ``HOME`` a
temporary directory.

The environment is the runbook's: namespaces ``istio-system`` and ``gateway-canary`` on the real
test kube-apiserver; in ``istio-system`` the two gateway Services with their CLB annotations, the
old gateway's Deployment, an IstioGateway ``ingressgateway-asm`` and the Istio Gateways that bind
the shop's host to each gateway (route parity holds, so ``preflight`` passes); the Helm release
``canary`` of charts/gateway-canary in ``gateway-canary`` (its Deployment runs no pod: there is no
controller-manager; it gives ``scale``, ``rollout restart`` and the label selectors an object); the
cloud controller EMULATED (tests/ccm_emulator.py: ``EnsuredLoadBalancer`` Events, the CLB's applied
weights, which the simulated gateways' traffic follows); and the controller running in-process as
the chart's ServiceAccount, for the policy ``shop-ingress`` from a copy of
policies/shop-ingress.yaml with short timings (``_test_policy``), against real Prometheus, elected
leader on the chart's Lease (``canary-gateway-canary``, through the chart's Lease RBAC). Also
``ingress``: the namespace of the other policy in policies/, which ``gateway-canary rbac policies/
| kubectl apply -f -`` writes Roles to (without it that line fails: namespace not found).
Everything created is deleted afterwards, cluster-scoped objects included.

What a line must do:

- never a usage error (``Usage``, ``No such option``, kubectl's ``unknown flag``/``unknown
  command``/``error: unknown``);
- exit 0, or an exit code that is an answer, named by pattern in ``ANSWERS`` with what its output
  then shows (a ``status`` exits 1 only while the policy is RolledBack, a command only when it
  prints "rejected", ...). A ``gateway-canary`` command never exits 3 (no answer): the controller
  runs. The exception is ``status --watch`` with its timeout, which the line's own comment names;
- show what the runbook says it shows, for the reads named in ``SHOWS`` (and the fields a
  ``status -o json`` line's comment names are in its output: ``check_json_paths``).

Substitutions, the only ones: ``--timeout 2h`` runs as ``--timeout 5s`` (the watch would otherwise
last two hours); ``/tmp/`` is the test's temporary directory (the two lines that write and read
``/tmp/shop.yaml`` keep their pairing, and nothing is written outside the test's directory). If
``jq`` were missing on the machine, a stand-in that pretty-prints the whole JSON (``python -m
json.tool``, the filter ignored) would be put on PATH: the pipeline's shape is still run.

Lines not run (``NOT_RUN``): the Alibaba Cloud CLI (``aliyun ...``), which needs an AccessKey and
the real cloud.

After some lines the test checks what they did (``_after``): an applied ``abort`` leaves the ASM
gateway at 0 and the old one at 100, and the cloud confirms both after it (``EnsuredLoadBalancer``);
an applied ``retry``/``pause``/``resume`` changes the phase; a ``kubectl annotate`` command is
answered by the controller and taken off the state object. At the end: every command word given
has its Event on the ASM Service, the IstioGateway holds the weight written, the chart's Deployment
was scaled and restarted, the Helm history has the upgrades. It prints a ``MEASURED`` line (lines
run, seconds) and leaves every line's full output in ``transcript.txt`` in its temporary directory.

The RBAC lines must be about the identity the can-i line checks (they once were not):
``test_the_rbac_apply_line_binds_the_account_the_can_i_line_checks``.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from controller.adapters.cloud import KubernetesCloudInspector
from controller.adapters.kube_api import build_api_client
from controller.adapters.kube_lease import KubernetesLeaseStore
from controller.adapters.kube_state import KubernetesStateStore
from controller.adapters.kubernetes import KubernetesGatewayPair
from controller.adapters.prometheus import PrometheusMetricsSource
from controller.core.cloud import BackendMode, Backends
from controller.core.commands import COMMAND_ANNOTATION
from controller.core.lease import LeaseTiming
from controller.runtime.clock import SystemClock
from controller.runtime.leader import LeaderElector
from controller.runtime.service import ControllerService
from controller.settings import PrometheusConnection, Settings
from tests.ccm_emulator import CcmEmulator
from tests.conftest import ISTIO_GATEWAY_GROUP, TEST_BIN
from tests.kube_cluster import SOURCE, TARGET, Cluster, ControlPlane, binary_paths
from tests.servers import MEASURED, WEIGHT, TrafficExporter, WebhookSink, wait_for

ROOT = Path(__file__).resolve().parents[1]
RUNBOOK = ROOT / "docs" / "runbook.md"
SHIPPED_POLICY = ROOT / "policies" / "shop-ingress.yaml"
CHART = ROOT / "charts" / "gateway-canary"

GATEWAYS_NS, CONTROLLER_NS = "istio-system", "gateway-canary"
POLICY, RELEASE = "shop-ingress", "canary"
CHART_ACCOUNT = f"{RELEASE}-gateway-canary"  # the chart's full name: its ServiceAccount and Deployment
STATE_OBJECT = f"gateway-canary-{POLICY}"
ISTIO_GATEWAY = "ingressgateway-asm"
ASM_CONTEXT = "asm-control-plane"
SHOP_HOST = "shop.example.com"
LINE_TIMEOUT = 90.0  # seconds per line: a command waits up to its --wait (60s) for an answer

#: (a line matches, the substitute): the only changes made to a line before it runs.
SUBSTITUTIONS: tuple[tuple[str, str], ...] = (
    (r"--timeout 2h\b", "--timeout 5s"),  # a watch of two hours; 5s shows the same behaviour
    (r"/tmp/", "{tmp}/"),  # the test's own directory, not the machine's shared /tmp
)

#: Lines that cannot run here, and why; each must still match a runbook line (no stale entries).
NOT_RUN: dict[str, str] = {
    r"^aliyun ": "the Alibaba Cloud CLI against the real cloud, with an AccessKey: neither exists here",
}


@dataclass(frozen=True)
class Answer:
    """An exit code other than 0 that a line may give as its answer, and how its output shows it."""

    line: str  # regex searched in the line (its comment removed)
    code: int
    why: str
    shows: str  # regex searched in the output (stdout, or stdout + stderr when ``stderr``)
    stderr: bool = True


_COMMANDS = r"^(kubectl )?gateway-canary (pause|resume|approve|abort|retry|promote)\b"
ANSWERS: tuple[Answer, ...] = (
    Answer(
        r"^(kubectl )?gateway-canary status\b", 1, "status exits 1 while a policy shown is RolledBack", "RolledBack"
    ),
    Answer(_COMMANDS, 1, "the controller rejected the command (the reason is printed)", r": rejected\b"),
    Answer(
        r"^gateway-canary status\b.*--watch",
        3,
        "--watch gave up at --timeout while the rollout still goes on (the line's comment: 3 still going)",
        r"--timeout \S+ passed",
    ),
    Answer(r"^kubectl auth can-i\b", 1, "kubectl auth can-i answers no with exit 1", r"^no$", stderr=False),
    Answer(r"\| *grep\b", 1, "grep found nothing (no controller pod runs here: no logs)", r"\A\s*\Z", stderr=False),
)

#: What a line that exits 0 shows on stdout, where the runbook's text says what it shows:
#: (the line matches, the output matches). A read that prints nothing useful would pass otherwise.
SHOWS: tuple[tuple[str, str], ...] = (
    (
        r"^(kubectl )?gateway-canary status shop-ingress(?! -o)",
        rf"^{POLICY} +\S+ (Pending|Progressing|Paused|Verifying|Promoted|RolledBack)\b",
    ),
    (r"^gateway-canary status$", rf"^{POLICY} "),
    (r"range \.items\[\*\]", r"\Aistio-ingressgateway\t\d+\nistio-ingressgateway-asm\t\d+\Z"),
    (r"get configmap -l app\.kubernetes\.io/managed-by=gateway-canary", rf"^{STATE_OBJECT} "),
    (r"jsonpath=\{\.data\.(status|state)\}$", r"\A\{.*\}\Z"),
    (r"\| jq \.last_command", r'"command": "\w+"'),
    (r"get deployment istio-ingressgateway", r"^istio-ingressgateway "),
    (r"^kubectl auth can-i", r"\Ayes\Z"),
    (r"get istiogateway ingressgateway-asm -o jsonpath", r"\A\d+\Z"),
    (r"get lease canary-gateway-canary -o jsonpath", r"\Acanary-0\Z"),  # the in-process controller leads
    (r"get lease canary-gateway-canary -o yaml", r"holderIdentity: canary-0"),
    (r"vgroup-port\}$", r"\Arsp-test:80\Z"),
    (r"^gateway-canary preflight", r"every item passed"),
    (r"^gateway-canary migrate-config", r"nothing to migrate"),
    (r"^gateway-canary rbac policies/$", r"^kind: Role$"),
    (r"\| kubectl apply -f -", r"^role\.rbac\.authorization\.k8s\.io/gateway-canary (created|configured|unchanged)"),
    (r"^gateway-canary validate", r"\b1 valid, 0 error"),
    (r"^gateway-canary plan", r"\bEARLIEST\b"),
    (r"^helm upgrade", r"has been upgraded"),
    (r"^helm .*history", r"^1 .*Install complete"),
    (r"scale deployment", rf"deployment\.apps/{CHART_ACCOUNT} scaled"),
    (r"rollout restart deployment", rf"deployment\.apps/{CHART_ACCOUNT} restarted"),
    (r"describe configmap canary-gateway-canary-policies", r"^shop\.yaml:$"),
    (r"get events --field-selector involvedObject\.name=istio-ingressgateway(-asm)? ", r"\bEnsuredLoadBalancer\b"),
)

USAGE_ERRORS = re.compile(r"Usage:|No such option|unknown flag|unknown command|unknown shorthand|error: unknown")


# --- the runbook's lines ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunbookLine:
    number: int  # line number in docs/runbook.md
    text: str  # as written

    @property
    def command(self) -> str:
        """The line without its trailing comment (shlex's reading, re-joined loosely for matching)."""
        words = shlex.split(self.text, comments=True)
        return " ".join(words)


def runbook_lines() -> list[RunbookLine]:
    """Every command line of every ```bash block, in document order (blank and comment lines skipped)."""
    lines: list[RunbookLine] = []
    inside = False
    for number, text in enumerate(RUNBOOK.read_text(encoding="utf-8").splitlines(), start=1):
        if text.startswith("```"):
            inside = text.strip() == "```bash" if not inside else False
            continue
        if inside and shlex.split(text, comments=True):
            lines.append(RunbookLine(number, text))
    return lines


def not_run_reason(line: RunbookLine) -> str | None:
    return next((why for pattern, why in NOT_RUN.items() if re.search(pattern, line.command)), None)


def substituted(line: RunbookLine, tmp: Path) -> str:
    text = line.text
    for pattern, replacement in SUBSTITUTIONS:
        text = re.sub(pattern, replacement.replace("{tmp}", str(tmp)), text)
    return text


# --- the environment ----------------------------------------------------------------------------------


def _namespace(plane: ControlPlane, name: str) -> None:
    plane.call("POST", "/api/v1/namespaces", {"metadata": {"name": name}})


def _deployment(plane: ControlPlane, namespace: str, name: str, labels: dict[str, str]) -> None:
    body = {
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.24.0"}]},
            },
        },
    }
    plane.call("POST", f"/apis/apps/v1/namespaces/{namespace}/deployments", body)


def _istio_gateways(plane: ControlPlane) -> None:
    """The IstioGateway of the ASM gateway, and an Istio Gateway per gateway serving the shop's host."""
    istio_gateway = {
        "apiVersion": f"{ISTIO_GATEWAY_GROUP}/v1beta1",
        "kind": "IstioGateway",
        "metadata": {"namespace": GATEWAYS_NS, "name": ISTIO_GATEWAY},
        "spec": {"gatewayType": "ingress", "serviceType": "LoadBalancer", "serviceAnnotations": {WEIGHT: "10"}},
    }
    plane.call("POST", f"/apis/{ISTIO_GATEWAY_GROUP}/v1beta1/namespaces/{GATEWAYS_NS}/istiogateways", istio_gateway)
    server = {"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": [SHOP_HOST]}
    for name, selector in (("shop", "ingressgateway"), ("shop-asm", "ingressgateway-asm")):
        gateway = {
            "apiVersion": "networking.istio.io/v1",
            "kind": "Gateway",
            "metadata": {"namespace": GATEWAYS_NS, "name": name},
            "spec": {"selector": {"istio": selector}, "servers": [server]},
        }
        plane.call("POST", f"/apis/networking.istio.io/v1/namespaces/{GATEWAYS_NS}/gateways", gateway)


def _admin_kubeconfig(plane: ControlPlane, path: Path) -> Path:
    """The administrator's kubeconfig: its current context, and ``asm-control-plane`` (same server)."""
    config = json.loads(plane.kubeconfig(plane.admin_token, "test-admin"))
    config["contexts"].append({"name": ASM_CONTEXT, "context": {"cluster": "test", "user": "test-admin"}})
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _test_policy(directory: Path, workloads: tuple[str, str]) -> None:
    """policies/shop-ingress.yaml with short timings, the simulated gateways' workload names, no
    windows, no approvals and no alert receivers (the controller's webhook receives every alert)."""
    policy = yaml.safe_load(SHIPPED_POLICY.read_text())
    spec = policy["spec"]
    spec["source"]["workload"], spec["target"]["workload"] = workloads
    for key in ("approvalAt", "advanceWindows"):
        spec["schedule"].pop(key, None)
    spec["schedule"]["bakeTime"] = "2s"
    spec["analysis"].update({"interval": "1s", "window": "10s", "minRequests": 10})
    spec.setdefault("promotion", {})["verifyFor"] = "2s"
    spec.pop("alerts", None)
    (directory / "shop-ingress.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))


def _delete_namespace(plane: ControlPlane, kubectl: Path, env: dict[str, str], name: str) -> None:
    """Everything in the namespace, then the namespace itself (no controller-manager finalizes it here)."""
    kinds = subprocess.run(
        [str(kubectl), "api-resources", "--verbs=list,delete", "--namespaced", "-o", "name"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    ).stdout.split()  # fmt: skip
    if kinds:
        subprocess.run(
            [str(kubectl), "-n", name, "delete", ",".join(kinds), "--all", "--ignore-not-found", "--wait=false"],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    plane.call("DELETE", f"/api/v1/namespaces/{name}", ok=(200, 202, 404))
    found = plane.call("GET", f"/api/v1/namespaces/{name}", ok=(200, 404))
    if found.get("kind") == "Namespace":
        found["spec"] = {"finalizers": []}
        plane.call("PUT", f"/api/v1/namespaces/{name}/finalize", found, ok=(200, 404, 409))


@dataclass
class Rig:
    plane: ControlPlane
    gateways: Cluster  # istio-system's view: the Services and their weights
    controller_ns: Cluster  # gateway-canary's view: the state object
    env: dict[str, str]
    tmp: Path
    sink: WebhookSink

    def state(self) -> dict[str, Any]:
        stored = self.controller_ns.state(POLICY)
        assert stored is not None, f"no state object {STATE_OBJECT}"
        return stored

    def weights(self) -> tuple[str | None, str | None]:
        """(ASM gateway, old gateway) weight annotations."""
        return self.gateways.annotations(TARGET).get(WEIGHT), self.gateways.annotations(SOURCE).get(WEIGHT)

    def cloud_answered(self, service: str, reason: str, *, since: datetime) -> bool:
        """Whether the cloud controller recorded ``reason`` on ``service`` in or after ``since``'s second."""
        events = self.plane.call("GET", f"/api/v1/namespaces/{GATEWAYS_NS}/events")["items"]
        cutoff = since.replace(microsecond=0)
        return any(
            event["reason"] == reason
            and event["involvedObject"]["name"] == service
            and datetime.fromisoformat(event["lastTimestamp"]) >= cutoff
            for event in events
        )

    def pending_command(self) -> str | None:
        annotations = self.controller_ns.configmap(STATE_OBJECT)["metadata"].get("annotations") or {}
        return annotations.get(COMMAND_ANNOTATION)


@pytest.fixture
def rig(
    control_plane: ControlPlane,
    traffic: TrafficExporter,
    gateways: tuple[str, str],
    prometheus: str,
    istio_gateway_crd: None,
    istio_gateway_api: ControlPlane,
    tmp_path: Path,
) -> Iterator[Rig]:
    plane = control_plane
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    binaries = binary_paths(TEST_BIN)
    for name in ("kubectl", "helm"):
        if not binaries[name].exists():
            pytest.fail(f"{binaries[name]} is missing (scripts/test-deps.sh builds it)")
        (bin_dir / name).symlink_to(binaries[name])
    if shutil.which("jq") is None:  # the stand-in: the whole JSON, pretty-printed; the filter ignored
        stand_in = bin_dir / "jq"
        stand_in.write_text(f"#!/bin/sh\nexec {ROOT / '.venv' / 'bin' / 'python'} -m json.tool\n")
        stand_in.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    kubeconfig = _admin_kubeconfig(plane, tmp_path / "admin.kubeconfig")
    env = {
        "PATH": f"{bin_dir}:{ROOT / '.venv' / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "KUBECONFIG": str(kubeconfig),
        "HOME": str(home),
        "LC_ALL": "C.UTF-8",
    }
    with ExitStack() as teardown:  # undone in reverse: controller, CCM, traffic, then the objects
        created: list[str] = []
        teardown.callback(_clean_up, plane, bin_dir, env, created)
        for name in (GATEWAYS_NS, CONTROLLER_NS, "ingress"):
            _namespace(plane, name)
            created.append(name)
        gateway_view = Cluster(plane, GATEWAYS_NS, tmp_path)
        gateway_view.add_gateways()
        _deployment(plane, GATEWAYS_NS, SOURCE, {"app": SOURCE, "istio": "ingressgateway"})
        _istio_gateways(plane)

        # the Helm release, as the runbook's upgrade line has it
        helm = subprocess.run(
            [
                str(bin_dir / "helm"), "install", RELEASE, str(CHART), "-n", CONTROLLER_NS, "--wait=false",
                "--set-file", f"policies.shop\\.yaml={SHIPPED_POLICY.relative_to(ROOT)}",
            ],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert helm.returncode == 0, helm.stderr

        # the cloud (EMULATED, tests/ccm_emulator.py) answers each weight change with its Events and
        # applies it to the CLB; the simulated gateways' traffic follows the CLB's applied weights
        ccm = teardown.enter_context(CcmEmulator(plane, GATEWAYS_NS, lag=0.2))
        for name in (TARGET, SOURCE):
            ccm.provision(name, Backends(BackendMode.CLUSTER, nodes=3))
        traffic.share = ccm.clb_target_share
        teardown.callback(setattr, traffic, "share", lambda: 0.0)  # stop reading what is about to go
        traffic.move_to(GATEWAYS_NS)
        traffic.source.error_ratio = traffic.target.error_ratio = 0.0

        # the controller, in-process, as the chart's ServiceAccount (the identity the chart's RBAC is for)
        policies = tmp_path / "policies"
        policies.mkdir()
        _test_policy(policies, gateways)
        identity = tmp_path / "controller.kubeconfig"
        identity.write_text(plane.kubeconfig(plane.token_for(CONTROLLER_NS, CHART_ACCOUNT), CHART_ACCOUNT))
        sink = WebhookSink()
        teardown.callback(sink.close)
        settings = Settings(
            policies_dir=policies,
            reload_interval_seconds=0.5,
            http_host="127.0.0.1",
            http_port=0,
            webhook_url=SecretStr(f"{sink.url}/global"),
            prometheus_url=prometheus,
            namespace=CONTROLLER_NS,
            command_poll_seconds=0.2,
            status_refresh_seconds=0,
        )
        api = build_api_client(identity)
        # elected on the chart's Lease, through the chart's Lease RBAC (the runbook reads who leads)
        leases = KubernetesLeaseStore(api, CONTROLLER_NS, f"{RELEASE}-gateway-canary", timeout_seconds=5)
        elector = LeaderElector(leases, "canary-0", LeaseTiming(15, 10, 2), clock=SystemClock())
        service = ControllerService(
            settings,
            pair=KubernetesGatewayPair(api, state_namespace=CONTROLLER_NS, fence=elector),
            store=KubernetesStateStore(api, CONTROLLER_NS, fence=elector),
            metrics_for=lambda policy: PrometheusMetricsSource(PrometheusConnection(settings, None)),
            clock=SystemClock(),
            cloud=KubernetesCloudInspector(api),
            elector=elector,
        )
        service.start()
        teardown.callback(service.stop)
        yield Rig(plane, gateway_view, Cluster(plane, CONTROLLER_NS, tmp_path), env, tmp_path, sink)


def _clean_up(plane: ControlPlane, bin_dir: Path, env: dict[str, str], namespaces: list[str]) -> None:
    """The release (its cluster-scoped RBAC with it), what ``gateway-canary rbac policies/`` applied
    (a ClusterRole and its binding), then the namespaces with everything in them."""

    def run(*args: str) -> str:
        return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False).stdout

    if CONTROLLER_NS in namespaces:
        run(str(bin_dir / "helm"), "uninstall", RELEASE, "-n", CONTROLLER_NS, "--wait=false")
    rendered = run(str(ROOT / ".venv" / "bin" / "gateway-canary"), "rbac", "policies/")
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    for obj in (doc for doc in yaml.safe_load_all(rendered) if doc):
        if obj["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            plane.call("DELETE", f"{rbac}/{obj['kind'].lower()}s/{obj['metadata']['name']}", ok=(200, 404))
    for name in namespaces:
        _delete_namespace(plane, bin_dir / "kubectl", env, name)


# --- running a line -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ran:
    line: RunbookLine
    ran: str  # what bash was given
    code: int
    stdout: str
    stderr: str
    seconds: float
    started: datetime

    def transcript(self, *, full: bool = False) -> str:
        out, err = (self.stdout, self.stderr) if full else (self.stdout[-1500:], self.stderr[-1500:])
        return (
            f"docs/runbook.md:{self.line.number}: {self.ran}\n  exit {self.code} after {self.seconds:.1f}s\n"
            f"  stdout: {out!r}\n  stderr: {err!r}"
        )


def run_line(rig: Rig, line: RunbookLine) -> Ran:
    text = substituted(line, rig.tmp)
    wall = datetime.now(UTC)
    started = time.monotonic()
    try:
        done = subprocess.run(
            ["bash", "-o", "pipefail", "-c", text],
            cwd=ROOT, env=rig.env, capture_output=True, text=True, timeout=LINE_TIMEOUT, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"docs/runbook.md:{line.number}: {text}\n  no end within {LINE_TIMEOUT:.0f}s: {exc.stderr!r}")
    return Ran(line, text, done.returncode, done.stdout, done.stderr, time.monotonic() - started, wall)


def accepted_answer(ran: Ran) -> Answer | None:
    """The ``ANSWERS`` entry that makes this non-zero exit an answer (its output showing it), if any."""
    for answer in ANSWERS:
        if answer.code != ran.code or not re.search(answer.line, ran.line.command):
            continue
        output = ran.stdout + ran.stderr if answer.stderr else ran.stdout
        if re.search(answer.shows, output.strip(), re.MULTILINE):
            return answer
    return None


def check_exit(rig: Rig, ran: Ran) -> None:
    where = ran.transcript()
    assert not USAGE_ERRORS.search(ran.stdout + ran.stderr), f"a usage error:\n{where}"
    is_cli = re.match(r"^(kubectl )?gateway-canary\b", ran.line.command) is not None
    if ran.code == 0:
        for pattern, shows in SHOWS:
            if re.search(pattern, ran.line.command):
                assert re.search(shows, ran.stdout.strip(), re.MULTILINE | re.DOTALL), f"not shown: {shows}\n{where}"
        check_json_paths(ran)
        return
    check_json_paths(ran)
    answer = accepted_answer(ran)
    assert answer is not None, f"exit {ran.code} is not an answer named in ANSWERS:\n{where}"
    if is_cli and ran.code == 3:
        assert "--watch" in ran.line.command, f"no answer from the running controller:\n{where}"
    if answer.code == 1 and re.match(r"^(kubectl )?gateway-canary status\b", ran.line.command):
        # RolledBack is left only by a command (retry) or a policy change: none came in between
        assert rig.state()["phase"] == "RolledBack", f"status exited 1 but the policy is not RolledBack:\n{where}"


def check_json_paths(ran: Ran) -> None:
    """``status -o json`` lines whose comment names fields (``# .status.lastCheck.cause, ...``): each
    is in the output (the command prints ``{name, state, status, error}``). ``.cloud`` is there only while the cloud
    controller has something to say about a write, so it is checked only when present."""
    if not re.match(r"^gateway-canary status .*-o json", ran.line.command) or "#" not in ran.line.text:
        return
    shown = json.loads(ran.stdout)
    status = shown["status"]
    for path in re.findall(r"(?<![\w.])\.([a-zA-Z][\w.]*\w)", ran.line.text.split("#", 1)[1]):
        keys = path.split(".")
        assert keys[0] == "status", f".{path}: the output is {{name, state, status, error}}: write .status...."
        keys = keys[1:]
        if keys[0] == "cloud" and "cloud" not in status:
            continue
        found: Any = status
        for key in keys:
            assert isinstance(found, dict) and key in found, f".{path} is not in the status:\n{ran.transcript()}"
            found = found[key]


# --- what a line did ----------------------------------------------------------------------------------

_CLI_COMMAND = re.compile(r"^(?:kubectl )?gateway-canary (pause|resume|approve|abort|retry|promote)\b")
_ANNOTATED = re.compile(rf"annotate configmap {STATE_OBJECT} {re.escape(COMMAND_ANNOTATION)}=(\w+)")


def _after(rig: Rig, ran: Ran, given: list[str]) -> None:
    """Check what the line did, where it is a write; note each command word given."""
    where = ran.transcript()
    cli = _CLI_COMMAND.match(ran.line.command)
    if cli:
        given.append(cli.group(1))
        assert rig.pending_command() is None, f"the command is still on the state object:\n{where}"
        answered = rig.state()["last_command"]
        assert answered["command"] == cli.group(1) and bool(answered["applied"]) is (ran.code == 0), where
        by = re.search(r"--by (\S+)", ran.line.command)
        assert answered["by"] == (by.group(1) if by else "test-admin"), where  # else who the API server says
        if ran.code == 0 and cli.group(1) == "abort":
            wait_for(lambda: rig.weights() == ("0", "100"), timeout=15, what=f"0 / 100 after {ran.line.text}")
            assert rig.state()["phase"] == "RolledBack"
            # what the runbook says to confirm next: the cloud's EnsuredLoadBalancer on both, after it
            for name in (TARGET, SOURCE):
                wait_for(
                    functools.partial(rig.cloud_answered, name, "EnsuredLoadBalancer", since=ran.started),
                    timeout=15,
                    what=f"EnsuredLoadBalancer on {name} after {ran.line.text}",
                )
        if ran.code == 0 and cli.group(1) == "retry":
            assert rig.state()["phase"] != "RolledBack", where
        if ran.code == 0 and cli.group(1) == "pause":
            state = rig.state()
            assert state["phase"] == "Paused" and state["history"][-1]["action"] == "Pause", where
            assert state["history"][-1]["by"] == answered["by"], where
        if ran.code == 0 and cli.group(1) == "resume":
            assert rig.state()["phase"] != "Paused", where
    annotated = _ANNOTATED.search(ran.line.command)
    if annotated:  # the controller answers a kubectl annotate too, and takes the command off
        given.append(annotated.group(1))
        wait_for(lambda: rig.pending_command() is None, timeout=15, what=f"the controller's answer to {ran.ran}")
        answered = rig.state()["last_command"]
        assert answered["command"] == annotated.group(1) and answered["by"] == "kubectl annotate", where
    scaled = re.search(r"\bscale deployment .*--replicas=(\d+)", ran.line.command)
    if scaled:
        deployment = rig.plane.call("GET", f"/apis/apps/v1/namespaces/{CONTROLLER_NS}/deployments/{CHART_ACCOUNT}")
        assert deployment["spec"]["replicas"] == int(scaled.group(1)), where


# --- the test -----------------------------------------------------------------------------------------


def test_the_runbook_lines_are_parsed_and_every_exception_names_a_line() -> None:
    lines = runbook_lines()
    assert len(lines) >= 100  # every block is read (the runbook has well over a hundred command lines)
    commands = [line.command for line in lines]
    for pattern in NOT_RUN:
        assert any(re.search(pattern, command) for command in commands), f"NOT_RUN {pattern!r} matches no line"
    for answer in ANSWERS:
        assert any(re.search(answer.line, command) for command in commands), f"{answer.line!r} matches no line"
    for pattern, _ in SUBSTITUTIONS:
        assert any(re.search(pattern, line.text) for line in lines), f"substitution {pattern!r} matches no line"


def test_the_rbac_apply_line_binds_the_account_the_can_i_line_checks(capsys: pytest.CaptureFixture[str]) -> None:
    """The lines of "A policy refuses to raise" must be about one identity: the chart's account."""
    from controller.cli import main

    commands = [line.command for line in runbook_lines()]
    can_i = next(command for command in commands if command.startswith("kubectl auth can-i"))
    account = re.search(r"--as=system:serviceaccount:([\w-]+):([\w-]+)", can_i)
    assert account is not None
    applied = [command for command in commands if re.search(r"^gateway-canary rbac .*\| kubectl apply", command)]
    assert applied
    for command in applied:
        assert main(shlex.split(command.split("|", 1)[0])[1:]) == 0
        objects = [doc for doc in yaml.safe_load_all(capsys.readouterr().out) if doc]
        subjects = {
            (subject["namespace"], subject["name"])
            for obj in objects
            if obj["kind"].endswith("Binding")
            for subject in obj["subjects"]
        }
        assert subjects == {(account.group(1), account.group(2))}, command


def test_every_runbook_command_runs_against_a_running_controller(rig: Rig) -> None:
    wait_for(lambda: rig.controller_ns.state(POLICY) is not None, timeout=60, what="the controller's state object")
    wait_for(
        lambda: rig.weights() == ("1", "99") and rig.state()["phase"] == "Progressing",
        timeout=60,
        what="the rollout to start at 1 / 99",
    )
    started = time.monotonic()
    ran: list[Ran] = []
    skipped: list[tuple[RunbookLine, str]] = []
    given: list[str] = []
    transcript = rig.tmp / "transcript.txt"  # every line's full output, for a failure's reader
    for line in runbook_lines():
        reason = not_run_reason(line)
        if reason is not None:
            skipped.append((line, reason))
            continue
        result = run_line(rig, line)
        ran.append(result)
        with transcript.open("a") as record:
            record.write(result.transcript(full=True) + "\n\n")
        check_exit(rig, result)
        _after(rig, result, given)
    seconds = time.monotonic() - started
    slowest = max(ran, key=lambda item: item.seconds)
    print(
        f"\nMEASURED runbook commands: {len(ran)} lines run in {seconds:.1f}s "
        f"({len(skipped)} not run: {', '.join(f'line {line.number}' for line, _ in skipped)}); "
        f"slowest line {slowest.line.number} {slowest.seconds:.1f}s; "
        f"exits: {sorted({r.code for r in ran})}"
    )
    MEASURED.setdefault(f"runbook commands ({len(ran)} lines)", []).append(seconds)
    for item in ran:  # the answers other than 0, for the record
        if item.code:
            answer = accepted_answer(item)
            print(f"  line {item.line.number}: exit {item.code} ({answer.why if answer else '?'}): {item.line.command}")

    # every command word given (CLI or kubectl annotate) is an Event on the ASM gateway's Service
    events = rig.plane.call("GET", f"/api/v1/namespaces/{GATEWAYS_NS}/events")["items"]
    reasons = {
        event["reason"]
        for event in events
        if event["involvedObject"]["name"] == TARGET
        and (event.get("source") or {}).get("component") == "gateway-canary"
    }
    assert {f"Command{word.capitalize()}" for word in given} <= reasons
    assert {"pause", "resume", "approve", "abort", "retry", "promote"} <= set(given)
    # the aborts alerted through the controller's receiver
    assert "RolledBack" in [body["kind"] for body in rig.sink.bodies("/global")]

    # the hand-written weights reached their objects
    istio_gateway = rig.plane.call(
        "GET", f"/apis/{ISTIO_GATEWAY_GROUP}/v1beta1/namespaces/{GATEWAYS_NS}/istiogateways/{ISTIO_GATEWAY}"
    )
    assert istio_gateway["spec"]["serviceAnnotations"][WEIGHT] == "0"
    # the chart's Deployment was scaled back to its 2 replicas and restarted; the upgrades are in the history
    deployment = rig.plane.call("GET", f"/apis/apps/v1/namespaces/{CONTROLLER_NS}/deployments/{CHART_ACCOUNT}")
    assert deployment["spec"]["replicas"] == 2
    assert "kubectl.kubernetes.io/restartedAt" in deployment["spec"]["template"]["metadata"].get("annotations", {})
    upgrades = sum(1 for line in runbook_lines() if line.command.startswith("helm upgrade"))
    secrets = rig.plane.call("GET", f"/api/v1/namespaces/{CONTROLLER_NS}/secrets?labelSelector=owner%3Dhelm")
    assert len(secrets["items"]) >= min(upgrades + 1, 10)  # helm keeps up to 10 revisions
    # and the line that read the chart's policies file back wrote it where the substitution said
    assert (rig.tmp / "shop.yaml").read_text().strip() == SHIPPED_POLICY.read_text().strip()
