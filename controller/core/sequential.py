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
  excess began and how large it is: ``sum_b pi_b mean_r prod_{t >= k_b} L_t(r) / L_t(1)``, where
  a change may begin at the first of every ``CHANGE_EVERY`` informative intervals (ones with a
  bad request), ``k_b`` for block ``b``, ``pi_b = 1 / (b (b + 1))`` (summing to 1), and ``r`` is on
  a grid from ``minEffect`` up. Adding the changes not begun yet (each ``pi_b`` times 1) makes it a
  nonnegative supermartingale starting at 1 under any ``r <= 1`` (``q(r)`` grows with ``r``), so by
  Ville's inequality it ever reaches ``1/alpha`` with probability at most alpha, however long the
  step and however many checks: that is the rejection, a rollback. The budget is per step: a
  migration of n steps is bounded by n x alpha.
  Why the changepoints: a plain mixture over the whole step carries a long healthy stretch as
  evidence against every ``r > 1``, and a target that breaks late in a long bake would need as much
  evidence again to outweigh it; here it pays about ``2 ln b`` for beginning in block ``b``. Why
  blocks: a change may begin only every few intervals, so a start that falls exactly between the
  source's part and the target's part of a burst common to both (see below) is rare.
* ``minEffect`` aims the test: its power goes to effects of at least that size; an effect below it
  (1.2 against 1.5) is flagged less often and later (bench/sequential.py: 24-34 % of steps within
  10 minutes at 100-200 requests/s), and a small effect is not bought with slower detection of a
  large one. Only "no worse than the source" carries the guarantee.
* The confidence sequence for ``r`` assumes one ``r`` for the step: a one-sided mixture above and
  one below every point of a grid around 1 (1/32 to 256), each at ``alpha / 2``. The lower bound
  is the top of the run of points rejected as too small counted from the bottom (so it passes
  the true ``r`` only if the first point at or above it is rejected: one test, at ``alpha / 2``),
  the upper bound likewise from the top; 0 and inf while none is. While the effect is steady, the
  interval ever misses ``r`` with probability at most alpha.
* The gateways are scraped at different moments, so an interval's counts do not cover exactly
  the same time on both; a burst of errors common to both can fall into one gateway's interval
  and the next of the other. An interval is therefore counted only once both gateways were
  scraped since the last one, and a rejection made on data that covers more time on one gateway
  waits until both are scraped past it (``confirming``), standing only if still reached; what is
  left with coarse scrapes is measured in bench/sequential.py and said in docs/policies.md.

The state is, at every grid point, the statistic's sum and the step's log likelihood ratio, with
the counter readings they reached: stored with the rollout state, so a restarted controller continues
from the stored readings (the time it was down becomes one longer interval: nothing lost, nothing
counted twice). Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

__all__ = [
    "CHANGE_EVERY",
    "FORGET_SECONDS",
    "GRID_RATIO",
    "MAX_TARGETS",
    "NO_NEW_SCRAPE",
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
    """One scrape target's counters (a gateway pod: Prometheus's ``instance``) as last scraped:
    requests, the bad ones among them, and when the scrape was (None: unknown).

    A gateway is read as one Reading per target, so that each target's counter is followed on its
    own: a target that restarts (its counters start again from 0), goes missing for a while or
    appears is handled without touching the others, and a reading no newer than the last one (an
    HA Prometheus answering from its other replica) counts nothing.
    """

    requests: float
    events: float
    time: float | None = None
    instance: str = ""


#: why a check counted nothing while the evidence stands as it was
NO_NEW_SCRAPE = "no new scrape of both gateways since the last check"
#: a change may begin every this many informative intervals (see the module docstring)
CHANGE_EVERY = 10
#: targets followed per gateway; more make the gate inconclusive (the state stays small)
MAX_TARGETS = 128
#: a target not scraped for this long (seconds, by sample time) is forgotten
FORGET_SECONDS = 600.0


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
    increment, one per scrape target (None: none yet). ``log_detector`` (on
    ``gate_grid``) is the log of the statistic's sum over changepoints at each ``r``; ``log_lik`` (on
    ``effect_grid``) is ``log L(r) - log L(1)`` summed over the counted intervals; both are empty
    until an informative interval (one with a bad request) counted, and ``changes`` counts those.
    ``rejected`` is final for the step: the test stopped.
    """

    gate: str
    step: str
    target: tuple[Reading, ...] | None = None
    source: tuple[Reading, ...] | None = None
    log_detector: tuple[float, ...] = ()
    log_lik: tuple[float, ...] = ()
    totals: Increment = Increment()
    intervals: int = 0
    changes: int = 0
    #: the bad requests counted since the statistic was at its lowest this step (where an excess
    #: most likely began): what the alert's estimate describes
    recent: Increment = Increment()
    lowest: float = 0.0
    #: the statistic reached 1/alpha with both gateways' data covering different times: the newest
    #: sample time then; the rejection waits until both cover it, and stands only if still reached
    confirming: float | None = None
    #: the last interval counted had no request on one of the gateways (no pass on no traffic)
    quiet: bool = False
    #: checks since the last interval counted (no new scrape of both gateways)
    waited: int = 0
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
    reaches ``2/alpha``; too large once the one over the points below does. The bounds are the ends
    of the runs of such points from either end of the grid (so each bound rests on one test); no
    widening is needed: each one-sided test is valid for every ``r`` on its null side.
    """
    points, lik = effect_grid(), evidence.log_lik
    if not lik:
        return 0.0, math.inf
    limit = math.log(2 / alpha)

    def too_small(i: int) -> bool:
        above = lik[i + 1 :]
        return bool(above) and _log_mean_exp([other - lik[i] for other in above]) >= limit

    def too_large(i: int) -> bool:
        below = lik[:i]
        return bool(below) and _log_mean_exp([other - lik[i] for other in below]) >= limit

    low, high = 0.0, math.inf
    for i in range(len(points)):  # the run of rejections from the bottom
        if not too_small(i):
            break
        low = points[i]
    for i in reversed(range(len(points))):  # ...and from the top
        if not too_large(i):
            break
        high = points[i]
    return low, max(low, high)


def estimate(totals: Increment) -> float | None:
    """The ASM gateway's rate over the source's since the step began (None: no bad event on the
    source, or no exposure yet)."""
    if totals.target_requests <= 0 or totals.source_requests <= 0 or totals.source_events <= 0:
        return None
    return (totals.target_events / totals.target_requests) / (totals.source_events / totals.source_requests)


def observe(
    evidence: Evidence,
    target: Reading | Sequence[Reading] | None,
    source: Reading | Sequence[Reading] | None,
    min_effect: float,
    alpha: float,
) -> tuple[Evidence, Increment | None, str | None]:
    """Take a check's readings: the evidence after it, the increment counted (None: none), and why
    nothing was counted.

    Each scrape target counts what it served since its previous reading: a counter lower than
    before (a restart, a series that expired) counts nothing and is the new base (what it served
    meanwhile is unknown), a target seen for the first time is only a base, one missing keeps its last
    reading (its next increment spans the gap, once), and a reading no newer than the last counts
    nothing. An interval is counted only once both gateways have been scraped since the last one.
    A gateway that could not be read (None) counts nothing and keeps every base.

    The statistic may reach ``1/alpha`` on data that covers more time on one gateway than on the
    other (they are scraped at different moments: a burst of errors common to both can be in one
    gateway's increment and not yet in the other's). The rejection then waits until both gateways
    have been scraped past the newest sample it stood on, and stands only if the statistic is still
    at ``1/alpha`` (``confirming``); waiting only ever removes rejections, so the guarantee holds.
    """
    if target is None or source is None:
        return evidence, None, "a counter could not be read; the next check counts from the last reading"
    now_t, now_s = _targets(target), _targets(source)
    if evidence.target is None or evidence.source is None:
        return (
            replace(evidence, target=now_t, source=now_s),
            None,
            "first reading of this step; evidence starts with the next check",
        )
    on_t, on_s = _advance(evidence.target, now_t), _advance(evidence.source, now_s)
    if not (on_t.fresh and on_s.fresh):
        # One gateway scraped since, the other not: what the first served is counted together with
        # what the other serves over the same time, at their next scrape (never alone: an interval
        # of one gateway against nothing of the other is how a burst on both looks like an excess).
        waiting = replace(evidence, target=on_t.waiting, source=on_s.waiting, waited=evidence.waited + 1)
        return waiting, None, NO_NEW_SCRAPE
    base_t, (t_requests, t_events) = on_t.counted, on_t.served
    base_s, (s_requests, s_events) = on_s.counted, on_s.served
    increment = Increment(t_requests, t_events, s_requests, s_events)
    rebased = replace(evidence, target=base_t, source=base_s)
    counted = replace(
        rebased,
        totals=evidence.totals + increment,
        intervals=evidence.intervals + 1,
        quiet=t_requests <= 0 or s_requests <= 0,
        waited=0,
    )
    if t_events + s_events > 0 and t_requests > 0 and s_requests > 0:
        change = evidence.changes + 1
        step = interval_log_lr(increment, gate_grid(min_effect))
        before = evidence.log_detector or (-math.inf,) * len(step)
        if (change - 1) % CHANGE_EVERY == 0:  # a change may begin with this interval: block b, pi_b
            block = (change - 1) // CHANGE_EVERY + 1
            start = -math.log(block * (block + 1))
            before = tuple(_log_add(sum_, start) for sum_ in before)
        counted = replace(
            counted,
            log_detector=tuple(sum_ + gain for sum_, gain in zip(before, step, strict=True)),
            log_lik=_add(evidence.log_lik, interval_log_lr(increment, effect_grid())),
            changes=change,
        )
    # where an excess most likely began: after the statistic's lowest point this step (tracked on
    # the supermartingale itself: the changes not begun yet count pi_k each, so it starts at 1)
    begun = -(-counted.changes // CHANGE_EVERY)  # blocks begun so far: the rest weigh 1 / (begun + 1)
    level = _log_add(log_e_value(counted), -math.log(begun + 1))
    if level < evidence.lowest:
        counted = replace(counted, lowest=level, recent=Increment())
    else:
        counted = replace(counted, recent=evidence.recent + increment)
    return _decide(counted, now_t, now_s, alpha), increment, None


def _decide(evidence: Evidence, target: tuple[Reading, ...], source: tuple[Reading, ...], alpha: float) -> Evidence:
    """Reject, or wait until both gateways are scraped past the newest sample the statistic stood on."""
    if evidence.rejected:
        return evidence
    reached = log_e_value(evidence) >= math.log(1 / alpha)
    now = target + source
    times = [reading.time for reading in now if reading.time is not None]
    if len(times) < len(now) or not times:
        return replace(evidence, rejected=reached, confirming=None)  # no sample times: nothing to wait for
    covered = min(_coverage(target), _coverage(source))
    waiting = evidence.confirming
    if waiting is not None and covered >= waiting:  # both gateways cover it now: decide on this
        return replace(evidence, rejected=reached, confirming=None)
    if waiting is None and reached:
        if covered >= max(times):  # scraped at one moment: nothing to wait for
            return replace(evidence, rejected=True)
        return replace(evidence, confirming=max(times))
    return evidence


def _coverage(readings: tuple[Reading, ...] | None) -> float:
    """Up to when every target of a gateway has been scraped (targets missing now are left out)."""
    times = [reading.time for reading in readings or () if reading.time is not None]
    return min(times) if times else math.inf


def _targets(readings: Reading | Sequence[Reading]) -> tuple[Reading, ...]:
    return (readings,) if isinstance(readings, Reading) else tuple(readings)


class _Advance(NamedTuple):
    """What a gateway's readings give: the base if the interval is counted, what its targets served
    since the base, whether any was scraped since, and the base if the interval waits."""

    counted: tuple[Reading, ...]
    served: tuple[float, float]
    fresh: bool
    waiting: tuple[Reading, ...]


def _advance(base: tuple[Reading, ...], now: tuple[Reading, ...]) -> _Advance:
    """Follow each scrape target from ``base`` to ``now`` (see ``observe``)."""
    before = {reading.instance: reading for reading in base}
    requests = events = 0.0
    fresh = False
    counted: dict[str, Reading] = {}
    waiting: dict[str, Reading] = {}
    for reading in now:
        last = before.get(reading.instance)
        if last is None:  # new: only a base (its counters may hold requests from before)
            counted[reading.instance] = waiting[reading.instance] = reading
            continue
        if reading.time is not None and last.time is not None and reading.time <= last.time:
            counted[reading.instance] = waiting[reading.instance] = last  # nothing newer
            continue
        fresh = True
        waiting[reading.instance] = last  # not taken while the interval waits for the other gateway
        counted[reading.instance] = reading
        served = (reading.requests - last.requests, reading.events - last.events)
        # lower than before: restarted (its counters start again) or a series of it expired;
        # what it served meanwhile is unknown, and it counts on from here. More bad requests than
        # requests cannot be: counted nowhere either.
        if 0 <= served[1] <= served[0]:
            requests, events = requests + served[0], events + served[1]
    newest = max((r.time for r in now if r.time is not None), default=None)
    for instance, last in before.items():  # missing now: kept a while, so its return spans the gap
        if instance not in counted and (newest is None or last.time is None or newest - last.time < FORGET_SECONDS):
            counted[instance] = waiting[instance] = last
    present = {reading.instance for reading in now}
    return _Advance(_bounded(counted, present), (requests, events), fresh, _bounded(waiting, present))


def _bounded(readings: dict[str, Reading], present: set[str]) -> tuple[Reading, ...]:
    """At most MAX_TARGETS, those scraped now first, then the most recently seen."""

    def rank(reading: Reading) -> tuple[bool, float]:
        return reading.instance not in present, -(reading.time if reading.time is not None else math.inf)

    kept = sorted(readings.values(), key=rank)[:MAX_TARGETS]
    return tuple(sorted(kept, key=lambda reading: reading.instance))


def _add(total: tuple[float, ...], step: tuple[float, ...]) -> tuple[float, ...]:
    return step if not total else tuple(a + b for a, b in zip(total, step, strict=True))


def _log_add(a: float, b: float) -> float:
    """log(exp(a) + exp(b)), -inf allowed."""
    top = max(a, b)
    if top == -math.inf:
        return top
    return top + math.log(math.exp(a - top) + math.exp(b - top))
