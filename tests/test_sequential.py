"""The sequential gate (controller.core.sequential, gates.errorRate.sequential): its statistic
against hand-computed values, its bookkeeping of counter readings (no request counted twice,
none lost across a gap), the gate's verdicts, the decision's rule R11 and the state that carries
the evidence across restarts. The statistical validity under equal rates is in
test_sequential_validity.py; the end-to-end run against the real Prometheus in
test_sequential_e2e.py."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from typing import Any

import pytest

from controller.adapters.memory import InMemoryGatewayPair, InMemoryStateStore
from controller.core.decision import Action, Observation, decide, initial_state
from controller.core.enums import GatewayRole, InconclusiveCause, Measure, Phase, Verdict
from controller.core.gates import judge, sequential_prior
from controller.core.queries import COUNTER_ERRORS, COUNTER_REQUESTS, counters_query, queries_for
from controller.core.results import CounterSeries, RenderedQuery
from controller.core.sequential import (
    CHANGE_EVERY,
    Evidence,
    Increment,
    Reading,
    confidence_sequence,
    effect_grid,
    estimate,
    gate_grid,
    interval_log_lr,
    log_e_value,
    observe,
)
from controller.core.state import decode_state, encode_state
from controller.errors import MetricsUnavailable
from tests.helpers import at, make_policy, runner_for, samples
from tests.servers import wait_for

SEQUENTIAL = {"errorRate": {"sequential": {"alpha": 0.01, "minEffect": 1.5}}, "responseMix": {"enabled": False}}


# --- the statistic -----------------------------------------------------------------------------------


def test_one_interval_likelihood_ratio_matches_the_binomial_by_hand() -> None:
    # 100 requests on each gateway, 4 errors all on the target: at r = 2, q = 2/3 against q0 = 1/2,
    # so L(2)/L(1) = (2/3 / 1/2)^4 = (4/3)^4
    (value,) = interval_log_lr(Increment(100, 4, 100, 0), (2.0,))
    assert value == pytest.approx(math.log((4 / 3) ** 4), rel=1e-12)
    # 100 vs 900 requests, 5 errors each: q(r) = 100r / (100r + 900)
    (value,) = interval_log_lr(Increment(100, 5, 900, 5), (3.0,))
    q, q0 = 300 / 1200, 100 / 1000
    assert value == pytest.approx(5 * math.log(q / q0) + 5 * math.log((1 - q) / (1 - q0)), rel=1e-12)


def test_no_error_or_no_exposure_carries_no_information() -> None:
    assert set(interval_log_lr(Increment(100, 0, 900, 0), gate_grid(1.5))) == {0.0}
    assert set(interval_log_lr(Increment(0, 0, 900, 7), gate_grid(1.5))) == {0.0}
    assert set(interval_log_lr(Increment(100, 3, 0, 0), gate_grid(1.5))) == {0.0}


def test_the_e_value_is_the_average_of_likelihood_ratios_over_changepoints_and_the_gate_grid() -> None:
    increments = [Increment(100, 6, 900, 4), Increment(120, 9, 880, 5), Increment(90, 2, 910, 6)]
    evidence, _, _ = observe(Evidence("g", "s"), Reading(0, 0), Reading(0, 0), 1.5, 0.01)
    target, source = Reading(0, 0), Reading(0, 0)
    for inc in increments:
        target = Reading(target.requests + inc.target_requests, target.events + inc.target_events)
        source = Reading(source.requests + inc.source_requests, source.events + inc.source_events)
        evidence, counted, note = observe(evidence, target, source, 1.5, 0.01)
        assert counted == inc and note is None

    def likelihood(r: float, inc: Increment) -> float:  # straight from the binomial, no logs
        q = r * inc.target_requests / (r * inc.target_requests + inc.source_requests)
        return q**inc.target_events * (1 - q) ** inc.source_events

    # the excess began with block b of CHANGE_EVERY informative intervals (prior 1/(b(b+1))), at a
    # rate r of the grid (equal weights); the three intervals are all in the first block
    assert len(increments) < CHANGE_EVERY
    by_hand = (
        1
        / (1 * 2)
        * sum(math.prod(likelihood(r, inc) / likelihood(1.0, inc) for inc in increments) for r in gate_grid(1.5))
        / len(gate_grid(1.5))
    )
    assert math.exp(log_e_value(evidence)) == pytest.approx(by_hand, rel=1e-9)
    assert gate_grid(1.5)[0] == pytest.approx(1.5)  # the mixture starts exactly at minEffect
    assert evidence.totals == increments[0] + increments[1] + increments[2]
    assert estimate(evidence.totals) == pytest.approx((17 / 310) / (15 / 2690))


def test_rejection_is_at_one_over_alpha_and_final_for_the_step() -> None:
    evidence, _, _ = observe(Evidence("g", "s"), Reading(0, 0), Reading(0, 0), 1.5, 0.01)
    steps = 0
    target = source = Reading(0, 0)
    while not evidence.rejected:
        steps += 1
        target = Reading(target.requests + 100, target.events + 5)  # 5 % against 0.5 %
        source = Reading(source.requests + 900, source.events + 4.5)
        evidence, _, _ = observe(evidence, target, source, 1.5, 0.01)
        assert steps < 50
    assert log_e_value(evidence) >= math.log(100)
    # the e-value may fall again (the target recovers); the rejection stands
    for _ in range(20):
        target = Reading(target.requests + 100, target.events)
        source = Reading(source.requests + 900, source.events + 4.5)
        evidence, _, _ = observe(evidence, target, source, 1.5, 0.01)
    assert log_e_value(evidence) < math.log(100)
    assert evidence.rejected


def _checks_to_reject(rng: random.Random, healthy: int, horizon: int = 120) -> int | None:
    """Checks of 100 target and 900 source requests, both at 0.5 % 5xx for ``healthy`` checks, then
    the target at 5 %: how many checks after the fault the gate rejects (None: not within ``horizon``)."""
    evidence, _, _ = observe(Evidence("g", "s"), Reading(0, 0), Reading(0, 0), 1.5, 0.01)
    target = source = Reading(0, 0)
    for index in range(healthy + horizon):
        ratio = 0.005 if index < healthy else 0.05
        target = Reading(target.requests + 100, target.events + sum(rng.random() < ratio for _ in range(100)))
        source = Reading(source.requests + 900, source.events + sum(rng.random() < 0.005 for _ in range(900)))
        evidence, _, _ = observe(evidence, target, source, 1.5, 0.01)
        if evidence.rejected:
            return None if index < healthy else index - healthy + 1
    return None


def test_a_target_that_breaks_late_in_a_long_step_is_caught_nearly_as_fast_as_at_its_start() -> None:
    """The changepoints: ten minutes of healthy 1 s checks cost a few checks, not minutes."""
    rng = random.Random(3)
    early = sorted(_checks_to_reject(rng, 0) or 10_000 for _ in range(40))
    late = sorted(_checks_to_reject(rng, 600) or 10_000 for _ in range(40))
    assert early[20] <= 3 and late[20] <= early[20] + 3, (early, late)
    assert late[36] <= 10, late  # p90


def test_the_confidence_sequence_narrows_around_the_true_effect_and_covers_it() -> None:
    rng = random.Random(11)
    misses = 0
    runs = 300
    widths = []
    for _ in range(runs):
        evidence = Evidence("g", "s", target=(Reading(0, 0),), source=(Reading(0, 0),))
        target = source = Reading(0, 0)
        ever_missed = False
        for _ in range(60):
            # 100 and 400 requests per interval, true effect r = 3 (1.5 % against 0.5 %)
            t_events = sum(rng.random() < 0.015 for _ in range(100))
            s_events = sum(rng.random() < 0.005 for _ in range(400))
            target = Reading(target.requests + 100, target.events + t_events)
            source = Reading(source.requests + 400, source.events + s_events)
            evidence, _, _ = observe(evidence, target, source, 1.5, 0.05)
            low, high = confidence_sequence(evidence, 0.05)
            ever_missed = ever_missed or not low <= 3.0 <= high
        misses += ever_missed
        widths.append(high / low if low > 0 else math.inf)
    # anytime coverage: the interval EVER missing 3 in a run has probability <= alpha (0.05); with
    # 300 runs the binomial standard deviation at 0.05 is 0.013: 0.05 + 3 sd bounds it
    assert misses / runs <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / runs)
    assert sorted(widths)[runs // 2] < 4  # and it is informative: the median run ends within a factor 4


def test_before_any_evidence_the_interval_is_everything() -> None:
    assert confidence_sequence(Evidence("g", "s"), 0.01) == (0.0, math.inf)
    assert effect_grid()[0] < 1 / 30 and effect_grid()[-1] > 250


# --- bookkeeping: every request once -----------------------------------------------------------------


def test_the_first_reading_is_only_a_base() -> None:
    evidence, counted, note = observe(Evidence("g", "s"), Reading(500, 3), Reading(900, 2), 1.5, 0.01)
    assert counted is None and note is not None and "first reading" in note
    assert evidence.target == (Reading(500, 3),) and evidence.intervals == 0


def test_any_schedule_of_checks_counts_each_request_exactly_once() -> None:
    """Checks at arbitrary moments over the same counters: the totals are the counters' growth,
    however many checks there were; and with a steady split, lumping intervals changes nothing."""
    rng = random.Random(5)
    stream = []
    target = source = Reading(0, 0)
    for _ in range(200):
        target = Reading(target.requests + 100, target.events + rng.choice([0, 1, 2, 5]))
        source = Reading(source.requests + 900, source.events + rng.choice([0, 1, 4]))
        stream.append((target, source))
    outcomes = []
    for every in (1, 3, 7, 199):
        evidence = Evidence("g", "s")
        for index in range(0, 200, every):
            evidence, _, _ = observe(evidence, *stream[index], 1.5, 0.01)
        last = (200 - 1) // every * every
        grown = Increment(
            stream[last][0].requests - stream[0][0].requests,
            stream[last][0].events - stream[0][0].events,
            stream[last][1].requests - stream[0][1].requests,
            stream[last][1].events - stream[0][1].events,
        )
        assert evidence.totals == grown
        if last == 199:
            outcomes.append(evidence.log_lik)
    # the same stretch read every check or only at its ends: the same statistic (a steady split
    # makes q the same in every interval, so the product of binomials is the binomial of the sums)
    assert len(outcomes) == 2
    assert outcomes[0] == pytest.approx(outcomes[1], rel=1e-9, abs=1e-9)


def test_a_missing_reading_keeps_the_base_and_the_gap_is_counted_once() -> None:
    evidence, _, _ = observe(Evidence("g", "s"), Reading(0, 0), Reading(0, 0), 1.5, 0.01)
    evidence, _, _ = observe(evidence, Reading(100, 1), Reading(900, 4), 1.5, 0.01)
    unread, counted, note = observe(evidence, None, Reading(1800, 8), 1.5, 0.01)
    assert counted is None and note is not None and unread == evidence
    evidence, counted, _ = observe(unread, Reading(300, 3), Reading(2700, 12), 1.5, 0.01)
    assert counted == Increment(200, 2, 1800, 8)
    assert evidence.totals == Increment(300, 3, 2700, 12) and evidence.intervals == 2


def test_a_target_whose_counters_went_down_counts_on_from_its_new_reading() -> None:
    """A restart (or an expired series): what it served meanwhile is unknown and counts nothing;
    from the new reading on, every request counts once (a crash-looping pod's 5xx are seen), and a
    difference of two unrelated counts is never taken for an interval."""
    evidence, _, _ = observe(Evidence("g", "s"), Reading(1000, 10), Reading(18e6, 900), 1.5, 0.01)
    evidence, counted, _ = observe(evidence, Reading(50, 25), Reading(18e6 + 900, 905), 1.5, 0.01)
    assert counted == Increment(0, 0, 900, 5) and evidence.target == (Reading(50, 25),)
    evidence, counted, _ = observe(evidence, Reading(150, 75), Reading(18e6 + 1800, 910), 1.5, 0.01)
    assert counted == Increment(100, 50, 900, 5)  # the restarted pod's 50 % 5xx, counted
    # past its old reading again: still its own increments, not (new - old before the restart)
    evidence, counted, _ = observe(evidence, Reading(1100, 80), Reading(18e6 + 2700, 915), 1.5, 0.01)
    assert counted == Increment(950, 5, 900, 5)
    # more bad requests than requests cannot be: counted nowhere, and counted on from there
    evidence, counted, _ = observe(evidence, Reading(1110, 100), Reading(18e6 + 2750, 916), 1.5, 0.01)
    assert counted == Increment(0, 0, 50, 1) and evidence.target == (Reading(1110, 100),)


def _at(requests: float, events: float, time: float, instance: str) -> Reading:
    return Reading(requests, events, time, instance)


def test_each_scrape_target_is_followed_on_its_own() -> None:
    """Two pods behind the source: one goes missing for a check and comes back, a third appears,
    and an older answer (an HA Prometheus's other replica) arrives: every request is counted once."""
    evidence, _, _ = observe(
        Evidence("g", "s"), _at(0, 0, 10, "t"), (_at(1000, 5, 10, "a"), _at(5000, 20, 10, "b")), 1.5, 0.01
    )
    # b is missing: a counts, b's base is kept
    evidence, counted, _ = observe(evidence, _at(100, 1, 11, "t"), (_at(1400, 7, 11, "a"),), 1.5, 0.01)
    assert counted == Increment(100, 1, 400, 2)
    # b is back (its gap counted once, in this interval); c is new: only a base
    evidence, counted, _ = observe(
        evidence,
        _at(200, 1, 12, "t"),
        (_at(1800, 9, 12, "a"), _at(5800, 24, 12, "b"), _at(70_000, 300, 12, "c")),
        1.5,
        0.01,
    )
    assert counted == Increment(100, 0, 400 + 800, 2 + 4)
    # the other replica answers with older samples of every target: nothing is counted again
    stale = (_at(1400, 7, 11, "a"), _at(5000, 20, 10, "b"), _at(69_000, 290, 11, "c"))
    evidence, counted, note = observe(evidence, _at(100, 1, 11, "t"), stale, 1.5, 0.01)
    assert counted is None and note is not None and "no new scrape" in note
    evidence, counted, _ = observe(
        evidence,
        _at(300, 2, 13, "t"),
        (_at(2200, 9, 13, "a"), _at(6200, 25, 13, "b"), _at(70_400, 302, 13, "c")),
        1.5,
        0.01,
    )
    assert counted == Increment(100, 1, 400 + 400 + 400, 0 + 1 + 2)
    assert evidence.totals.source_requests == 400 + 1200 + 1200  # a, b and c: each request once


def test_a_burst_common_to_both_seen_first_on_the_target_waits_for_the_source_and_is_dropped() -> None:
    """The gateways are scraped at different moments: a burst on both shows on the target's counters
    a scrape before the source's. The statistic reaches 1/alpha on that, and the rejection waits
    until the source is scraped past the target's sample; then the burst is on both, and it stands
    down. The same excess on the target alone stands."""

    def run(source_burst: float) -> Evidence:
        evidence, _, _ = observe(Evidence("g", "s"), _at(0, 0, 0.0, "t"), _at(0, 0, -0.5, "s"), 1.5, 0.01)
        # target scraped at 1.0 (the burst in it); source at 0.5 (not yet)
        evidence, _, _ = observe(evidence, _at(100, 40, 1.0, "t"), _at(900, 4, 0.5, "s"), 1.5, 0.01)
        assert evidence.confirming == 1.0 and not evidence.rejected
        # next scrapes: the source's covers the burst now (or not, when it was the target's own)
        evidence, _, _ = observe(evidence, _at(200, 41, 2.0, "t"), _at(1800, 8 + source_burst, 1.5, "s"), 1.5, 0.01)
        assert evidence.confirming is None
        return evidence

    assert not run(source_burst=360).rejected  # 10 % of the burst's requests on the target: its share
    assert run(source_burst=0).rejected  # the target's own: rejected once the source caught up


def test_scraped_at_one_moment_a_rejection_does_not_wait() -> None:
    evidence, _, _ = observe(Evidence("g", "s"), _at(0, 0, 5.0, "t"), _at(0, 0, 5.0, "s"), 1.5, 0.01)
    evidence, _, _ = observe(evidence, _at(100, 40, 6.0, "t"), _at(900, 4, 6.0, "s"), 1.5, 0.01)
    assert evidence.rejected and evidence.confirming is None


# --- the gate -------------------------------------------------------------------------------------


def _counters(role: GatewayRole, requests: float | None, errors: float | None, error: str | None = None) -> Any:
    query = RenderedQuery("counters", Measure.COUNTERS, role, gate="sequential")
    values = {}
    if requests is not None:
        values = {(COUNTER_REQUESTS, "pod-1"): requests, (COUNTER_ERRORS, "pod-1"): errors or 0.0}
    return replace(samples(role), counters=CounterSeries(query, values=values, error=error))


def _judge(
    policy: Any, prior: dict[str, Evidence], t: tuple[float | None, float | None], s: tuple[float, float]
) -> Any:
    return judge(
        policy,
        _counters(GatewayRole.SOURCE, *s),
        _counters(GatewayRole.TARGET, *t),
        evidence=prior,
    )


def test_the_gate_starts_inconclusive_passes_with_traffic_and_fails_decisively_with_its_reasons() -> None:
    policy = make_policy(gates=SEQUENTIAL)
    prior = sequential_prior(policy, (), 10, 90)
    first = _judge(policy, prior, (1000, 5), (9000, 45))
    gate = first.gates[-1]
    assert gate.gate == "errorRateSequential" and gate.verdict is Verdict.INCONCLUSIVE
    assert gate.cause is InconclusiveCause.TOO_FEW_REQUESTS and "first reading" in gate.reason
    (evidence,) = first.evidence
    healthy = _judge(policy, {"errorRateSequential": evidence}, (1100, 5), (9900, 50))
    gate = healthy.gates[-1]
    assert healthy.verdict is Verdict.PASS and gate.verdict is Verdict.PASS and not gate.decisive
    assert gate.threshold == 100 and gate.value is not None and gate.value < 100
    (evidence,) = healthy.evidence
    failed = _judge(policy, {"errorRateSequential": evidence}, (1200, 45), (10800, 55))
    gate = failed.gates[-1]
    assert failed.verdict is Verdict.FAIL and gate.verdict is Verdict.FAIL and gate.decisive
    assert gate.value is not None and gate.value >= 100
    assert "since it most likely began (target 40 of 100 requests, source 5 of 900)" in gate.reason
    assert "this step 36x the source's, 99% CS [" in gate.reason


def test_the_gate_never_passes_on_no_traffic_and_keeps_its_base_when_prometheus_fails() -> None:
    policy = make_policy(gates=SEQUENTIAL)
    prior = sequential_prior(policy, (), 10, 90)
    (evidence,) = _judge(policy, prior, (1000, 5), (9000, 45)).evidence
    quiet = _judge(policy, {"errorRateSequential": evidence}, (1000, 5), (9900, 50))
    assert quiet.gates[-1].verdict is Verdict.INCONCLUSIVE and "no requests on a gateway" in quiet.gates[-1].reason
    (evidence,) = quiet.evidence
    failing = judge(
        policy,
        _counters(GatewayRole.SOURCE, None, None, error="connection refused"),
        _counters(GatewayRole.TARGET, None, None, error="connection refused"),
        evidence={"errorRateSequential": evidence},
    )
    assert failing.gates[-1].cause is InconclusiveCause.METRICS_UNAVAILABLE
    assert failing.evidence[0] == evidence  # nothing counted, the base kept for the next increment
    absent = _judge(policy, {"errorRateSequential": evidence}, (None, None), (10800, 55))
    assert absent.gates[-1].cause is InconclusiveCause.TOO_FEW_REQUESTS and absent.evidence[0] == evidence
    # fewer than minRequests (50) on the target since the step began: no pass yet
    small = make_policy(gates=SEQUENTIAL, analysis={"interval": "1s", "window": "10s", "minRequests": 500})
    (evidence,) = _judge(small, sequential_prior(small, (), 10, 90), (0, 0), (0, 0)).evidence
    early = _judge(small, {"errorRateSequential": evidence}, (100, 0), (900, 4))
    assert early.gates[-1].verdict is Verdict.INCONCLUSIVE and "fewer than 500" in early.gates[-1].reason


def test_evidence_is_carried_only_into_the_same_step_and_settings() -> None:
    policy = make_policy(gates=SEQUENTIAL)
    prior = sequential_prior(policy, (), 10, 90)
    (evidence,) = _judge(policy, prior, (1000, 5), (9000, 45)).evidence
    assert sequential_prior(policy, (evidence,), 10, 90)["errorRateSequential"] == evidence
    assert sequential_prior(policy, (evidence,), 25, 75)["errorRateSequential"].target is None
    edited = make_policy(gates={**SEQUENTIAL, "errorRate": {"sequential": {"alpha": 0.05, "minEffect": 1.5}}})
    assert sequential_prior(edited, (evidence,), 10, 90)["errorRateSequential"].target is None


def test_the_counters_query_reads_raw_counters_per_gateway_in_one_instant_query() -> None:
    policy = make_policy(
        gates={**SEQUENTIAL, "latency": {"p99Ms": {"max": 500}, "sequential": {"minEffect": 2}}},
    )
    query = counters_query(policy, GatewayRole.TARGET)
    assert query is not None and query.measure is Measure.COUNTERS
    assert "increase(" not in query.promql and "rate(" not in query.promql
    assert '"counter", "requests"' in query.promql and '"counter", "withinLatency"' in query.promql
    assert 'le=~"500|500\\\\.0"' in query.promql  # Prometheus 3 writes le="500.0"
    assert queries_for(make_policy()).get(GatewayRole.TARGET).counters is None  # type: ignore[union-attr]


def test_latency_sequential_needs_a_bound() -> None:
    with pytest.raises(ValueError, match="slowerThanMs"):
        make_policy(gates={"latency": {"maxRatio": 2, "sequential": {"minEffect": 2}}})
    policy = make_policy(gates={"latency": {"sequential": {"slowerThanMs": 250}}})
    assert policy.spec.gates.latency is not None and policy.spec.gates.latency.slow_ms == 250


# --- the decision: R11 -------------------------------------------------------------------------------


def test_a_decisive_fail_rolls_back_at_once_whatever_the_failure_threshold() -> None:
    policy = make_policy(
        gates=SEQUENTIAL, analysis={"interval": "1s", "window": "10s", "minRequests": 50, "failureThreshold": 5}
    )
    observed = Observation(10, 90)
    state = initial_state(policy, observed, at(0))
    assert state.phase is Phase.PROGRESSING
    prior = sequential_prior(policy, state.evidence, 10, 90)
    (evidence,) = _judge(policy, prior, (1000, 5), (9000, 45)).evidence
    check = _judge(policy, {"errorRateSequential": evidence}, (1200, 45), (10800, 55))
    decision = decide(policy, state, replace(observed, check=check), at(1))
    assert decision.action is Action.ROLLBACK and decision.weights is not None and decision.weights.target == 0
    assert "errorRateSequential rejected" in decision.reason and "CS [" in decision.reason
    assert decision.state.evidence == ()  # a retry gathers its own
    # the same FAIL from a threshold gate is counted against failureThreshold 5
    threshold = replace(check, gates=tuple(replace(g, decisive=False) for g in check.gates))
    held = decide(policy, state, replace(observed, check=threshold), at(1))
    assert held.action is Action.HOLD and held.state.consecutive_failures == 1


def test_the_state_keeps_the_evidence_of_every_check_and_a_new_step_starts_afresh() -> None:
    policy = make_policy(gates=SEQUENTIAL, schedule={"steps": [10, 50, 100], "bakeTime": "2s"},
                         analysis={"interval": "1s", "window": "10s", "minRequests": 50})  # fmt: skip
    observed = Observation(10, 90)
    state = initial_state(policy, observed, at(0))
    readings = [((1000 + 100 * i, 5 + i // 2), (9000 + 900 * i, 45 + 4 * i)) for i in range(6)]
    advanced = None
    for second, (t, s) in enumerate(readings):
        prior = sequential_prior(policy, state.evidence, state.target_weight, state.source_weight)
        check = _judge(policy, prior, t, s)
        decision = decide(policy, state, replace(observed, check=check), at(second))
        if decision.action is Action.ADVANCE:
            advanced = decision
            break
        assert decision.state.evidence == check.evidence
        state = decision.state
    assert advanced is not None and advanced.state.evidence == ()


def test_the_evidence_survives_encoding_exactly_enough() -> None:
    policy = make_policy(gates=SEQUENTIAL)
    prior = sequential_prior(policy, (), 10, 90)
    (evidence,) = _judge(policy, prior, (1000, 5), (9000, 45)).evidence
    (evidence,) = _judge(policy, {"errorRateSequential": evidence}, (1100.0, 9.0), (9900, 50)).evidence
    state = initial_state(policy, Observation(10, 90), at(0)).evolve(evidence=(evidence,))
    (back,) = decode_state(encode_state(state)).evidence
    assert back.target == evidence.target and back.totals == evidence.totals and back.step == evidence.step
    assert back.log_detector == pytest.approx(evidence.log_detector, abs=1e-8)
    assert encode_state(state, evidence=False) == encode_state(state.evolve(evidence=()), evidence=False)
    with pytest.raises(ValueError, match="evidence"):
        decode_state(encode_state(state).replace('"rejected":false', '"rejected":"no"'))


# --- the runner: saved with the state, never a reason to save, continued after a restart --------------


def baking_policy() -> Any:
    """A sequential gate alone, 1 s checks, a long bake at 10, failureThreshold 3 (which R11 skips)."""
    return make_policy(
        gates=SEQUENTIAL,
        schedule={"steps": [10, 50, 100], "bakeTime": "1h"},
        analysis={"interval": "1s", "window": "10s", "minRequests": 50, "failureThreshold": 3},
    )


class CounterSource:
    """Prometheus as the gates see it: built-in measures, and raw counters that grow per call."""

    def __init__(self) -> None:
        self.target = Reading(1000, 5)
        self.source = Reading(9000, 45)
        self.down = False

    def grow(self, target: tuple[float, float], source: tuple[float, float]) -> None:
        self.target = Reading(self.target.requests + target[0], self.target.events + target[1])
        self.source = Reading(self.source.requests + source[0], self.source.events + source[1])

    def query(self, query: RenderedQuery) -> float | None:
        if self.down:
            raise MetricsUnavailable("connection refused")
        return {Measure.REQUESTS: 1000.0, Measure.ERROR_RATE: 0.005, Measure.LATENCY: 100.0}.get(query.measure, 0.0)

    def query_vector(self, query: RenderedQuery) -> list[tuple[dict[str, str], float]]:
        if self.down:
            raise MetricsUnavailable("connection refused")
        reading = self.target if query.role is GatewayRole.TARGET else self.source
        pod = {"instance": "10.0.0.1:15090"}
        return [
            ({"counter": COUNTER_REQUESTS, **pod}, reading.requests),
            ({"counter": COUNTER_ERRORS, **pod}, reading.events),
        ]


def test_a_restarted_runner_continues_from_the_saved_readings_counting_the_gap_once() -> None:
    policy = make_policy(gates=SEQUENTIAL, schedule={"steps": [10, 50, 100], "bakeTime": "1h"})
    pair = InMemoryGatewayPair(target_weight=10, source_weight=90)
    store = InMemoryStateStore()
    metrics = CounterSource()
    runner = runner_for(policy, pair=pair, store=store, metrics=metrics, status_refresh_seconds=3600.0)
    runner.tick()  # first sight: adopts 10, the first reading is the base
    metrics.grow((100, 0), (900, 5))
    runner.tick()  # the first pass: a run of passes starts (saved)
    saves = store.saves
    for _ in range(2):
        metrics.grow((100, 0), (900, 5))
        outcome = runner.tick()
        assert outcome.check is not None and outcome.check.verdict is Verdict.PASS
    assert store.saves == saves  # healthy checks move the evidence and save nothing
    metrics.grow((100, 1), (900, 4))
    stored = store.load(policy).state
    assert stored is not None and len(stored.evidence) == 1
    saved_totals = stored.evidence[0].totals
    # a new process: only the store survives; the checks the old one counted since its last save
    # are counted again from the saved readings, once (together with the new interval)
    restarted = runner_for(policy, pair=pair, store=store, metrics=metrics, status_refresh_seconds=3600.0)
    outcome = restarted.tick()
    assert outcome.check is not None
    (evidence,) = outcome.check.evidence
    assert evidence.totals.target_requests == saved_totals.target_requests + 300  # 2 unsaved checks + 1 new
    assert evidence.intervals == stored.evidence[0].intervals + 1  # ...as one longer interval
    assert evidence.totals.target_requests == metrics.target.requests - 1000  # every request since the base, once
    metrics.down = True
    restarted.tick()
    metrics.down = False
    metrics.grow((100, 0), (900, 5))
    outcome = restarted.tick()
    assert outcome.check is not None
    assert outcome.check.evidence[0].totals.target_requests == metrics.target.requests - 1000


def test_a_sequential_rollback_alerts_once_with_its_numbers_and_exports_them() -> None:
    from prometheus_client import generate_latest

    from controller.runtime.telemetry import Telemetry
    from tests.helpers import RecordingNotifier

    policy = baking_policy()
    pair = InMemoryGatewayPair(target_weight=10, source_weight=90)
    metrics = CounterSource()
    pager = RecordingNotifier("pager")
    telemetry = Telemetry()
    runner = runner_for(
        policy, pair=pair, store=InMemoryStateStore(), metrics=metrics, receivers=[pager], telemetry=telemetry
    )
    runner.tick()
    for _ in range(3):
        metrics.grow((100, 0), (900, 4))
        runner.tick()
    ticks = 0
    while pair.target_weight != 0:
        ticks += 1
        assert ticks <= 5, "a 10x 5xx rate at 100 requests a check was not rolled back within 5 checks"
        metrics.grow((100, 5), (900, 4))  # 5 % against 0.44 %
        runner.tick()
    exported = generate_latest(telemetry.registry).decode()

    def rolled_back() -> list[Any]:
        return [alert for alert in pager.alerts if alert.kind.value == "RolledBack"]

    wait_for(rolled_back, timeout=5, what="the rollback alert")
    assert len(rolled_back()) == 1
    alert = rolled_back()[0]
    assert "errorRateSequential rejected" in alert.reason and "CS [" in alert.reason
    assert any(gate["gate"] == "errorRateSequential" for gate in alert.failing_gates)
    assert 'gateway_canary_sequential_rejected{gate="errorRateSequential",policy="shop"} 1.0' in exported
    assert 'gateway_canary_sequential_effect{bound="lower",gate="errorRateSequential",policy="shop"}' in exported
    assert 'gateway_canary_sequential_requests{gate="errorRateSequential",gateway="target",policy="shop"}' in exported
    assert 'gateway_canary_gate_threshold{gate="errorRateSequential",policy="shop"} 100.0' in exported


def test_the_latency_gate_counts_requests_slower_than_its_bound_from_the_histogram() -> None:
    """Bad = the +Inf bucket minus the bucket at slowerThanMs; the same test as for 5xx."""
    from controller.core.queries import COUNTER_HISTOGRAM, COUNTER_WITHIN

    policy = make_policy(
        gates={"latency": {"p99Ms": {"max": 500}, "sequential": {"minEffect": 2}}, "responseMix": {"enabled": False}}
    )

    def gateway(role: GatewayRole, total: float, within: float) -> Any:
        query = RenderedQuery("counters", Measure.COUNTERS, role, gate="sequential")
        values = {(COUNTER_HISTOGRAM, "pod"): total, (COUNTER_WITHIN, "pod"): within}
        return replace(samples(role, latency=100.0), counters=CounterSeries(query, values=values))

    evidence = sequential_prior(policy, (), 10, 90)
    first = judge(
        policy, gateway(GatewayRole.SOURCE, 9000, 8955), gateway(GatewayRole.TARGET, 1000, 995), evidence=evidence
    )
    (after,) = first.evidence
    assert after.target == (Reading(1000, 5, None, "pod"),)  # 5 of 1000 over 500 ms
    # then a tenth of the target's requests are slow, against 0.5 % on the source
    slow = judge(
        policy,
        gateway(GatewayRole.SOURCE, 9900, 9850),
        gateway(GatewayRole.TARGET, 1100, 1085),
        evidence={"latencySequential": after},
    )
    (after,) = slow.evidence
    assert after.totals == Increment(100, 10, 900, 5)
    gate = next(g for g in slow.gates if g.gate == "latencySequential")
    assert gate.verdict is Verdict.FAIL and gate.decisive and "requests slower than 500ms rate" in gate.reason
