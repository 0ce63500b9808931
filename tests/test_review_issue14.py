"""Regressions from the adversarial review of the sequential gate (issue 14), each failing before
its fix:

1. the gateways are scraped at different moments: a burst of errors common to both fell into the
   target's increment a scrape before the source's and was taken for an excess (17-27 % false
   rollbacks with 15 s scrapes); an interval now counts only once both gateways were scraped, and
   a rejection waits until both cover the same time (what remains with coarse scrapes is in
   docs/policies.md);
2. sums over all of a gateway's scrape targets: one target's series missing for a check made the
   sum drop and, on its return, counted its whole life as one interval; an HA Prometheus's older
   answer counted an interval twice; now each target is followed on its own, with its sample time;
3. a selector edited mid-step kept the evidence gathered over other series;
4. with the state store unreadable since the start, every check was a first reading;
5. ``intervals`` outgrew the stored state's bound after a million checks;
7. the first check of each step was inconclusive beside other gates (``onMissingData: rollback``
   after 1 rolled back a healthy gateway).
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

from controller.adapters.memory import InMemoryGatewayPair, InMemoryStateStore
from controller.core.decision import Observation, initial_state
from controller.core.enums import Phase
from controller.core.gates import sequential_prior
from controller.core.sequential import Evidence, Reading, observe
from controller.core.state import decode_state, encode_state
from controller.errors import ClusterUnavailable
from tests.helpers import at, make_policy, runner_for
from tests.test_sequential import SEQUENTIAL, CounterSource, baking_policy


def _poisson(rng: random.Random, mean: float) -> int:
    if mean < 30:
        limit, k, p = math.exp(-mean), 0, 1.0
        while True:
            p *= rng.random()
            if p <= limit:
                return k
            k += 1
    return max(0, round(rng.gauss(mean, math.sqrt(mean))))


def _scraped_step(rng: random.Random, scrape: float, check: float, seconds: int = 600) -> bool:
    """One step at weight 10 of 1000 requests/s, 0.5 % 5xx on both gateways but for bursts of 20 %
    common to both (4 s each, about one a minute), each gateway scraped every ``scrape`` seconds at
    a phase of its own, checked every ``check`` seconds: whether the gate (falsely) rejected."""
    phases = {"t": rng.uniform(0, scrape), "s": rng.uniform(0, scrape)}
    rates = {"t": 100.0, "s": 900.0}
    bursts = [rng.uniform(0, seconds) for _ in range(seconds // 60)]
    counters = {"t": [0.0, 0.0], "s": [0.0, 0.0]}
    history: dict[str, list[tuple[float, float, float]]] = {"t": [(0.0, 0.0, 0.0)], "s": [(0.0, 0.0, 0.0)]}
    for second in range(1, seconds + 1):
        ratio = 0.2 if any(start <= second < start + 4 for start in bursts) else 0.005
        for gateway in ("t", "s"):
            served = _poisson(rng, rates[gateway])
            counters[gateway][0] += served
            counters[gateway][1] += min(served, _poisson(rng, served * ratio))
            history[gateway].append((float(second), *counters[gateway]))

    def reading(gateway: str, now: float) -> Reading:
        phase = phases[gateway]
        scraped = phase + scrape * math.floor((now - phase) / scrape)
        _, requests, events = history[gateway][max(0, int(scraped))]
        return Reading(requests, events, scraped, gateway)

    evidence = Evidence("g", "s")
    now = check
    while now <= seconds:
        evidence, _, _ = observe(evidence, reading("t", now), reading("s", now), 1.5, 0.01)
        if evidence.rejected:
            return True
        now += check
    return False


def test_bursts_common_to_both_gateways_scraped_at_other_moments_are_no_excess() -> None:
    """Finding 1: equal rates at every instant, a 4 s burst of 20 % 5xx on both gateways about every
    minute, each gateway scraped every second at a phase of its own, checked every second: false
    rejections stay within alpha (1 %) plus three binomial standard deviations. (The mechanism, a
    burst in one gateway's increment and not yet in the other's, is test_sequential's
    test_a_burst_common_to_both_seen_first_on_the_target_waits_for_the_source_and_is_dropped.)

    With coarser scrapes the part of a burst between the two gateways' scrapes is beyond any
    alignment, and this stress model exceeds alpha: docs/policies.md gives the figures and the
    advice (scrape the gateways often during a migration)."""
    rng = random.Random(14)
    runs = 200
    rejected = sum(_scraped_step(rng, scrape=1.0, check=1.0) for _ in range(runs))
    assert rejected / runs <= 0.01 + 3 * math.sqrt(0.01 * 0.99 / runs), f"{rejected} of {runs}"


def test_a_target_missing_for_a_check_then_back_with_all_it_counted_adds_no_history() -> None:
    """Finding 2: one source pod's scrape failed (its series stale for a check), then came back."""
    evidence = Evidence("g", "s")
    asm, pods = [0.0, 0.0], {"a": [18e6, 90e3], "b": [50e6, 2e3]}
    for check in range(1, 7):
        asm[0] += 1000
        asm[1] += 5
        pods["a"][0] += 6000
        pods["a"][1] += 30
        pods["b"][0] += 3000
        pods["b"][1] += 15
        source = [Reading(*pods["a"], float(check), "a")]
        if check != 4:
            source.append(Reading(*pods["b"], float(check), "b"))
        evidence, counted, _ = observe(evidence, Reading(*asm, float(check), "t"), source, 1.5, 0.01)
        assert counted is None or counted.source_requests <= 9000 * 2, (check, counted)
    assert evidence.totals.source_requests == 5 * 9000 and not evidence.rejected


def test_an_answer_from_an_older_scrape_counts_nothing_twice() -> None:
    def scraped(t: float) -> tuple[Reading, Reading]:
        return Reading(100 * t, 0.5 * t, t, "t"), Reading(900 * t, 4.5 * t, t, "s")

    evidence = Evidence("g", "s")
    for moment in (10, 22, 18, 40):  # HA replicas: the third answer comes from the replica behind
        evidence, _, _ = observe(evidence, *scraped(moment), 1.5, 0.01)
    assert evidence.totals.target_requests == 100 * (40 - 10)


def test_a_selector_edit_starts_the_evidence_afresh() -> None:
    before = make_policy(gates=SEQUENTIAL)
    labels = {"app": "istio-ingressgateway", "reporter": "source"}
    after = make_policy(gates=SEQUENTIAL, source={"service": "istio-system/istio-ingressgateway", "labels": labels})
    (kept,) = sequential_prior(before, (), 10, 90).values()
    kept = replace(kept, target=(Reading(1000, 5),), source=(Reading(9000, 45),))
    assert sequential_prior(before, (kept,), 10, 90)["errorRateSequential"] == kept
    assert sequential_prior(after, (kept,), 10, 90)["errorRateSequential"].target is None


def test_a_long_rolled_back_rollout_stays_decodable() -> None:
    policy = make_policy(gates=SEQUENTIAL)
    (evidence,) = sequential_prior(policy, (), 0, 100).values()
    evidence = replace(evidence, target=(Reading(0, 0),), source=(Reading(1e9, 10),), intervals=10**9, changes=10**9)
    evidence, _, _ = observe(evidence, Reading(0, 0), Reading(1e9 + 900, 11), 1.5, 0.01)
    state = initial_state(policy, Observation(0, 100), at(0)).evolve(phase=Phase.ROLLED_BACK, evidence=(evidence,))
    assert decode_state(encode_state(state)).evidence[0].intervals == 10**9 + 1


class _UnreadableStore(InMemoryStateStore):
    """A state store that cannot be read or written (the API server refuses, say)."""

    def load(self, policy):  # type: ignore[no-untyped-def]
        raise ClusterUnavailable("the state object cannot be read")

    def save(self, policy, state, previous, outbox=(), status=None):  # type: ignore[no-untyped-def]
        raise ClusterUnavailable("the state object cannot be written")


def test_with_the_store_unreadable_since_the_start_the_evidence_is_still_gathered() -> None:
    """Finding 4: it rolls a failing target back while no state can be read or written."""
    pair = InMemoryGatewayPair(target_weight=10, source_weight=90)
    metrics = CounterSource()
    runner = runner_for(baking_policy(), pair=pair, store=_UnreadableStore(), metrics=metrics)
    runner.tick()
    for _ in range(8):
        metrics.grow((100, 5), (900, 4))  # 5 % against 0.44 %
        runner.tick()
        if pair.target_weight == 0:
            break
    assert pair.target_weight == 0


def test_beside_other_gates_the_first_reading_of_a_step_is_no_inconclusive_check() -> None:
    """Finding 7: ``onMissingData: rollback`` after 1 must not roll a healthy gateway back."""
    policy = make_policy(
        gates={"errorRate": {"max": 0.05, "sequential": {}}, "responseMix": {"enabled": False}},
        schedule={"steps": [10, 50, 100], "bakeTime": "1h"},
        analysis={
            "interval": "1s",
            "window": "10s",
            "minRequests": 50,
            "onMissingData": {"action": "rollback", "afterChecks": 1},
        },
    )
    pair = InMemoryGatewayPair(target_weight=10, source_weight=90)
    metrics = CounterSource()
    runner = runner_for(policy, pair=pair, store=InMemoryStateStore(), metrics=metrics)
    first = runner.tick()
    assert first.check is not None and first.check.verdict.value == "PASS", first.check
    assert pair.target_weight == 10
    assert [gate.gate for gate in first.check.gates] == ["errorRate"]  # the sequential gate: no opinion yet
    metrics.grow((100, 0), (900, 4))
    second = runner.tick()
    assert second.check is not None and [gate.gate for gate in second.check.gates] == [
        "errorRate",
        "errorRateSequential",
    ]


# --- the second review ------------------------------------------------------------------------------


def _judged(policy: object, prior: dict[str, Evidence], target: list[Reading], source: list[Reading]) -> object:
    from controller.core.enums import GatewayRole, Measure
    from controller.core.gates import judge
    from controller.core.queries import COUNTER_ERRORS, COUNTER_REQUESTS, COUNTER_TIME
    from controller.core.results import CounterSeries, RenderedQuery
    from tests.helpers import samples

    def gateway(role: GatewayRole, readings: list[Reading]) -> object:
        values: dict[tuple[str, str], float] = {}
        for r in readings:
            values[(COUNTER_REQUESTS, r.instance)] = r.requests
            values[(COUNTER_ERRORS, r.instance)] = r.events
            if r.time is not None:
                values[(COUNTER_TIME, r.instance)] = r.time
        query = RenderedQuery("counters", Measure.COUNTERS, role, gate="sequential")
        return replace(samples(role, error_rate=0.001), counters=CounterSeries(query, values=values))

    return judge(policy, gateway(GatewayRole.SOURCE, source), gateway(GatewayRole.TARGET, target), evidence=prior)  # type: ignore[arg-type]


def test_a_rejection_waiting_for_confirmation_is_never_a_pass_beside_other_gates() -> None:
    """Second review, 1: while it waits, the check must not pass (a pass could raise or promote)."""
    from controller.core.enums import Verdict

    policy = make_policy(
        gates={"errorRate": {"max": 0.5, "sequential": {}}, "responseMix": {"enabled": False}},
    )
    prior = sequential_prior(policy, (), 10, 90)
    first = _judged(policy, prior, [Reading(0, 0, 10.0, "t")], [Reading(0, 0, 9.0, "s")])
    (evidence,) = first.evidence  # type: ignore[attr-defined]
    # the target scraped at 11 with 40 % 5xx, the source at 10: reached, but not yet confirmed
    waiting = _judged(
        policy, {"errorRateSequential": evidence}, [Reading(100, 40, 11.0, "t")], [Reading(900, 4, 10.0, "s")]
    )
    (evidence,) = waiting.evidence  # type: ignore[attr-defined]
    assert evidence.confirming == 11.0 and not evidence.rejected
    assert waiting.verdict is Verdict.INCONCLUSIVE  # type: ignore[attr-defined]
    gate = next(g for g in waiting.gates if g.gate == "errorRateSequential")  # type: ignore[attr-defined]
    assert gate.verdict is Verdict.INCONCLUSIVE and "waits for both gateways" in gate.reason
    confirmed = _judged(
        policy, {"errorRateSequential": evidence}, [Reading(200, 80, 12.0, "t")], [Reading(1800, 8, 11.0, "s")]
    )
    assert confirmed.verdict is Verdict.FAIL  # type: ignore[attr-defined]


def test_without_new_scrapes_the_last_verdict_stands_only_briefly() -> None:
    """Second review, 4: one gateway never scraped anew (a replica's clock ahead): no pass forever."""
    from controller.core.enums import Verdict
    from controller.core.gates import STANDING_CHECKS

    policy = make_policy(gates={"errorRate": {"sequential": {}}, "responseMix": {"enabled": False}})
    prior = sequential_prior(policy, (), 10, 90)
    (evidence,) = _judged(policy, prior, [Reading(0, 0, 1.0, "t")], [Reading(0, 0, 1.0, "s")]).evidence  # type: ignore[attr-defined]
    passed = _judged(
        policy, {"errorRateSequential": evidence}, [Reading(100, 0, 2.0, "t")], [Reading(900, 4, 2.0, "s")]
    )
    assert passed.verdict is Verdict.PASS  # type: ignore[attr-defined]
    (evidence,) = passed.evidence  # type: ignore[attr-defined]
    verdicts = []
    for second in range(3, 3 + STANDING_CHECKS + 3):  # the source stays at its scrape of 2.0
        check = _judged(
            policy,
            {"errorRateSequential": evidence},
            [Reading(100 * second, 0, float(second), "t")],
            [Reading(900, 4, 2.0, "s")],
        )
        (evidence,) = check.evidence  # type: ignore[attr-defined]
        verdicts.append(check.verdict)  # type: ignore[attr-defined]
    assert verdicts[:STANDING_CHECKS] == [Verdict.PASS] * STANDING_CHECKS
    assert set(verdicts[STANDING_CHECKS:]) == {Verdict.INCONCLUSIVE}


def test_targets_scraped_now_are_followed_before_ones_gone_missing() -> None:
    """Second review, 3: a base full of pods gone in a rollout must not keep the new ones out."""
    from controller.core.sequential import MAX_TARGETS

    old = tuple(Reading(1000, 5, 100.0, f"10.0.9.{i}") for i in range(MAX_TARGETS))
    evidence = Evidence("g", "s", target=old, source=(Reading(0, 0, 100.0, "s"),))
    new = [Reading(10, 0, 101.0, f"10.1.0.{i}") for i in range(5)]
    evidence, _, _ = observe(evidence, new, Reading(900, 4, 101.0, "s"), 1.5, 0.01)
    kept = {reading.instance for reading in evidence.target or ()}
    assert {reading.instance for reading in new} <= kept and len(kept) == MAX_TARGETS
    evidence, counted, _ = observe(
        evidence, [replace(r, requests=110, time=102.0) for r in new], Reading(1800, 8, 102.0, "s"), 1.5, 0.01
    )
    assert counted is not None and counted.target_requests == 5 * 100
