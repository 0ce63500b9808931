"""Judging samples: each gate needs only its own data; no data is never a pass."""

from __future__ import annotations

import math
from typing import Any

from controller.core.enums import GatewayRole, InconclusiveCause, Verdict
from controller.core.gates import judge
from tests.helpers import make_policy, samples

S, T = GatewayRole.SOURCE, GatewayRole.TARGET
POLICY = make_policy(
    gates={
        "errorRate": {"max": 0.05, "maxIncrease": 0.01},
        "latency": {"p99Ms": {"max": 500}, "maxRatio": 1.5},
        "custom": [{"name": "resets", "query": "sum(x{ {{ selector }} }[{{ window }}])", "max": 3}],
    }
)


def test_all_gates_pass_with_values_thresholds_and_baseline() -> None:
    result = judge(
        POLICY, samples(S, error_rate=0.001, custom={"resets": 0}), samples(T, error_rate=0.002, custom={"resets": 1})
    )
    assert result.verdict is Verdict.PASS
    by_name = {gate.gate: gate for gate in result.gates}
    assert set(by_name) == {
        "errorRate",
        "errorRateIncrease",
        "latencyP99",
        "latencyP99Ratio",
        "resets",
        "responses4xx",  # the response-mix gate is on by default
        "responsesAuth",
        "responsesNoRoute",
    }
    assert by_name["errorRateIncrease"].value == 0.001
    assert by_name["errorRateIncrease"].baseline == 0.001
    assert by_name["latencyP99"].threshold == 500


def test_failure_names_gate_value_threshold_and_query() -> None:
    result = judge(POLICY, samples(S, error_rate=0.0), samples(T, error_rate=0.2))
    assert result.verdict is Verdict.FAIL
    failing = result.failing[0]
    assert failing.gate == "errorRate" and failing.value == 0.2 and failing.threshold == 0.05
    assert failing.query == "q_target_errorRate"  # the rendered PromQL travels with the result


def test_relative_latency_gate_fails_against_the_baseline() -> None:
    result = judge(POLICY, samples(S, latency=100), samples(T, latency=200))
    assert result.verdict is Verdict.FAIL
    assert [g.gate for g in result.failing] == ["latencyP99Ratio"]
    assert result.failing[0].value == 2.0


def test_a_failing_target_is_not_hidden_by_a_quiet_source() -> None:
    result = judge(POLICY, samples(S, requests=3), samples(T, error_rate=0.5))
    assert result.verdict is Verdict.FAIL
    assert S in result.starved


def test_too_few_requests_on_target_is_inconclusive_never_pass() -> None:
    result = judge(POLICY, samples(S), samples(T, requests=10, error_rate=0.0, custom={"resets": 0}))
    assert result.verdict is Verdict.INCONCLUSIVE
    assert result.cause is InconclusiveCause.TOO_FEW_REQUESTS
    assert result.starved == (T,)


def test_empty_requests_answer_means_no_traffic() -> None:
    result = judge(POLICY, samples(S), samples(T, requests=None, error_rate=None, latency=None))
    assert result.verdict is Verdict.INCONCLUSIVE
    assert result.starved == (T,)


def test_prometheus_errors_are_metrics_unavailable() -> None:
    result = judge(POLICY, samples(S, error="connection refused"), samples(T, error="connection refused"))
    assert result.verdict is Verdict.INCONCLUSIVE
    assert result.cause is InconclusiveCause.METRICS_UNAVAILABLE
    assert "connection refused" in result.reason


def test_nan_latency_is_inconclusive_not_a_pass() -> None:
    policy = make_policy(gates={"latency": {"p99Ms": {"max": 500}}})
    result = judge(policy, samples(S), samples(T, latency=math.nan))
    assert result.verdict is Verdict.INCONCLUSIVE
    assert result.cause is InconclusiveCause.NOT_A_NUMBER


def test_custom_gate_without_data_is_no_data() -> None:
    policy = make_policy(gates={"custom": [{"name": "resets", "query": "x", "max": 3}]})
    result = judge(policy, samples(S, custom={"resets": None}), samples(T, custom={"resets": None}))
    assert result.verdict is Verdict.INCONCLUSIVE and result.cause is InconclusiveCause.NO_DATA


def test_min_bound_custom_gate() -> None:
    policy = make_policy(gates={"custom": [{"name": "ready", "query": "x", "min": 2}]})
    assert judge(policy, samples(S, custom={"ready": 3}), samples(T, custom={"ready": 1})).verdict is Verdict.FAIL
    assert judge(policy, samples(S, custom={"ready": 3}), samples(T, custom={"ready": 2})).verdict is Verdict.PASS


def test_observed_share_follows_requests() -> None:
    result = judge(POLICY, samples(S, requests=750), samples(T, requests=250))
    assert result.observed_target_share == 0.25


# --- the response mix: the ASM gateway's responses against the old gateway's ---------------------------

MIX_ONLY = make_policy(gates={"errorRate": {"max": 1.0}}, analysis={"minRequests": 50})


def mix_gate(target: dict[str, float | None], source: dict[str, float | None], name: str, **requests: float) -> Any:
    result = judge(
        MIX_ONLY,
        samples(S, requests=requests.get("on_source", 5000.0), mix=source),
        samples(T, requests=requests.get("on_target", 600.0), mix=target),
    )
    return next(gate for gate in result.gates if gate.gate == name)


def test_a_missing_route_fails_on_404_nr_with_both_ratios_and_the_noise() -> None:
    gate = mix_gate({"4xx": 72, "noRoute": 60}, {"4xx": 100, "noRoute": 0}, "responsesNoRoute")
    assert gate.verdict is Verdict.FAIL and gate.value == 0.1 and gate.baseline == 0.0 and gate.threshold == 0.01
    assert "404 NR (no route) 10.00% on the target vs 0.00% on the source" in gate.reason and "sigma" in gate.reason
    four = mix_gate({"4xx": 72, "noRoute": 60}, {"4xx": 100, "noRoute": 0}, "responses4xx")
    assert four.verdict is Verdict.FAIL and four.baseline == 0.02


def test_a_missing_authorization_policy_fails_on_401_403() -> None:
    gate = mix_gate({"4xx": 40, "auth": 30}, {"4xx": 100, "auth": 5}, "responsesAuth")
    assert gate.verdict is Verdict.FAIL and gate.value is not None and gate.value > 0.04


def test_no_4xx_on_the_source_is_a_ratio_of_zero_not_missing_data() -> None:
    quiet = mix_gate({"4xx": 1}, {"4xx": 0}, "responses4xx")
    assert quiet.verdict is Verdict.PASS and quiet.baseline == 0.0
    loud = mix_gate({"4xx": 60}, {"4xx": 0}, "responses4xx")
    assert loud.verdict is Verdict.FAIL


def test_more_on_the_source_than_on_the_target_is_no_failure() -> None:
    gate = mix_gate({"noRoute": 0}, {"noRoute": 500}, "responsesNoRoute")
    assert gate.verdict is Verdict.PASS and gate.value is not None and gate.value < 0


def test_no_traffic_on_either_side_is_inconclusive_too_few_requests() -> None:
    for traffic in ({"on_target": 0.0}, {"on_source": 10.0}):
        gate = mix_gate({"4xx": 0}, {"4xx": 0}, "responses4xx", **traffic)
        assert gate.verdict is Verdict.INCONCLUSIVE and gate.cause is InconclusiveCause.TOO_FEW_REQUESTS


def test_a_handful_of_stray_responses_at_low_traffic_is_noise() -> None:
    # 4 NR out of 120 requests (3.3 %) on a quiet target: over the limit, under minExcess (5)
    gate = mix_gate({"4xx": 4, "noRoute": 4}, {"4xx": 100, "noRoute": 1}, "responsesNoRoute", on_target=120.0)
    assert gate.verdict is Verdict.PASS and gate.value is not None and gate.value > gate.threshold
    # and an excess within 4 sigma of the two-proportion noise is noise too
    noisy = mix_gate({"4xx": 50}, {"4xx": 30}, "responses4xx", on_target=600.0, on_source=600.0)
    assert noisy.verdict is Verdict.PASS and noisy.value is not None and noisy.value > noisy.threshold


def test_the_response_mix_gate_can_be_turned_off() -> None:
    policy = make_policy(gates={"errorRate": {"max": 1.0}, "responseMix": {"enabled": False}})
    gates = {gate.gate for gate in judge(policy, samples(S), samples(T)).gates}
    assert gates == {"errorRate"}


def test_tls_handshake_failures_per_connection_and_no_stats_is_no_data() -> None:
    policy = make_policy(gates={"errorRate": {"max": 1.0}, "tlsHandshake": {"maxIncrease": 0.01}})
    broken = judge(
        policy,
        samples(S, mix={"tlsErrors": 2, "connections": 5000}),
        samples(T, mix={"tlsErrors": 120, "connections": 720}),
    )
    gate = next(g for g in broken.gates if g.gate == "tlsHandshakeFailures")
    assert gate.verdict is Verdict.FAIL and "TLS handshake failures 16.67% on the target" in gate.reason
    unexported = judge(
        policy,
        samples(S, mix={"tlsErrors": None, "connections": None}),
        samples(T, mix={"tlsErrors": None, "connections": None}),
    )
    gate = next(g for g in unexported.gates if g.gate == "tlsHandshakeFailures")
    assert gate.verdict is Verdict.INCONCLUSIVE and gate.cause is InconclusiveCause.NO_DATA
