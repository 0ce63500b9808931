"""Judging samples: each gate needs only its own data; no data is never a pass."""

from __future__ import annotations

import math

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
