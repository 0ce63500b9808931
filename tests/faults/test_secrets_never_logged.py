"""Scenario 7 of the fault suite: no secret in any log line of the whole suite.

It runs last (``tests/faults/conftest.py``). First a ``gateway-canary run`` process of its own is
given every secret of ``report.SECRETS`` and a hard time: a hostile Prometheus that answers 401,
then 500, with the request's Authorization header echoed in its body, then 200 with that header as
a sample; receivers whose URLs carry secrets in their paths and queries, which answer 500 (the
robot: an error echoing its URL), then refuse connections; the API server cut off for a while (a
TCP forwarder in front of it is closed); then all of it healthy again. Its JSON log is registered
like every other controller log of the suite. Then every registered log (``report.LOG_FILES``) is
read line by line for every secret value and for each secret's random part alone; the alerts the
receivers got are read too.

Runs: log lines (and alert bodies) read; violations: those holding a secret.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.report import LOG_FILES, SECRETS, register_log, tally
from tests.faults.rig import SECRET_ALERTS, Fault, PrometheusProxy, log_lines, secret_env
from tests.kube_cluster import Cluster
from tests.servers import ManagedProcess, TrafficExporter, _Quiet, _Server, free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]

POLICY = """\
metadata: {{name: secretive}}
spec:
  source: {{service: {ns}/istio-ingressgateway, workload: {source}}}
  target: {{service: {ns}/istio-ingressgateway-asm, workload: {target}}}
  schedule: {{steps: [5, 50, 100], bakeTime: 1h}}
  analysis: {{interval: 1s, window: 10s, minRequests: 10, onMetricsUnavailable: {{action: hold, afterChecks: 2}}}}
  gates: {{errorRate: {{max: 0.05}}}}
  routes: {{check: false}}
"""
#: one more receiver of the policy: a webhook whose secret is in its path and its query
POLICY_HOOK = "    - {type: webhook, name: hook, urlFromEnv: GATEWAY_CANARY_POLICY_HOOK}\n"


class HostileReceivers:
    """Every receiver of the controller on one loopback port, failing: webhooks and Slack answer 500
    with the request's path (its secret) echoed; the robot answers 200 with an error code whose
    message echoes its URL (token, signature). ``close()``: from then on, connections are refused."""

    def __init__(self) -> None:
        self.received: list[tuple[str, Any]] = []
        self._lock = threading.Lock()
        receivers = self

        class Handler(_Quiet):
            def do_POST(self) -> None:
                body = self.body()
                with receivers._lock:
                    receivers.received.append((self.path, body))
                if self.path.startswith("/robot/"):
                    self.reply(200, {"errcode": 310000, "errmsg": f"sign not match, url {self.path}"})
                else:
                    self.reply(500, {"error": f"no such hook {self.path}"})

        self.server = _Server(Handler)
        self.url = self.server.url

    def close(self) -> None:
        self.server.close()


class ApiGate:
    """A TCP forwarder on a loopback port in front of the API server (TLS passes through untouched:
    its certificate is for 127.0.0.1). ``cut()`` resets every connection and refuses new ones;
    ``restore()`` forwards again on the same port."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            with self._lock:
                if self._listener is not listener:
                    return
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._open += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._open = self._open, []
        if listener is not None:
            listener.close()
        for connection in connections:  # a reset, as a crashed server's kernel would send
            with contextlib.suppress(OSError):
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                connection.close()


def secret_values(extra: dict[str, str]) -> dict[str, str]:
    """Every secret of the suite and each one's random part alone (the text after its last dash)."""
    found = {**SECRETS, **extra}
    parts = {f"{name} (its random part)": value.rsplit("-", 1)[-1] for name, value in found.items()}
    return {**found, **{name: part for name, part in parts.items() if len(part) >= 12}}


def scan(path: Path, secrets: dict[str, str]) -> Iterator[list[str]]:
    """Per line of ``path``, the secrets it holds (``file:line: which``); nothing for a missing file."""
    if not path.exists():
        return
    needles = {name: value.encode() for name, value in secrets.items()}
    with path.open("rb") as text:
        for number, line in enumerate(text, start=1):
            held = [name for name, needle in needles.items() if needle in line]
            yield [f"{path}:{number}: {', '.join(held)}"] if held else []


@pytest.fixture
def hostile(
    kube: Cluster, traffic: TrafficExporter, gateways: tuple[str, str], prometheus: str, tmp_path: Path
) -> Iterator[dict[str, Any]]:
    kube.add_gateways()
    kube.grant(kube.policy(name="secretive"))
    traffic.share = kube.target_share
    traffic.move_to(kube.ns)
    policies = tmp_path / "policies"
    policies.mkdir()
    text = POLICY.format(ns=kube.ns, source=gateways[0], target=gateways[1]) + SECRET_ALERTS + POLICY_HOOK
    (policies / "secretive.yaml").write_text(text)
    gate = ApiGate(int(kube.plane.url.rsplit(":", 1)[1]))
    config = json.loads(kube.kubeconfig())
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{gate.port}"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps(config))
    proxy, receivers = PrometheusProxy(prometheus), HostileReceivers()
    proxy.set(Fault.ECHO_401)
    hook = f"{receivers.url}/policy/{SECRETS['slack secret path']}?key={SECRETS['webhook secret path']}"
    env = {
        **os.environ,
        **secret_env(receivers.url, receivers.url),
        "GATEWAY_CANARY_POLICY_HOOK": hook,
        "GATEWAY_CANARY_POLICIES_DIR": str(policies),
        "GATEWAY_CANARY_PROMETHEUS_URL": proxy.url,
        "GATEWAY_CANARY_KUBECONFIG": str(kubeconfig),
        "GATEWAY_CANARY_NAMESPACE": kube.ns,
        "GATEWAY_CANARY_HTTP_HOST": "127.0.0.1",
        "GATEWAY_CANARY_HTTP_PORT": str(free_port()),
        "GATEWAY_CANARY_LOG_FORMAT": "json",
        "GATEWAY_CANARY_RELOAD_INTERVAL_SECONDS": "0.5",
        "GATEWAY_CANARY_NOTIFY_BACKOFF_SECONDS": "0.2",
        "GATEWAY_CANARY_NOTIFY_BACKOFF_MAX_SECONDS": "1",
    }
    log = register_log(tmp_path / "controller.log")
    controller = ManagedProcess([sys.executable, "-m", "controller", "run"], log, env=env, cwd=ROOT)
    try:
        yield {
            "controller": controller,
            "proxy": proxy,
            "receivers": receivers,
            "gate": gate,
            "log": log,
            "token": str(config["users"][0]["user"]["token"]),
        }
    finally:
        controller.stop(signal.SIGKILL)
        gate.cut()
        proxy.close()
        receivers.close()
        traffic.share = lambda: 0.0


def lines_after(log: Path, start: int, event: str, **fields: str) -> list[dict[str, Any]]:
    """The JSON lines from the ``start``-th on with this event and fields (values: substrings)."""
    return [
        line
        for line in log_lines(log)[start:]
        if line.get("event") == event and all(value in str(line.get(key)) for key, value in fields.items())
    ]


def test_no_secret_in_any_log_line_of_the_suite(hostile: dict[str, Any]) -> None:
    scenario = tally(7, "No secret in any log line of the suite")
    controller, proxy, receivers, gate, log = (hostile[k] for k in ("controller", "proxy", "receivers", "gate", "log"))

    # 1. Prometheus answers 401 with the token echoed; every receiver fails, echoing its secret path.
    wait_for(
        lambda: lines_after(log, 0, "check", cause="MetricsUnavailable", reason="401"),
        timeout=60,
        what=f"a check refused with 401 (log: {log})",
    )
    receivers_named = {"webhook:global", "slack:global", "dingtalk:robot", "webhook:hook"}

    def every_receiver_failed() -> bool:
        failed = {line["receiver"] for line in lines_after(log, 0, "alert delivery failed; retrying")}
        return receivers_named <= failed

    wait_for(every_receiver_failed, timeout=30, what="every receiver to fail a delivery")
    # 2. Prometheus answers 500, with the token echoed.
    seen = len(log_lines(log))
    proxy.set(Fault.ECHO_500)
    wait_for(lambda: lines_after(log, seen, "check", reason="500"), timeout=30, what="a check answered 500")
    # ... and 200 with the token as the sample.
    seen = len(log_lines(log))
    proxy.set(Fault.ECHO_SAMPLE)
    wait_for(lambda: lines_after(log, seen, "check", reason="not a number"), timeout=30, what="a sample refused")
    # 3. The API server unreachable, the receivers gone (connections refused).
    seen = len(log_lines(log))
    gate.cut()
    receivers.close()
    wait_for(
        lambda: [line for line in log_lines(log)[seen:] if "API server unreachable" in json.dumps(line)],
        timeout=30,
        what="the controller to find the API server unreachable",
    )
    wait_for(
        lambda: lines_after(log, seen, "alert delivery failed; retrying", error="ConnectionError"),
        timeout=30,
        what="a delivery refused",
    )
    # 4. All healthy again: checks pass.
    seen = len(log_lines(log))
    gate.restore()
    proxy.set(Fault.PASS)
    wait_for(lambda: lines_after(log, seen, "check", verdict="PASS"), timeout=60, what="a passing check")
    assert controller.stop() == 0, f"the controller did not stop cleanly (log: {log})"
    assert f"Bearer {SECRETS['prometheus token']}" in proxy.authorizations  # the secrets were in use
    paths = [path for path, _ in receivers.received]
    for secret in ("webhook secret path", "slack secret path"):
        assert any(SECRETS[secret] in path for path in paths), f"no request carried the {secret}"

    # Every log of the suite, line by line (this one too), and the alerts the receivers got.
    secrets = secret_values({"controller's ServiceAccount token": hostile["token"]})
    files = list(dict.fromkeys([*LOG_FILES, log]))
    leaks: list[str] = []
    read = 0
    for path in files:
        for found in scan(path, secrets):
            read += 1
            leaks += found
            scenario.run(found)
    for number, (path, body) in enumerate(receivers.received, start=1):
        text = json.dumps(body)
        held = [name for name, value in secrets.items() if value in text]
        found = [f"alert {number} sent to /{path.split('/')[1]}: {', '.join(held)}"] if held else []
        leaks += found
        scenario.run(found)
    scenario.figure("log files", str(len([path for path in files if path.exists()])))
    scenario.figure("log lines", str(read))
    scenario.figure("alerts read", str(len(receivers.received)))
    assert leaks == [], "\n".join(leaks[:20])
