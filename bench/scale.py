"""Benchmark: many policies in one ``gateway-canary run`` process, in steady state (baking).

For each size (``--sizes``, default 1,10,100,200,500 policies) and each query-sharing setting
(``--share-seconds``, default 0 and 1: ``GATEWAY_CANARY_QUERY_SHARE_SECONDS``, 0 = every check
sends its own queries), one controller subprocess runs that many policies against:

- the tests' real kube-apiserver + etcd (``tests.kube_cluster``; binaries from scripts/test-deps.sh),
  where every policy has a gateway pair of its own: two LoadBalancer Services on one CLB of their
  own, both with the runbook's CLB annotations and weights 20/80, and 20 Ready Nodes (the CLB's
  backends, as the end-to-end tests provision them). The controller runs as its ServiceAccount
  bound only to what ``gateway-canary rbac`` prints for all the policies (``Cluster.grant``);
- a real Prometheus scraping every second one exporter that serves Istio's standard metrics of
  every pair (``PairsExporter``: ``tests.servers.TrafficExporter``'s gateways, many at once), all
  healthy, the ASM gateway getting exactly the share the CLB gives it at 20/80 over 20 nodes.

A policy finds its target at 20 and adopts that step (no write), then bakes for 12 h: the steady
state moves no weight. Each policy checks every 5 s over a 1 m window with the default gates
(errorRate, latency p99, the response mix, which is on by default) plus one custom gate; route
parity is off (no Istio Gateways here), the controller's settings are its defaults.

After a warm-up (every policy loaded and checked at least twice), over ``--window`` seconds:

- check lateness (due -> started) p50/p99/max and tick duration p50/p99, from the controller's
  histograms ``gateway_canary_check_lateness_seconds`` and ``gateway_canary_tick_seconds``
  (their buckets' increase over the window, quantiles interpolated in a bucket as PromQL's
  ``histogram_quantile`` does; max: the smallest bucket bound that holds every observation);
- check duration p50/p99 from ``gateway_canary_check_seconds`` (its buckets summed over policies);
- Prometheus queries per second from Prometheus's own /metrics
  (``prometheus_http_requests_total{handler="/api/v1/query"}``, GET and POST alike);
- Kubernetes reads per second from the API server's /metrics (``apiserver_request_total``, GET and
  LIST on the resources the controller reads; nothing else in this process talks to the API server
  during the window, and the API server's own loops touch other resources), and the controller's
  writes from the audit log (by its user; listed by verb and resource when there are any);
- the controller's CPU (utime + stime from /proc, % of one core), RSS at the end and its peak
  (VmRSS, VmHWM); the CPU of the API server, etcd, Prometheus and this process (the exporter)
  too, and of the whole machine, to see which one bends first;
- whether the rollouts really bake: "baking" counts the policies waiting on their bake, "bake ok"
  those whose bake run (passing checks at most two intervals apart) stayed open all through the
  window (a late check closes it: the bake time stops growing and the state object is written),
  "skipped" the runs APScheduler skipped because the policy's previous one had not finished.

The machine is shared: "other work" (CPU outside this benchmark's processes) is reported per run,
and ``--quiet-wait S`` waits up to S seconds before each run for it to drop below ``--quiet-limit``.

Asserts nothing; prints one table and whether the targets are met at the largest size (500
policies: lateness p99 <= 1 s, CPU <= 50 % of one core, RSS <= 200 MB, no write while baking).
``--profile PATH`` records the controller with py-spy after the window at the largest size: a
flame graph at PATH, collapsed stacks of the threads not idle and of the thread holding the GIL
(its CPU in Python) beside it, summarised by activity, function and module, and one dump.

``--quick`` is the CI size (tests/test_benchmarks.py): sizes 1 and 3, checks every 2 s, an 8 s window.

Usage: .venv/bin/python bench/scale.py [--sizes 1,10,100,200,500] [--share-seconds 0,1]
       [--window 30] [--interval 5] [--quick] [--json PATH] [--profile PATH] [--keep]
       [--quiet-wait 600 --quiet-limit 25]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controller.core.cloud import BackendMode, Backends, effective_share  # noqa: E402
from controller.core.loader import parse_policy_text  # noqa: E402
from controller.core.policy import CanaryPolicy  # noqa: E402
from tests.ccm_emulator import CcmEmulator  # noqa: E402
from tests.conftest import PROMETHEUS, TEST_BIN, prometheus_command  # noqa: E402
from tests.faults.harness import ControllerProcess, Fleet  # noqa: E402
from tests.kube_cluster import CLB_READY, Cluster, ControlPlane, binary_paths  # noqa: E402
from tests.servers import (  # noqa: E402
    BUCKETS,
    LB_ID,
    VGROUP,
    WEIGHT,
    GatewayTraffic,
    ManagedProcess,
    ResponseKey,
    TrafficExporter,
    free_port,
    wait_for,
)

SIZES = (1, 10, 100, 200, 500)
QUICK_SIZES = (1, 3)
SHARE_SECONDS = (0.0, 1.0)  # 0: every check asks its own queries; 1.0: the controller's default
INTERVAL_SECONDS = 5
QUICK_INTERVAL_SECONDS = 2  # --quick: four checks per policy in its 8 s window
TARGET_WEIGHT, SOURCE_WEIGHT = 20, 80
NODES = 20
RPS_PER_PAIR = 200.0
#: the targets at 500 policies (reported as met or not, never asserted)
TARGET_SIZE = 500
TARGET_LATENESS_P99_S = 1.0
TARGET_CPU_PERCENT = 50.0
TARGET_RSS_MB = 200.0
#: what the controller reads (apiserver_request_total resources); the API server's own loops read others
CONTROLLER_READS = frozenset({"services", "configmaps", "nodes", "events", "endpointslices"})
READ_VERBS = frozenset({"GET", "LIST"})
WRITE_VERBS = frozenset({"POST", "PUT", "PATCH", "DELETE", "DELETECOLLECTION", "APPLY"})
#: the fault suite's fast timings in Fleet's environment: dropped, so the controller runs on its defaults
_TEST_SETTINGS = (
    "GATEWAY_CANARY_RELOAD_INTERVAL_SECONDS",
    "GATEWAY_CANARY_COMMAND_POLL_SECONDS",
    "GATEWAY_CANARY_FAILURE_RECHECK_SECONDS",
    "GATEWAY_CANARY_PROMETHEUS_TOKEN",
)
_CONTROLLER_FAMILIES = (
    "gateway_canary_check_lateness_seconds_bucket",
    "gateway_canary_tick_seconds_bucket",
    "gateway_canary_check_seconds_bucket",
    "gateway_canary_check_seconds_count",
    "gateway_canary_checks_total",
    "gateway_canary_errors_total",
    "gateway_canary_policies",
    "gateway_canary_waiting_info",
    "gateway_canary_target_weight",
)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

POLICY = """\
apiVersion: gateway-canary.io/v1alpha1
kind: CanaryPolicy
metadata:
  name: {name}
spec:
  source: {{service: {ns}/{source}}}
  target: {{service: {ns}/{target}}}
  schedule:
    steps: [{weight}, 50, 100]
    bakeTime: 12h                 # the steady state is baking: no weight moves while measured
  analysis:
    interval: {interval}s
    window: 1m
    minRequests: 100
    failureThreshold: 2
  gates:
    errorRate: {{max: 0.01, maxIncrease: 0.005}}
    latency: {{p99Ms: {{max: 500}}, maxRatio: 1.25}}
    # responseMix: on by default (4xx, 401/403 and 404 NR against the source)
    custom:
      - name: upstreamResets
        query: sum(rate(istio_requests_total{{ {{{{ selector }}}},response_flags="UC"}}[{{{{ window }}}}]))
        max: 2
        onEmpty: zero
  routes: {{check: false}}        # no Istio Gateways in this cluster
"""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def say(text: str = "", *, progress: bool = False) -> None:
    """The table on stdout; progress on stderr (so that stdout is only the result)."""
    stream = sys.stderr if progress else sys.stdout
    stream.write(text + "\n")
    stream.flush()


# --- traffic for many gateway pairs ------------------------------------------------------------------


class PairsExporter(TrafficExporter):
    """``TrafficExporter`` for many gateway pairs at once (it serves one pair; ``fresh_pair`` replaces it).

    Every pair is two ``GatewayTraffic`` (healthy mix, no noise) and a fixed share of the pair's
    ``total_rps`` for the target; counters accumulate at those rates and are rendered as
    ``TrafficExporter.render`` renders one pair, each metric family in one group. The listener
    TLS stats are left out: no gate here reads them.
    """

    def __init__(self, rps_per_pair: float) -> None:
        self.pairs: list[tuple[GatewayTraffic, GatewayTraffic, float]] = []
        self._mixes: dict[int, dict[ResponseKey, float]] = {}
        super().__init__(GatewayTraffic("unused"), GatewayTraffic("unused-asm"), total_rps=rps_per_pair)

    def add(self, source: str, target: str, namespace: str, share: float) -> None:
        with self._lock:
            gateways = [GatewayTraffic(name, namespace, tls_stats=False) for name in (source, target)]
            for gateway in gateways:
                self._mixes[id(gateway)] = gateway.mix()
            self.pairs.append((gateways[0], gateways[1], share))

    def advance(self) -> None:
        with self._lock:
            now = self._clock()
            elapsed, self._last = now - self._last, now
            for source, target, share in self.pairs:
                for gateway, fraction in ((target, share), (source, 1.0 - share)):
                    expected = self.total_rps * fraction * elapsed
                    if expected > 0:
                        self._accumulate(gateway, self._mixes[id(gateway)], expected)

    def render(self) -> str:
        self.advance()
        requests_lines = ["# TYPE istio_requests_total counter"]
        durations = ["# TYPE istio_request_duration_milliseconds histogram"]
        with self._lock:
            for pair in self.pairs:
                for gateway in pair[:2]:
                    assert isinstance(gateway, GatewayTraffic)
                    if gateway.requests <= 0:
                        continue
                    base = (
                        f'reporter="source",source_workload="{gateway.workload}",'
                        f'source_workload_namespace="{gateway.namespace}"'
                    )
                    for key, count in gateway.counts.items():
                        requests_lines.append(
                            f'istio_requests_total{{{base},response_code="{key.code}",'
                            f'response_flags="{key.flags}",destination_service_name="{key.destination}"}} {count}'
                        )
                    metric = "istio_request_duration_milliseconds"
                    for bound in BUCKETS:
                        durations.append(f'{metric}_bucket{{{base},le="{bound}"}} {gateway.buckets[bound]}')
                    durations.append(f'{metric}_bucket{{{base},le="+Inf"}} {gateway.requests}')
                    durations.append(f"{metric}_sum{{{base}}} {gateway.latency_sum}")
                    durations.append(f"{metric}_count{{{base}}} {gateway.requests}")
        return "\n".join([*requests_lines, *durations]) + "\n"


# --- the API server as an admin, from many threads ------------------------------------------------------


class Admin:
    """Admin REST on the control plane, one ``requests`` session per thread (for concurrent setup)."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["Authorization"] = f"Bearer {self.plane.admin_token}"
            self._local.session = session
        return session

    def call(self, method: str, path: str, body: Any = None, *, ok: Iterable[int] = (200, 201)) -> Any:
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
        answer = self._session().request(
            method, f"{self.plane.url}{path}", json=body, headers=headers, timeout=60, verify=str(self.plane.ca_file)
        )
        if answer.status_code not in ok:
            raise RuntimeError(f"{method} {path}: {answer.status_code} {answer.text[:300]}")
        return answer.json() if answer.content else {}

    def text(self, path: str) -> str:
        answer = self._session().get(f"{self.plane.url}{path}", timeout=60, verify=str(self.plane.ca_file))
        answer.raise_for_status()
        return answer.text


def concurrently(work: Callable[[Any], object], items: Iterable[Any], workers: int = 16) -> None:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(work, items):
            pass


# --- the fleet of gateway pairs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    index: int
    source: str
    target: str
    policy: str


def pairs_for(count: int) -> list[Pair]:
    return [Pair(i, f"gw-{i:04d}", f"gw-{i:04d}-asm", f"scale-{i:04d}") for i in range(count)]


def service_body(pair: Pair, name: str, weight: int) -> dict[str, Any]:
    """A gateway Service as ``Cluster.add_service`` makes it, on the pair's own CLB."""
    annotations = {
        **CLB_READY,
        LB_ID: f"lb-scale-{pair.index:04d}",
        VGROUP: f"rsp-scale-{pair.index:04d}:80",
        WEIGHT: str(weight),
    }
    return {
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"type": "LoadBalancer", "ports": [{"name": "http2", "port": 80, "targetPort": 8080}]},
    }


def policy_text(pair: Pair, namespace: str, interval: int) -> str:
    return POLICY.format(
        name=pair.policy, ns=namespace, source=pair.source, target=pair.target, weight=TARGET_WEIGHT, interval=interval
    )


# --- reading metrics -----------------------------------------------------------------------------------


def parse(text: str, names: tuple[str, ...]) -> Samples:
    """The samples of the named series (exact sample names) in an exposition text."""
    wanted = "\n".join(line for line in text.splitlines() if line.startswith(names))
    samples: Samples = {}
    for family in text_string_to_metric_families(wanted + "\n"):
        for sample in family.samples:
            if sample.name in names:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of a process (seconds); NaN when it is gone."""
    if pid is None:
        return math.nan
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of stat(5)


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return float(sum(values) - idle), float(sum(values))


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, in MB (MiB)."""
    found: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(rest.split()[0]) / 1024
    return found.get("VmRSS", math.nan), found.get("VmHWM", math.nan)


def buckets(samples: Samples, name: str) -> dict[float, float]:
    """Upper bound -> cumulative count, summed over every other label."""
    summed: dict[float, float] = defaultdict(float)
    for (sample, labels), value in samples.items():
        if sample == name:
            summed[float(dict(labels)["le"])] += value
    return dict(summed)


def increase(end: dict[float, float], start: dict[float, float]) -> list[tuple[float, float]]:
    """The buckets' increase over the window, sorted by bound (a series new in the window counts from 0)."""
    return sorted((bound, count - start.get(bound, 0.0)) for bound, count in end.items())


def quantile(q: float, cumulative: list[tuple[float, float]]) -> float:
    """As PromQL's ``histogram_quantile``: linear within the bucket that holds the rank; in the +Inf
    bucket, the highest finite bound. NaN with no observation."""
    if not cumulative or cumulative[-1][1] <= 0:
        return math.nan
    rank = q * cumulative[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def upper_bound(cumulative: list[tuple[float, float]]) -> float:
    """The smallest bucket bound that holds every observation (inf: some are above the last bound)."""
    if not cumulative or cumulative[-1][1] <= 0:
        return math.nan
    total = cumulative[-1][1]
    return next(bound for bound, count in cumulative if count >= total)


# --- the bench: servers up once, a controller per run ---------------------------------------------------


@dataclass
class Setup:
    workdir: Path
    plane: ControlPlane
    admin: Admin
    kube: Cluster
    exporter: PairsExporter
    prometheus_url: str
    prometheus_pid: int | None
    pairs: list[Pair]
    policies: dict[str, CanaryPolicy]
    seconds: dict[str, float] = field(default_factory=dict)

    def pids(self) -> dict[str, int | None]:
        apiserver = getattr(self.plane, "_apiserver", None)
        etcd = getattr(self.plane, "_etcd", None)
        return {
            "kube-apiserver": None if apiserver is None else apiserver.proc.pid,
            "etcd": None if etcd is None else etcd.proc.pid,
            "prometheus": self.prometheus_pid,
            "bench": os.getpid(),
        }


@contextmanager
def servers(workdir: Path, count: int, interval: int) -> Iterator[Setup]:
    """The control plane, the pairs' Services, Nodes and RBAC, the exporter and Prometheus."""
    binaries = binary_paths(TEST_BIN)
    missing = [str(binaries[name]) for name in ("etcd", "kube-apiserver") if not binaries[name].exists()]
    if not Path(PROMETHEUS).exists():
        missing.append(PROMETHEUS)
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run scripts/test-deps.sh")
    seconds: dict[str, float] = {}
    with ExitStack() as stack:
        plane = stack.enter_context(ControlPlane(workdir / "control-plane", binaries).running())
        seconds["control plane start (certificates, etcd, kube-apiserver /readyz)"] = plane.startup_seconds
        admin = Admin(plane)
        kube = Cluster(plane, plane.create_namespace("scale"), workdir)
        pairs = pairs_for(count)

        started = time.monotonic()
        bodies = [body for p in pairs for body in (service_body(p, p.target, TARGET_WEIGHT),
                                                   service_body(p, p.source, SOURCE_WEIGHT))]  # fmt: skip
        concurrently(lambda body: admin.call("POST", f"/api/v1/namespaces/{kube.ns}/services", body), bodies)
        seconds[f"{2 * count} Services ({count} pairs), 16 concurrent creates"] = time.monotonic() - started

        started = time.monotonic()
        CcmEmulator(plane, kube.ns).add_nodes(NODES)  # Ready Nodes only (the emulator's loop is not started)
        seconds[f"{NODES} Ready Nodes"] = time.monotonic() - started

        started = time.monotonic()
        policies: dict[str, CanaryPolicy] = {}
        for p in pairs:
            loaded = parse_policy_text(policy_text(p, kube.ns, interval), f"{p.policy}.yaml")
            if loaded.errors or len(loaded.policies) != 1:
                raise SystemExit(f"the benchmark's policy is invalid: {[str(e) for e in loaded.errors]}")
            policies[p.policy] = loaded.policies[0].policy
        kube.grant(*policies.values())
        seconds[f"RBAC for {count} policies (Cluster.grant: apply, then wait until RBAC allows each Service)"] = (
            time.monotonic() - started
        )

        started = time.monotonic()
        nodes = Backends(BackendMode.CLUSTER, nodes=NODES)
        share = effective_share(TARGET_WEIGHT, SOURCE_WEIGHT, nodes, nodes) or 0.0
        exporter = PairsExporter(RPS_PER_PAIR)
        stack.callback(exporter.close)
        for p in pairs:
            exporter.add(p.source, p.target, kube.ns, share)
        port = free_port()
        args, scraped = prometheus_command(workdir, port, [exporter.server.port])
        prometheus = ManagedProcess(args, workdir / "prometheus.log")
        stack.callback(prometheus.stop)
        wait_for(scraped, timeout=90, interval=0.2, what="Prometheus's first scrape of the exporter")
        seconds["Prometheus start until its first scrape"] = time.monotonic() - started

        yield Setup(
            workdir=workdir,
            plane=plane,
            admin=admin,
            kube=kube,
            exporter=exporter,
            prometheus_url=f"http://127.0.0.1:{port}",
            prometheus_pid=prometheus.proc.pid,
            pairs=pairs,
            policies=policies,
            seconds=seconds,
        )


@dataclass
class Snapshot:
    """Every counter the figures come from, each with the monotonic time it was read."""

    controller: Samples = field(default_factory=dict)
    controller_at: float = 0.0
    queries: float = 0.0
    queries_at: float = 0.0
    requests: dict[tuple[str, str, str], float] = field(default_factory=dict)  # (verb, resource, code)
    requests_at: float = 0.0
    audit_offset: int = 0
    cpu: dict[str, float] = field(default_factory=dict)
    machine: tuple[float, float] = (0.0, 0.0)
    cpu_at: float = 0.0


def controller_metrics(process: ControllerProcess) -> Samples:
    answer = process.get("/metrics", timeout=30)
    if answer is None or answer.status_code != 200:
        raise RuntimeError(f"{process} /metrics did not answer")
    return parse(answer.text, _CONTROLLER_FAMILIES)


def prometheus_queries(setup: Setup) -> float:
    text = requests.get(f"{setup.prometheus_url}/metrics", timeout=30).text
    samples = parse(text, ("prometheus_http_requests_total",))
    return sum(value for (_, labels), value in samples.items() if dict(labels).get("handler") == "/api/v1/query")


def apiserver_requests(setup: Setup) -> dict[tuple[str, str, str], float]:
    samples = parse(setup.admin.text("/metrics"), ("apiserver_request_total",))
    counts: dict[tuple[str, str, str], float] = defaultdict(float)
    for (_, labels), value in samples.items():
        label = dict(labels)
        resource = label.get("resource", "") + (f"/{label['subresource']}" if label.get("subresource") else "")
        counts[(label.get("verb", ""), resource, label.get("code", ""))] += value
    return dict(counts)


def snapshot(setup: Setup, process: ControllerProcess, pids: dict[str, int | None], *, end: bool) -> Snapshot:
    """Read at the start in one order and at the end in the reverse one: the CPU window is the innermost."""
    shot = Snapshot()

    def controller() -> None:
        shot.controller, shot.controller_at = controller_metrics(process), time.monotonic()

    def queries() -> None:
        shot.queries, shot.queries_at = prometheus_queries(setup), time.monotonic()

    def kube() -> None:
        shot.requests, shot.requests_at = apiserver_requests(setup), time.monotonic()
        shot.audit_offset = setup.plane.audit_log.stat().st_size

    def cpu() -> None:
        shot.cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
        shot.machine, shot.cpu_at = machine_cpu(), time.monotonic()

    steps = [controller, queries, kube, cpu]
    for step in reversed(steps) if end else steps:
        step()
    return shot


def controller_writes(setup: Setup, start: int, end: int) -> Counter[str]:
    """The controller's writes between two audit-log offsets, by "verb resource"."""
    writes: Counter[str] = Counter()
    with setup.plane.audit_log.open("rb") as log:
        log.seek(start)
        data = log.read(end - start)
    for line in data.splitlines():
        entry = json.loads(line)
        if entry.get("stage") != "ResponseComplete" or entry["user"]["username"] != setup.kube.controller_user:
            continue
        writes[f"{entry['verb']} {(entry.get('objectRef') or {}).get('resource', '')}"] += 1
    return writes


def per_policy(samples: Samples, name: str) -> dict[str, float]:
    return {dict(labels).get("policy", ""): value for (sample, labels), value in samples.items() if sample == name}


def warm_up(process: ControllerProcess, size: int, timeout: float) -> tuple[bool, float]:
    """Until every policy is loaded and checked at least twice: (reached, seconds)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if not process.alive():
            raise RuntimeError(f"{process} exited with {process.exit_code()}:\n{process.tail()}")
        try:
            samples = controller_metrics(process)
        except RuntimeError:
            samples = {}
        loaded = samples.get(("gateway_canary_policies", ()), 0.0)
        checked = per_policy(samples, "gateway_canary_check_seconds_count")
        if loaded == size and len(checked) == size and min(checked.values()) >= 2:
            return True, time.monotonic() - started
        time.sleep(1.0)
    return False, time.monotonic() - started


def figures(setup: Setup, start: Snapshot, end: Snapshot, pid: int) -> dict[str, Any]:
    """The run's figures from its two snapshots (rates over each source's own interval)."""
    a, b = start.controller, end.controller
    lateness = increase(
        buckets(b, "gateway_canary_check_lateness_seconds_bucket"),
        buckets(a, "gateway_canary_check_lateness_seconds_bucket"),
    )
    ticks = increase(buckets(b, "gateway_canary_tick_seconds_bucket"), buckets(a, "gateway_canary_tick_seconds_bucket"))
    checks = increase(
        buckets(b, "gateway_canary_check_seconds_bucket"), buckets(a, "gateway_canary_check_seconds_bucket")
    )
    controller_s = end.controller_at - start.controller_at
    kube_s = end.requests_at - start.requests_at
    cpu_s = end.cpu_at - start.cpu_at
    reads: Counter[str] = Counter()
    other_reads: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    apiserver_writes: Counter[str] = Counter()
    for key, count in end.requests.items():
        verb, resource, code = key
        delta = count - start.requests.get(key, 0.0)
        if delta <= 0:
            continue
        if verb in READ_VERBS:
            (reads if resource in CONTROLLER_READS else other_reads)[f"{verb} {resource}"] += int(delta)
        elif verb in WRITE_VERBS:
            apiserver_writes[f"{verb} {resource}"] += int(delta)
        if not code.startswith("2"):
            failed[f"{verb} {resource} {code}"] += int(delta)
    writes = controller_writes(setup, start.audit_offset, end.audit_offset)
    busy = end.machine[0] - start.machine[0]
    total = end.machine[1] - start.machine[1]
    rss, peak = memory_mb(pid)
    waiting: Counter[str] = Counter()
    for (sample, labels), value in b.items():
        if sample == "gateway_canary_waiting_info" and value == 1:
            waiting[dict(labels).get("kind", "?")] += 1
    verdicts: Counter[str] = Counter()
    for (sample, labels), value in b.items():
        if sample == "gateway_canary_checks_total":
            delta = int(value - a.get((sample, labels), 0.0))
            if delta:
                verdicts[dict(labels).get("verdict", "?")] += delta
    errors = sum(v - a.get(k, 0.0) for k, v in b.items() if k[0] == "gateway_canary_errors_total")
    tick_count = ticks[-1][1] if ticks else 0.0
    return {
        "window_s": round(cpu_s, 2),
        "ticks_per_s": tick_count / controller_s,
        "lateness_p50_s": quantile(0.5, lateness),
        "lateness_p99_s": quantile(0.99, lateness),
        "lateness_max_s": upper_bound(lateness),
        "check_p50_s": quantile(0.5, checks),
        "check_p99_s": quantile(0.99, checks),
        "tick_p50_s": quantile(0.5, ticks),
        "tick_p99_s": quantile(0.99, ticks),
        "lateness_buckets": lateness,
        "tick_buckets": ticks,
        "check_buckets": checks,
        "prometheus_queries_per_s": (end.queries - start.queries) / (end.queries_at - start.queries_at),
        "kube_reads_per_s": sum(reads.values()) / kube_s,
        "kube_writes_per_s": sum(writes.values()) / cpu_s,
        "kube_reads_by_request": dict(reads.most_common()),
        "kube_reads_per_tick": sum(reads.values()) / tick_count if tick_count else math.nan,
        "apiserver_own_reads": dict(other_reads.most_common()),
        "apiserver_writes_by_request": dict(apiserver_writes.most_common()),
        "apiserver_non_2xx": dict(failed.most_common()),
        "controller_writes_by_request": dict(writes.most_common()),
        "cpu_percent": 100.0 * (end.cpu["controller"] - start.cpu["controller"]) / cpu_s,
        "cpu_percent_by_process": {
            name: 100.0 * (end.cpu[name] - start.cpu[name]) / cpu_s for name in start.cpu if name != "controller"
        },
        "machine_busy_percent": 100.0 * busy / total if total else math.nan,
        # in % of one core: the machine's busy time not spent in the bench's own processes (other work)
        "other_load_percent": (
            100.0 * busy / total * (os.cpu_count() or 1)
            - sum(end.cpu[name] - start.cpu[name] for name in start.cpu) * 100.0 / cpu_s
            if total
            else math.nan
        ),
        "rss_mb": rss,
        "rss_peak_mb": peak,
        "waiting": dict(waiting.most_common()),
        "verdicts": dict(verdicts.most_common()),
        "tick_errors": errors,
    }


def other_load(setup: Setup, seconds: float = 3.0) -> float:
    """CPU the machine spends outside this benchmark's processes, in % of one core, over ``seconds``."""
    pids = setup.pids()
    mine, machine, at = sum(cpu_seconds(pid) for pid in pids.values()), machine_cpu(), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - at
    busy, total = (b - a for b, a in zip(machine_cpu(), machine, strict=True))
    ours = sum(cpu_seconds(pid) for pid in pids.values()) - mine
    return 100.0 * (busy / total * (os.cpu_count() or 1) - ours / elapsed) if total else math.nan


def wait_for_quiet(setup: Setup, limit: float, timeout: float) -> float:
    """Until other work takes less than ``limit`` % of a core (at most ``timeout`` s): the last reading."""
    deadline = time.monotonic() + timeout
    load = other_load(setup)
    while load > limit and time.monotonic() < deadline:
        say(f"  other work on the machine: {load:.0f}% of a core; waiting for < {limit:.0f}%", progress=True)
        time.sleep(10)
        load = other_load(setup)
    return load


def run_once(setup: Setup, size: int, share: float, args: argparse.Namespace) -> dict[str, Any]:
    """One controller with ``size`` policies and one sharing setting, measured over the window."""
    tag = f"{size}-share{share:g}"
    policies = setup.workdir / f"policies-{tag}"
    policies.mkdir()
    for p in setup.pairs[:size]:
        (policies / f"{p.policy}.yaml").write_text(policy_text(p, setup.kube.ns, args.interval))
    workdir = setup.workdir / f"run-{tag}"
    workdir.mkdir()
    result: dict[str, Any] = {"size": size, "share_seconds": share, "source": source_state()}
    if args.quiet_wait > 0:
        result["other_load_before_percent"] = wait_for_quiet(setup, args.quiet_limit, args.quiet_wait)
    with Fleet(kube=setup.kube, policies=policies, prometheus_url=setup.prometheus_url, workdir=workdir) as fleet:
        for key in _TEST_SETTINGS:
            fleet.env.pop(key, None)
        fleet.env["GATEWAY_CANARY_QUERY_SHARE_SECONDS"] = f"{share:g}"
        started = time.monotonic()
        process = fleet.start(f"scale-{tag}")
        assert process.pid is not None
        result["ready_s"] = time.monotonic() - started
        warm, result["warm_up_s"] = warm_up(process, size, timeout=60 + 0.5 * size)
        result["warmed_up"] = warm
        if not warm:
            say(f"  size {size}, share {share:g}: NOT warmed up after {result['warm_up_s']:.0f} s", progress=True)
        pids = {"controller": process.pid, **setup.pids()}
        start = snapshot(setup, process, pids, end=False)
        began = time.time()
        time.sleep(args.window)
        end = snapshot(setup, process, pids, end=True)
        ended = time.time()
        result.update(figures(setup, start, end, process.pid))
        result["bake_unbroken"] = bake_unbroken(setup, began)
        result["skipped_runs"] = skipped_runs(process, began, ended)
        result["log"] = str(process.log)
        if args.profile is not None and size == max(args.sizes):
            result["profile"] = profile(process.pid, args.profile, share, args.profile_seconds)
        process.stop()
    reset(setup)
    return result


def bake_unbroken(setup: Setup, since: float) -> int:
    """Policies whose bake run (passing checks at most two intervals apart) began before ``since``
    and is still open: their bake time grew all through the window. A check late by more than two
    intervals closes the run, and the next one opens a new one, a change of state that is saved."""
    items = setup.admin.call(
        "GET",
        f"/api/v1/namespaces/{setup.kube.ns}/configmaps?labelSelector=app.kubernetes.io%2Fmanaged-by%3Dgateway-canary",
    )["items"]
    unbroken = 0
    for item in items:
        state = json.loads((item.get("data") or {}).get("state") or "{}")
        started = state.get("run_started_at")
        if started and datetime.fromisoformat(started).timestamp() <= since:
            unbroken += 1
    return unbroken


def skipped_runs(process: ControllerProcess, since: float, until: float) -> int:
    """Runs APScheduler skipped in the window because the policy's previous run had not even started
    (``max_instances`` 1: a run waiting for one of the executor's threads counts as running)."""
    skipped = 0
    for line in process.lines():
        if "maximum number of running instances" not in str(line.get("event", "")):
            continue
        at = datetime.fromisoformat(str(line.get("timestamp", "")).replace("Z", "+00:00")).timestamp()
        skipped += since <= at <= until
    return skipped


def reset(setup: Setup) -> None:
    """The next run starts from the same cluster: no state objects, every pair at 20/80 again."""
    ns = setup.kube.ns
    setup.admin.call(
        "DELETE", f"/api/v1/namespaces/{ns}/configmaps?labelSelector=app.kubernetes.io%2Fmanaged-by%3Dgateway-canary"
    )
    items = setup.admin.call("GET", f"/api/v1/namespaces/{ns}/services")["items"]
    wanted = {p.target: TARGET_WEIGHT for p in setup.pairs} | {p.source: SOURCE_WEIGHT for p in setup.pairs}
    moved = [
        item["metadata"]["name"]
        for item in items
        if item["metadata"]["name"] in wanted
        and (item["metadata"].get("annotations") or {}).get(WEIGHT) != str(wanted[item["metadata"]["name"]])
    ]
    if moved:
        say(f"  {len(moved)} Services' weights moved (reset): {moved[:5]}", progress=True)
        concurrently(
            lambda name: setup.admin.call(
                "PATCH",
                f"/api/v1/namespaces/{ns}/services/{name}",
                {"metadata": {"annotations": {WEIGHT: str(wanted[name])}}},
            ),
            moved,
        )


# --- profiling ---------------------------------------------------------------------------------------------


def profile(pid: int, svg: Path, share: float, seconds: int) -> dict[str, Any]:
    """py-spy on the controller: a flame graph (the default setting's at ``svg``), collapsed stacks
    summarised by function and module (% of the samples of active threads), and one dump."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        return {"error": "py-spy not installed (.venv/bin/pip install py-spy)"}
    svg.parent.mkdir(parents=True, exist_ok=True)
    stem = svg.with_suffix("") if share == SHARE_SECONDS[-1] else svg.with_name(f"{svg.stem}-share{share:g}")
    flame = stem.with_suffix(".svg")
    raw = stem.with_suffix(".collapsed.txt")
    gil = stem.with_suffix(".gil.collapsed.txt")
    dump = stem.with_suffix(".dump.txt")
    out: dict[str, Any] = {"svg": str(flame), "collapsed": str(raw), "gil_collapsed": str(gil), "dump": str(dump)}
    recordings = (("flamegraph", flame, ()), ("raw", raw, ()), ("raw", gil, ("--gil",)))
    for fmt, path, extra in recordings:
        say(f"  py-spy record ({fmt} {' '.join(extra)}) {seconds} s on pid {pid}", progress=True)
        done = subprocess.run(
            [spy, "record", "-p", str(pid), "-d", str(seconds), "--nolineno", "-f", fmt, "-o", str(path), *extra],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            out["error"] = done.stderr[-500:]
            return out
    dumped = subprocess.run([spy, "dump", "-p", str(pid)], capture_output=True, text=True, check=False)
    dump.write_text(dumped.stdout + dumped.stderr)
    out["active"] = summarise(raw)
    out["gil"] = summarise(gil)
    return out


def summarise(collapsed: Path, top: int = 15) -> dict[str, Any]:
    """From py-spy's collapsed stacks: % of samples by leaf function (self), by function anywhere on
    the stack (inclusive) and by the module of the leaf frame."""
    own: Counter[str] = Counter()
    activities: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    modules: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        threads[frames[0].split(" ")[0] if frames else "?"] += count
        leaf = frames[-1]
        own[leaf] += count
        activities[activity(frames)] += count
        modules[_module(leaf)] += count
        for frame in set(frames[1:]):
            inclusive[frame] += count
    if not total:
        return {"samples": 0}

    def share_of(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100.0 * count / total, 1)) for name, count in counter.most_common(top)]

    return {
        "samples": total,
        "activities": share_of(activities),
        "self": share_of(own),
        "inclusive": share_of(inclusive),
        "modules": share_of(modules),
        "threads": share_of(threads),
    }


#: what a stack is doing, by the first rule any of its frames (or, for waiting, its leaf) matches
ACTIVITIES = (
    ("waiting (condition, queue, lock)", ("Condition.wait", "Queue.get", "Event.wait", "_worker (concurrent"), True),
    ("Prometheus queries (requests, JSON)", ("prometheus_connect.py", "adapters/prometheus.py"), False),
    ("shared-query bookkeeping", ("runtime/sharing.py",), False),
    ("Kubernetes reads (client, JSON)", ("adapters/kube_api.py", "kubernetes/client", "adapters/kube_rest.py"), False),
    ("logging (structlog, JSON lines)", ("controller/logs.py", "structlog/", "logging/__init__"), False),
    ("/metrics exposition", ("prometheus_client/",), False),
    ("policy reload (files, YAML)", ("policy_source.py", "yaml/"), False),
    ("gates and decision (controller/core)", ("controller/core/",), False),
    ("scheduler (APScheduler)", ("apscheduler/",), False),
)


def activity(frames: list[str]) -> str:
    for name, needles, leaf_only in ACTIVITIES:
        where = frames[-1:] if leaf_only else frames
        if any(needle in frame for frame in where for needle in needles):
            return name
    return "other"


def _module(frame: str) -> str:
    """``function (path/to/module.py)`` -> the module path's first two parts."""
    inside = frame[frame.rfind("(") + 1 : frame.rfind(")")] if "(" in frame else frame
    parts = inside.replace("\\", "/").split("/")
    return "/".join(parts[:2]) if len(parts) > 1 else inside


# --- the report ------------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    if math.isinf(seconds):
        return ">10s"
    return f"{seconds * 1000:.0f}" if seconds >= 0.01 else f"{seconds * 1000:.1f}"


def table(runs: list[dict[str, Any]]) -> list[str]:
    head = (
        "policies", "share s", "ticks/s", "late p50", "late p99", "late max", "check p50", "check p99", "tick p50",
        "tick p99", "prom q/s", "kube r/s", "kube w/s", "CPU %", "RSS MB", "peak MB", "baking", "bake ok", "skipped",
    )  # fmt: skip
    rows = [head]
    for run in runs:
        baking = run["waiting"].get("bake", 0)
        rows.append(
            (
                str(run["size"]),
                f"{run['share_seconds']:g}",
                f"{run['ticks_per_s']:.1f}",
                _ms(run["lateness_p50_s"]),
                _ms(run["lateness_p99_s"]),
                "<=" + _ms(run["lateness_max_s"]),
                _ms(run["check_p50_s"]),
                _ms(run["check_p99_s"]),
                _ms(run["tick_p50_s"]),
                _ms(run["tick_p99_s"]),
                f"{run['prometheus_queries_per_s']:.1f}",
                f"{run['kube_reads_per_s']:.1f}",
                f"{run['kube_writes_per_s']:.2f}",
                f"{run['cpu_percent']:.0f}",
                f"{run['rss_mb']:.0f}",
                f"{run['rss_peak_mb']:.0f}",
                f"{baking}/{run['size']}" + ("" if run["warmed_up"] else " (cold)"),
                f"{run['bake_unbroken']}/{run['size']}",
                str(run["skipped_runs"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return lines


def verdicts(runs: list[dict[str, Any]]) -> list[str]:
    """The targets at 500 policies (or at the largest size measured, said so)."""
    largest = max(run["size"] for run in runs)
    lines = []
    for run in (r for r in runs if r["size"] == largest):
        checks = [
            ("lateness p99 <= 1 s", run["lateness_p99_s"] <= TARGET_LATENESS_P99_S, f"{_ms(run['lateness_p99_s'])} ms"),
            ("CPU <= 50 % of one core", run["cpu_percent"] <= TARGET_CPU_PERCENT, f"{run['cpu_percent']:.0f} %"),
            (
                "RSS <= 200 MB",
                max(run["rss_mb"], run["rss_peak_mb"]) <= TARGET_RSS_MB,
                f"{run['rss_mb']:.0f} MB (peak {run['rss_peak_mb']:.0f})",
            ),
            (
                "no write while baking",
                run["kube_writes_per_s"] == 0,
                ", ".join(f"{k}: {v}" for k, v in run["controller_writes_by_request"].items()) or "none",
            ),
        ]
        where = f"{largest} policies" + ("" if largest == TARGET_SIZE else f" (the targets are for {TARGET_SIZE})")
        lines.append(f"targets at {where}, share {run['share_seconds']:g} s:")
        lines += [f"  {'met    ' if ok else 'NOT met'}  {name}: {value}" for name, ok, value in checks]
    return lines


def details(runs: list[dict[str, Any]]) -> list[str]:
    """Where the load goes: other processes' CPU, the reads by request, anything unexpected."""
    lines = []
    for run in runs:
        others = ", ".join(f"{name} {value:.0f}%" for name, value in run["cpu_percent_by_process"].items())
        reads = ", ".join(
            f"{name} {count / run['window_s']:.1f}/s" for name, count in run["kube_reads_by_request"].items()
        )
        lines.append(
            f"{run['size']:>4} policies, share {run['share_seconds']:g}: machine {run['machine_busy_percent']:.0f}% "
            f"busy (of {os.cpu_count()} cores), other work {run['other_load_percent']:.0f}% of a core; {others}; "
            f"reads/tick {run['kube_reads_per_tick']:.1f}, command polls included ({reads})"
        )
        odd = {
            "verdicts": run["verdicts"],
            "waiting": {k: v for k, v in run["waiting"].items() if k != "bake"},
            "non-2xx": run["apiserver_non_2xx"],
            "tick errors": run["tick_errors"],
        }
        if odd["waiting"] or odd["non-2xx"] or odd["tick errors"] or {v.lower() for v in odd["verdicts"]} - {"pass"}:
            lines.append(f"      note: {odd}")
    return lines


def source_state() -> dict[str, Any]:
    """The commit measured and the files that differ from it (the figures belong to that code)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    changed = git("status", "--short", "controller").splitlines()
    digest = hashlib.sha256(git("diff", "HEAD", "--", "controller").encode()).hexdigest()[:12] if changed else None
    return {"commit": git("rev-parse", "--short", "HEAD"), "changed": changed, "diff_sha256": digest}


def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity: written as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", help="policies per run, comma-separated (default 1,10,100,200,500)")
    parser.add_argument("--share-seconds", help="GATEWAY_CANARY_QUERY_SHARE_SECONDS values (default 0,1)")
    parser.add_argument("--window", type=float, help="seconds measured per run (default 30; --quick 6)")
    parser.add_argument("--interval", type=int, help="analysis.interval, seconds (default 5; --quick 2)")
    parser.add_argument(
        "--quick", action="store_true", help="the CI size: sizes 1 and 3, checks every 2 s, an 8 s window"
    )
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--profile", type=Path, help="py-spy flame graph of the largest size (SVG path)")
    parser.add_argument("--profile-seconds", type=int, default=20)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, data)")
    parser.add_argument(
        "--quiet-wait", type=float, default=0.0, help="before each run, wait up to this long for other work to end"
    )
    parser.add_argument("--quiet-limit", type=float, default=20.0, help="other work allowed, %% of one core")
    args = parser.parse_args(argv)
    sizes = QUICK_SIZES if args.quick else SIZES
    args.sizes = sorted({int(s) for s in args.sizes.split(",")}) if args.sizes else list(sizes)
    shares = SHARE_SECONDS
    args.share_seconds = [float(s) for s in args.share_seconds.split(",")] if args.share_seconds else list(shares)
    args.interval = args.interval or (QUICK_INTERVAL_SECONDS if args.quick else INTERVAL_SECONDS)
    args.window = args.window or (8.0 if args.quick else 30.0)
    if args.window <= args.interval:
        parser.error(f"--window must be longer than the check interval ({args.interval} s)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="gateway-canary-scale-"))
    runs: list[dict[str, Any]] = []
    began = time.monotonic()
    try:
        with servers(workdir, max(args.sizes), args.interval) as setup:
            for name, seconds in setup.seconds.items():
                say(f"setup: {name}: {seconds:.1f} s", progress=True)
            for size in args.sizes:
                for share in args.share_seconds:
                    say(f"run: {size} policies, share {share:g} s ...", progress=True)
                    run = run_once(setup, size, share, args)
                    say(
                        f"  ready {run['ready_s']:.1f} s, warm-up {run['warm_up_s']:.1f} s, "
                        f"{run['ticks_per_s']:.1f} ticks/s, CPU {run['cpu_percent']:.0f} %",
                        progress=True,
                    )
                    runs.append(run)
            setup_seconds = dict(setup.seconds)
    finally:
        if args.keep:
            say(f"work directory kept: {workdir}", progress=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    say(
        f"gateway-canary scale: {', '.join(map(str, args.sizes))} policies x share {args.share_seconds}; "
        f"check every {args.interval} s, window {args.window:g} s measured after warm-up; "
        f"{os.cpu_count()} cores, all servers on this machine"
    )
    say("latency columns in ms; kube r/s: GET/LIST on what the controller reads; kube w/s: its writes (audit log)")
    for line in table(runs):
        say(line)
    say()
    for line in verdicts(runs):
        say(line)
    say()
    for line in details(runs):
        say(line)
    for run in runs:
        spied = run.get("profile") or {}
        for kind, what in (("active", "threads not idle"), ("gil", "holding the GIL: CPU in Python")):
            summary = spied.get(kind) or {}
            if not summary.get("samples"):
                continue
            say(
                f"\nprofile, {run['size']} policies, share {run['share_seconds']:g}, {what} "
                f"({summary['samples']} samples):"
            )
            for title in ("activities", "self", "modules"):
                say(f"  by {title}: " + "; ".join(f"{name} {pct}%" for name, pct in summary[title][:10]))
    total = time.monotonic() - began
    say("\nsetup: " + "; ".join(f"{name}: {seconds:.1f} s" for name, seconds in setup_seconds.items()))
    say(f"whole benchmark: {total:.0f} s")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                _finite(
                    {
                        "setup_seconds": setup_seconds,
                        "total_seconds": total,
                        "args": vars(args) | {"json": str(args.json), "profile": str(args.profile)},
                        "runs": runs,
                    }
                ),
                indent=2,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
