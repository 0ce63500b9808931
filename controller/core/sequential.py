"""An anytime-valid sequential test: is the ASM gateway's rate of bad requests above the source's?

Why: a threshold on a windowed ratio, checked every interval with "N consecutive failures" as the
noise guard, is slow (the window and the count add up) and its false-alarm rate is unknown (one
burst in overlapping windows counts as several failures; looking more often raises the rate).
This test looks as often as it likes and keeps one budget: the chance that it EVER rejects while
the ASM gateway is no worse than ``minEffect`` x the source is at most ``alpha``.

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
* The statistic is a mixture likelihood ratio against ``r = 1`` (equal rates): the average over a
  grid of effects from ``minEffect`` up of ``prod_t L_t(r) / L_t(1)``. Under any ``r <= 1`` it is a
  nonnegative supermartingale with mean <= 1 (``q(r)`` grows with ``r``), so by Ville's inequality
  it ever reaches ``1/alpha`` with probability <= alpha: that is the rejection, a rollback.
  ``minEffect`` aims the test: its power goes to effects of at least that size (an effect well
  below it, say 1.2 against 1.5, drifts the statistic down and is rarely flagged), and a small
  effect is not bought with slower detection of a large one (bench/sequential.py has the figures).
* The confidence sequence for ``r`` inverts a second mixture, over a symmetric grid around 1 (1/32
  to 256), two-sided at every grid point: the ``r0`` whose mixture e-value is still below
  ``1/alpha``, widened by one grid step each side (the true ``r`` need not sit on the grid).

The state is the cumulative log likelihood ratio at every grid point of both grids with the
counter readings it reached: stored with the rollout state, so a restarted controller continues
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
    increment (None: none yet, or the last one could not be used). ``log_lr`` (on ``gate_grid``) and
    ``log_lik`` (on ``effect_grid``) are ``log L(r) - log L(1)`` summed over the counted intervals,
    empty until one counted. ``rejected`` is final for the step: the test stopped.
    """

    gate: str
    step: str
    target: Reading | None = None
    source: Reading | None = None
    log_lr: tuple[float, ...] = ()
    log_lik: tuple[float, ...] = ()
    totals: Increment = Increment()
    intervals: int = 0
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
    """The log of the gate's statistic: the mixture over ``r >= minEffect`` against ``r = 1`` (0: none yet)."""
    if not evidence.log_lr:
        return 0.0
    return _log_mean_exp(evidence.log_lr)


def confidence_sequence(evidence: Evidence, alpha: float) -> tuple[float, float]:
    """An anytime-valid (1 - alpha) interval for ``r``; (0, inf) before any evidence.

    Each grid point ``r0`` is kept while its two-sided mixture e-value (the average over the whole
    grid of the likelihood ratio against ``r0``) is below ``1/alpha``; the bounds are widened to
    the neighbouring grid points, 0 or inf past the grid's ends.
    """
    points = effect_grid()
    if not evidence.log_lik:
        return 0.0, math.inf
    limit = math.log(1 / alpha)
    kept = [
        i for i, at in enumerate(evidence.log_lik) if _log_mean_exp([other - at for other in evidence.log_lik]) < limit
    ]
    if not kept:  # cannot happen for alpha < 1 (r0's own term is in the average); never claim a point
        return 0.0, math.inf
    low, high = kept[0], kept[-1]
    return (points[low - 1] if low > 0 else 0.0), (points[high + 1] if high + 1 < len(points) else math.inf)


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
    counted = replace(
        rebased,
        log_lr=_add(evidence.log_lr, interval_log_lr(increment, gate_grid(min_effect))),
        log_lik=_add(evidence.log_lik, interval_log_lr(increment, effect_grid())),
        totals=evidence.totals + increment,
        intervals=evidence.intervals + 1,
    )
    rejected = evidence.rejected or log_e_value(counted) >= math.log(1 / alpha)
    return replace(counted, rejected=rejected), increment, None


def _add(total: tuple[float, ...], step: tuple[float, ...]) -> tuple[float, ...]:
    return step if not total else tuple(a + b for a, b in zip(total, step, strict=True))
