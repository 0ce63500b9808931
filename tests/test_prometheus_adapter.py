"""The Prometheus adapter and the collector against a REAL Prometheus scraping the traffic exporter."""

from __future__ import annotations

import pytest

from controller.adapters.prometheus import PrometheusMetricsSource
from controller.core.enums import GatewayRole, InconclusiveCause, Measure, Verdict
from controller.core.results import RenderedQuery
from controller.errors import MetricsUnavailable
from controller.runtime.collector import Collector
from controller.settings import PrometheusConnection, Settings
from tests.helpers import make_policy
from tests.servers import TrafficExporter, free_port, wait_for


def policy_for(workloads: tuple[str, str]):
    source, target = workloads
    return make_policy(
        source={"service": "istio-system/istio-ingressgateway", "workload": source},
        target={"service": "istio-system/istio-ingressgateway-asm", "workload": target},
        analysis={"window": "10s", "minRequests": 10, "interval": "1s"},
        gates={"errorRate": {"max": 0.05, "maxIncrease": 0.02}, "latency": {"p99Ms": {"max": 200}, "maxRatio": 2}},
    )


def source_for(url: str) -> PrometheusMetricsSource:
    return PrometheusMetricsSource(
        PrometheusConnection(Settings(prometheus_url=url, prometheus_timeout_seconds=2), None)
    )


@pytest.fixture
def half_split(traffic: TrafficExporter, gateways: tuple[str, str]):
    traffic.share = lambda: 0.5
    traffic.source.latency_ms = traffic.target.latency_ms = 40.0
    return traffic, policy_for(gateways)


def test_healthy_traffic_without_any_5xx_series_passes(prometheus: str, half_split) -> None:
    _, policy = half_split
    collector = Collector()
    metrics = source_for(prometheus)

    def passing_at_half():
        # the series are new: wait until the 10 s window holds enough of this split
        result = collector.check(policy, metrics)
        share = result.observed_target_share
        settled = share is not None and abs(share - 0.5) < 0.1
        return result if result.verdict is Verdict.PASS and settled else None

    result = wait_for(passing_at_half, timeout=40, interval=0.5, what="a passing check on a 50/50 split")
    by_gate = {g.gate: g for g in result.gates}
    assert by_gate["errorRate"].value == 0.0  # no 5xx series at all is a ratio of 0, not missing data
    assert 25 <= by_gate["latencyP99"].value <= 50  # the 50 ms bucket's interpolation
    assert result.observed_target_share == pytest.approx(0.5, abs=0.1)


def test_errors_on_the_target_fail_the_check(prometheus: str, half_split) -> None:
    traffic, policy = half_split
    collector = Collector()
    metrics = source_for(prometheus)
    traffic.target.error_ratio = 0.3

    def absolute_gate_failing():
        # the relative gate (0.02 over the source) may trip first while the window fills
        result = collector.check(policy, metrics)
        return result if "errorRate" in {g.gate for g in result.failing} else None

    result = wait_for(absolute_gate_failing, timeout=30, interval=0.3, what="errors to fail the errorRate gate")
    assert result.verdict is Verdict.FAIL
    assert {g.gate for g in result.failing} <= {"errorRate", "errorRateIncrease"}
    assert 'response_code=~"5.."' in result.failing[0].query


def test_empty_vector_is_none_and_bad_query_is_unavailable(prometheus: str) -> None:
    metrics = source_for(prometheus)
    empty = RenderedQuery('sum(istio_requests_total{source_workload="nobody"})', Measure.REQUESTS, GatewayRole.TARGET)
    assert metrics.query(empty) is None
    with pytest.raises(MetricsUnavailable, match="answered an error"):
        metrics.query(RenderedQuery("sum(", Measure.CUSTOM, GatewayRole.TARGET))
    with pytest.raises(MetricsUnavailable, match="aggregate it"):
        metrics.query(RenderedQuery("up or vector(1)", Measure.CUSTOM, GatewayRole.TARGET))


def test_unreachable_prometheus_is_inconclusive_never_pass() -> None:
    metrics = source_for(f"http://127.0.0.1:{free_port()}")
    result = Collector().check(policy_for(("a", "b")), metrics)
    assert result.verdict is Verdict.INCONCLUSIVE
    assert result.cause is InconclusiveCause.METRICS_UNAVAILABLE
    assert "unreachable" in result.reason
