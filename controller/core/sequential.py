"""An anytime-valid sequential test: is the ASM gateway's rate of bad requests above the source's?

Why: a threshold on a windowed ratio, checked every interval with "N consecutive failures" as the
noise guard, is slow (the window and the count add up) and its false-alarm rate is unknown (one
burst in overlapping windows counts as several failures; looking more often raises the rate).
This test looks as often as it likes and keeps one budget: the chance that it EVER rejects in a
step while the ASM gateway is no worse than the source is at most ``alpha``.

The method (Lindon & Malek, "Anytime-Valid Inference for Multinomial Count Data", NeurIPS 2022;
Netflix's "Sequential Testing Keeps the World Streaming, Part 2: Counting Processes"):

* Each check adds the increments of both gateways' counters since the previous check: requests
  ``R`` and bad events ``x`` (5xx, or requests slower than a histogram bound). Increments of raw
  counters over disjoint intervals: no request is counted twice, however the checks are timed.
* Given the interval's total bad events ``n = x_asm + x_src``, the ASM gateway's share of them is
  binomial with ``q(r) = r R_asm / (r R_asm + R_src)`` when its rate is ``r`` times the source's.
  The exposures ``R`` are measured, so the CLB's effective split does not matter. (With a common
  per-request probability the exact law is hypergeometric, which is less spread than the binomial
  in the convex order, so the binomial likelihood ratio below stays a supermartingale: conservative.)
* The statistic is a mixture likelihood ratio against ``r = 1`` (equal rates) over when the
  excess began and how large it is: ``sum_k pi_k mean_r prod_{t >= k} L_t(r) / L_t(1)``, ``k`` the
  informative interval (one with a bad request) at which it began, ``pi_k = 1 / (k (k + 1))``
  (summing to 1), ``r`` on a grid from ``minEffect`` up. Adding the changes not begun yet (each
  ``pi_k`` times 1) makes it a nonnegative supermartingale starting at 1 under any ``r <= 1``
  (``q(r)`` grows with ``r``), so by Ville's inequality it ever reaches ``1/alpha`` with probability
  at most alpha, however long the step and however many checks: that is the rejection, a rollback.
  Why the changepoints: a plain mixture over the whole step carries a long healthy stretch as
  evidence against every ``r > 1``, and a target that breaks late in a long bake would need as much
  evidence again to outweigh it; here it pays only ``log(1 / pi_k)`` (about 2 ln k) for starting at
  interval ``k``.
* ``minEffect`` aims the test: its power goes to effects of at least that size (an effect well
  below it, say 1.2 against 1.5, drifts the statistic down and is rarely flagged), and a small
  effect is not bought with slower detection of a large one (bench/sequential.py has the figures).
* The confidence sequence for ``r`` assumes one ``r`` for the step: a one-sided mixture above and
  one below every point of a grid around 1 (1/32 to 256), each at ``alpha / 2``; the interval is
  from the largest point rejected as too small to the smallest rejected as too large (0 and inf
  while none is). While the effect is steady, it ever misses ``r`` with probability at most alpha.

The state is, at every grid point, the statistic's sum and the step's log likelihood ratio, with
the counter readings they reached: stored with the rollout state, so a restarted controller continues
from the stored readings (the time it was down becomes one longer interval: nothing lost, nothing
counted twice). Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

__all__ = [
    "GRID_RATIO",
    "Evidence",
    "Increment",
    "Reading",
    "confidence_sequence",
    "effect_grid",
    "estimate",
    "gate_grid",
    "interval_log_lr",
    "log_e_value",
    "observe",
]

#: neighbouring grid points of the effect ``r`` differ by this factor (2^(1/3): 26 %)
GRID_RATIO = 2 ** (1 / 3)
#: the gate's alternatives: ``minEffect`` .. ``minEffect * 128``
_GATE_POINTS = 22
#: the confidence sequence's grid: 1/32 .. 256
_EFFECT_POINTS = range(-15, 25)


def gate_grid(min_effect: float) -> tuple[float, ...]:
    """The effects the gate's mixture averages over (equal weights), from ``min_effect`` up."""
    return tuple(min_effect * GRID_RATIO**j for j in range(_GATE_POINTS))


def effect_grid() -> tuple[float, ...]:
    """The effects the confidence sequence is judged at (equal weights in the two-sided mixture)."""
    return tuple(GRID_RATIO**j for j in _EFFECT_POINTS)


@dataclass(frozen=True, slots=True)
class Reading:
    """One gateway's counters at one instant: requests, and the bad ones among them."""

    requests: float
    events: float


@dataclass(frozen=True, slots=True)
class Increment:
    """Requests and bad events on each gateway between two readings (or summed over many)."""

    target_requests: float = 0.0
    target_events: float = 0.0
    source_requests: float = 0.0
    source_events: float = 0.0

    def __add__(self, other: Increment) -> Increment:
        return Increment(
            self.target_requests + other.target_requests,
            self.target_events + other.target_events,
            self.source_requests + other.source_requests,
            self.source_events + other.source_events,
        )


@dataclass(frozen=True, slots=True)
class Evidence:
    """What one sequential gate has seen in the current step.

    ``step`` names the step and the gate's settings it was gathered under: evidence is carried only
    into a check of the same step and settings (a new step, a rollback, a changed ``minEffect`` or
    latency bound start afresh). ``target``/``source`` are the last readings, the base of the next
    increment (None: none yet, or the last one could not be used). ``log_detector`` (on
    ``gate_grid``) is the log of the statistic's sum over changepoints at each ``r``; ``log_lik`` (on
    ``effect_grid``) is ``log L(r) - log L(1)`` summed over the counted intervals; both are empty
    until an informative interval (one with a bad request) counted, and ``changes`` counts those.
    ``rejected`` is final for the step: the test stopped.
    """

    gate: str
    step: str
    target: Reading | None = None
    source: Reading | None = None
    log_detector: tuple[float, ...] = ()
    log_lik: tuple[float, ...] = ()
    totals: Increment = Increment()
    intervals: int = 0
    changes: int = 0
    rejected: bool = False


def interval_log_lr(increment: Increment, points: Sequence[float]) -> tuple[float, ...]:
    """``log L(r) - log L(1)`` of one interval at each of ``points`` (zeros: no information).

    ``L(r) = q(r)^x_asm (1 - q(r))^x_src`` with ``q(r) = r R_asm / (r R_asm + R_src)``; the binomial
    coefficient is the same for every ``r`` and cancels.
    """
    ra, xa = increment.target_requests, increment.target_events
    rs, xs = increment.source_requests, increment.source_events
    if xa + xs <= 0 or ra <= 0 or rs <= 0:
        return (0.0,) * len(points)  # no bad event, or one side has no exposure: q is 0 or 1 for every r

    def log_l(r: float) -> float:
        # log q and log(1 - q) from their own parts: finite however lopsided the exposures are
        whole = math.log(r * ra + rs)
        return xa * (math.log(r * ra) - whole) + xs * (math.log(rs) - whole)

    null = log_l(1.0)
    return tuple(log_l(r) - null for r in points)


def _log_mean_exp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values) / len(values))


def log_e_value(evidence: Evidence) -> float:
    """The log of the gate's statistic (-inf before any informative interval: no change has begun)."""
    if not evidence.log_detector:
        return -math.inf
    return _log_mean_exp(evidence.log_detector)


def confidence_sequence(evidence: Evidence, alpha: float) -> tuple[float, float]:
    """An anytime-valid (1 - alpha) interval for a steady ``r``; (0, inf) before any evidence.

    A grid point ``r0`` is too small once the mixture over the grid points above it, against it,
    reaches ``2/alpha``; too large once the one over the points below does. No widening is needed:
    each one-sided test is valid for every ``r`` on its null side, on the grid or not.
    """
    points, lik = effect_grid(), evidence.log_lik
    if not lik:
        return 0.0, math.inf
    limit = math.log(2 / alpha)
    low, high = 0.0, math.inf
    for i, at in enumerate(lik):
        above, below = lik[i + 1 :], lik[:i]
        if above and _log_mean_exp([other - at for other in above]) >= limit:
            low = points[i]
        if below and high == math.inf and _log_mean_exp([other - at for other in below]) >= limit:
            high = points[i]
    return low, max(low, high)


def estimate(totals: Increment) -> float | None:
    """The ASM gateway's rate over the source's since the step began (None: no bad event on the
    source, or no exposure yet)."""
    if totals.target_requests <= 0 or totals.source_requests <= 0 or totals.source_events <= 0:
        return None
    return (totals.target_events / totals.target_requests) / (totals.source_events / totals.source_requests)


def observe(
    evidence: Evidence, target: Reading | None, source: Reading | None, min_effect: float, alpha: float
) -> tuple[Evidence, Increment | None, str | None]:
    """Take a check's readings: the evidence after it, the increment counted (None: none), and why
    nothing was counted.

    Nothing is counted, and the readings become the base of the next increment, when there is no
    earlier reading, a counter went down (a restarted pod, a series that went away: the interval is
    unknown, never guessed), or a gateway shows more bad events than requests. A missing reading
    keeps the old base: the next increment spans the gap, once.
    """
    if target is None or source is None:
        return evidence, None, "a counter could not be read; the next check counts from the last reading"
    before_t, before_s = evidence.target, evidence.source
    rebased = replace(evidence, target=target, source=source)
    if before_t is None or before_s is None:
        return rebased, None, "first reading of this step; evidence starts with the next check"
    increment = Increment(
        target.requests - before_t.requests,
        target.events - before_t.events,
        source.requests - before_s.requests,
        source.events - before_s.events,
    )
    if min(increment.target_requests, increment.target_events, increment.source_requests) < 0 or (
        increment.source_events < 0
    ):
        return rebased, None, "a counter went down (a restarted pod or a series gone); counting again from here"
    if increment.target_events > increment.target_requests or increment.source_events > increment.source_requests:
        return rebased, None, "more bad events than requests between two readings; counting again from here"
    counted = replace(rebased, totals=evidence.totals + increment, intervals=evidence.intervals + 1)
    informative = increment.target_events + increment.source_events > 0
    if informative and increment.target_requests > 0 and increment.source_requests > 0:
        change = evidence.changes + 1
        step = interval_log_lr(increment, gate_grid(min_effect))
        start = -math.log(change * (change + 1))  # log pi_k: a change that begins with this interval
        before = evidence.log_detector or (-math.inf,) * len(step)
        counted = replace(
            counted,
            log_detector=tuple(_log_add(sum_, start) + gain for sum_, gain in zip(before, step, strict=True)),
            log_lik=_add(evidence.log_lik, interval_log_lr(increment, effect_grid())),
            changes=change,
        )
    rejected = evidence.rejected or log_e_value(counted) >= math.log(1 / alpha)
    return replace(counted, rejected=rejected), increment, None


def _add(total: tuple[float, ...], step: tuple[float, ...]) -> tuple[float, ...]:
    return step if not total else tuple(a + b for a, b in zip(total, step, strict=True))


def _log_add(a: float, b: float) -> float:
    """log(exp(a) + exp(b)), -inf allowed."""
    top = max(a, b)
    if top == -math.inf:
        return top
    return top + math.log(math.exp(a - top) + math.exp(b - top))
