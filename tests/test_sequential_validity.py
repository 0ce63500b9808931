"""The sequential gate's statistical promises, measured over many simulated steps (fixed seeds).

``controller/core/sequential.py`` promises: with equal error rates on both gateways the chance that a
step EVER rejects is at most ``alpha``, however often it looks (Ville's inequality on a nonnegative
supermartingale); a large effect is rejected quickly; a larger ``alpha`` rejects no later; and the
confidence sequence covers the true ratio at every look with probability ``1 - alpha``. Each test
is a binomial experiment with a fixed seed and a stated tolerance (3 binomial standard deviations
above the promised bound, so a correct implementation fails with a chance of ~0.1 % per seed, and
the seed is fixed), and each can fail: a statistic that ignored the exposures, summed instead of
averaging its mixture, or looked the wrong way would break them.

The traffic of one check: both gateways' request exposures drawn independently and log-uniformly
(one gateway can have 100x the other's), and the bad events drawn as Poisson with the same
per-request rate times ``r`` for the ASM gateway; the rate itself changes from check to check
(bursts hit both gateways). Readings are the cumulative counters, as the controller reads them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.core.sequential import Evidence, Reading, confidence_sequence, log_e_value, observe

ALPHA = 0.01
MIN_EFFECT = 1.5


def _tolerance(n: int, p: float) -> float:
    """The most rejections allowed among ``n`` runs when the promise is a rate of at most ``p``:
    ``n p`` plus 3 binomial standard deviations."""
    return n * p + 3 * math.sqrt(n * p * (1 - p))


def _poisson(rng: random.Random, lam: float) -> int:
    """Knuth's method, split into chunks so that exp(-lam) never underflows."""
    k = 0
    while lam > 0:
        chunk = min(lam, 30.0)
        lam -= chunk
        limit, prod = math.exp(-chunk), rng.random()
        while prod > limit:
            k += 1
            prod *= rng.random()
    return k


def _readings(rng: random.Random, effect: float, *, events: float = 10.0) -> Iterator[tuple[Reading, Reading]]:
    """Cumulative counters of the ASM gateway and the source, check after check, from zero.

    ``events``: the mean number of bad events a check on the source side would see at the check's
    base rate; the rate varies x0.2 - x5 from check to check (both gateways alike)."""
    target = [0.0, 0.0]
    source = [0.0, 0.0]
    yield Reading(*target), Reading(*source)
    while True:
        ra = round(10 ** rng.uniform(1.7, 3.7))
        rs = round(10 ** rng.uniform(1.7, 3.7))
        rate = events / 1000 * 5 ** rng.uniform(-1, 1)  # per request
        xa = min(ra, _poisson(rng, ra * rate * effect))
        xs = min(rs, _poisson(rng, rs * rate))
        target = [target[0] + ra, target[1] + xa]
        source = [source[0] + rs, source[1] + xs]
        yield Reading(*target), Reading(*source)


def _step(
    rng: random.Random, effect: float, checks: int, alpha: float = ALPHA, *, events: float = 10.0, stop: bool = False
) -> tuple[int | None, float]:
    """One step of ``checks`` checks: the first rejecting check (None: none) and the largest log
    e-value seen (unless ``stop``, the step runs on after a rejection, so that every level can be
    judged)."""
    evidence = Evidence(gate="errorRateSequential", step="s")
    first: int | None = None
    top = 0.0
    for check, (target, source) in zip(range(checks + 1), _readings(rng, effect, events=events), strict=False):
        evidence, _, _ = observe(evidence, target, source, MIN_EFFECT, alpha)
        top = max(top, log_e_value(evidence))
        if evidence.rejected and first is None:
            first = check
            if stop:
                break
    return first, top


def test_equal_rates_reject_at_most_alpha_however_often_it_looks() -> None:
    """2 000 steps of 150 checks at equal rates (about 5 000 bad events a step): rejected in at most
    alpha of them (within 3 binomial sd: 31 of 2 000). Ville's bound holds at every level, not just
    at 1/alpha: the e-value ever reaching c happens in at most 1/c of the steps (a statistic that
    summed its 22 alternatives instead of averaging them would start at 22 and fail every level)."""
    rng = random.Random(20261129)
    runs = [_step(rng, 1.0, 150) for _ in range(2000)]
    rejected = sum(first is not None for first, _ in runs)
    assert rejected <= _tolerance(len(runs), ALPHA), f"{rejected} of {len(runs)} null steps rejected"
    for level in (2.0, 5.0, 20.0, 1 / ALPHA):
        reached = sum(top >= math.log(level) for _, top in runs)
        assert reached <= _tolerance(len(runs), 1 / level), f"e-value reached {level:g} in {reached} steps"
    # the flag is the e-value crossing 1/alpha, nothing else
    assert rejected == sum(top >= math.log(1 / ALPHA) for _, top in runs)


def test_an_asm_gateway_better_than_the_source_is_no_rejection_either() -> None:
    """The null is every r <= 1: the ASM gateway at 0.7 x the source's rate, 400 steps of 100 checks."""
    rng = random.Random(7)
    rejected = sum(_step(rng, 0.7, 100)[0] is not None for _ in range(400))
    assert rejected <= _tolerance(400, ALPHA), rejected


def test_a_large_effect_is_rejected_in_a_few_checks() -> None:
    """r = 10 (0.5 % -> 5 %): rejected in 199+ of 200 steps within 30 checks, half of them within 3."""
    rng = random.Random(11)
    firsts = [_step(rng, 10.0, 30, events=5.0, stop=True)[0] for _ in range(200)]
    caught = sorted(f for f in firsts if f is not None)
    assert len(caught) >= 199, f"{len(caught)} of 200"
    assert caught[len(firsts) // 2 - 1] <= 3, caught[:110]


def test_an_effect_at_min_effect_is_rejected_in_most_steps() -> None:
    """r = 2 (above minEffect 1.5): rejected within 300 checks in at least 90 % of 200 steps."""
    rng = random.Random(12)
    caught = sum(_step(rng, 2.0, 300, events=5.0, stop=True)[0] is not None for _ in range(200))
    assert caught >= 180, f"{caught} of 200"


def test_a_larger_alpha_rejects_no_later_and_more_often() -> None:
    """The same 300 steps (r = 1.6, 40 checks) judged at alpha 0.05 and 0.01: every step rejected at
    0.01 is rejected at 0.05 at the same check or sooner, and 0.05 rejects more steps."""
    seeds = range(300)
    at = {
        alpha: [_step(random.Random(seed), 1.6, 40, alpha, events=5.0)[0] for seed in seeds] for alpha in (0.05, 0.01)
    }
    for seed, (loose, strict) in enumerate(zip(at[0.05], at[0.01], strict=True)):
        if strict is not None:
            assert loose is not None and loose <= strict, (seed, loose, strict)
    counts = {alpha: sum(f is not None for f in firsts) for alpha, firsts in at.items()}
    assert counts[0.05] >= counts[0.01] + 15, counts  # a real difference, not a tie
    assert 0 < counts[0.01] < 300, counts  # neither all nor none: the comparison means something


def test_the_confidence_sequence_covers_the_true_ratio_at_every_look() -> None:
    """r = 3 (between two grid points): the 95 % confidence sequence holds 3 at each of the checks
    looked at (every 5th of 100) in at least 95 % of 300 steps (within 3 binomial sd), and by the
    end it is narrower than a factor of 2 (high / low) in most steps: coverage is not bought with
    an interval that says nothing."""
    alpha, true_r = 0.05, 3.0
    rng = random.Random(13)
    missed = 0
    widths = []
    for _ in range(300):
        evidence = Evidence(gate="errorRateSequential", step="s")
        covered = True
        for check, (target, source) in zip(range(101), _readings(rng, true_r, events=5.0), strict=False):
            evidence, _, _ = observe(evidence, target, source, MIN_EFFECT, alpha)
            if check % 5 == 0 and check:
                low, high = confidence_sequence(evidence, alpha)
                covered = covered and low <= true_r <= high
        missed += not covered
        low, high = confidence_sequence(evidence, alpha)
        widths.append(high / low)
    assert missed <= _tolerance(300, alpha), f"missed in {missed} of 300 steps"
    assert sorted(widths)[len(widths) // 2] <= 2.0 + 1e-9, sorted(widths)[150]


_counter = st.tuples(st.integers(0, 5000), st.integers(0, 200)).map(lambda t: Reading(float(t[0]), float(t[1])))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.none(), _counter), st.one_of(st.none(), _counter)), max_size=30))
def test_alpha_changes_only_the_threshold(readings: list[tuple[Reading | None, Reading | None]]) -> None:
    """Any readings (counters that go down, missing reads, more events than requests): the evidence at
    alpha 0.05 and 0.01 is the same but for the flag, and a rejection at 0.01 is one at 0.05."""
    loose = strict = Evidence(gate="errorRateSequential", step="s")
    for target, source in readings:
        loose, _, _ = observe(loose, target, source, MIN_EFFECT, 0.05)
        strict, _, _ = observe(strict, target, source, MIN_EFFECT, 0.01)
        assert replace(loose, rejected=False) == replace(strict, rejected=False)
        assert loose.rejected or not strict.rejected
        if log_e_value(loose) >= math.log(20):
            assert loose.rejected
