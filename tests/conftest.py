"""Fixtures: real Prometheus and Alertmanager on free loopback ports, and the servers in servers.py.

Prometheus and Alertmanager are started once per session (Prometheus's first scrape comes ~6 s
after start) and stopped at the end. A missing binary skips the tests that need it with the
reason printed; ``scripts/test-deps.sh`` installs them and CI sets GATEWAY_CANARY_REQUIRE_BINARIES
so that there a missing binary fails instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
import requests
import yaml

from tests.kube_cluster import Cluster, ControlPlane, binary_paths, pinned_versions
from tests.servers import MEASURED, GatewayTraffic, ManagedProcess, TrafficExporter, WebhookSink, free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
TEST_BIN = Path(os.environ.get("GATEWAY_CANARY_TEST_BIN", ROOT / ".cache" / "bin"))
PROMETHEUS = os.environ.get("PROMETHEUS_BIN", "/usr/bin/prometheus")
ALERTMANAGER = os.environ.get("ALERTMANAGER_BIN", "/usr/bin/prometheus-alertmanager")


def _need(binary: str) -> None:
    if shutil.which(binary) or Path(binary).exists():
        return
    message = f"{binary} is not installed (run scripts/test-deps.sh)"
    if os.environ.get("GATEWAY_CANARY_REQUIRE_BINARIES"):
        pytest.fail(message)
    pytest.skip(message)


def kubectl_binary() -> Path:
    """The pinned kubectl that scripts/test-deps.sh builds (skips, or fails in CI, when it is missing)."""
    binary = binary_paths(TEST_BIN)["kubectl"]
    _need(str(binary))
    return binary


@contextlib.contextmanager
def _serving(args: list[str], log: Path, ready: Callable[[], bool], what: str) -> Iterator[None]:
    """Run a server binary until the with-block ends, once ``ready()`` holds."""
    process = ManagedProcess(args, log)
    try:
        wait_for(ready, timeout=60, interval=0.2, what=f"{what} (log: {log})")
        yield
    finally:
        process.stop()


def _answers(url: str, params: dict[str, str] | None = None, *, with_result: bool = False) -> bool:
    try:
        answer = requests.get(url, params=params, timeout=1)
        return answer.ok and (not with_result or bool(answer.json()["data"]["result"]))
    except requests.RequestException:
        return False


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="gateway-canary-tests-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def traffic() -> Iterator[TrafficExporter]:
    exporter = TrafficExporter(
        GatewayTraffic("istio-ingressgateway"), GatewayTraffic("istio-ingressgateway-asm"), total_rps=200.0
    )
    yield exporter
    exporter.close()


@pytest.fixture
def gateways(traffic: TrafficExporter, request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """Fresh (source, target) workload names for this test; traffic stops afterwards."""
    tag = f"{request.node.name[:40]}-{os.getpid()}-{id(request)}".lower().replace("_", "-")
    tag = "".join(ch for ch in tag if ch.isalnum() or ch == "-")
    yield traffic.fresh_pair(tag)
    traffic.share = lambda: 0.0


def prometheus_command(directory: Path, port: int, targets: list[int]) -> tuple[list[str], Callable[[], bool]]:
    """A real Prometheus on 127.0.0.1:``port`` scraping the exporters on loopback ports ``targets`` every
    second: its command line (config and data in ``directory``, so a restart keeps its data) and the
    check that it has scraped every target. Skips (fails in CI) when the binary is missing.
    """
    _need(PROMETHEUS)
    config = directory / "prometheus.yml"
    listed = ", ".join(f"'127.0.0.1:{target}'" for target in targets)
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        f"  - job_name: traffic\n    static_configs:\n      - targets: [{listed}]\n"
    )
    args = [
        PROMETHEUS,
        f"--config.file={config}",
        f"--storage.tsdb.path={directory / 'prom-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1h",
    ]
    every = f'count(up{{job="traffic"}} == 1) == {len(targets)}'
    return args, partial(_answers, f"http://127.0.0.1:{port}/api/v1/query", {"query": every}, with_result=True)


@pytest.fixture(scope="session")
def prometheus(workdir: Path, traffic: TrafficExporter) -> Iterator[str]:
    """A real Prometheus scraping the traffic exporter every second."""
    port = free_port()
    args, scraped = prometheus_command(workdir, port, [traffic.server.port])
    with _serving(args, workdir / "prometheus.log", scraped, "Prometheus's first scrape of the exporter"):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def alert_sink() -> Iterator[WebhookSink]:
    sink = WebhookSink()
    yield sink
    sink.close()


@pytest.fixture(scope="session")
def alertmanager(workdir: Path, alert_sink: WebhookSink) -> Iterator[str]:
    """A real Alertmanager delivering every alert at once to the webhook sink."""
    _need(ALERTMANAGER)
    port = free_port()
    config = workdir / "alertmanager.yml"
    config.write_text(
        "route:\n  receiver: sink\n  group_by: ['alertname', 'policy']\n"
        "  group_wait: 0s\n  group_interval: 1s\n  repeat_interval: 1h\n"
        f"receivers:\n  - name: sink\n    webhook_configs:\n      - url: {alert_sink.url}/alertmanager\n"
    )
    url = f"http://127.0.0.1:{port}"
    args = [
        ALERTMANAGER,
        f"--config.file={config}",
        f"--storage.path={workdir / 'am-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
    ]
    with _serving(args, workdir / "alertmanager.log", partial(_answers, f"{url}/-/ready"), "Alertmanager ready"):
        yield url


_STARTUP: dict[str, float] = {}


@pytest.fixture(scope="session")
def control_plane(workdir: Path) -> Iterator[ControlPlane]:
    """A real etcd + kube-apiserver (RBAC on) for the whole session."""
    binaries = binary_paths(TEST_BIN)
    for name in ("etcd", "kube-apiserver"):
        _need(str(binaries[name]))
    with ControlPlane(workdir / "control-plane", binaries).running() as plane:
        versions = pinned_versions()
        label = f"kube-apiserver {versions['KUBERNETES_VERSION']} + etcd {versions['ETCD_VERSION']}"
        _STARTUP[label] = plane.startup_seconds
        yield plane


@pytest.fixture
def kube(control_plane: ControlPlane, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """This test's namespace on the real API server; the controller's identity is bound to its Role.

    The cluster-scoped RBAC ``gateway-canary rbac`` makes for it (named after the namespace) is
    deleted afterwards: it would outlive the namespace.
    """
    prefix = "".join(ch if ch.isalnum() else "-" for ch in request.node.name.lower()).strip("-")
    cluster = Cluster(control_plane, control_plane.create_namespace(prefix or "test"), tmp_path)
    yield cluster
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    for name in (f"gateway-canary-{cluster.ns}", f"gateway-canary-asm-{cluster.ns}"):
        for kind in ("clusterrolebindings", "clusterroles"):
            control_plane.call("DELETE", f"{rbac}/{kind}/{name}", ok=(200, 404))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Report how long the session's servers took to become ready."""
    for label, seconds in _STARTUP.items():
        terminalreporter.write_line(f"MEASURED {label} start-up (certificates, etcd, /readyz): {seconds:.2f}s")
    for label, values in MEASURED.items():
        figures = ", ".join(f"{value:.2f}s" for value in values)
        terminalreporter.write_line(f"MEASURED {label}: {figures}")


ISTIO_GATEWAY_CRD = Path(__file__).parent / "fixtures" / "istio-gateway-crd.yaml"
ISTIO_GATEWAY_CRD_NAME = "gateways.networking.istio.io"


@pytest.fixture(scope="session")
def istio_gateway_api(control_plane: ControlPlane) -> ControlPlane:
    """The minimal Gateway CRD installed (once, idempotently) and served."""
    crd = yaml.safe_load(ISTIO_GATEWAY_CRD.read_text())
    control_plane.call("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd, ok=(201, 409))

    def established() -> bool:
        got = control_plane.call(
            "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{ISTIO_GATEWAY_CRD_NAME}"
        )
        conditions = (got.get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)

    wait_for(established, timeout=30, interval=0.1, what=f"CRD {ISTIO_GATEWAY_CRD_NAME} Established")
    for version in ("v1", "v1beta1"):
        path = f"/apis/networking.istio.io/{version}/gateways"
        wait_for(
            lambda path=path: control_plane.call("GET", path, ok=(200, 404, 429)).get("kind") == "GatewayList",
            timeout=30,
            interval=0.1,
            what=f"GET {path} served",
        )
    return control_plane


ISTIO_GATEWAY_ASM_CRD = Path(__file__).parent / "fixtures" / "istiogateway-crd.yaml"
ISTIO_GATEWAY_GROUP = "istio.alibabacloud.com"


@pytest.fixture(scope="session")
def istio_gateway_crd(control_plane: ControlPlane) -> None:
    """The IstioGateway CRD, installed once per session (idempotently) and served in both versions."""
    crd = yaml.safe_load(ISTIO_GATEWAY_ASM_CRD.read_text())
    path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    control_plane.call("POST", path, crd, ok=(201, 409))

    def established() -> bool:
        conditions = control_plane.call("GET", f"{path}/{crd['metadata']['name']}").get("status", {}).get("conditions")
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions or [])

    wait_for(established, timeout=30, what="the IstioGateway CRD to be Established")
    for version in ("v1beta1", "v1"):  # served a little after Established (404, then 429 while its storage starts)
        wait_for(
            lambda v=version: (
                control_plane.call(  # type: ignore[misc]
                    "GET", f"/apis/{ISTIO_GATEWAY_GROUP}/{v}/istiogateways", ok=(200, 404, 429)
                ).get("kind")
                == "IstioGatewayList"
            ),
            timeout=30,
            what=f"istiogateways served on {version}",
        )
