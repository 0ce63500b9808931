"""The simulated gateways' traffic (tests/servers.py): response mix, TLS statistics, noise.

Most tests scrape an exporter of their own over HTTP with a stepped clock, so every count is
known exactly; the last ones check that a real Prometheus sees what the controller will query.
"""

from __future__ import annotations

import math
import random
import re
import statistics
import time
from collections.abc import Callable, Iterator

import pytest
import requests

from tests.servers import (
    POISSON_EXACT_BELOW,
    UNKNOWN_DESTINATION,
    GatewayTraffic,
    Response,
    TrafficExporter,
    pod_name,
    poisson,
    wait_for,
)

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
REQUESTS = "istio_requests_total"
TLS_ERRORS = "envoy_listener_ssl_connection_error"
CONNECTIONS = "envoy_listener_downstream_cx_total"
#: Every sample name the exporter may write; anything else in a scrape is a bug.
KNOWN = {
    REQUESTS,
    TLS_ERRORS,
    CONNECTIONS,
    "istio_request_duration_milliseconds_bucket",
    "istio_request_duration_milliseconds_sum",
    "istio_request_duration_milliseconds_count",
}


class SteppedClock:
    """A monotonic clock the test moves: intervals of exactly known length."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def step(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> SteppedClock:
    return SteppedClock()


@pytest.fixture
def exporter(clock: SteppedClock) -> Iterator[TrafficExporter]:
    """200 rps, a quarter of it on the target, both gateways healthy; time moves only on ``step``."""
    traffic = TrafficExporter(GatewayTraffic("gw"), GatewayTraffic("gw-asm"), total_rps=200.0, clock=clock)
    traffic.share = lambda: 0.25
    yield traffic
    traffic.close()


def scrape(traffic: TrafficExporter) -> Samples:
    """GET /metrics and parse every sample line (each family must be one group, once)."""
    answer = requests.get(f"{traffic.url}/metrics", timeout=5)
    assert answer.status_code == 200, answer.text
    samples: Samples = {}
    families: list[str] = []
    for line in answer.text.splitlines():
        if line.startswith("# TYPE "):
            families.append(line.split()[2])
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        labels = frozenset(_LABEL.findall(match["labels"] or ""))
        key = (match["name"], labels)
        assert key not in samples, f"duplicate series {key}"
        assert match["name"] in KNOWN, match["name"]
        samples[key] = float(match["value"])
    assert len(families) == len(set(families)), f"a family declared twice: {families}"
    return samples


def total(samples: Samples, name: str, **match: str) -> float:
    """``sum(name{match})``, label values as regexes anchored like PromQL's ``=~``."""
    found = [
        value
        for (sample, labels), value in samples.items()
        if sample == name and all(re.fullmatch(rx, dict(labels).get(key, "")) for key, rx in match.items())
    ]
    return math.fsum(found)


def series(samples: Samples, name: str, workload: str) -> list[dict[str, str]]:
    return [
        dict(labels) for sample, labels in samples if sample == name and dict(labels)["source_workload"] == workload
    ]


def pods(samples: Samples, name: str, workload: str) -> float:
    return total(samples, name, pod=re.escape(pod_name(workload)))


# --- defaults: today's series, exactly --------------------------------------------------------------


def test_the_default_mix_is_all_200_with_no_flags_exactly_rate_times_share_times_time(
    exporter: TrafficExporter, clock: SteppedClock
) -> None:
    clock.step(2.0)
    samples = scrape(exporter)
    assert total(samples, REQUESTS, source_workload="gw-asm") == 100.0  # 200 rps x 0.25 x 2 s, no noise
    assert total(samples, REQUESTS, source_workload="gw") == 300.0
    assert series(samples, REQUESTS, "gw-asm") == [
        {
            "reporter": "source",
            "source_workload": "gw-asm",
            "source_workload_namespace": "istio-system",
            "response_code": "200",
            "response_flags": "-",
            "destination_service_name": "productpage",
        }
    ]
    # the histogram keeps its labels (no response labels): 40 ms lands in the 50 ms bucket
    bucket = "istio_request_duration_milliseconds_bucket"
    assert total(samples, bucket, source_workload="gw-asm", le="25") == 0.0
    assert total(samples, bucket, source_workload="gw-asm", le="50") == 100.0
    assert total(samples, bucket, source_workload="gw-asm", le=r"\+Inf") == 100.0
    assert total(samples, "istio_request_duration_milliseconds_sum", source_workload="gw-asm") == 4000.0
    # healthy TLS: one connection per request, no handshake failure (exported as 0, as Envoy does)
    assert pods(samples, CONNECTIONS, "gw-asm") == 100.0
    assert pods(samples, TLS_ERRORS, "gw-asm") == 0.0
    assert (TLS_ERRORS, frozenset({("namespace", "istio-system"), ("pod", pod_name("gw-asm"))})) in samples


def test_error_ratio_works_as_before_and_sums_over_the_selector_keep_the_totals(
    exporter: TrafficExporter, clock: SteppedClock
) -> None:
    exporter.target.error_ratio = 0.3
    clock.step(4.0)
    samples = scrape(exporter)
    assert total(samples, REQUESTS, source_workload="gw-asm") == pytest.approx(200.0)
    assert total(samples, REQUESTS, source_workload="gw-asm", response_code="5..") == pytest.approx(60.0)
    assert total(samples, REQUESTS, source_workload="gw-asm", response_code="503", response_flags="-") == (
        pytest.approx(60.0)
    )
    assert total(samples, REQUESTS, source_workload="gw", response_code="5..") == 0.0
    assert not any(s["response_code"].startswith("5") for s in series(samples, REQUESTS, "gw"))  # no 5xx series yet


def test_a_gateway_that_never_served_has_no_series(exporter: TrafficExporter, clock: SteppedClock) -> None:
    exporter.share = lambda: 0.0
    clock.step(3.0)
    samples = scrape(exporter)
    assert not series(samples, REQUESTS, "gw-asm")
    assert pods(samples, CONNECTIONS, "gw-asm") == 0.0 and pods(samples, CONNECTIONS, "gw") == 600.0
    assert not [key for key in samples if dict(key[1]).get("pod") == pod_name("gw-asm")]


# --- the three misconfigurations ----------------------------------------------------------------------


def test_missing_route_answers_its_share_404_nr_to_an_unknown_destination(
    exporter: TrafficExporter, clock: SteppedClock
) -> None:
    exporter.target.missing_route(0.2)
    clock.step(10.0)  # 500 requests on the target
    samples = scrape(exporter)
    nr = total(samples, REQUESTS, source_workload="gw-asm", response_flags=".*NR.*")
    assert nr == pytest.approx(100.0)
    assert total(samples, REQUESTS, source_workload="gw-asm", response_code="404") == pytest.approx(100.0)
    assert total(samples, REQUESTS, source_workload="gw-asm", destination_service_name=UNKNOWN_DESTINATION) == (
        pytest.approx(100.0)
    )
    assert total(samples, REQUESTS, source_workload="gw-asm") == pytest.approx(500.0)  # nothing lost
    assert total(samples, REQUESTS, source_workload="gw", response_flags=".*NR.*") == 0.0  # the source is fine
    assert pods(samples, TLS_ERRORS, "gw-asm") == 0.0


def test_missing_authz_answers_its_share_403_to_the_routes_destinations(
    exporter: TrafficExporter, clock: SteppedClock
) -> None:
    exporter.target.responses = [
        Response(200, destination="productpage", fraction=0.75),
        Response(200, "-", "ratings", 0.25),
    ]
    exporter.target.missing_authz(0.4)
    clock.step(10.0)
    samples = scrape(exporter)
    denied = total(samples, REQUESTS, source_workload="gw-asm", response_code="403")
    assert denied == pytest.approx(200.0)  # 0.4 of 500
    assert total(samples, REQUESTS, source_workload="gw-asm", response_code="403", response_flags="-") == denied
    # RBAC denied after the route matched: the 403s keep the mix's destinations, in its proportions
    assert total(
        samples, REQUESTS, source_workload="gw-asm", response_code="403", destination_service_name="ratings"
    ) == (pytest.approx(50.0))
    assert total(
        samples, REQUESTS, source_workload="gw-asm", response_code="200", destination_service_name="ratings"
    ) == (pytest.approx(75.0))
    assert total(samples, REQUESTS, source_workload="gw-asm") == pytest.approx(500.0)


def test_missing_cert_requests_vanish_from_http_metrics_and_count_as_handshake_failures(
    exporter: TrafficExporter, clock: SteppedClock
) -> None:
    exporter.target.missing_cert(0.3)
    exporter.target.error_ratio = 0.1
    clock.step(10.0)
    samples = scrape(exporter)
    assert total(samples, REQUESTS, source_workload="gw-asm") == pytest.approx(350.0)  # 500 - 150 vanished
    assert total(samples, "istio_request_duration_milliseconds_count", source_workload="gw-asm") == pytest.approx(350.0)
    assert not any(s["response_code"] == "0" for s in series(samples, REQUESTS, "gw-asm"))
    assert pods(samples, TLS_ERRORS, "gw-asm") == pytest.approx(150.0)
    assert pods(samples, CONNECTIONS, "gw-asm") == pytest.approx(500.0)
    # what a 5xx gate sees: 10 % errors of what arrived at HTTP, blind to the 30 % that never did
    errors = total(samples, REQUESTS, source_workload="gw-asm", response_code="5..")
    assert errors / total(samples, REQUESTS, source_workload="gw-asm") == pytest.approx(0.1)
    assert pods(samples, TLS_ERRORS, "gw") == 0.0 and pods(samples, CONNECTIONS, "gw") == pytest.approx(1500.0)


def test_all_misconfigurations_together_account_for_every_request_once(
    exporter: TrafficExporter, clock: SteppedClock
) -> None:
    target = exporter.target
    target.responses = [Response(200, fraction=0.9), Response(429, "RL", "ratings", 0.1)]
    target.missing_route(0.1).missing_authz(0.05).missing_cert(0.15)
    target.error_ratio = 0.5
    expected = target.mix()
    assert math.fsum(expected.values()) == pytest.approx(1.0 - 0.15)
    for seconds in (0.7, 1.3, 2.0, 6.0):  # several scrapes: the counters only ever grow
        clock.step(seconds)
        scrape(exporter)
    samples = scrape(exporter)
    arrived = 200.0 * 0.25 * 10.0
    http = total(samples, REQUESTS, source_workload="gw-asm")
    assert http + pods(samples, TLS_ERRORS, "gw-asm") == pytest.approx(pods(samples, CONNECTIONS, "gw-asm"))
    assert pods(samples, CONNECTIONS, "gw-asm") == pytest.approx(arrived)
    assert total(samples, REQUESTS, source_workload="gw-asm", response_flags="NR") == pytest.approx(0.1 * arrived)
    assert total(samples, REQUESTS, source_workload="gw-asm", response_code="403") == pytest.approx(0.05 * arrived)
    assert total(samples, REQUESTS, source_workload="gw-asm", response_code="429") == pytest.approx(0.07 * arrived)
    # the backends fail half of what reaches them and would have succeeded: 0.7 x 0.9 x 0.5
    assert total(samples, REQUESTS, source_workload="gw-asm", response_code="503") == pytest.approx(0.315 * arrived)
    assert total(samples, REQUESTS, source_workload="gw-asm", response_code="200") == pytest.approx(0.315 * arrived)
    for key, share in expected.items():
        got = total(
            samples,
            REQUESTS,
            source_workload="gw-asm",
            response_code=str(key.code),
            response_flags=re.escape(key.flags),
            destination_service_name=key.destination,
        )
        assert got == pytest.approx(share * arrived), key


def test_setting_a_share_again_replaces_it_and_impossible_shares_are_refused(exporter: TrafficExporter) -> None:
    target = exporter.target
    target.missing_route(0.3).missing_route(0.1)
    assert target.unrouted_ratio == 0.1
    with pytest.raises(ValueError, match="between 0 and 1"):
        target.missing_cert(1.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        target.missing_authz(float("nan"))
    with pytest.raises(ValueError, match="more than all requests"):
        target.missing_authz(0.95)


def test_a_mix_that_does_not_add_up_fails_the_scrape_loudly_and_accumulates_nothing(
    exporter: TrafficExporter, clock: SteppedClock
) -> None:
    exporter.target.responses = [Response(200, fraction=0.6), Response(404, "NR", UNKNOWN_DESTINATION, 0.3)]
    clock.step(1.0)
    answer = requests.get(f"{exporter.url}/metrics", timeout=5)
    assert answer.status_code == 500 and "add up to 0.9" in answer.text
    assert exporter.source.requests == 0.0  # neither gateway moved on a refused scrape
    exporter.target.responses = [Response(200, fraction=0.7), Response(404, "NR", UNKNOWN_DESTINATION, 0.3)]
    samples = scrape(exporter)  # the refused second is counted now, once
    assert total(samples, REQUESTS, source_workload="gw-asm", response_code="404") == pytest.approx(15.0)


# --- TLS statistics ----------------------------------------------------------------------------------


def test_tls_stats_can_be_left_out_as_istio_does_without_proxy_stats_matcher(
    exporter: TrafficExporter, clock: SteppedClock
) -> None:
    exporter.target.tls_stats = False
    exporter.target.missing_cert(0.5)
    clock.step(2.0)
    samples = scrape(exporter)
    assert not [
        labels for name, labels in samples if name.startswith("envoy_") and ("pod", pod_name("gw-asm")) in labels
    ]
    assert pods(samples, CONNECTIONS, "gw") == 300.0  # the other gateway still exports its own
    assert total(samples, REQUESTS, source_workload="gw-asm") == 50.0  # the vanished half is simply invisible


def test_envoy_stats_carry_a_deployment_pod_name_and_the_gateways_namespace(
    exporter: TrafficExporter, clock: SteppedClock
) -> None:
    exporter.move_to("shop")
    clock.step(1.0)
    samples = scrape(exporter)
    envoy = [dict(labels) for name, labels in samples if name == CONNECTIONS]
    assert sorted(envoy, key=lambda labels: labels["pod"]) == sorted(
        [{"namespace": "shop", "pod": pod_name("gw")}, {"namespace": "shop", "pod": pod_name("gw-asm")}],
        key=lambda labels: labels["pod"],
    )
    suffix = "[bcdfghjklmnpqrstvwxz2456789]"
    for workload in ("gw", "gw-asm", "istio-ingressgateway"):
        assert re.fullmatch(rf"{re.escape(workload)}-{suffix}{{9}}-{suffix}{{5}}", pod_name(workload))
    assert pod_name("gw") == pod_name("gw")  # stable across scrapes: one series per pod
    # Real names overlap by prefix: "gw-.*" also matches the target's pods, "gw-[^-]+-[^-]+" does not.
    assert re.fullmatch("gw-.*", pod_name("gw-asm"))
    assert not re.fullmatch("gw-[^-]+-[^-]+", pod_name("gw-asm"))


# --- noise -------------------------------------------------------------------------------------------


def test_without_noise_two_exporters_count_exactly_the_same(clock: SteppedClock) -> None:
    pair = [
        TrafficExporter(GatewayTraffic("gw"), GatewayTraffic("gw-asm").missing_route(0.07), clock=clock)
        for _ in range(2)
    ]
    try:
        for traffic in pair:
            traffic.share = lambda: 0.3
        for seconds in (0.9, 1.1, 0.37):
            clock.step(seconds)
            first, second = (scrape(traffic) for traffic in pair)
            assert first == second
        assert total(first, REQUESTS, source_workload="gw-asm", response_flags="NR") == pytest.approx(
            200 * 0.3 * 2.37 * 0.07
        )
        assert total(first, REQUESTS, source_workload="gw-asm", response_flags="NR") % 1 != 0  # not rounded
    finally:
        for traffic in pair:
            traffic.close()


@pytest.mark.parametrize("mean", [0.3, 4.0, 25.0, POISSON_EXACT_BELOW, 400.0, 5000.0])
def test_poisson_draws_are_unbiased_counts_with_poisson_variance(mean: float) -> None:
    rng = random.Random(20240601)
    draws = [poisson(rng, mean) for _ in range(4000)]
    assert all(isinstance(draw, int) and draw >= 0 for draw in draws)
    # the mean of n draws has a standard error of sqrt(mean/n); 5 of them is a tolerance no seed trips
    assert abs(statistics.fmean(draws) - mean) < 5 * math.sqrt(mean / len(draws))
    assert statistics.pvariance(draws) == pytest.approx(mean, rel=0.15)


def test_poisson_of_nothing_is_zero() -> None:
    rng = random.Random(1)
    assert poisson(rng, 0.0) == 0 and poisson(rng, -2.0) == 0


def test_noise_makes_each_interval_vary_around_the_expected_count(clock: SteppedClock) -> None:
    traffic = TrafficExporter(
        GatewayTraffic("gw"), GatewayTraffic("gw-asm"), total_rps=200.0, noise=random.Random(7), clock=clock
    )
    traffic.share = lambda: 1.0
    traffic.target.missing_route(0.05).missing_cert(0.1)  # 10 and 20 a second: the exact draws
    try:
        kinds: dict[str, Callable[[Samples], float]] = {
            "nr": lambda s: total(s, REQUESTS, source_workload="gw-asm", response_flags="NR"),
            "ok": lambda s: total(s, REQUESTS, source_workload="gw-asm", response_code="200"),  # 170: normal
            "tls": lambda s: pods(s, TLS_ERRORS, "gw-asm"),
            "cx": lambda s: pods(s, CONNECTIONS, "gw-asm"),
            "http": lambda s: total(s, REQUESTS, source_workload="gw-asm"),
        }
        previous = dict.fromkeys(kinds, 0.0)
        steps: dict[str, list[float]] = {kind: [] for kind in kinds}
        for _ in range(600):
            clock.step(1.0)
            samples = scrape(traffic)
            for kind, read in kinds.items():
                now = read(samples)
                steps[kind].append(now - previous[kind])
                previous[kind] = now
            assert kinds["http"](samples) + kinds["tls"](samples) == kinds["cx"](samples)  # still consistent
        for kind, mean in (("nr", 10.0), ("tls", 20.0), ("ok", 170.0), ("cx", 200.0)):
            got = steps[kind]
            assert all(step == int(step) and step >= 0 for step in got), kind  # whole requests
            assert len(set(got)) > 5, f"{kind} does not vary: {sorted(set(got))}"
            assert abs(statistics.fmean(got) - mean) < 5 * math.sqrt(mean / len(got)), kind
            assert statistics.pvariance(got) == pytest.approx(mean, rel=0.25), kind
    finally:
        traffic.close()


def test_the_same_seed_gives_the_same_traffic_and_fresh_pair_restores_the_defaults(clock: SteppedClock) -> None:
    runs = []
    for _ in range(2):
        traffic = TrafficExporter(GatewayTraffic("gw"), GatewayTraffic("gw-asm"), noise=random.Random(99), clock=clock)
        traffic.share = lambda: 0.5
        try:
            clock.step(1.0)
            runs.append(scrape(traffic))
            traffic.total_rps = 50.0
            traffic.fresh_pair("next")
            assert traffic.noise is None and traffic.total_rps == 200.0
            traffic.share = lambda: 0.5
            clock.step(1.0)
            assert total(scrape(traffic), REQUESTS, source_workload="gw-next") == 100.0
        finally:
            traffic.close()
    assert runs[0] == runs[1]
    assert (
        total(runs[0], REQUESTS, source_workload="gw") != 100.0
        or total(runs[0], REQUESTS, source_workload="gw-asm") != 100.0
    )


# --- through the real Prometheus ---------------------------------------------------------------------


def _settled_now() -> float:
    """A moment 2 s ago: every scrape up to it is committed, so queries at it all see the same samples."""
    return time.time() - 2.0


def _query(prometheus: str, promql: str, at: float) -> list[dict[str, object]]:
    """An instant query evaluated at ``at``: queries meant to be compared must see the same samples."""
    answer = requests.get(f"{prometheus}/api/v1/query", params={"query": promql, "time": f"{at:.3f}"}, timeout=5)
    answer.raise_for_status()
    result: list[dict[str, object]] = answer.json()["data"]["result"]
    return result


def _value(result: list[dict[str, object]]) -> float | None:
    if not result:
        return None
    value = result[0]["value"]
    assert isinstance(value, list)
    return float(value[1])


@pytest.mark.integration
def test_prometheus_sees_the_targets_no_route_responses(
    prometheus: str, traffic: TrafficExporter, gateways: tuple[str, str]
) -> None:
    source, target = gateways
    traffic.target.missing_route(0.25)  # before any traffic: the 200 and 404 series start together
    traffic.share = lambda: 0.5
    nr = 'sum(increase(istio_requests_total{{reporter="source",source_workload="{}",response_flags=~".*NR.*"}}[10s]))'
    every = 'sum(increase(istio_requests_total{{reporter="source",source_workload="{}"}}[10s]))'

    def seen() -> tuple[float, float, float] | None:
        at = _settled_now()
        count = _value(_query(prometheus, nr.format(target), at))
        all_requests = _value(_query(prometheus, every.format(target), at))
        return (count, all_requests, at) if count and all_requests else None

    count, all_requests, at = wait_for(seen, timeout=30, interval=0.25, what="the target's NR requests in Prometheus")
    assert count / all_requests == pytest.approx(0.25, rel=1e-9)  # exact counts, same samples: an exact ratio
    assert _query(prometheus, nr.format(source), at) == []  # the source routes everything
    assert _value(_query(prometheus, every.format(source), at))


@pytest.mark.integration
def test_prometheus_sees_handshake_failures_that_http_metrics_miss(
    prometheus: str, traffic: TrafficExporter, gateways: tuple[str, str]
) -> None:
    _, target = gateways
    traffic.target.missing_cert(0.4)
    traffic.share = lambda: 1.0
    pod = f'namespace="istio-system",pod="{pod_name(target)}"'
    queries = (
        f"sum(increase(envoy_listener_ssl_connection_error{{{pod}}}[10s]))",
        f"sum(increase(envoy_listener_downstream_cx_total{{{pod}}}[10s]))",
        f'sum(increase(istio_requests_total{{source_workload="{target}"}}[10s]))',
    )

    def seen() -> list[float] | None:
        at = _settled_now()
        values = [_value(_query(prometheus, promql, at)) for promql in queries]
        return [value for value in values if value] if all(values) else None

    failures, connections, http = wait_for(seen, timeout=30, interval=0.25, what="handshake failures in Prometheus")
    assert failures / connections == pytest.approx(0.4, rel=1e-9)
    assert http / connections == pytest.approx(0.6, rel=1e-9)
