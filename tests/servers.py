"""Loopback servers the tests control: a traffic exporter and a webhook sink; process helpers.

Both are real HTTP servers that the real Prometheus scrapes and the real Alertmanager delivers
to. Kubernetes is the real kube-apiserver (tests/kube_cluster.py).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

WEIGHT = "service.beta.kubernetes.io/alibaba-cloud-loadbalancer-weight"
#: Durations the tests measured, by label; printed at the end of the session (conftest.py).
MEASURED: dict[str, list[float]] = {}
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

    ``share()`` returns the target's share of ``total_rps``; the end-to-end tests make it read the
    weight annotations from the API server, so traffic follows the controller's writes.
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

    def move_to(self, namespace: str) -> None:
        """Report both gateways in ``namespace`` (each test's Services live in a namespace of its own)."""
        with self._lock:
            self.source.namespace = self.target.namespace = namespace

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


class LaggedShare:
    """A share function that follows another one ``lag_seconds`` late: the CLB's new split reaches
    the requests only as connections are re-established (keep-alives, DNS, client pools).

    Each call samples ``source`` and returns the newest sample taken at least ``lag_seconds`` ago,
    or ``initial`` (default: ``source()`` at construction) before there is one. The exporter calls
    it on every scrape, so the lag is resolved to the scrape interval. Wire it as
    ``traffic.share = LaggedShare(ccm.clb_target_share, 2.0)``.
    """

    def __init__(
        self,
        source: Callable[[], float],
        lag_seconds: float,
        *,
        initial: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.lag_seconds = lag_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._initial = source() if initial is None else initial
        self._samples: list[tuple[float, float]] = []  # (time, value), oldest first

    def __call__(self) -> float:
        now = self._clock()
        value = self.source()
        with self._lock:
            self._samples.append((now, value))
            due = [i for i, (at, _) in enumerate(self._samples) if at <= now - self.lag_seconds]
            if not due:
                return self._initial
            newest = due[-1]
            del self._samples[:newest]  # older samples can never be returned again
            return self._samples[0][1]


# --- webhook sink --------------------------------------------------------------------------------


class WebhookSink:
    """Collects JSON POSTs (Alertmanager's webhook, our generic webhook, Slack-shaped bodies)."""

    def __init__(self, status: int = 200) -> None:
        self.received: list[tuple[str, Any]] = []
        self.headers: list[tuple[str, dict[str, str]]] = []
        self.status = status
        self.delay = 0.0  # seconds before answering (a slow receiver)
        self._lock = threading.Lock()
        sink = self

        class Handler(_Quiet):
            def do_POST(self) -> None:
                body = self.body()
                with sink._lock:
                    sink.received.append((self.path, body))
                    sink.headers.append((self.path, dict(self.headers.items())))
                if sink.delay:
                    time.sleep(sink.delay)  # the behaviour under test: a receiver that answers late
                self.reply(sink.status, {})

        self.server = _Server(Handler)
        self.url = self.server.url

    def bodies(self, path: str | None = None) -> list[Any]:
        with self._lock:
            return [body for p, body in self.received if path is None or p == path]

    def close(self) -> None:
        self.server.close()


# --- a Prometheus that answers wrongly -----------------------------------------------------------


class MalformedPrometheus:
    """EMULATOR (not Prometheus): answers ``/api/v1/query`` with whatever body the test sets.

    A real Prometheus never sends a 200 without ``data`` or a string sample; proxies, gateways and
    half-compatible backends do. This serves exactly such bodies so the adapter's handling of them
    can be tested; every test of well-formed answers uses the real Prometheus.
    """

    def __init__(self) -> None:
        self.status = 200
        self.body: Any = {"status": "success", "data": {"resultType": "vector", "result": []}}
        server_self = self

        class Handler(_Quiet):
            def do_GET(self) -> None:
                body = server_self.body
                self.reply(server_self.status, body if isinstance(body, bytes) else json.dumps(body).encode())

            do_POST = do_GET

        self.server = _Server(Handler)
        self.url = self.server.url

    def close(self) -> None:
        self.server.close()
