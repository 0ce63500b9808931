"""Shared queries against a REAL Prometheus: each gateway's group of a shared answer is exactly
what its own query answers, evaluated at the same instant, for every built-in measure.

Four gateway pairs on exporters of their own (a Prometheus of this module's scrapes them every
second): 5xx and slow on one target, 404 NR / 403 / 401 on another, one target with no traffic at
all, one whose names hold regex metacharacters and are a prefix of another's. Then the collector
itself: three policies' checks sharing their queries give the verdicts and values their own
queries give, with fewer queries sent (counted by Prometheus itself).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from controller.adapters.prometheus import PrometheusMetricsSource
from controller.core.enums import Verdict
from controller.core.policy import CanaryPolicy
from controller.core.queries import queries_for, shared_index, shared_value
from controller.core.results import CheckResult
from controller.runtime.collector import Collector
from controller.settings import PrometheusConnection, Settings
from tests.conftest import _serving, prometheus_command
from tests.helpers import make_policy
from tests.servers import GatewayTraffic, Response, TrafficExporter, free_port, wait_for

NAMESPACE = "shared-ns"


def _policy(name: str, source: str, target: str, namespace: str = NAMESPACE, **gates: Any) -> CanaryPolicy:
    return make_policy(
        name,
        source={"service": f"{namespace}/{source}", "workload": source},
        target={"service": f"{namespace}/{target}", "workload": target},
        analysis={"window": "20s", "minRequests": 10, "interval": "5s"},
        gates={"errorRate": {"max": 0.05, "maxIncrease": 0.02}, "latency": {"p99Ms": {"max": 200}}, **gates},
    )


class _Pairs:
    """The exporters and the policies that watch them."""

    def __init__(self) -> None:
        self.exporters: list[TrafficExporter] = []
        self.policies: list[CanaryPolicy] = []

    def add(self, policy: CanaryPolicy, share: float, source: GatewayTraffic, target: GatewayTraffic) -> None:
        exporter = TrafficExporter(source, target, total_rps=400.0)
        exporter.share = lambda: share
        self.exporters.append(exporter)
        self.policies.append(policy)


def _labels(workload: str) -> dict[str, str]:
    return {"reporter": "source", "source_workload": workload, "source_workload_namespace": "other-ns"}


@pytest.fixture(scope="module")
def pairs() -> Iterator[_Pairs]:
    made = _Pairs()
    failing = GatewayTraffic("shop-asm", NAMESPACE, error_ratio=0.1, latency_ms=300.0)
    made.add(_policy("failing", "shop", "shop-asm"), 0.5, GatewayTraffic("shop", NAMESPACE), failing)
    mixed = GatewayTraffic("api-asm", NAMESPACE, unrouted_ratio=0.05, denied_ratio=0.04)
    mixed.responses = [Response(200, fraction=0.9), Response(401, fraction=0.1)]
    made.add(_policy("mixed", "api", "api-asm"), 0.3, GatewayTraffic("api", NAMESPACE), mixed)
    # no traffic on the target: no series at all (share 0)
    made.add(_policy("idle", "idle", "idle-asm"), 0.0, GatewayTraffic("idle", NAMESPACE), GatewayTraffic("idle-asm"))
    # label values full of regex and string metacharacters (a gateway selected by its labels)
    odd_source, odd_target = "gw+x(1).a", 'gw|x*[2]\\"q'
    odd = make_policy(
        "odd",
        source={"service": "other-ns/odd", "labels": _labels(odd_source)},
        target={"service": "other-ns/odd-asm", "labels": _labels(odd_target)},
        analysis={"window": "20s", "minRequests": 10, "interval": "5s"},
        gates={"errorRate": {"max": 0.05}},
    )
    target = GatewayTraffic(odd_target, "other-ns", error_ratio=0.02)
    made.add(odd, 0.5, GatewayTraffic(odd_source, "other-ns"), target)
    yield made
    for exporter in made.exporters:
        exporter.close()


@pytest.fixture(scope="module")
def prometheus_of_pairs(pairs: _Pairs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    directory: Path = tmp_path_factory.mktemp("shared-prometheus")
    port = free_port()
    args, scraped = prometheus_command(directory, port, [e.server.port for e in pairs.exporters])
    url = f"http://127.0.0.1:{port}"
    with _serving(args, directory / "prometheus.log", scraped, "Prometheus scraping four exporters"):
        # every gateway with traffic has a rate over its window a second ago (the tests look there)
        def rates() -> bool:
            found = _vector(url, "count by (source_workload) (rate(istio_requests_total[20s]))", time.time() - 1)
            return len(found) == 7

        wait_for(rates, timeout=30, what="a rate for every gateway with traffic")
        yield url


def _vector(url: str, promql: str, at: float | None = None) -> list[tuple[dict[str, str], float]]:
    params = {"query": promql, **({"time": f"{at:.3f}"} if at is not None else {})}
    answer = requests.post(f"{url}/api/v1/query", data=params, timeout=5)
    answer.raise_for_status()
    result = answer.json()["data"]["result"]
    return [(sample["metric"], float(sample["value"][1])) for sample in result]


def _own(url: str, promql: str, at: float) -> float | None:
    found = _vector(url, promql, at)
    assert len(found) <= 1, found
    return found[0][1] if found else None


def _same(left: float | None, right: float | None) -> bool:
    if left is None or right is None:
        return left is right
    if math.isnan(left) or math.isnan(right):
        return math.isnan(left) and math.isnan(right)
    return math.isclose(left, right, rel_tol=1e-9, abs_tol=1e-12)


def test_each_gateways_group_is_its_own_query_at_the_same_instant(pairs: _Pairs, prometheus_of_pairs: str) -> None:
    at = time.time() - 1.0  # a past instant: both queries see exactly the same samples
    plans = [plan for policy in pairs.policies for plan in queries_for(policy).values()]
    compared: dict[str, int] = {}
    numbers = 0
    for measure in {m for plan in plans for m in plan.shared.values()}:
        askers = [(plan, query) for plan in plans for query, m in plan.shared.items() if m == measure]
        answer = _vector(prometheus_of_pairs, measure.promql(plan.labels for plan, _ in askers), at)
        for plan, query in askers:
            own = _own(prometheus_of_pairs, query.promql, at)
            mine = shared_value(measure, shared_index(measure, answer), plan.labels)
            assert _same(own, mine), f"{plan.labels} {measure}: own {own}, shared {mine}\n{query.promql}"
            numbers += own is not None and not math.isnan(own)
            key = f"{measure.measure}:{measure.kind or ''}"
            compared[key] = compared.get(key, 0) + 1
    # every built-in measure was compared for all eight gateways, the response kinds included
    assert compared == {f"{m}:": 8 for m in ("requests", "errorRate", "latency")} | {
        f"responses:{kind}": 8 for kind in ("4xx", "auth", "noRoute")
    }
    # and they were numbers: all but the idle target's requests, error rate and latency
    assert numbers == 6 * 8 - 3


def test_what_the_gateways_show_is_in_the_shared_answers(pairs: _Pairs, prometheus_of_pairs: str) -> None:
    """The comparison above is not vacuous: real numbers, no data and 0 where the traffic says so."""
    at = time.time() - 1.0
    values: dict[tuple[str, str, str], float | None] = {}
    plans = [(p.name, plan) for p in pairs.policies for plan in queries_for(p).values()]
    for measure in {m for _, plan in plans for m in plan.shared.values()}:
        answer = _vector(prometheus_of_pairs, measure.promql(plan.labels for _, plan in plans), at)
        for name, plan in plans:
            values[(name, plan.role.value, f"{measure.measure}{measure.kind or ''}")] = shared_value(
                measure, shared_index(measure, answer), plan.labels
            )
    assert values[("failing", "target", "errorRate")] == pytest.approx(0.1, abs=0.01)
    assert values[("failing", "source", "errorRate")] == 0.0  # traffic, never a 5xx series
    assert values[("failing", "target", "latency")] > 250
    assert values[("mixed", "target", "responsesnoRoute")] > 0
    assert values[("mixed", "source", "responsesnoRoute")] == 0.0  # no such series: 0, not no data
    assert values[("idle", "target", "requests")] is None  # no traffic: no data
    assert values[("idle", "target", "errorRate")] is None
    assert values[("idle", "target", "responses4xx")] == 0.0
    assert values[("odd", "target", "errorRate")] == pytest.approx(0.02, abs=0.005)
    assert values[("odd", "source", "errorRate")] == 0.0


def _query_count(url: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("prometheus_http_requests_total{") and 'handler="/api/v1/query"' in line
    )


def _values(result: CheckResult) -> dict[str, tuple[Verdict, float | None]]:
    return {gate.gate: (gate.verdict, gate.value) for gate in result.gates}


def test_checks_that_share_judge_as_their_own_queries_do_with_fewer_queries(
    pairs: _Pairs, prometheus_of_pairs: str
) -> None:
    source = PrometheusMetricsSource(
        PrometheusConnection(Settings(prometheus_url=prometheus_of_pairs, prometheus_timeout_seconds=5), None)
    )
    alone, sharing = Collector(), Collector(share_seconds=1.0)
    try:
        before = _query_count(prometheus_of_pairs)
        own = {p.name: alone.check(p, source) for p in pairs.policies}
        between = _query_count(prometheus_of_pairs)
        for policy in pairs.policies:  # each gateway asks once: from now on every answer covers it
            sharing.check(policy, source)
        sent, warm = sharing.shared.sent, _query_count(prometheus_of_pairs)
        shared = {p.name: sharing.check(p, source) for p in pairs.policies}
        after = _query_count(prometheus_of_pairs)
    finally:
        alone.close()
        sharing.close()
        source.close()
    for name, result in own.items():
        assert result.verdict is shared[name].verdict, name
        for gate, (verdict, value) in _values(result).items():
            other_verdict, other = _values(shared[name])[gate]
            assert verdict is other_verdict, (name, gate)
            # a second apart: rates over a 20 s window move a little between the two checks
            assert (value is None) == (other is None), (name, gate, value, other)
            assert value is None or other == pytest.approx(value, rel=0.2, abs=0.01), (name, gate, value, other)
    assert own["failing"].verdict is Verdict.FAIL and own["mixed"].verdict is Verdict.FAIL
    # on their own: 4 policies x 2 gateways x 6 built-in measures; shared: one query per measure
    # for all eight gateways (the four checks came within a second of each other). Each failed
    # response-mix gate asks both gateways' breakdown by route on top, in both rounds.
    breakdowns = 2 * sum(
        g.gate.startswith("responses") and g.verdict is Verdict.FAIL for r in own.values() for g in r.gates
    )
    assert breakdowns == 6  # the mixed pair fails its three
    assert between - before == 48 + breakdowns
    assert after - warm == 6 + breakdowns
    assert sharing.shared.sent - sent == 6


def test_the_sequential_gates_counters_are_the_raw_sums_read_in_one_instant(
    pairs: _Pairs, prometheus_of_pairs: str
) -> None:
    """The counters query (one per gateway) answers each counter as its plain sum does, at the same
    instant; a gateway that never served has no request counter; a bound that is no bucket has none."""
    from controller.core.enums import InconclusiveCause
    from controller.core.gates import sequential_prior
    from controller.core.queries import COUNTER_NAMES, counters_query, render_selector

    at = time.time() - 1.0
    gates = {"errorRate": {"sequential": {}}, "latency": {"sequential": {"slowerThanMs": 250}}}
    checked = 0
    for base in pairs.policies:
        policy = make_policy(
            base.name, source=base.spec.source.model_dump(), target=base.spec.target.model_dump(), gates=gates
        )
        for role, plan in queries_for(policy).items():
            query = counters_query(policy, role)
            assert query is not None and plan.counters == query
            answer = {
                (labels["counter"], labels["instance"]): value
                for labels, value in _vector(prometheus_of_pairs, query.promql, at)
            }
            inner = render_selector(plan.labels)[1:-1]
            by_target = "sum by (instance) ({}{{{}{}}})"
            plain = {
                (name, labels["instance"]): value
                for name, promql in (
                    ("requests", by_target.format("istio_requests_total", inner, "")),
                    ("errors", by_target.format("istio_requests_total", inner, ',response_code=~"5.."')),
                    (
                        "histogramCount",
                        by_target.format("istio_request_duration_milliseconds_bucket", inner, ',le="+Inf"'),
                    ),
                    (
                        "withinLatency",
                        by_target.format("istio_request_duration_milliseconds_bucket", inner, ',le="250"'),
                    ),
                    ("time", f"max by (instance) (timestamp(istio_requests_total{{{inner}}}))"),
                )
                for labels, value in _vector(prometheus_of_pairs, promql, at)
            }
            targets = {instance for name, instance in plain if name == "requests"}
            if not targets:  # never served: no counter at all
                assert answer == {}, (policy.name, role, answer)
                continue
            for instance in targets:  # traffic and no 5xx series: 0
                plain.setdefault(("errors", instance), 0.0)
            assert {name for name, _ in answer} == set(COUNTER_NAMES)
            assert answer == plain, (policy.name, role, answer, plain)
            assert all(at - 3 < answer[("time", instance)] <= at for instance in targets)  # scraped each second
            checked += 1
    assert checked == 7  # every gateway with traffic
    # the failing target through the collector: 10 % 5xx and every request slower than 250 ms
    failing = make_policy(
        "failing",
        source=pairs.policies[0].spec.source.model_dump(),
        target=pairs.policies[0].spec.target.model_dump(),
        gates=gates,
        analysis={"window": "20s", "minRequests": 10, "interval": "1s"},
    )
    # a bound that is no bucket: the gate says so, it does not take "no bucket" for "no traffic"
    source = PrometheusMetricsSource(
        PrometheusConnection(Settings(prometheus_url=prometheus_of_pairs, prometheus_timeout_seconds=5), None)
    )
    odd_bound = make_policy(
        "bound",
        source=failing.spec.source.model_dump(),
        target=failing.spec.target.model_dump(),
        gates={"latency": {"sequential": {"slowerThanMs": 300}}},
    )
    collector = Collector()
    try:
        result = collector.check(odd_bound, source, evidence=sequential_prior(odd_bound, (), 10, 90))
        gate = next(g for g in result.gates if g.gate == "latencySequential")
        assert gate.cause is InconclusiveCause.NO_DATA and "no latency histogram bucket at 300ms" in gate.reason
        prior = sequential_prior(failing, (), 10, 90)
        first = collector.check(failing, source, evidence=prior)
        counted: list[CheckResult] = []

        def an_interval_counted() -> bool:
            carried = {e.gate: e for e in first.evidence}
            result = collector.check(failing, source, evidence=carried)
            counted[:] = [result]
            return all(e.totals.target_requests > 100 for e in result.evidence)

        wait_for(an_interval_counted, timeout=20, what="counters that grew since the first reading")
    finally:
        collector.close()
    errors, slow = counted[0].evidence
    assert errors.totals.target_events / errors.totals.target_requests == pytest.approx(0.1, abs=0.04)
    assert errors.totals.source_events == 0
    assert slow.totals.target_events == slow.totals.target_requests > 0  # all of them over 250 ms
