"""Loopback servers the tests control: a traffic exporter, a webhook sink, a Kubernetes stand-in.

The traffic exporter and webhook sink are real HTTP servers that the real Prometheus scrapes
and the real Alertmanager delivers to. The Kubernetes server is a STAND-IN (see its docstring).
"""

from __future__ import annotations

import copy
import json
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

WEIGHT = "service.beta.kubernetes.io/alibaba-cloud-loadbalancer-weight"
LB_ID = "service.beta.kubernetes.io/alibaba-cloud-loadbalancer-id"
VGROUP = "service.beta.kubernetes.io/alibaba-cloud-loadbalancer-vgroup-port"
STATE = "gateway-canary.io/state"


class ManagedProcess:
    """A subprocess with its output in a log file; stopped with a signal, killed if it lingers."""

    def __init__(self, args: list[str], log: Path, **popen: Any) -> None:
        self.log = log
        self._out = log.open("ab")
        self.proc = subprocess.Popen(args, stdout=self._out, stderr=subprocess.STDOUT, **popen)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        return int(self.proc.returncode)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], Any], *, timeout: float, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or condition!r} (last: {last!r})")


class _Server:
    """A ThreadingHTTPServer on a free loopback port, run in a daemon thread."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.port = int(self.httpd.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Quiet(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return

    def reply(self, status: int, body: Any, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"null")


# --- traffic exporter ------------------------------------------------------------------------------

BUCKETS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)


@dataclass
class GatewayTraffic:
    """One simulated gateway's behaviour; counters accumulate at the rates set here."""

    workload: str
    namespace: str = "istio-system"
    error_ratio: float = 0.0
    latency_ms: float = 40.0
    requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=lambda: dict.fromkeys(BUCKETS, 0.0))
    latency_sum: float = 0.0


class TrafficExporter:
    """Istio standard metrics for two gateways, split by a share function (the CLB weights).

    ``share()`` returns the target's share of ``total_rps``; by default it reads the weight
    annotations from a Kubernetes (stand-in) server, so traffic follows the controller's writes.
    """

    def __init__(self, source: GatewayTraffic, target: GatewayTraffic, total_rps: float = 200.0) -> None:
        self.source = source
        self.target = target
        self.total_rps = total_rps
        self.share: Callable[[], float] = lambda: 0.0
        self._lock = threading.Lock()
        self._last = time.monotonic()
        exporter = self

        class Handler(_Quiet):
            def do_GET(self) -> None:
                if self.path.startswith("/metrics"):
                    self.reply(200, exporter.render().encode(), "text/plain; version=0.0.4")
                else:
                    self.reply(404, {})

        self.server = _Server(Handler)
        self.url = self.server.url

    def fresh_pair(self, tag: str) -> tuple[str, str]:
        """Start new series for both gateways, so no earlier test's traffic is in any window."""
        with self._lock:
            self.source = GatewayTraffic(f"gw-{tag}")
            self.target = GatewayTraffic(f"gw-{tag}-asm")
            self._last = time.monotonic()
        self.share = lambda: 0.0
        return self.source.workload, self.target.workload

    def advance(self) -> None:
        """Accumulate traffic since the last call at the current rates and share."""
        with self._lock:
            now = time.monotonic()
            elapsed, self._last = now - self._last, now
            share = max(0.0, min(1.0, self.share()))
            for gateway, fraction in ((self.target, share), (self.source, 1.0 - share)):
                count = self.total_rps * fraction * elapsed
                if count <= 0:
                    continue
                gateway.requests += count
                gateway.errors += count * gateway.error_ratio
                gateway.latency_sum += count * gateway.latency_ms
                for bound in BUCKETS:
                    if gateway.latency_ms <= bound:
                        gateway.buckets[bound] += count

    def render(self) -> str:
        self.advance()
        lines = ["# TYPE istio_requests_total counter", "# TYPE istio_request_duration_milliseconds histogram"]
        with self._lock:
            for gateway in (self.source, self.target):
                if gateway.requests <= 0:
                    continue  # a gateway that never served has no series at all
                base = (
                    f'reporter="source",source_workload="{gateway.workload}",'
                    f'source_workload_namespace="{gateway.namespace}"'
                )
                ok = gateway.requests - gateway.errors
                lines.append(f'istio_requests_total{{{base},response_code="200"}} {ok}')
                if gateway.errors > 0:  # like Envoy: no 5xx series until the first 5xx
                    lines.append(f'istio_requests_total{{{base},response_code="503"}} {gateway.errors}')
                for bound in BUCKETS:
                    lines.append(
                        f'istio_request_duration_milliseconds_bucket{{{base},le="{bound}"}} {gateway.buckets[bound]}'
                    )
                lines.append(f'istio_request_duration_milliseconds_bucket{{{base},le="+Inf"}} {gateway.requests}')
                lines.append(f"istio_request_duration_milliseconds_sum{{{base}}} {gateway.latency_sum}")
                lines.append(f"istio_request_duration_milliseconds_count{{{base}}} {gateway.requests}")
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        self.server.close()


# --- webhook sink --------------------------------------------------------------------------------


class WebhookSink:
    """Collects JSON POSTs (Alertmanager's webhook, our generic webhook, Slack-shaped bodies)."""

    def __init__(self, status: int = 200) -> None:
        self.received: list[tuple[str, Any]] = []
        self.status = status
        self._lock = threading.Lock()
        sink = self

        class Handler(_Quiet):
            def do_POST(self) -> None:
                body = self.body()
                with sink._lock:
                    sink.received.append((self.path, body))
                self.reply(sink.status, {})

        self.server = _Server(Handler)
        self.url = self.server.url

    def bodies(self, path: str | None = None) -> list[Any]:
        with self._lock:
            return [body for p, body in self.received if path is None or p == path]

    def close(self) -> None:
        self.server.close()


# --- Kubernetes API stand-in ----------------------------------------------------------------------


class KubeStandIn:
    """STAND-IN for a Kubernetes API server, until the real kube-apiserver fixture lands (issue 3).

    Implements only what the controller uses, driven through the real ``kubernetes`` client:
    GET and PATCH (JSON merge patch, RFC 7386) of core/v1 Services with resourceVersion
    preconditions (409 Conflict on a stale version), and POST/GET of core/v1 Events. No auth,
    no RBAC, no watch: tests that need those wait for the real API server.
    """

    def __init__(self) -> None:
        self.services: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.patches: list[tuple[str, dict[str, Any]]] = []
        self._version = 100
        self._lock = threading.Lock()
        self.fail_next: list[int] = []  # status codes to answer the next requests with
        self.fail_patch_of: dict[str, int] = {}  # "namespace/name" -> status for its next PATCH
        stand_in = self

        class Handler(_Quiet):
            def do_GET(self) -> None:
                stand_in._handle(self, "GET")

            def do_PATCH(self) -> None:
                stand_in._handle(self, "PATCH")

            def do_POST(self) -> None:
                stand_in._handle(self, "POST")

        self.server = _Server(Handler)
        self.url = self.server.url

    def _bump(self) -> str:
        self._version += 1
        return str(self._version)

    def add_service(self, namespace: str, name: str, annotations: dict[str, str], **metadata: Any) -> None:
        with self._lock:
            self.services[(namespace, name)] = {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "uid": str(uuid.uuid4()),
                    "resourceVersion": self._bump(),
                    "annotations": dict(annotations),
                    **metadata,
                },
                "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]},
            }

    def annotations(self, namespace: str, name: str) -> dict[str, str]:
        with self._lock:
            return dict(self.services[(namespace, name)]["metadata"].get("annotations") or {})

    def edit(self, namespace: str, name: str, annotations: dict[str, str | None]) -> None:
        """Another writer (a human, kubectl) changes annotations; bumps the version."""
        with self._lock:
            meta = self.services[(namespace, name)]["metadata"]
            current = meta.setdefault("annotations", {})
            for key, value in annotations.items():
                if value is None:
                    current.pop(key, None)
                else:
                    current[key] = value
            meta["resourceVersion"] = self._bump()

    def _handle(self, request: _Quiet, method: str) -> None:
        parts = request.path.split("?")[0].strip("/").split("/")
        with self._lock:
            if self.fail_next:
                status = self.fail_next.pop(0)
                request.reply(status, {"kind": "Status", "code": status, "message": "injected failure"})
                return
        # api/v1/namespaces/{ns}/services/{name} or api/v1/namespaces/{ns}/events
        if len(parts) >= 5 and parts[:2] == ["api", "v1"] and parts[2] == "namespaces":
            namespace, kind = parts[3], parts[4]
            if kind == "services" and len(parts) == 6:
                self._service(request, method, namespace, parts[5])
                return
            if kind == "events" and len(parts) == 5:
                self._events(request, method, namespace)
                return
        request.reply(404, {"kind": "Status", "code": 404, "message": f"stand-in does not serve {request.path}"})

    def _service(self, request: _Quiet, method: str, namespace: str, name: str) -> None:
        key = (namespace, name)
        with self._lock:
            current = self.services.get(key)
            if current is None:
                request.reply(
                    404,
                    {"kind": "Status", "code": 404, "reason": "NotFound", "message": f'services "{name}" not found'},
                )
                return
            if method == "GET":
                request.reply(200, current)
                return
            if method != "PATCH":
                request.reply(405, {"kind": "Status", "code": 405})
                return
            if request.headers.get("Content-Type") != "application/merge-patch+json":
                request.reply(415, {"kind": "Status", "code": 415, "message": "stand-in takes merge patches only"})
                return
            patch = request.body()
            failure = self.fail_patch_of.pop(f"{namespace}/{name}", None)
            if failure is not None:
                request.reply(failure, {"kind": "Status", "code": failure, "message": "injected failure"})
                return
            self.patches.append((f"{namespace}/{name}", copy.deepcopy(patch)))
            wanted = (patch.get("metadata") or {}).get("resourceVersion")
            if wanted is not None and wanted != current["metadata"]["resourceVersion"]:
                request.reply(
                    409,
                    {
                        "kind": "Status",
                        "code": 409,
                        "reason": "Conflict",
                        "message": "the object has been modified; please apply your changes "
                        "to the latest version and try again",
                    },
                )
                return
            updated = _merge(copy.deepcopy(current), patch)
            updated["metadata"]["resourceVersion"] = self._bump()
            self.services[key] = updated
            request.reply(200, updated)

    def _events(self, request: _Quiet, method: str, namespace: str) -> None:
        with self._lock:
            if method == "POST":
                event = request.body()
                meta = event.setdefault("metadata", {})
                meta["name"] = meta.get("name") or f"{meta.get('generateName', 'event.')}{uuid.uuid4().hex[:8]}"
                meta["namespace"] = namespace
                meta["resourceVersion"] = self._bump()
                self.events.append(event)
                request.reply(201, event)
                return
            items = [e for e in self.events if e["metadata"]["namespace"] == namespace]
            request.reply(200, {"apiVersion": "v1", "kind": "EventList", "items": items, "metadata": {}})

    def kubeconfig(self) -> str:
        return kubeconfig_for(self.url)

    def close(self) -> None:
        self.server.close()


def kubeconfig_for(url: str) -> str:
    """A kubeconfig pointing at ``url`` with no credentials."""
    return (
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: standin\n  cluster:\n    server: {url}\n"
        "users:\n- name: tester\n  user: {}\n"
        "contexts:\n- name: standin\n  context:\n    cluster: standin\n    user: tester\n"
        "current-context: standin\n"
    )


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    if not isinstance(target, dict):
        target = {}
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = _merge(target.get(key), value)
    return target
