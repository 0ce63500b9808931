"""Benchmark: rollback latency against the physical floor, end to end, in one run.

Everything is real except the traffic and the cloud: Prometheus scraping the tests' traffic
exporter every second, Alertmanager delivering to a webhook, kube-apiserver + etcd (binaries from
``scripts/test-deps.sh``), the EMULATED cloud controller of the tests (the exporter's split follows
the CLB weights it applies, half a second late, as in ``tests/test_end_to_end.py``), and
``gateway-canary run`` as a subprocess under the Role ``gateway-canary rbac`` prints, with 1 s
checks, a 10 s window and ``GATEWAY_CANARY_FAILURE_RECHECK_SECONDS=1``.

For every injection (a scenario's fault on the ASM gateway) it measures, from the moment of injection:

(a) the floor: an independent poller asks Prometheus every 100 ms for the very PromQL the gate
    judges (``queries_for(policy)``: the target's 5xx ratio, or its p99) and notes the first
    answer over the limit. Each policy has one absolute gate only, so "the target's value > limit"
    is exactly when a check can first FAIL: no controller reading this Prometheus can react sooner;
(b) the ASM Service's weight annotation reading "0", as a watch on the API server delivers it;
(c) the RolledBack alert reaching a webhook behind Alertmanager (``GATEWAY_CANARY_ALERTMANAGER_URL``),
    and, for comparison, the controller's own webhook (``GATEWAY_CANARY_WEBHOOK_URL``).

Where (b) - (a) goes comes from the controller's check log lines and ``up``'s sample times: the
scrape whose samples crossed the limit, the start of the first failing check, the check, the writes.

Phases are random twice over. Each rollout's policy is written at a random moment and loaded within
50 ms (``GATEWAY_CANARY_RELOAD_INTERVAL_SECONDS=0.05``; its checks keep the phase they start with,
so the default 0.5 s reload would leave two phases of checks against scrapes for a whole run); the
fault comes a random fraction of the check interval after a scrape.

Between injections nothing is reused: a fresh pair of gateway workloads (new series, no earlier
fault in any window) and a fresh policy name (a new rollout, a new Alertmanager group), written to
the same policy file; the fault is injected once the rollout holds its first step (weight 50, a 1 h
bake) and the ASM gateway has carried healthy traffic for a full window, so every floor starts from
the same state. An injection that did not end in a rollback is reset by hand (no policy, 0/100).

The window is 10 s: a rate needs several 1 s scrapes to be steady; the 1 % -> 20 % fault then takes
a few scrapes to cross 5 % (a gradual floor), an 800 ms p99 crosses at the first scrape after the
fault and a dead backend at the second (its 5xx series is born with the fault, and rate() needs two
samples); and it is the window of ``tests/test_end_to_end.py``, so the figures compare. A longer
window lengthens (a) for the gradual fault only.

Asserts nothing; exits 1 when an injection did not produce every figure. Usage:
    .venv/bin/python bench/rollback.py [--quick] [--scenarios S,...] [--thresholds 1,2]
        [--injections N] [--seed N] [--json PATH] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from controller.core.cloud import BackendMode, Backends  # noqa: E402
from controller.core.enums import GatewayRole  # noqa: E402
from controller.core.loader import parse_policy_text  # noqa: E402
from controller.core.policy import CanaryPolicy  # noqa: E402
from controller.core.queries import queries_for  # noqa: E402
from tests.ccm_emulator import CcmEmulator  # noqa: E402
from tests.conftest import ALERTMANAGER, PROMETHEUS, TEST_BIN, prometheus_command  # noqa: E402
from tests.faults.harness import AlertReceiver, ControllerProcess, Fleet  # noqa: E402
from tests.kube_cluster import SOURCE, TARGET, Cluster, ControlPlane, binary_paths  # noqa: E402
from tests.servers import WEIGHT, GatewayTraffic, LaggedShare, ManagedProcess, TrafficExporter, free_port, wait_for  # noqa: E402

INTERVAL_S = 1.0  # the policy's analysis.interval (and GATEWAY_CANARY_FAILURE_RECHECK_SECONDS)
WINDOW_S = 10.0  # the policy's analysis.window
FLOOR_POLL_S = 0.1  # how often the floor poller asks Prometheus
#: how often the controller re-reads the policies directory. A policy's checks start when it is
#: loaded and keep that phase; loaded within 50 ms of a write at a random moment, every rollout's
#: checks fall at a random phase of the scrapes (a 0.5 s reload would allow only two phases per run).
RELOAD_S = 0.05
TOTAL_RPS = 200.0
#: the first step: the ASM gateway's weight while a fault is injected (a long bake keeps it there)
STEP = 50
MIN_REQUESTS = 10

POLICY = """\
apiVersion: gateway-canary.io/v1alpha1
kind: CanaryPolicy
metadata:
  name: {name}
spec:
  source: {{service: {ns}/{source_service}, workload: {source}}}
  target: {{service: {ns}/{target_service}, workload: {target}}}
  schedule:
    steps: [{step}, 100]
    bakeTime: 1h
  analysis:
    interval: {interval:g}s
    window: {window:g}s
    minRequests: {min_requests}
    failureThreshold: {threshold}
  gates:
    {gates}
  routes: {{check: false}}   # no Istio Gateways here
"""


@dataclass(frozen=True)
class Scenario:
    """A fault on the ASM gateway and the one gate that must catch it."""

    name: str
    title: str
    #: the policy's gates (one absolute limit, so the floor is exactly "target's value > limit")
    gates: str
    #: which of the target's queries the gate judges: "error_rate" or "latency"
    measure: str
    limit: float
    #: the GatewayTraffic attribute the fault changes, its healthy value (both gateways) and the fault's
    attribute: str
    healthy: float
    broken: float


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("5xx-1to20", "5xx 1% -> 20%, limit 5%", "errorRate: {max: 0.05}", "error_rate", 0.05,
                 "error_ratio", 0.01, 0.20),
        Scenario("5xx-0to100", "5xx 0% -> 100% (dead backend), limit 5%", "errorRate: {max: 0.05}", "error_rate",
                 0.05, "error_ratio", 0.0, 1.0),
        Scenario("p99-20to800", "p99 20 -> 800 ms, limit 500 ms", "latency: {p99Ms: {max: 500}}", "latency", 500.0,
                 "latency_ms", 20.0, 800.0),
    )
}  # fmt: skip
QUICK = {"scenarios": ["5xx-0to100"], "thresholds": [1], "injections": 2}


@dataclass
class Sample:
    """One injection. Times in seconds from the injection; None: not seen before the deadline."""

    scenario: str
    threshold: int
    index: int
    policy: str
    start_phase_s: float  # the random wait before writing the policy (its checks' phase)
    phase_s: float = 0.0  # the random wait before injecting (a fraction of the check interval)
    floor_s: float | None = None  # (a)
    floor_value: float | None = None  # the floor poller's first answer over the limit
    crossing_scrape_s: float | None = None  # the last scrape before (a): the one whose samples crossed
    zero_s: float | None = None  # (b)
    alertmanager_s: float | None = None  # (c)
    webhook_s: float | None = None  # the controller's own webhook
    # from the controller's log (its timestamps: when the line was written)
    first_fail_check_start_s: float | None = None
    rollback_check_start_s: float | None = None  # the failureThreshold-th consecutive FAIL
    rollback_check_end_s: float | None = None
    intent_saved_s: float | None = None  # the rollback's "alert" line: its intent is saved
    error: str | None = None
    #: every answer of the floor poller: (seconds after the injection it was asked for, value)
    floor_trace: list[tuple[float, float | None]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return None not in (self.floor_s, self.zero_s, self.alertmanager_s)


# --- watching the Services ----------------------------------------------------------------------------


class WeightWatch:
    """The weight annotations of a namespace's Services as a watch on the API server delivers them.

    ``seen`` holds (monotonic time of arrival, Service, weight) for every event, oldest first.
    """

    def __init__(self, plane: ControlPlane, namespace: str) -> None:
        self._url = f"{plane.url}/api/v1/namespaces/{namespace}/services"
        self._verify = str(plane.ca_file)
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Bearer {plane.admin_token}"
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._response: requests.Response | None = None
        self.seen: list[tuple[float, str, str | None]] = []
        self.current: dict[str, str | None] = {}
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._run, name="weight-watch", daemon=True)

    def __enter__(self) -> WeightWatch:
        self._thread.start()
        wait_for(lambda: TARGET in self.current and SOURCE in self.current, timeout=10, what="the Services listed")
        return self

    def __exit__(self, *exc: object) -> None:
        # The thread is blocked reading the stream: closing the response from here would wait for that
        # read, and an open watch holds kube-apiserver's shutdown up for 20 s. Shutting the socket
        # down ends the read at once.
        self._stop.set()
        response = self._response
        connection = None if response is None else getattr(response.raw, "connection", None)
        sock = getattr(connection, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)

    def _record(self, item: dict[str, Any]) -> None:
        name = item["metadata"]["name"]
        weight = (item["metadata"].get("annotations") or {}).get(WEIGHT)
        with self._changed:
            self.seen.append((time.monotonic(), name, weight))
            self.current[name] = weight
            self._changed.notify_all()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                listing = self._session.get(self._url, timeout=10, verify=self._verify)
                listing.raise_for_status()
                body = listing.json()
                for item in body["items"]:
                    self._record(item)
                params = {"watch": "true", "resourceVersion": body["metadata"]["resourceVersion"],
                          "allowWatchBookmarks": "false", "timeoutSeconds": "600"}  # fmt: skip
                with self._session.get(
                    self._url, params=params, stream=True, timeout=(5, 660), verify=self._verify
                ) as response:
                    self._response = response
                    response.raise_for_status()
                    for line in response.iter_lines():
                        if self._stop.is_set():
                            return
                        if not line:
                            continue
                        event = json.loads(line)
                        if event.get("type") == "ERROR":  # e.g. 410 Gone: list again
                            break
                        if event.get("type") in ("ADDED", "MODIFIED"):
                            self._record(event["object"])
            except (requests.RequestException, ValueError, AttributeError) as exc:
                if self._stop.is_set():
                    return
                self.errors.append(repr(exc))
                time.sleep(0.1)

    def first(self, name: str, accept: Callable[[str | None], bool], *, after: float, timeout: float) -> float | None:
        """The arrival time of the first event of ``name`` at or after ``after`` whose weight ``accept``s."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for at, service, weight in self.seen:
                    if at >= after and service == name and accept(weight):
                        return at
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)

    def weights(self) -> tuple[str | None, str | None]:
        with self._changed:
            return self.current.get(TARGET), self.current.get(SOURCE)


# --- Prometheus -----------------------------------------------------------------------------------------


def instant(session: requests.Session, prometheus: str, promql: str) -> float | None:
    """The first sample of an instant query (None: empty answer or an error)."""
    try:
        answer = session.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=2).json()
    except (requests.RequestException, ValueError):
        return None
    result = (answer.get("data") or {}).get("result") or []
    return float(result[0]["value"][1]) if result else None


def poll_floor(
    prometheus: str, promql: str, limit: float, *, since: float, timeout: float, trace: list[tuple[float, float | None]]
) -> tuple[float, float] | None:
    """(a): every FLOOR_POLL_S from ``since``, the gate's query; (seconds after ``since`` the first answer
    over ``limit`` was asked for, that answer). None: not crossed within ``timeout``. Every answer is
    appended to ``trace`` as (seconds after ``since`` it was asked for, value)."""
    with requests.Session() as session:
        tick = 0
        while True:
            due = since + tick * FLOOR_POLL_S
            time.sleep(max(0.0, due - time.monotonic()))
            asked = time.monotonic()
            if asked - since > timeout:
                return None
            value = instant(session, prometheus, promql)
            trace.append((round(asked - since, 4), value))
            if value is not None and value > limit:  # the gate's FAIL: value <= threshold passes
                return asked - since, value
            tick = max(tick + 1, math.ceil((time.monotonic() - since) / FLOOR_POLL_S))


def crossing_scrape(prometheus: str, crossed_epoch: float, since_epoch: float) -> float | None:
    """Seconds from ``since_epoch`` to the start of the last scrape (``up``'s sample time) before
    ``crossed_epoch``: the scrape whose samples the floor poller first saw over the limit."""
    try:
        answer = requests.get(
            f"{prometheus}/api/v1/query", params={"query": 'up{job="traffic"}[60s]'}, timeout=2
        ).json()
    except (requests.RequestException, ValueError):
        return None
    series = (answer.get("data") or {}).get("result") or []
    times = [float(at) for item in series for at, _ in item.get("values", []) if float(at) <= crossed_epoch]
    return max(times) - since_epoch if times else None


# --- the controller's log ---------------------------------------------------------------------------------


def _epoch(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(line["timestamp"]).replace("Z", "+00:00")).timestamp()


def read_checks(controller: ControllerProcess, sample: Sample, injected_at_epoch: float) -> None:
    """Fill in where (b) - (a) went, from the policy's check and alert log lines after the injection.

    A FAIL is always logged at info, and so is a PASS after a FAIL (only a PASS like the last one
    may be at debug), so the failing checks and their streak are all here.
    """
    lines = [line for line in controller.lines() if line.get("policy") == sample.policy and "timestamp" in line]
    checks = []
    for line in lines:
        if line.get("event") == "check":
            end = _epoch(line) - injected_at_epoch
            checks.append((end - float(line.get("seconds") or 0.0), end, line.get("verdict")))
        elif line.get("event") == "alert" and line.get("kind") == "RolledBack" and sample.intent_saved_s is None:
            sample.intent_saved_s = _epoch(line) - injected_at_epoch
    after = [c for c in checks if c[1] >= 0]
    fails = [c for c in after if c[2] == "FAIL"]
    if fails:
        sample.first_fail_check_start_s = fails[0][0]
        streak = 0
        for start, end, verdict in after:
            streak = streak + 1 if verdict == "FAIL" else 0
            if streak == sample.threshold:
                sample.rollback_check_start_s, sample.rollback_check_end_s = start, end
                break


# --- the rig ----------------------------------------------------------------------------------------------


def missing_binaries() -> list[str]:
    """What ``scripts/test-deps.sh`` installs and this machine lacks."""
    binaries = binary_paths(TEST_BIN)
    wanted = [PROMETHEUS, ALERTMANAGER, str(binaries["etcd"]), str(binaries["kube-apiserver"]), "openssl"]
    return [path for path in wanted if not (shutil.which(path) or Path(path).exists())]


def _answers(url: str, params: dict[str, str] | None = None) -> bool:
    try:
        return requests.get(url, params=params, timeout=1).ok
    except requests.RequestException:
        return False


def _serve(stack: contextlib.ExitStack, args: list[str], log: Path) -> ManagedProcess:
    process = ManagedProcess(args, log)
    stack.callback(process.stop)
    return process


def alertmanager_args(directory: Path, port: int, webhook: str) -> list[str]:
    """Alertmanager as the tests configure it (``tests/conftest.py``): every new group at once."""
    config = directory / "alertmanager.yml"
    config.write_text(
        "route:\n  receiver: sink\n  group_by: ['alertname', 'policy']\n"
        "  group_wait: 0s\n  group_interval: 1s\n  repeat_interval: 1h\n"
        f"receivers:\n  - name: sink\n    webhook_configs:\n      - url: {webhook}\n"
    )
    return [
        ALERTMANAGER,
        f"--config.file={config}",
        f"--storage.path={directory / 'am-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
    ]


@dataclass
class Rig:
    """Everything one run measures against."""

    kube: Cluster
    traffic: TrafficExporter
    share: LaggedShare
    prometheus: str
    receiver: AlertReceiver
    watch: WeightWatch
    controller: ControllerProcess
    policies: Path
    workdir: Path


@contextlib.contextmanager
def started_rig(workdir: Path, policy_names: Sequence[str], after_scrape: float = 0.0) -> Iterator[Rig]:
    """Start Prometheus and Alertmanager (in the background), the control plane, the gateways, the
    emulated cloud controller and the controller; stop them all at the end, however it ends."""
    with contextlib.ExitStack() as stack:
        traffic = TrafficExporter(GatewayTraffic("gw-bench"), GatewayTraffic("gw-bench-asm"), total_rps=TOTAL_RPS)
        stack.callback(traffic.close)
        receiver = AlertReceiver("bench")
        stack.callback(receiver.close)
        prom_port, am_port = free_port(), free_port()
        prom_args, scraped = prometheus_command(workdir, prom_port, [traffic.server.port])
        _serve(stack, prom_args, workdir / "prometheus.log")
        _serve(stack, alertmanager_args(workdir, am_port, f"{receiver.url}/alertmanager"), workdir / "am.log")
        plane = stack.enter_context(ControlPlane(workdir / "control-plane", binary_paths(TEST_BIN)).running())
        kube = Cluster(plane, plane.create_namespace("bench"), workdir)
        kube.add_gateways()
        kube.grant(*(kube.policy(name=name) for name in policy_names))
        ccm = stack.enter_context(CcmEmulator(plane, kube.ns, lag=0.2))
        for service in (TARGET, SOURCE):
            ccm.provision(service, Backends(BackendMode.CLUSTER, nodes=20))
        share = LaggedShare(ccm.clb_target_share, 0.5)
        traffic.share = share
        traffic.move_to(kube.ns)
        stack.callback(setattr, traffic, "share", lambda: 0.0)  # before the CCM stops answering
        prometheus = f"http://127.0.0.1:{prom_port}"
        wait_for(scraped, timeout=60, interval=0.2, what=f"Prometheus's first scrape (log: {workdir})")
        am_url = f"http://127.0.0.1:{am_port}"
        wait_for(lambda: _answers(f"{am_url}/-/ready"), timeout=60, interval=0.2, what="Alertmanager ready")
        watch = stack.enter_context(WeightWatch(plane, kube.ns))
        policies = workdir / "policies"
        policies.mkdir()
        fleet = stack.enter_context(
            Fleet(kube=kube, policies=policies, prometheus_url=prometheus, workdir=workdir,
                  webhook_url=f"{receiver.url}/hook", alertmanager_url=am_url,
                  extra_env={"GATEWAY_CANARY_FAILURE_RECHECK_SECONDS": f"{INTERVAL_S:g}",
                             "GATEWAY_CANARY_RELOAD_INTERVAL_SECONDS": f"{RELOAD_S:g}",
                             "GATEWAY_CANARY_CHECK_AFTER_SCRAPE_SECONDS": f"{after_scrape:g}"})
        )  # fmt: skip
        controller = fleet.start("controller")
        yield Rig(kube, traffic, share, prometheus, receiver, watch, controller, policies, workdir)


# --- one injection ----------------------------------------------------------------------------------------


def reset_weights(rig: Rig) -> None:
    """After an injection that did not end in a rollback: no policy, and the Services back at 0/100
    (written as an admin, as a person would)."""
    (rig.policies / "bench.yaml").unlink(missing_ok=True)
    time.sleep(1.0)  # the controller reloads every 0.5 s: it leaves the weights alone from then on
    for service, weight in ((TARGET, "0"), (SOURCE, "100")):
        rig.kube.edit(service, {WEIGHT: weight})
    wait_for(lambda: rig.watch.weights() == ("0", "100"), timeout=10, what="the Services at 0/100")


def _policy(rig: Rig, scenario: Scenario, threshold: int, name: str, workloads: tuple[str, str]) -> CanaryPolicy:
    text = POLICY.format(
        name=name, ns=rig.kube.ns, source_service=SOURCE, target_service=TARGET, source=workloads[0],
        target=workloads[1], step=STEP, interval=INTERVAL_S, window=WINDOW_S, min_requests=MIN_REQUESTS,
        threshold=threshold, gates=scenario.gates,
    )  # fmt: skip
    loaded = parse_policy_text(text, "bench.yaml")
    if loaded.errors or len(loaded.policies) != 1:
        raise SystemExit(f"the benchmark's policy is invalid: {'; '.join(map(str, loaded.errors))}")
    staged = rig.policies / ".bench.yaml.new"  # hidden: never read half-written
    staged.write_text(text)
    staged.replace(rig.policies / "bench.yaml")  # the same file: the controller reloads it
    return loaded.policies[0].policy


def _alertmanager_arrival(rig: Rig, policy: str, after: float, timeout: float) -> float | None:
    def arrived() -> float | None:
        for delivery in rig.receiver.received():
            if delivery.at < after or delivery.path != "/alertmanager" or not isinstance(delivery.body, dict):
                continue
            for alert in delivery.body.get("alerts") or []:
                labels = alert.get("labels") or {}
                if labels.get("policy") == policy and labels.get("alertname") == "GatewayCanaryRolledBack":
                    return delivery.at
        return None

    return _within(arrived, timeout)


def _webhook_arrival(rig: Rig, policy: str, after: float, timeout: float) -> float | None:
    def arrived() -> float | None:
        hits = [d.at for d in rig.receiver.delivered(kind="RolledBack", policy=policy) if d.at >= after]
        return hits[0] if hits else None

    return _within(arrived, timeout)


def _within(find: Callable[[], float | None], timeout: float, interval: float = 0.01) -> float | None:
    deadline = time.monotonic() + timeout
    while True:
        found = find()
        if found is not None or time.monotonic() > deadline:
            return found
        time.sleep(interval)


def inject(rig: Rig, scenario: Scenario, *, threshold: int, index: int, name: str, rng: random.Random) -> Sample:
    """Set up a fresh rollout, wait until it carries healthy traffic at weight STEP, break the ASM
    gateway at a random phase, and time what follows."""
    traffic, watch = rig.traffic, rig.watch
    # the previous rollback is finished: the new rollout starts from 0/100, as a migration does
    if _within(lambda: 1.0 if watch.weights() == ("0", "100") else None, 10) is None:
        reset_weights(rig)
    sample = Sample(scenario.name, threshold, index, name, start_phase_s=rng.uniform(0.0, INTERVAL_S))
    time.sleep(sample.start_phase_s)  # the new rollout's checks: at a random phase of the scrapes
    workloads = traffic.fresh_pair(name)
    traffic.move_to(rig.kube.ns)
    for gateway in (traffic.source, traffic.target):
        setattr(gateway, scenario.attribute, scenario.healthy)
    traffic.share = rig.share
    policy = _policy(rig, scenario, threshold, name, workloads)
    plans = queries_for(policy)[GatewayRole.TARGET]
    promql = (plans.error_rate if scenario.measure == "error_rate" else plans.latency).promql
    requests_promql = plans.requests.promql

    started = time.monotonic()
    if watch.first(TARGET, lambda w: w not in (None, "0"), after=started, timeout=60) is None:
        sample.error = "the rollout did not start within 60 s"
        return sample
    with requests.Session() as session:
        carrying = _within(
            lambda: time.monotonic() if (instant(session, rig.prometheus, requests_promql) or 0) > 0 else None,
            30,
            interval=0.05,
        )
        if carrying is None:
            sample.error = "the ASM gateway carried no traffic within 30 s of its weight"
            return sample
        time.sleep(max(0.0, carrying + WINDOW_S + 1.0 - time.monotonic()))  # a full window of it
        before = instant(session, rig.prometheus, promql)
        served = instant(session, rig.prometheus, requests_promql) or 0.0
    if watch.weights()[0] in (None, "0") or before is None or before > scenario.limit or served < MIN_REQUESTS:
        sample.error = f"not healthy before the fault: weight {watch.weights()}, value {before}, requests {served}"
        return sample

    sample.phase_s = rng.uniform(0.0, INTERVAL_S)
    time.sleep(sample.phase_s)
    traffic.advance()  # the traffic so far at the healthy rates: the exporter accumulates at scrapes
    setattr(traffic.target, scenario.attribute, scenario.broken)
    injected, injected_epoch = time.monotonic(), time.time()
    with ThreadPoolExecutor(1) as pool:
        floor = pool.submit(
            poll_floor, rig.prometheus, promql, scenario.limit, since=injected, timeout=30.0, trace=sample.floor_trace
        )
        zero = watch.first(TARGET, lambda w: w == "0", after=injected, timeout=30 + 10 * threshold)
        crossed = floor.result()
    if crossed is not None:
        sample.floor_s, sample.floor_value = crossed
        sample.crossing_scrape_s = crossing_scrape(rig.prometheus, injected_epoch + sample.floor_s, injected_epoch)
    if zero is not None:
        sample.zero_s = zero - injected
        sample.alertmanager_s = _optional(_alertmanager_arrival(rig, name, injected, 20), injected)
        sample.webhook_s = _optional(_webhook_arrival(rig, name, injected, 5), injected)
    setattr(traffic.target, scenario.attribute, scenario.healthy)
    time.sleep(0.3)  # the log lines of the rollback's tick
    read_checks(rig.controller, sample, injected_epoch)
    missing = [what for what, value in (("floor", sample.floor_s), ("weight 0", sample.zero_s),
                                        ("Alertmanager alert", sample.alertmanager_s)) if value is None]  # fmt: skip
    if missing:
        sample.error = f"not seen before the deadline: {', '.join(missing)}"
    return sample


def _optional(at: float | None, since: float) -> float | None:
    return None if at is None else at - since


# --- figures ----------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


#: the figures of a row, each computed from a complete sample (None: not known for that sample)
FIGURES: dict[str, Callable[[Sample], float | None]] = {
    "a_floor_s": lambda s: s.floor_s,
    "b_zero_s": lambda s: s.zero_s,
    "b_minus_a_s": lambda s: _minus(s.zero_s, s.floor_s),
    "b_over_a": lambda s: None if s.zero_s is None or not s.floor_s else s.zero_s / s.floor_s,
    "c_minus_b_s": lambda s: _minus(s.alertmanager_s, s.zero_s),
    "webhook_minus_b_s": lambda s: _minus(s.webhook_s, s.zero_s),
    # where (b) - (a) goes
    "floor_after_scrape_s": lambda s: _minus(s.floor_s, s.crossing_scrape_s),
    "scrape_to_check_s": lambda s: _minus(s.first_fail_check_start_s, s.crossing_scrape_s),
    "wait_for_check_s": lambda s: _minus(s.first_fail_check_start_s, s.floor_s),
    "rollback_check_s": lambda s: _minus(s.rollback_check_end_s, s.rollback_check_start_s),
    "check_end_to_b_s": lambda s: _minus(s.zero_s, s.rollback_check_end_s),
}


def _minus(x: float | None, y: float | None) -> float | None:
    return None if x is None or y is None else x - y


@dataclass
class Row:
    scenario: str
    threshold: int
    asked: int
    n: int
    figures: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> {"p50": .., "p95": ..}
    #: injections whose first failing check started a check interval or more after (a): a check ran
    #: after the floor and passed (inferred from the times: a passing check may be logged at debug)
    late_checks: int = 0


def summarize(samples: Sequence[Sample], rows: Sequence[tuple[str, int]], asked: int) -> list[Row]:
    out = []
    for scenario, threshold in rows:
        complete = [s for s in samples if (s.scenario, s.threshold) == (scenario, threshold) and s.complete]
        row = Row(scenario, threshold, asked, len(complete))
        for name, compute in FIGURES.items():
            values = [v for v in (compute(s) for s in complete) if v is not None and math.isfinite(v)]
            row.figures[name] = {"p50": percentile(values, 0.5), "p95": percentile(values, 0.95), "n": len(values)}
        row.late_checks = sum(1 for s in complete if (_minus(s.first_fail_check_start_s, s.floor_s) or 0) >= INTERVAL_S)
        out.append(row)
    return out


def targets(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """The issue's targets at failureThreshold 1 (reported, not asserted)."""
    found = []
    for row in rows:
        if row.threshold != 1:
            continue
        b_a, c_b = row.figures["b_minus_a_s"], row.figures["c_minus_b_s"]
        for what, value, limit in (
            ("(b - a) p95 <= one check interval", b_a["p95"], INTERVAL_S),
            ("(b - a) p50 <= half a check interval", b_a["p50"], INTERVAL_S / 2),
            ("(c - b) p95 <= 100 ms", c_b["p95"], 0.1),
        ):
            found.append({"scenario": row.scenario, "target": what, "value": value, "limit": limit,
                          "met": bool(value <= limit)})  # fmt: skip
    return found


def _pair(figure: dict[str, float], scale: float = 1.0, digits: int = 2) -> str:
    return f"{figure['p50'] * scale:.{digits}f} / {figure['p95'] * scale:.{digits}f}"


def _print_rows(header: Sequence[str], widths: Sequence[int], rows: Sequence[Sequence[str]]) -> None:
    for cells in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip())


def print_table(rows: Sequence[Row]) -> None:
    print(
        f"rollback latency, p50 / p95 over n injections (scrape 1 s, check interval {INTERVAL_S:g} s, window "
        f"{WINDOW_S:g} s, failure recheck {INTERVAL_S:g} s, ASM weight {STEP}); (a) floor: the gate's PromQL over "
        'the limit (polled every 100 ms), (b) ASM weight "0", (c) RolledBack via Alertmanager; from injection'
    )
    print("; ".join(f"{name}: {SCENARIOS[name].title}" for name in dict.fromkeys(row.scenario for row in rows)))
    _print_rows(
        ("scenario", "thr", "n", "(a) s", "(b) s", "(b-a) s", "(b)/(a)", "(c-b) ms", "hook-b ms"),
        (12, 3, 5, 13, 13, 13, 13, 13, 13),
        [
            (row.scenario, str(row.threshold), f"{row.n}/{row.asked}", *(_pair(row.figures[name]) for name in
             ("a_floor_s", "b_zero_s", "b_minus_a_s")), _pair(row.figures["b_over_a"], digits=1),
             _pair(row.figures["c_minus_b_s"], 1000, 0), _pair(row.figures["webhook_minus_b_s"], 1000, 0))
            for row in rows
        ],
    )  # fmt: skip
    print()
    print("where (b - a) goes, p50 / p95 in s (the controller's log, up's sample times): the crossing scrape's start")
    print("to (a) (ingestion + 100 ms polling) and to the start of the first failing check; (a) to that start; the")
    print('rollback check itself; from its end to weight "0" (the intent saved, the target patched)')
    _print_rows(
        ("scenario", "thr", "scrape->(a)", "scrape->check", "(a)->check", "check", "check->(b)", "late checks"),
        (12, 3, 13, 13, 13, 13, 13, 3),
        [
            (row.scenario, str(row.threshold), *(_pair(row.figures[name]) for name in
             ("floor_after_scrape_s", "scrape_to_check_s", "wait_for_check_s")),
             _pair(row.figures["rollback_check_s"], 1, 3), _pair(row.figures["check_end_to_b_s"], 1, 3),
             str(row.late_checks))
            for row in rows
        ],
    )  # fmt: skip


def print_targets(found: Sequence[dict[str, Any]]) -> None:
    if not found:
        return
    print()
    print("targets at failureThreshold 1 (reported, not asserted):")
    for item in found:
        verdict = "met" if item["met"] else "NOT met"
        value = f"{item['value']:.3f} s (limit {item['limit']:g} s)"
        print(f"  {item['scenario']:<12} {item['target']:<38} {value}: {verdict}")


def _provenance() -> dict[str, Any]:
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return result.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "changed": git("status", "--short", "--", "controller").splitlines()}


# --- the command --------------------------------------------------------------------------------------


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _numbers(text: str) -> list[int]:
    return [int(part) for part in _names(text)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--scenarios", type=_names, help=f"comma-separated, of {', '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--thresholds", type=_numbers, help="failureThreshold values (default 1,2)")
    parser.add_argument("--injections", type=int, help="injections per scenario and threshold (default 8)")
    parser.add_argument("--quick", action="store_true", help="the smallest size, for CI: 5xx-0to100 x 1 x 2 injections")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random phases")
    parser.add_argument("--json", type=Path, help="write the raw samples and the summary here")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (all the logs)")
    parser.add_argument(
        "--after-scrape", type=float, default=0.0, help="GATEWAY_CANARY_CHECK_AFTER_SCRAPE_SECONDS (default 0: off)"
    )
    args = parser.parse_args(argv)
    size = QUICK if args.quick else {"scenarios": list(SCENARIOS), "thresholds": [1, 2], "injections": 8}
    for key, value in size.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    if args.injections < 1 or any(t < 1 for t in args.thresholds):
        parser.error("--injections and every threshold must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_binaries()
    if missing:
        print(f"missing: {', '.join(missing)}\nrun `bash scripts/test-deps.sh` (as root for the apt packages)",
              file=sys.stderr)  # fmt: skip
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    rows = [(scenario, threshold) for scenario in args.scenarios for threshold in args.thresholds]
    # rows interleaved, so that a slow spell of the machine spreads over all of them
    plan = [(i, scenario, threshold) for i in range(args.injections) for scenario, threshold in rows]
    names = [f"bench-{scenario}-t{threshold}-{i}".lower() for i, scenario, threshold in plan]
    workdir = Path(tempfile.mkdtemp(prefix="gateway-canary-bench-rollback-"))
    samples: list[Sample] = []
    began = time.monotonic()
    try:
        with started_rig(workdir, names, args.after_scrape) as setup:
            print(f"set up in {time.monotonic() - began:.1f} s (logs in {workdir}); {len(plan)} injections",
                  file=sys.stderr)  # fmt: skip
            for (i, scenario, threshold), name in zip(plan, names, strict=True):
                sample = inject(setup, SCENARIOS[scenario], threshold=threshold, index=i, name=name, rng=rng)
                samples.append(sample)
                shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(sample).items()
                         if k != "floor_trace"}  # fmt: skip
                print(f"[{len(samples)}/{len(plan)}] {json.dumps(shown)}", file=sys.stderr, flush=True)
            if setup.watch.errors:
                print(f"the watch reconnected {len(setup.watch.errors)} time(s): {setup.watch.errors[:3]}",
                      file=sys.stderr)  # fmt: skip
    finally:
        if args.keep or any(s.error for s in samples):
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    wall = time.monotonic() - began
    summary = summarize(samples, rows, args.injections)
    found = targets(summary)
    print_table(summary)
    print_targets(found)
    print(f"\nwall time {wall:.0f} s, seed {seed}")
    if args.json is not None:
        report = {
            "config": {"scrape_s": 1.0, "interval_s": INTERVAL_S, "window_s": WINDOW_S, "recheck_s": INTERVAL_S,
                       "floor_poll_s": FLOOR_POLL_S, "total_rps": TOTAL_RPS, "step": STEP,
                       "scenarios": args.scenarios, "thresholds": args.thresholds, "injections": args.injections,
                       "seed": seed, "wall_s": wall, **_provenance()},
            "samples": [asdict(s) for s in samples],
            "summary": [asdict(row) for row in summary],
            "targets": found,
        }  # fmt: skip
        args.json.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    return 0 if samples and all(s.complete for s in samples) and len(samples) == len(plan) else 1


if __name__ == "__main__":
    sys.exit(main())
