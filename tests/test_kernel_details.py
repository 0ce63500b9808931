"""The details of the pure kernel that the scenario tests do not pin down (found by mutation testing).

Each test here kills mutants of controller/core/decision.py or gates.py that survived the scenario
tests: a boundary, a field of a result, a branch of a small helper.
"""

from __future__ import annotations

import pytest

from controller.core.decision import Action, Observation, decide, initial_state, raises_share, recovered_state
from controller.core.enums import AlertKind, GatewayRole, InconclusiveCause, Phase, Verdict
from controller.core.gates import judge
from controller.core.schedule import Weights
from controller.core.state import Intent
from tests.helpers import FAIL, NO_DATA, PASS, PROM_DOWN, TARGET_QUIET, at, make_policy, samples

S, T = GatewayRole.SOURCE, GatewayRole.TARGET
POLICY = make_policy()


# --- gates -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "target", "verdict", "cause", "value"),
    [
        (samples(S, requests=50), samples(T, requests=0), Verdict.PASS, None, 50.0),  # exactly minRequests
        (
            samples(S, requests=49),
            samples(T, requests=0),
            Verdict.INCONCLUSIVE,
            InconclusiveCause.TOO_FEW_REQUESTS,
            49.0,
        ),
        (samples(S, requests=None), samples(T), Verdict.INCONCLUSIVE, InconclusiveCause.TOO_FEW_REQUESTS, 0.0),
        (samples(S, error="boom"), samples(T), Verdict.INCONCLUSIVE, InconclusiveCause.METRICS_UNAVAILABLE, None),
        (samples(S), samples(T, error="boom"), Verdict.INCONCLUSIVE, InconclusiveCause.METRICS_UNAVAILABLE, None),
    ],
)
def test_the_baseline_needs_every_query_answered_and_min_requests_on_the_source(
    source, target, verdict, cause, value
) -> None:
    baseline = judge(POLICY, source, target).baseline
    assert (baseline.gate, baseline.verdict, baseline.cause, baseline.value) == ("baseline", verdict, cause, value)
    assert baseline.threshold == 50 and baseline.comparator == ">="
    assert baseline.query == source.requests.query.promql


def test_the_baseline_reason_counts_the_failed_queries() -> None:
    one = judge(POLICY, samples(S), samples(T, error="boom")).baseline.reason
    # samples(error=...) fails every query of that gateway: requests, error rate, latency, the three
    # response-mix counts, the custom one
    assert one == "baseline: 7 queries failed: boom"
    quiet = judge(POLICY, samples(S, requests=7), samples(T)).baseline.reason
    assert quiet == "baseline: source had 7 requests in the window, needs 50"
    ok = judge(POLICY, samples(S, requests=1234), samples(T)).baseline.reason
    assert ok == "baseline: source answered with 1234 requests"


CUSTOM = make_policy(
    gates={
        "custom": [
            {"name": "resets", "query": "sum(x) or vector(0)", "max": 3, "min": 1},
            {"name": "drops", "query": "sum(y)", "max": 3, "onEmpty": "zero"},
        ]
    }
)


def test_custom_gates_carry_the_source_value_and_a_min_bound() -> None:
    result = judge(
        CUSTOM, samples(S, custom={"resets": 2.5, "drops": None}), samples(T, custom={"resets": 0.5, "drops": None})
    )
    gates = {gate.gate: gate for gate in result.gates}
    assert gates["resets"].baseline == 2.5 and gates["resets"].verdict is Verdict.PASS
    assert gates["resetsMin"].comparator == ">=" and gates["resetsMin"].verdict is Verdict.FAIL
    assert gates["resetsMin"].reason == "resetsMin: 0.5 breaks >= 1 (source 2.5)"
    assert gates["drops"].value == 0.0 and gates["drops"].baseline is None  # empty means zero, by the policy


def test_on_empty_zero_never_hides_an_error_or_a_real_value() -> None:
    erroring = judge(CUSTOM, samples(S), samples(T, custom={"resets": 2, "drops": None}, error="boom"))
    assert erroring.verdict is Verdict.INCONCLUSIVE and erroring.cause is InconclusiveCause.METRICS_UNAVAILABLE
    valued = judge(CUSTOM, samples(S, custom={"resets": 2, "drops": 1}), samples(T, custom={"resets": 2, "drops": 7}))
    assert {g.gate: g.value for g in valued.gates}["drops"] == 7


def test_gate_reasons_name_what_was_measured_and_its_unit() -> None:
    policy = make_policy(gates={"errorRate": {"max": 0.05, "maxIncrease": 0.01}, "latency": {"p99Ms": {"max": 500}}})
    result = judge(policy, samples(S, error_rate=None), samples(T, error_rate=None, latency=600))
    reasons = {g.gate: g.reason for g in result.gates}
    assert reasons["errorRate"] == "errorRate: target 5xx ratio: no data"
    assert reasons["errorRateIncrease"] == "errorRateIncrease: target 5xx ratio: no data"
    assert reasons["latencyP99"] == "latencyP99: 600ms breaks <= 500ms"
    assert result.verdict is Verdict.FAIL and result.reason == "latencyP99: 600ms breaks <= 500ms"
    missing = judge(policy, samples(S, error_rate=0.0, latency=None), samples(T, error_rate=0.0, latency=None))
    assert {g.gate: g.reason for g in missing.gates}["latencyP99"] == "latencyP99: target p99 latency: no data"


# --- decision helpers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "target", "source", "raises"),
    [
        (Weights(10, 90), 0, 100, True),
        (Weights(10, 90), 10, 90, False),
        (Weights(10, 90), 10, 100, True),  # finishing a raise: the source goes down
        (Weights(10, 100), 10, 90, False),
        (Weights(0, 100), 10, 90, False),
        (Weights(0, 90), 0, 100, False),  # the target stays at 0: no share to raise
        (Weights(10, None), 5, 0, True),
        (Weights(10, None), 10, 0, False),
        (Weights(1, 90), None, 100, True),
        (Weights(10, 90), 10, None, False),
    ],
)
def test_what_raises_the_asm_share(weights: Weights, target: int | None, source: int | None, raises: bool) -> None:
    assert raises_share(weights, target, source) is raises


def test_the_check_is_remembered_with_its_failing_gate() -> None:
    state = initial_state(POLICY, Observation(10, 90), at(0))
    failed = decide(POLICY, state, Observation(10, 90, FAIL), at(30)).state
    assert (failed.last_verdict, failed.last_failed_gate, failed.consecutive_failures) == (Verdict.FAIL, "errorRate", 1)
    passed = decide(POLICY, failed, Observation(10, 90, PASS), at(60)).state
    assert (passed.last_verdict, passed.last_failed_gate, passed.consecutive_failures) == (Verdict.PASS, None, 0)
    unsure = decide(POLICY, passed, Observation(10, 90, NO_DATA), at(90)).state
    assert unsure.last_verdict is Verdict.INCONCLUSIVE and unsure.inconclusive_count(InconclusiveCause.NO_DATA) == 1
    assert decide(POLICY, unsure, Observation(10, 90, NO_DATA), at(120)).reason == (
        "inconclusive (NoData 2/10): errorRate INCONCLUSIVE"
    )


def test_a_rollback_records_what_it_replaces_and_restarts_nothing() -> None:
    state = initial_state(POLICY, Observation(10, 90), at(0)).evolve(consecutive_failures=1, baked_seconds=100.0)
    decision = decide(POLICY, state, Observation(10, 90, FAIL), at(30))
    assert decision.action is Action.ROLLBACK and decision.transition and decision.force
    assert decision.state.pending == Intent(target=0, source=100, from_target=10, from_source=90, rollback=True)
    assert decision.state.changed_at == at(30) and decision.state.step_started_at is None
    assert decision.state.covered_seconds == 0 and (decision.state.target_weight, decision.state.source_weight) == (
        0,
        100,
    )
    assert [n.kind for n in decision.notices] == [AlertKind.ROLLED_BACK]


def test_target_only_mode_keeps_the_source_on_rollback_and_zeroes_it_on_promotion() -> None:
    policy = make_policy(schedule={"steps": [50], "bakeTime": 0, "weightMode": "target-only"})
    state = initial_state(policy, Observation(50, 80), at(0))
    promoted = decide(policy, state, Observation(50, 80, PASS), at(30))
    assert promoted.action is Action.PROMOTE and promoted.weights == Weights(100, 0)
    assert promoted.state.phase is Phase.PROMOTED and promoted.transition
    failing = state.evolve(consecutive_failures=1)
    rolled = decide(policy, failing, Observation(50, 80, FAIL), at(30))
    assert rolled.weights == Weights(0, None) and rolled.state.source_weight == 80


def test_a_target_seen_with_traffic_is_protected_even_if_the_state_says_0() -> None:
    state = initial_state(POLICY, Observation(0, 100), at(0)).evolve(consecutive_failures=1)
    decision = decide(POLICY, state, Observation(5, 100, FAIL), at(30))
    assert decision.action is Action.ROLLBACK  # (the weight 5 was adopted and counted in the same tick)


def test_an_unreadable_target_weight_is_not_an_outside_change_but_a_moved_source_is() -> None:
    state = initial_state(POLICY, Observation(10, 90), at(0))
    unreadable = decide(POLICY, state, Observation(None, 90, PASS, refusal="weight 'x' is not an integer"), at(30))
    assert unreadable.action is not Action.PAUSE
    moved = decide(POLICY, state, Observation(10, 80, PASS), at(30))
    assert moved.action is Action.PAUSE and moved.state.source_weight == 80


def test_a_target_only_intent_is_complete_once_the_target_shows_it() -> None:
    policy = make_policy(schedule={"steps": [10, 50, 100], "bakeTime": 0, "weightMode": "target-only"})
    state = initial_state(policy, Observation(50, 100), at(0)).evolve(pending=Intent(50, None, 10, 100))
    decision = decide(policy, state, Observation(50, 100, PASS), at(30))
    assert decision.action is Action.PROMOTE  # settled (the source is not ours to write), then the next step
    held = decide(policy, state, Observation(10, 100, NO_DATA), at(30))
    assert held.action is Action.HOLD and held.state.pending == state.pending  # not visible yet: waits


def test_a_start_needs_a_quiet_target_or_a_pass_not_any_inconclusive() -> None:
    pending = initial_state(POLICY, Observation(0, 100), at(0))
    assert decide(POLICY, pending, Observation(0, 100, NO_DATA), at(0)).action is Action.HOLD
    assert decide(POLICY, pending, Observation(0, 100, PROM_DOWN), at(0)).action is Action.HOLD
    assert decide(POLICY, pending, Observation(0, 100, PASS), at(0)).action is Action.START
    started = decide(POLICY, pending, Observation(0, 100, TARGET_QUIET), at(0))
    assert started.action is Action.START and started.transition and started.state.step_started_at == at(0)
    assert started.reason == "started: target weight 0 -> 10; baseline ready: source has traffic, metrics answer"


def test_recovered_state_holds_where_the_services_are() -> None:
    paused = recovered_state(POLICY, Observation(30, 70), at(5), "bad JSON")
    assert (paused.phase, paused.target_weight, paused.source_weight) == (Phase.PAUSED, 30, 70)
    assert paused.changed_at == at(5) and paused.step_started_at == at(5) and paused.policy == "shop"
    assert paused.fingerprint == POLICY.rollout_fingerprint() and "bad JSON" in paused.reason
    assert "rollback armed" in paused.reason
    promoted = recovered_state(POLICY, Observation(100, 0), at(5), "bad JSON")
    assert promoted.phase is Phase.PROMOTED and "rollback armed" not in promoted.reason
    empty = recovered_state(POLICY, Observation(None, None), at(5), "x")
    assert (empty.target_weight, empty.source_weight) == (0, None)


def test_an_outside_change_in_a_terminal_phase_is_adopted_once() -> None:
    rolled = initial_state(POLICY, Observation(0, 100), at(0)).evolve(phase=Phase.ROLLED_BACK)
    decision = decide(POLICY, rolled, Observation(20, 80), at(30))
    assert decision.action is Action.ADOPT and decision.transition and decision.state.phase is Phase.ROLLED_BACK
    assert (decision.state.target_weight, decision.state.source_weight) == (20, 80)
    assert decision.state.changed_at == at(30)
    assert decision.reason.startswith("weights changed outside gateway-canary: found target=20 source=80, expected")
    again = decide(POLICY, decision.state, Observation(20, 80), at(60))
    assert again.notices == () and again.action is Action.NONE


def test_boundaries_a_value_at_its_threshold_passes_and_min_requests_is_enough() -> None:
    policy = make_policy(gates={"errorRate": {"max": 0.05}, "latency": {"maxRatio": 2}})
    at_limit = judge(
        policy, samples(S, requests=50, latency=100), samples(T, requests=50, error_rate=0.05, latency=200)
    )
    assert at_limit.verdict is Verdict.PASS and at_limit.starved == ()
    below = judge(policy, samples(S, requests=50), samples(T, requests=49))
    assert below.verdict is Verdict.INCONCLUSIVE and below.starved == (T,)
    no_source_latency = judge(policy, samples(S, latency=0.0), samples(T, latency=10.0))
    assert no_source_latency.cause is InconclusiveCause.NOT_A_NUMBER
    assert {g.gate: g.reason for g in no_source_latency.gates}["latencyP99Ratio"] == (
        "latencyP99Ratio: source latency is 0.0, no ratio"
    )
    one_ms = judge(policy, samples(S, latency=1.0), samples(T, latency=1.5))
    assert one_ms.verdict is Verdict.PASS  # a source at 1 ms is a baseline, not "no ratio"


def test_weight_1_carries_traffic_and_is_protected() -> None:
    state = initial_state(POLICY, Observation(1, 99), at(0)).evolve(consecutive_failures=1)
    assert decide(POLICY, state, Observation(1, 99, FAIL), at(30)).action is Action.ROLLBACK
    assert initial_state(POLICY, Observation(1, 99), at(0)).phase is Phase.PROGRESSING
    assert initial_state(POLICY, Observation(100, 0), at(0)).phase is Phase.PROMOTED
    assert initial_state(POLICY, Observation(99, 1), at(0)).phase is Phase.PROGRESSING


def test_passes_exactly_two_intervals_apart_cover_the_gap_and_a_step_more_does_not() -> None:
    policy = make_policy(schedule={"steps": [10, 50, 100], "bakeTime": "120s"})  # interval 30s
    state = initial_state(policy, Observation(10, 90), at(0))
    state = decide(policy, state, Observation(10, 90, PASS), at(0)).state
    covered = decide(policy, state, Observation(10, 90, PASS), at(60)).state
    assert covered.covered_seconds == 60
    gap = decide(policy, state, Observation(10, 90, PASS), at(61)).state
    assert gap.covered_seconds == 0 and gap.run_started_at == at(61)
