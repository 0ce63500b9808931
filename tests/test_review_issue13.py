"""Review of the performance work (f3e0f07..HEAD): shared queries, found holes, each a failing test.

1. One shared query for every gateway on a Prometheus makes a limit of that query (its size: a
   server's max samples or series, its running time; its form: a POST a GET-only endpoint refuses)
   every policy's trouble: their checks are "metrics unavailable" for good, while each check's own
   query would have judged (here: a FAIL that rolls back). No fallback to the own query.
2. A check that waits for another check's shared query gives up after a fixed 30 s
   (``SharedQueries(wait_seconds=30)``), however long the source itself is allowed to take
   (PROMETHEUS_TIMEOUT_SECONDS / ``prometheus.timeout`` up to 300 s, retried once): with a slow
   but answering Prometheus every policy but the one that sent the query is unavailable.
3. Policies loaded together (a start, a takeover) each send a new shared query naming every gateway
   seen so far: the first round names O(policies^2) gateways.
4. A failure's recheck (FAILURE_RECHECK_SECONDS after it) may judge an answer sent a moment after
   the failed one when QUERY_SHARE_SECONDS exceeds half the recheck delay: one scrape's evidence
   counted as two consecutive failures.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from apscheduler.events import EVENT_JOB_MAX_INSTANCES

from controller.adapters.memory import InMemoryStateStore
from controller.adapters.prometheus import PrometheusMetricsSource
from controller.core.enums import GatewayRole, Measure, Verdict
from controller.core.policy import CanaryPolicy
from controller.core.queries import SharedMeasure, queries_for
from controller.core.results import CheckResult, RenderedQuery
from controller.runtime.collector import Collector
from controller.runtime.service import _STAGGER_SECONDS
from controller.runtime.sharing import SharedQueries
from controller.settings import PrometheusConnection, Settings
from tests.conftest import _serving, prometheus_command
from tests.helpers import make_policy, memory_service
from tests.servers import GatewayTraffic, Response, TrafficExporter, _Quiet, _Server, free_port, wait_for

NAMESPACE = "review-ns"
#: samples one query may load: each gateway's own queries stay well under it, the shared one not
MAX_SAMPLES = 300
#: destinations (one istio_requests_total series each) of each of the four "wide" gateways
WIDE = 120


def _policy(name: str, source: str, target: str) -> CanaryPolicy:
    return make_policy(
        name,
        source={"service": f"{NAMESPACE}/{source}", "workload": source},
        target={"service": f"{NAMESPACE}/{target}", "workload": target},
        analysis={"window": "10s", "minRequests": 10, "interval": "5s"},
        gates={"errorRate": {"max": 0.05}},
    )


def _wide(workload: str) -> GatewayTraffic:
    """A gateway that routes to many services: many series, each query of its own still small."""
    gateway = GatewayTraffic(workload, NAMESPACE)
    gateway.responses = [Response(200, destination=f"svc-{i}", fraction=1 / WIDE) for i in range(WIDE)]
    return gateway


class _World:
    def __init__(self) -> None:
        self.exporters: list[TrafficExporter] = []
        self.failing = _policy("shop", "shop", "shop-asm")
        self.wide = [_policy(f"wide{i}", f"wide{i}", f"wide{i}-asm") for i in range(2)]
        self.url = ""

    def pair(self, source: GatewayTraffic, target: GatewayTraffic) -> None:
        exporter = TrafficExporter(source, target, total_rps=400.0)
        exporter.share = lambda: 0.5
        self.exporters.append(exporter)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_World]:
    made = _World()
    made.pair(GatewayTraffic("shop", NAMESPACE), GatewayTraffic("shop-asm", NAMESPACE, error_ratio=0.1))
    for i in range(2):
        made.pair(_wide(f"wide{i}"), _wide(f"wide{i}-asm"))
    directory: Path = tmp_path_factory.mktemp("review-prometheus")
    port = free_port()
    args, scraped = prometheus_command(directory, port, [e.server.port for e in made.exporters])
    made.url = f"http://127.0.0.1:{port}"
    try:
        with _serving(
            [*args, f"--query.max-samples={MAX_SAMPLES}"], directory / "prometheus.log", scraped, "Prometheus"
        ):
            source, alone = _source(made.url), Collector()
            try:  # every gateway has a rate over its window: shop's own queries judge its 5xx
                wait_for(
                    lambda: alone.check(made.failing, source).verdict is Verdict.FAIL,
                    timeout=30,
                    what="shop's own check to judge",
                )
            finally:
                alone.close()
                source.close()
            yield made
    finally:
        for exporter in made.exporters:
            exporter.close()


def _source(url: str, timeout: float = 5.0) -> PrometheusMetricsSource:
    return PrometheusMetricsSource(
        PrometheusConnection(Settings(prometheus_url=url, prometheus_timeout_seconds=timeout), None)
    )


def _status(url: str, promql: str) -> int:
    return requests.post(f"{url}/api/v1/query", data={"query": promql}, timeout=5).status_code


def test_a_shared_query_refused_for_its_size_leaves_each_check_to_its_own_query(world: _World) -> None:
    """Finding 1 (real Prometheus, ``--query.max-samples``): the ASM gateway of "shop" answers 10 % 5xx.
    Its own queries judge FAIL (a rollback at failureThreshold). Through sharing, its measures are
    asked together with two other policies' gateways that route to many services: that query loads
    more samples than the server allows, and "shop" is "metrics unavailable" at every check, its
    own queries never asked. (The same happens on any limit of one big query: VictoriaMetrics'
    -search.maxUniqueTimeseries, Mimir/Cortex's fetched-series limits, a query timeout.)"""
    everyone = [*world.wide, world.failing]
    plans = [plan for policy in everyone for plan in queries_for(policy).values()]
    requests_measure = next(m for m in plans[0].shared.values() if m.measure is Measure.REQUESTS)
    shared_promql = requests_measure.promql(plan.labels for plan in plans)

    def limits_bite() -> bool:  # enough samples in the window that the shared query is refused...
        return _status(world.url, shared_promql) == 422

    wait_for(limits_bite, timeout=40, what="the shared query over the limit")
    # ... while each gateway's own query is well within it (the widest included)
    for plan in plans:
        assert _status(world.url, plan.requests.promql) == 200, plan.labels
        assert _status(world.url, plan.error_rate.promql) == 200, plan.labels

    source = _source(world.url)
    alone, sharing = Collector(), Collector(share_seconds=1.0)
    try:
        own = alone.check(world.failing, source)
        results = {policy.name: sharing.check(policy, source) for policy in everyone}
    finally:
        alone.close()
        sharing.close()
        source.close()
    assert own.verdict is Verdict.FAIL, own.reason
    shared = results["shop"]
    assert shared.verdict is own.verdict, (
        f"own queries: {own.verdict} ({own.reason}); shared: {shared.verdict} {shared.cause} ({shared.reason})"
    )


class _GetOnly:
    """A Prometheus-compatible endpoint that takes GET only (a read-only proxy's method allowlist):
    forwards GET to a real Prometheus, answers POST with 405."""

    def __init__(self, upstream: str) -> None:
        class Handler(_Quiet):
            def do_GET(self) -> None:
                answer = requests.get(f"{upstream}{self.path}", timeout=5)
                self.reply(answer.status_code, answer.content)

            def do_POST(self) -> None:
                self.reply(405, {"status": "error", "error": "method not allowed"})

        self.server = _Server(Handler)
        self.url = self.server.url

    def close(self) -> None:
        self.server.close()


def test_an_endpoint_that_refuses_the_shared_form_leaves_each_check_to_its_own_query(world: _World) -> None:
    """Finding 1, second trigger: the checks' own queries are GETs (prometheus-api-client), the
    shared ones POSTs. Behind an endpoint that takes GET only, every shared check is "metrics
    unavailable" for good, while the same checks on their own judge (here: FAIL)."""
    proxy = _GetOnly(world.url)
    source = _source(proxy.url)
    alone, sharing = Collector(), Collector(share_seconds=1.0)
    try:
        own = alone.check(world.failing, source)
        shared = sharing.check(world.failing, source)  # alone in its shared queries: no size limit here
    finally:
        alone.close()
        sharing.close()
        source.close()
        proxy.close()
    assert own.verdict is Verdict.FAIL, own.reason
    assert shared.verdict is own.verdict, f"shared: {shared.verdict} {shared.cause} ({shared.reason})"


# -- 2. the waiters' fixed wait ---------------------------------------------------------------------

KEYS = ("reporter", "source_workload", "source_workload_namespace")
ERRORS = SharedMeasure(Measure.ERROR_RATE, "1m", KEYS)
QUERY = RenderedQuery("unused", Measure.ERROR_RATE, GatewayRole.TARGET)


class _SlowPrometheus:
    """A Prometheus that answers after ``delay`` seconds: shared queries (POST) with a group for each
    gateway of ``workloads``, a gateway's own query (GET) with its one series. 1000 requests, no
    5xx, 50 ms, no responses of the mix's kinds."""

    def __init__(self, delay: float, workloads: list[str]) -> None:
        def value(promql: str) -> str:
            if "histogram_quantile" in promql:
                return "50"
            if "response_code" in promql or "response_flags" in promql:
                return "0"
            return "1000"

        def reply(handler: _Quiet, series: list[dict[str, str]], promql: str) -> None:
            time.sleep(delay)  # (the slowness this test is about)
            result = [{"metric": labels, "value": [time.time(), value(promql)]} for labels in series]
            handler.reply(200, {"status": "success", "data": {"resultType": "vector", "result": result}})

        class Handler(_Quiet):
            def do_POST(self) -> None:
                form = parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
                reply(self, [_gateway(w) for w in workloads], form["query"][0])

            def do_GET(self) -> None:
                reply(self, [{}], parse_qs(urlsplit(self.path).query)["query"][0])

        self.server = _Server(Handler)
        self.url = self.server.url

    def close(self) -> None:
        self.server.close()


def _gateway(workload: str) -> dict[str, str]:
    return {"reporter": "source", "source_workload": workload, "source_workload_namespace": "ns"}


def _plain(name: str) -> CanaryPolicy:
    return make_policy(
        name,
        source={"service": f"ns/{name}", "workload": name},
        target={"service": f"ns/{name}-asm", "workload": f"{name}-asm"},
        analysis={"window": "1m", "minRequests": 10, "interval": "30s"},
    )


def test_a_check_waiting_for_a_shared_answer_waits_as_long_as_the_source_may_take() -> None:
    """Finding 2, at a scale a test can wait for: the waiters' limit (0.3 s here, 30 s in the
    controller) is shorter than the source's own timeout (5 s here; PROMETHEUS_TIMEOUT_SECONDS and
    ``prometheus.timeout`` go up to 300 s, retried once, in the controller). The server answers in
    0.8 s: the check that sent the shared queries judges (PASS), the check that waited for them is
    "metrics unavailable", though its own queries would have been answered as well."""
    first, second = _plain("first"), _plain("second")
    server = _SlowPrometheus(0.8, ["first", "first-asm", "second", "second-asm"])
    source = _source(server.url, timeout=5.0)
    collector = Collector(share_seconds=1.0)
    clock = _Clock()
    collector.shared = SharedQueries(wait_seconds=0.3, clock=clock)
    results: dict[str, CheckResult] = {}
    try:
        for policy in (first, second):  # each gateway asks once: the next answers cover all four
            collector.check(policy, source)
        clock.now += 1.1  # older than max_age: the next check sends new queries...
        sent = collector.shared.sent
        lead = threading.Thread(target=lambda: results.update(first=collector.check(first, source)))
        lead.start()
        wait_for(lambda: collector.shared.sent == sent + 6, timeout=5, what="the first check's shared queries")
        results["second"] = collector.check(second, source)  # ... and this one waits for them
        lead.join()
    finally:
        collector.close()
        source.close()
        server.close()
    assert results["first"].verdict is Verdict.PASS, results["first"].reason
    waited = results["second"]
    assert waited.verdict is Verdict.PASS, f"the waiting check: {waited.verdict} {waited.cause} ({waited.reason})"


# -- 3. policies loaded together ----------------------------------------------------------------------


class _CountingSource:
    """Answers every gateway asked with 0.0 at once; counts the gateways each query names."""

    answers_groups = True

    def __init__(self) -> None:
        self.named: list[int] = []

    def query(self, query: RenderedQuery) -> float | None:
        raise AssertionError("shared measures are asked as vectors")

    def query_vector(self, query: RenderedQuery) -> list[tuple[dict[str, str], float]]:
        self.named.append(len(query.groups))
        return [(dict(group), 0.0) for group in query.groups]


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_policies_loaded_together_name_each_gateway_a_bounded_number_of_times() -> None:
    """Finding 3: 200 policies start 20 ms apart (``_staggered``), each checking its two gateways.
    Every first check finds its gateway missing from the latest answer and sends a new query naming
    every gateway asked so far: the first round names ~2 x 400^2 / 2 gateways (per measure; a check
    asks six), where one query per gateway alone would name 400. At 500 policies it is ~500 000
    selections within ten seconds, on every start and takeover."""
    clock = _Clock()
    source = _CountingSource()
    shared = SharedQueries(clock=clock)
    policies = 200
    for p in range(policies):
        clock.now = 1000.0 + p * _STAGGER_SECONDS
        for gateway in (2 * p, 2 * p + 1):
            shared.ask(source, ERRORS, QUERY, _gateway(f"gw-{gateway}"), asker=f"p{p}", max_age=1.0)
    gateways = 2 * policies
    assert sum(source.named) <= 4 * gateways, (
        f"{len(source.named)} queries naming {sum(source.named)} gateways in all for {gateways} gateways"
    )


# -- 4. the recheck after a failure ---------------------------------------------------------------------


def test_a_recheck_never_judges_an_answer_sent_a_moment_after_the_failed_one(tmp_path: Path) -> None:
    """Finding 4: QUERY_SHARE_SECONDS=20 (allowed up to 60), FAILURE_RECHECK_SECONDS=15, interval 10m
    (max_age = min(20, 300) = 20 s). Policy "a" fails on answers sent at t=0; policy "b" starts at
    t=0.1 and sends new answers (its gateways were new) that cover a's gateways too. a's recheck
    at t=15 takes those, sent 0.1 s after the ones it failed on: the same scrape judged twice, two
    consecutive failures of one piece of evidence (on its own queries the recheck asks at t=15)."""
    settings = Settings(policies_dir=tmp_path, query_share_seconds=20, failure_recheck_seconds=15)
    svc = memory_service(settings)
    clock = _Clock()
    source = _CountingSource()
    sent: list[float] = []
    original = source.query_vector

    def recording(query: RenderedQuery) -> list[tuple[dict[str, str], float]]:
        sent.append(clock.now)
        return original(query)

    source.query_vector = recording  # type: ignore[method-assign]
    collector = svc._collector
    collector.shared = SharedQueries(clock=clock)

    def policy(name: str) -> CanaryPolicy:
        return make_policy(
            name,
            source={"service": f"ns/{name}", "workload": name},
            target={"service": f"ns/{name}-asm", "workload": f"{name}-asm"},
            analysis={"window": "1m", "minRequests": 10, "interval": "10m"},
        )

    a, b = policy("a"), policy("b")
    try:
        collector.check(a, source)  # a's failing check, t=0
        clock.now += 0.1
        collector.check(b, source)  # b's first check
        clock.now += 14.9
        before = len(sent)
        collector.check(a, source)  # a's recheck
    finally:
        collector.close()
    measures = len(queries_for(a)[GatewayRole.TARGET].shared)
    assert len(sent) - before == measures, (
        f"a's recheck at t=15 sent {len(sent) - before} of its {measures} shared queries: the rest it judged "
        "from answers sent at t=0.1, 0.1 s after the answers its failed check judged"
    )


# -- 5. the skipped-ticks metric ------------------------------------------------------------------------


def test_a_slow_look_for_commands_is_not_counted_as_a_skipped_tick(tmp_path: Path) -> None:
    """Finding 5: gateway_canary_ticks_skipped ("ticks not run because the policy's previous tick was
    still running: the process cannot keep up") counts every job's dropped run, the service's own
    too. A look for commands that takes longer than COMMAND_POLL_SECONDS (100 sequential reads at
    500 policies against a 20 ms API server: 2 s, the default poll) is counted as skipped ticks with
    no policy at all: the benchmarks read an overload that is not there."""

    class SlowStore(InMemoryStateStore):
        def commands(self, policies: Any) -> dict[str, str]:
            time.sleep(0.5)
            return {}

    svc = memory_service(Settings(policies_dir=tmp_path, command_poll_seconds=0.1), store=SlowStore())
    dropped: list[str] = []  # every run APScheduler drops, whatever the job
    svc._scheduler.add_listener(lambda event: dropped.append(event.job_id), EVENT_JOB_MAX_INSTANCES)
    svc.start()
    try:
        wait_for(lambda: "__commands__" in dropped, timeout=10, what="a look for commands dropped (still running)")
        assert not svc.runners
    finally:
        svc.stop()
    assert svc.telemetry.ticks_skipped._value.get() == 0
