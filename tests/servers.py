"""Loopback servers the tests control: a traffic exporter and a webhook sink; process helpers.

Both are real HTTP servers that the real Prometheus scrapes and the real Alertmanager delivers
to. Kubernetes is the real kube-apiserver (tests/kube_cluster.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple, Self

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
#: Istio's ``destination_service_name`` of a request no route matched (Envoy's flag NR).
UNKNOWN_DESTINATION = "unknown"
#: The destination of the default mix (Istio's Bookinfo front end; any name would do).
DEFAULT_DESTINATION = "productpage"
#: Below this expected count a draw is exact (Knuth's product of uniforms); above it, the normal
#: approximation, whose skew error is then small and whose clipping at 0 is 5.5 sigma away.
POISSON_EXACT_BELOW = 30.0
#: Kubernetes' alphabet for generated name suffixes (no vowels, no 0/1/3: no words, no look-alikes).
_K8S_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


class ResponseKey(NamedTuple):
    """The labels that make one ``istio_requests_total`` series of a gateway, besides the workload's."""

    code: int
    flags: str
    destination: str


@dataclass(frozen=True)
class Response:
    """One kind of response in a gateway's mix: ``fraction`` of that gateway's requests get it.

    The mix describes the gateway as configured correctly; ``GatewayTraffic.mix()`` carves the
    misconfigurations (``missing_route`` and friends) and ``error_ratio`` out of it.
    """

    code: int
    flags: str = "-"
    destination: str = DEFAULT_DESTINATION
    fraction: float = 1.0

    @property
    def key(self) -> ResponseKey:
        return ResponseKey(self.code, self.flags, self.destination)


def pod_name(workload: str) -> str:
    """A Deployment pod's name for ``workload``: ``<workload>-<template hash>-<5 chars>``.

    Envoy's own stats carry the pod, not Istio's workload labels, so a query has to find a
    workload's pods by name; a realistic name (derived from the workload, so stable across
    scrapes) lets the tests catch a pattern that matches too much, e.g. ``gw-.*`` also matching
    the pods of ``gw-asm``.
    """
    digest = hashlib.sha256(workload.encode()).digest()
    chars = "".join(_K8S_SUFFIX_ALPHABET[byte % len(_K8S_SUFFIX_ALPHABET)] for byte in digest[:14])
    return f"{workload}-{chars[:9]}-{chars[9:]}"


def poisson(rng: random.Random, mean: float) -> int:
    """A Poisson-distributed count with expectation ``mean``, drawn from ``rng`` (numpy-free).

    Requests arriving independently at a constant rate are Poisson; splitting them by kind gives
    independent Poisson counts per kind, so each kind can be drawn on its own. Exact below
    ``POISSON_EXACT_BELOW`` (count uniforms until their product falls under e^-mean); above it,
    a normal draw with the same mean and variance, rounded and clipped at 0 (unbiased there: the
    rounding is symmetric and the clipped tail is negligible).
    """
    if mean <= 0:
        return 0
    if mean < POISSON_EXACT_BELOW:
        limit = math.exp(-mean)
        count, product = 0, rng.random()
        while product > limit:
            count += 1
            product *= rng.random()
        return count
    return max(0, round(rng.gauss(mean, math.sqrt(mean))))


def _default_responses() -> list[Response]:
    return [Response(200, "-", DEFAULT_DESTINATION, 1.0)]


def _check_share(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise ValueError(f"{name} must be a share between 0 and 1, not {value!r}")
    return value


def _label(value: str) -> str:
    """A label value as the text exposition format quotes it."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@dataclass
class GatewayTraffic:
    """One simulated gateway's behaviour; counters accumulate at the rates set here.

    Every request arriving at the gateway (one connection each) ends in exactly one way, as shares
    of that gateway's requests:

    * ``handshake_failure_ratio`` (``missing_cert``): the TLS handshake fails; the request never
      reaches HTTP, so it is counted only in the listener's TLS statistics;
    * ``unrouted_ratio`` (``missing_route``): 404 with Envoy's flag NR, destination "unknown";
    * ``denied_ratio`` (``missing_authz``): 403 (RBAC denied), split over the mix's destinations;
    * the rest follows ``responses``; of its entries below 400 (requests that reach a backend and
      would succeed) ``error_ratio`` is answered 503 with ``error_flags`` instead.

    With the defaults this is today's behaviour exactly: every request 200, ``error_ratio`` of
    them 503. ``requests`` counts the requests that reached HTTP (the histogram's count),
    ``errors`` their 5xx, ``connections`` and ``handshake_failures`` the listener's counters.
    """

    workload: str
    namespace: str = "istio-system"
    error_ratio: float = 0.0
    latency_ms: float = 40.0
    requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=lambda: dict.fromkeys(BUCKETS, 0.0))
    latency_sum: float = 0.0
    responses: list[Response] = field(default_factory=_default_responses)
    error_flags: str = "-"
    unrouted_ratio: float = 0.0
    denied_ratio: float = 0.0
    handshake_failure_ratio: float = 0.0
    #: Istio exports Envoy's listener stats only when the proxy's proxyStatsMatcher includes them.
    tls_stats: bool = True
    counts: dict[ResponseKey, float] = field(default_factory=dict)
    connections: float = 0.0
    handshake_failures: float = 0.0

    @property
    def pod(self) -> str:
        """The ``pod`` label of this gateway's Envoy stats."""
        return pod_name(self.workload)

    def missing_route(self, host_share: float) -> Self:
        """``host_share`` of the requests are for a host the gateway has no route for: 404, flags NR.

        As when a VirtualService (or a host of it) was not migrated to the new gateway. Sets the
        share (calling again replaces it); returns the gateway for chaining.
        """
        self.unrouted_ratio = _check_share("host_share", host_share)
        self._check_total()
        return self

    def missing_authz(self, share: float) -> Self:
        """``share`` of the requests are denied by the gateway's RBAC: 403, flags "-".

        As when an AuthorizationPolicy's principals or namespaces did not follow the migration.
        The 403s keep the destinations of the mix (the route matched; the filter denied).
        """
        self.denied_ratio = _check_share("share", share)
        self._check_total()
        return self

    def missing_cert(self, share: float) -> Self:
        """``share`` of the requests fail the TLS handshake (a certificate for their SNI is missing).

        Those requests vanish from Istio's HTTP metrics: the only trace is the listener's
        ``envoy_listener_ssl_connection_error``, which is why a gate on the 5xx ratio misses them.
        """
        self.handshake_failure_ratio = _check_share("share", share)
        self._check_total()
        return self

    def _check_total(self) -> None:
        for name in ("error_ratio", "unrouted_ratio", "denied_ratio", "handshake_failure_ratio"):
            _check_share(name, getattr(self, name))
        lost = self.unrouted_ratio + self.denied_ratio + self.handshake_failure_ratio
        if lost > 1.0 + 1e-9:
            raise ValueError(
                f"{self.workload}: missing route, authz and cert shares add up to {lost:g}, more than all requests"
            )

    def mix(self) -> dict[ResponseKey, float]:
        """The share of this gateway's requests that ends in each response (only non-zero ones).

        The shares add up to ``1 - handshake_failure_ratio``: the rest never reached HTTP.
        Raises ValueError for a mix that does not describe all requests exactly once.
        """
        self._check_total()
        if not self.responses:
            raise ValueError(f"{self.workload}: the response mix is empty")
        for response in self.responses:
            if not 100 <= response.code <= 599 or not response.flags:
                raise ValueError(f"{self.workload}: {response} is not an HTTP response with flags")
            _check_share(f"fraction of {response}", response.fraction)
        total = math.fsum(response.fraction for response in self.responses)
        if not math.isclose(total, 1.0, abs_tol=1e-9):
            raise ValueError(f"{self.workload}: the response mix's fractions add up to {total:g}, not 1")
        served = 1.0 - self.unrouted_ratio - self.denied_ratio - self.handshake_failure_ratio
        shares: dict[ResponseKey, float] = {}

        def add(key: ResponseKey, share: float) -> None:
            if share > 0:
                shares[key] = shares.get(key, 0.0) + share

        for response in self.responses:
            part = response.fraction * max(0.0, served)
            if response.code < 400:  # reaches a backend, which fails error_ratio of them
                add(response.key, part * (1.0 - self.error_ratio))
                add(ResponseKey(503, self.error_flags, response.destination), part * self.error_ratio)
            else:
                add(response.key, part)
            add(ResponseKey(403, "-", response.destination), response.fraction * self.denied_ratio)
        add(ResponseKey(404, "NR", UNKNOWN_DESTINATION), self.unrouted_ratio)
        return shares


class TrafficExporter:
    """Istio standard metrics and Envoy listener stats for two gateways, split by a share function.

    ``share()`` returns the target's share of ``total_rps``; the end-to-end tests make it read the
    weight annotations from the API server, so traffic follows the controller's writes.

    Counts are exact products of rate, share and time unless ``noise`` is a ``random.Random``:
    then each interval's count of every kind of response (and of failed handshakes) is a Poisson
    draw around that product (see ``poisson``), as real traffic is; seed it for repeatable runs.
    ``clock`` is injectable so that tests can step time instead of sleeping.
    """

    def __init__(
        self,
        source: GatewayTraffic,
        target: GatewayTraffic,
        total_rps: float = 200.0,
        *,
        noise: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.target = target
        self.total_rps = total_rps
        self._initial_rps = total_rps
        self.noise = noise
        self.share: Callable[[], float] = lambda: 0.0
        self._clock = clock
        self._lock = threading.Lock()
        self._last = clock()
        exporter = self

        class Handler(_Quiet):
            def do_GET(self) -> None:
                if not self.path.startswith("/metrics"):
                    self.reply(404, {})
                    return
                try:
                    text = exporter.render()
                except ValueError as exc:  # a test's impossible mix: a failed scrape says why
                    self.reply(500, f"{exc}\n".encode(), "text/plain")
                    return
                self.reply(200, text.encode(), "text/plain; version=0.0.4")

        self.server = _Server(Handler)
        self.url = self.server.url

    def fresh_pair(self, tag: str) -> tuple[str, str]:
        """Start new series for both gateways, so no earlier test's traffic is in any window.

        The new gateways have the default (healthy) mix, noise is off and ``total_rps`` is the
        constructor's again: a test that changed them (on the session's exporter) does not leak
        them into the next one, which starts from exact, deterministic traffic.
        """
        with self._lock:
            self.source = GatewayTraffic(f"gw-{tag}")
            self.target = GatewayTraffic(f"gw-{tag}-asm")
            self._last = self._clock()
            self.noise = None
            self.total_rps = self._initial_rps
        self.share = lambda: 0.0
        return self.source.workload, self.target.workload

    def move_to(self, namespace: str) -> None:
        """Report both gateways in ``namespace`` (each test's Services live in a namespace of its own)."""
        with self._lock:
            self.source.namespace = self.target.namespace = namespace

    def advance(self) -> None:
        """Accumulate traffic since the last call at the current rates and share.

        Raises ValueError (and accumulates nothing) when a gateway's mix is impossible.
        """
        with self._lock:
            plans = [(gateway, gateway.mix()) for gateway in (self.target, self.source)]
            now = self._clock()
            elapsed, self._last = now - self._last, now
            share = max(0.0, min(1.0, self.share()))
            for (gateway, shares), fraction in zip(plans, (share, 1.0 - share), strict=True):
                expected = self.total_rps * fraction * elapsed
                if expected > 0:
                    self._accumulate(gateway, shares, expected)

    def _draw(self, expected: float) -> float:
        return expected if self.noise is None else float(poisson(self.noise, expected))

    def _accumulate(self, gateway: GatewayTraffic, shares: dict[ResponseKey, float], expected: float) -> None:
        served = 0.0
        for key, part in shares.items():
            count = self._draw(expected * part)
            if count <= 0:
                continue  # like Envoy: no series for a response until the first one
            gateway.counts[key] = gateway.counts.get(key, 0.0) + count
            served += count
            if key.code >= 500:
                gateway.errors += count
        vanished = self._draw(expected * gateway.handshake_failure_ratio)
        gateway.handshake_failures += vanished
        gateway.connections += served + vanished
        gateway.requests += served
        gateway.latency_sum += served * gateway.latency_ms
        for bound in BUCKETS:
            if gateway.latency_ms <= bound:
                gateway.buckets[bound] += served

    def render(self) -> str:
        """The exposition text: each metric family in one group, as the format asks."""
        self.advance()
        requests = ["# TYPE istio_requests_total counter"]
        durations = ["# TYPE istio_request_duration_milliseconds histogram"]
        tls_errors = ["# TYPE envoy_listener_ssl_connection_error counter"]
        connections = ["# TYPE envoy_listener_downstream_cx_total counter"]
        with self._lock:
            for gateway in (self.source, self.target):
                if gateway.tls_stats and gateway.connections > 0:
                    pod = f'namespace="{_label(gateway.namespace)}",pod="{_label(gateway.pod)}"'
                    tls_errors.append(f"envoy_listener_ssl_connection_error{{{pod}}} {gateway.handshake_failures}")
                    connections.append(f"envoy_listener_downstream_cx_total{{{pod}}} {gateway.connections}")
                if gateway.requests <= 0:
                    continue  # a gateway that never served HTTP has no Istio series at all
                base = (
                    f'reporter="source",source_workload="{_label(gateway.workload)}",'
                    f'source_workload_namespace="{_label(gateway.namespace)}"'
                )
                for key, count in gateway.counts.items():
                    labels = (
                        f'{base},response_code="{key.code}",response_flags="{_label(key.flags)}",'
                        f'destination_service_name="{_label(key.destination)}"'
                    )
                    requests.append(f"istio_requests_total{{{labels}}} {count}")
                for bound in BUCKETS:
                    durations.append(
                        f'istio_request_duration_milliseconds_bucket{{{base},le="{bound}"}} {gateway.buckets[bound]}'
                    )
                durations.append(f'istio_request_duration_milliseconds_bucket{{{base},le="+Inf"}} {gateway.requests}')
                durations.append(f"istio_request_duration_milliseconds_sum{{{base}}} {gateway.latency_sum}")
                durations.append(f"istio_request_duration_milliseconds_count{{{base}}} {gateway.requests}")
        return "\n".join([*requests, *durations, *tls_errors, *connections]) + "\n"

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
