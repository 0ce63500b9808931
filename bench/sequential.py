"""Simulation study: the sequential error-rate gate against the windowed threshold gate.

Why: ``controller/core/sequential.py`` makes two claims that no unit test can show, because both are
about probabilities over many rollouts: with equal error rates on both gateways it rolls back at
most ``alpha`` of the migrations however often it looks, and it catches a real fault sooner than the
windowed threshold gate (what Flagger, Argo Rollouts and our ``errorRate.maxIncrease`` do). This
script measures both on simulated traffic. The sequential gate is the controller's own ``observe``,
fed the cumulative counters of both gateways; the threshold gate is modelled on exactly the same
counts.

The traffic, per second (the check interval), the same model everywhere:

- the total request rate is ``rps x level``: ``level`` is a slowly varying log-normal process (an
  AR(1) in the log, sd 0.3, correlation time 5 min), and each gateway's requests are Poisson with
  its share of that rate (the CLB's split: the weight times a per-migration imbalance of 0.8-1.2 in
  the false-rollback study, exactly 10 % to the ASM gateway in the detection study);
- the error rate, the same for both gateways, is 0.5 % times a slow log-normal factor (sd 0.3,
  correlation time 10 min) times bursts: one every 5 min on average, 5-30 s long, 3x-20x the rate
  (up to 10 % 5xx on both gateways at once). Each request fails independently (binomial counts).
  A fault multiplies the ASM gateway's rate by ``r`` (0.5 % -> 5 % is ``r = 10``).

(a) False rollbacks: ``--migrations`` migrations (default 10 000) through ASM weights 1, 5, 10, 25,
50 (100 has no source to compare with), 60 checks of 1 s per step, 1 000 requests/s in all; both
gateways always have the same error rate. The sequential gate starts a new ``Evidence`` at every
step. A migration counts as a false rollback when any step rejects (sequential) or reaches
``failureThreshold`` consecutive FAILs (threshold). Rates with 95 % Wilson intervals.

(b) Detection: the ASM gateway at 10, 100 or 200 requests/s (10 % of the total), healthy for a
while, then its error rate jumps by ``r`` (10: 0.5 % -> 5 %, 2: 0.5 % -> 1 %, and 1.2, below
``minEffect``) at a random phase of a check interval. The time from the fault to the rollback:
median and p90 (nearest rank; an undetected run counts as never), and the share detected within
``--horizon`` (10 min). The sequential gate's evidence starts at the check just before the fault
("at the step's start") or 60 s of healthy checks earlier ("60 s into the step"): its evidence is
cumulative over the step, so healthy time before a fault slows it (a second table shows how much).

The threshold gate (every check): the ASM gateway's 5xx ratio over the last W seconds minus the
source's over the same seconds, exact counts (Prometheus's ``increase()`` would only add noise);
FAIL above the limit; fewer than 50 requests on either gateway is inconclusive (it neither fails nor
resets the count, as in ``controller/core/decision.py``); rollback at ``failureThreshold``
consecutive FAILs, counted from the step's start (from the fault's start in (b); its windows hold
the healthy traffic before). Typical: W 60 s, limit 0.01, threshold 2. Best: of W 5-60 s x limit
0.005-0.03 x threshold 1-3, the fastest median detection of 0.5 % -> 5 % at 100 requests/s among
the settings whose false-rollback rate in (a) is at most ``alpha`` (ties: p90, then fewer false
rollbacks).

(c) Counters as Prometheus serves them. (a) and (b) give the gate the exact counters at every check.
The controller reads them with an instant query: each gateway's counters as of its last scrape, and
Prometheus scrapes each target at a phase of its own, so the two increments of a check can cover
different seconds. (a)'s migrations and (b)'s 0.5 % -> 5 % at 100 requests/s are run again with each
gateway's counters at its last scrape (one phase per gateway, drawn per run, or the same phase for
both), for a few scrape and check intervals (``--scrape-migrations``, ``--scrape-runs``), with each
reading's sample time (the scrape's) when ``Reading`` takes one, and without.

Deterministic for a seed (every run has its own generator, so ``--jobs`` changes nothing but the
time). Also: the microseconds one ``observe`` call takes. Asserts nothing. Usage:
    .venv/bin/python bench/sequential.py [--quick] [--seed N] [--migrations N] [--runs N]
        [--horizon S] [--scrape-migrations N] [--scrape-runs N] [--jobs N] [--json PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar, cast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controller.core.sequential import Evidence, Reading, log_e_value, observe  # noqa: E402

ALPHA = 0.01
MIN_EFFECT = 1.5
BASE_ERROR = 0.005
#: the false-rollback study's schedule (ASM weight %) and each step's checks (1 s apart)
WEIGHTS = (1, 5, 10, 25, 50)
STEP_CHECKS = 60
MIGRATION_RPS = 1000.0
#: the detection study: the ASM gateway's requests/s, its share of the total, the faults (r)
ASM_RPS = (10, 100, 200)
ASM_SHARE = 0.10
EFFECTS = (10.0, 2.0, 1.2)
#: healthy checks in the step before the fault: the main table, and the longer list for one scenario
BEFORE = (0, 60)
BEFORE_LONG = (0, 10, 60, 300, 600)
LONG_SCENARIO = (10.0, 100)
#: the threshold gate
WINDOWS = (5, 10, 20, 30, 60)
#: the limits asked for, and two more (the sweep goes on when none of the asked stays within alpha)
ASKED_LIMITS = (0.005, 0.01, 0.02, 0.03)
LIMITS = (*ASKED_LIMITS, 0.04, 0.05)
FAILURE_THRESHOLDS = (1, 2, 3)
MIN_REQUESTS = 50
TYPICAL: tuple[int, float, int] = (60, 0.01, 2)
#: a setting of the threshold gate: window (s), limit (the ASM ratio minus the source's), failureThreshold
Setting = tuple[int, float, int]
SETTINGS: tuple[Setting, ...] = tuple((w, limit, k) for w in WINDOWS for limit in LIMITS for k in FAILURE_THRESHOLDS)
#: the sequential gate is also judged at alpha / steps per step: alpha over a whole migration
STRICT_ALPHA = ALPHA / len(WEIGHTS)
SEQ_ALPHAS = (ALPHA, STRICT_ALPHA)
#: the targets of the issue at 100 requests/s to the ASM gateway, r = 10
TARGET_MEDIAN_S = 2.0
TARGET_P90_S = 3.0

#: the traffic model
LEVEL_SD, LEVEL_TAU_S = 0.3, 300.0
ERROR_SD, ERROR_TAU_S = 0.3, 600.0
BURST_EVERY_S = 300.0
BURST_SECONDS = (5, 30)
BURST_FACTOR = (3.0, 20.0)
IMBALANCE = (0.8, 1.2)

DEFAULTS = {"migrations": 10_000, "runs": 2000, "horizon": 600, "scrape_migrations": 4000, "scrape_runs": 500}
QUICK = {"migrations": 300, "runs": 30, "horizon": 600, "scrape_migrations": 100, "scrape_runs": 20}
CHUNK = 100

T = TypeVar("T")
R = TypeVar("R")


# --- random variates (pure Python: random has no Poisson, and binomialvariate is 3.12) ------------------


def poisson(rng: random.Random, lam: float) -> int:
    """A Poisson variate: multiplication below 10, else Hörmann's PTRS (transformed rejection)."""
    if lam <= 0:
        return 0
    if lam < 10:
        limit, k, prod = math.exp(-lam), 0, rng.random()
        while prod > limit:
            k += 1
            prod *= rng.random()
        return k
    slam, loglam = math.sqrt(lam), math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    invalpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2)
    while True:
        u = rng.random() - 0.5
        v = rng.random()
        us = 0.5 - abs(u)
        k = math.floor((2 * a / us + b) * u + lam + 0.43)
        if us >= 0.07 and v <= vr:
            return k
        if k < 0 or (us < 0.013 and v > us):
            continue
        if math.log(v) + math.log(invalpha) - math.log(a / (us * us) + b) <= -lam + k * loglam - math.lgamma(k + 1):
            return k


def binomial(rng: random.Random, n: int, p: float) -> int:
    """A binomial variate: Devroye's geometric method when ``n p < 10``, else Hörmann's BTRS (as
    CPython 3.12's ``random.binomialvariate``)."""
    if n <= 0 or p <= 0.0:
        return 0
    if p >= 1.0:
        return n
    if p > 0.5:
        return n - binomial(rng, n, 1.0 - p)
    if n * p < 10.0:
        x = y = 0
        c = math.log1p(-p)
        while True:
            y += math.floor(math.log(1.0 - rng.random()) / c) + 1
            if y > n:
                return x
            x += 1
    spq = math.sqrt(n * p * (1.0 - p))
    b = 1.15 + 2.53 * spq
    a = -0.0873 + 0.0248 * b + 0.01 * p
    c = n * p + 0.5
    vr = 0.92 - 4.2 / b
    m = math.floor((n + 1) * p)
    h = math.lgamma(m + 1) + math.lgamma(n - m + 1)
    lpq = math.log(p / (1.0 - p))
    alpha = (2.83 + 5.1 / b) * spq
    while True:
        u = rng.random() - 0.5
        us = 0.5 - abs(u)
        k = math.floor((2.0 * a / us + b) * u + c)
        if k < 0 or k > n:
            continue
        v = rng.random()
        if us >= 0.07 and v <= vr:
            return k
        v *= alpha / (a / (us * us) + b)
        if math.log(v) <= h - math.lgamma(k + 1) - math.lgamma(n - k + 1) + (k - m) * lpq:
            return k


# --- the traffic ---------------------------------------------------------------------------------------


class Traffic:
    """Both gateways' counters, second by second, as prefix sums: ``target_requests[t]`` is the ASM
    gateway's requests in seconds ``[0, t)`` (a check at time ``t`` reads them)."""

    def __init__(self, rng: random.Random, rps: float) -> None:
        self.rng = rng
        self.rps = rps
        self.level = rng.gauss(0.0, LEVEL_SD)
        self.error = rng.gauss(0.0, ERROR_SD)
        self.burst_left = 0
        self.burst_factor = 1.0
        self.bursts = 0
        self.target_requests = [0]
        self.target_events = [0]
        self.source_requests = [0]
        self.source_events = [0]

    def second(self, share: float, effect: float = 1.0, fault_from: float = 0.0) -> None:
        """One more second: the ASM gateway gets ``share`` of the requests; its error rate is ``effect``
        times the source's from ``fault_from`` (a fraction of this second) on."""
        rng = self.rng
        keep = math.exp(-1.0 / LEVEL_TAU_S)
        self.level = keep * self.level + LEVEL_SD * math.sqrt(1 - keep * keep) * rng.gauss(0.0, 1.0)
        keep = math.exp(-1.0 / ERROR_TAU_S)
        self.error = keep * self.error + ERROR_SD * math.sqrt(1 - keep * keep) * rng.gauss(0.0, 1.0)
        if self.burst_left > 0:
            self.burst_left -= 1
        elif rng.random() < 1.0 / BURST_EVERY_S:
            self.burst_left = rng.randint(*BURST_SECONDS) - 1
            self.bursts += 1
            self.burst_factor = math.exp(rng.uniform(math.log(BURST_FACTOR[0]), math.log(BURST_FACTOR[1])))
        burst = self.burst_factor if self.burst_left > 0 else 1.0
        rate = self.rps * math.exp(self.level - LEVEL_SD**2 / 2)
        p = min(1.0, BASE_ERROR * math.exp(self.error - ERROR_SD**2 / 2) * burst)
        ra = poisson(rng, rate * share)
        rs = poisson(rng, rate * (1.0 - share))
        if effect == 1.0 or fault_from >= 1.0:
            xa = binomial(rng, ra, p)
        elif fault_from <= 0.0:
            xa = binomial(rng, ra, min(1.0, p * effect))
        else:  # the fault starts within this second
            before = binomial(rng, ra, fault_from)
            xa = binomial(rng, before, p) + binomial(rng, ra - before, min(1.0, p * effect))
        xs = binomial(rng, rs, p)
        self.target_requests.append(self.target_requests[-1] + ra)
        self.target_events.append(self.target_events[-1] + xa)
        self.source_requests.append(self.source_requests[-1] + rs)
        self.source_events.append(self.source_events[-1] + xs)

    def readings(self, t: int) -> tuple[Reading, Reading]:
        return (
            Reading(float(self.target_requests[t]), float(self.target_events[t])),
            Reading(float(self.source_requests[t]), float(self.source_events[t])),
        )

    def difference(self, t: int, window: int) -> float | None:
        """The threshold gate's measure at a check at ``t``: the ASM gateway's 5xx ratio over the last
        ``window`` seconds minus the source's; None: fewer than ``MIN_REQUESTS`` on either side."""
        lo = max(0, t - window)
        ra = self.target_requests[t] - self.target_requests[lo]
        rs = self.source_requests[t] - self.source_requests[lo]
        if ra < MIN_REQUESTS or rs < MIN_REQUESTS:
            return None
        return (self.target_events[t] - self.target_events[lo]) / ra - (
            self.source_events[t] - self.source_events[lo]
        ) / rs


def _rng(seed: int, *parts: object) -> random.Random:
    """One generator per run (a str seed is hashed with SHA-512: the same in every process)."""
    return random.Random(":".join(str(p) for p in (seed, *parts)))


def _evidence() -> Evidence:
    return Evidence(gate="errorRateSequential", step="s")


# --- (a) false rollbacks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    """One migration at equal error rates, step by step: whether the sequential gate rejected and the
    largest log e-value it reached (so that a stricter alpha can be judged too), and for each window
    and failureThreshold of the threshold gate the largest limit it would have failed (the highest
    minimum of ``k`` consecutive conclusive differences in the step; -inf: none); and the bursts of
    errors the migration saw."""

    rejected: tuple[bool, ...]
    top: tuple[float, ...]
    worst: tuple[tuple[float, ...], ...]
    bursts: int


def migration(seed: int, index: int) -> Migration:
    rng = _rng(seed, "migration", index)
    traffic = Traffic(rng, MIGRATION_RPS)
    imbalance = rng.uniform(*IMBALANCE)
    rejected: list[bool] = []
    tops: list[float] = []
    worst_steps: list[tuple[float, ...]] = []
    for step, weight in enumerate(WEIGHTS):
        share = min(0.95, weight / 100 * imbalance)
        start = step * STEP_CHECKS
        for _ in range(STEP_CHECKS):
            traffic.second(share)
        evidence, top = _evidence(), 0.0
        for t in range(start, start + STEP_CHECKS + 1):
            evidence, _, _ = observe(evidence, *traffic.readings(t), MIN_EFFECT, ALPHA)
            top = max(top, log_e_value(evidence))
        rejected.append(evidence.rejected)
        tops.append(top)
        worst = [-math.inf] * (len(WINDOWS) * len(FAILURE_THRESHOLDS))
        for wi, window in enumerate(WINDOWS):
            last: list[float] = []  # the last conclusive differences of this step, newest first
            for t in range(start + 1, start + STEP_CHECKS + 1):
                d = traffic.difference(t, window)
                if d is None:
                    continue
                last = [d, *last[: len(FAILURE_THRESHOLDS) - 1]]
                low = math.inf
                for ki, k in enumerate(FAILURE_THRESHOLDS):
                    if len(last) < k:
                        break
                    low = min(low, last[k - 1])
                    slot = wi * len(FAILURE_THRESHOLDS) + ki
                    worst[slot] = max(worst[slot], low)
        worst_steps.append(tuple(worst))
    return Migration(tuple(rejected), tuple(tops), tuple(worst_steps), traffic.bursts)


def _migrations(task: tuple[int, int, int]) -> list[Migration]:
    seed, start, stop = task
    return [migration(seed, i) for i in range(start, stop)]


# --- (b) detection -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    effect: float
    asm_rps: int
    before: tuple[int, ...]


@dataclass(frozen=True)
class Detection:
    """One run: seconds from the fault to the rollback (inf: not within the horizon) of the sequential
    gate for each length of healthy evidence before the fault (``Scenario.before``) and each of
    ``SEQ_ALPHAS`` (negative: it rejected before the fault), and of the threshold gate at each of
    ``SETTINGS``."""

    sequential: tuple[float, ...]
    threshold: tuple[float, ...]


def detection(seed: int, scenario: Scenario, index: int, horizon: int) -> Detection:
    rng = _rng(seed, "detection", scenario.effect, scenario.asm_rps, index)
    traffic = Traffic(rng, scenario.asm_rps / ASM_SHARE)
    pre = max(*WINDOWS, *scenario.before)
    phase = rng.random()
    fault = pre + phase  # the fault's start, in seconds
    for _ in range(pre):
        traffic.second(ASM_SHARE)
    traffic.second(ASM_SHARE, scenario.effect, fault_from=phase)
    end = pre + horizon  # the last check
    for _ in range(pre + 1, end):
        traffic.second(ASM_SHARE, scenario.effect)

    sequential: list[float] = []
    strict = math.log(1 / STRICT_ALPHA)
    for before in scenario.before:
        evidence, found = _evidence(), [math.inf, math.inf]
        for t in range(pre - before, end + 1):
            evidence, _, _ = observe(evidence, *traffic.readings(t), MIN_EFFECT, ALPHA)
            if evidence.rejected and found[0] == math.inf:
                found[0] = t - fault
            if log_e_value(evidence) >= strict:
                found[1] = t - fault
                break
        sequential.extend(found)

    threshold = [math.inf] * len(SETTINGS)
    per_window = len(LIMITS) * len(FAILURE_THRESHOLDS)
    for wi, window in enumerate(WINDOWS):
        fails = [0] * len(LIMITS)
        left = per_window
        for t in range(pre + 1, end + 1):
            d = traffic.difference(t, window)
            if d is None:
                continue
            for li, limit in enumerate(LIMITS):
                fails[li] = fails[li] + 1 if d > limit else 0
                for ki, k in enumerate(FAILURE_THRESHOLDS):
                    slot = wi * per_window + li * len(FAILURE_THRESHOLDS) + ki
                    if fails[li] >= k and threshold[slot] == math.inf:
                        threshold[slot] = t - fault
                        left -= 1
            if not left:
                break
    return Detection(tuple(sequential), tuple(threshold))


def _detections(task: tuple[int, Scenario, int, int, int]) -> list[Detection]:
    seed, scenario, start, stop, horizon = task
    return [detection(seed, scenario, i, horizon) for i in range(start, stop)]


# --- (c) counters as Prometheus serves them ------------------------------------------------------------


@dataclass(frozen=True)
class Scrape:
    """How the controller sees the counters: each gateway's value at its last scrape (every ``every``
    seconds at a phase of its own), read by checks every ``check`` seconds. ``phases``: "random"
    (each gateway's phase drawn per run, as Prometheus spreads its targets) or "same". ``times``:
    each reading carries its sample time (the scrape's), as the controller passes it."""

    every: int
    check: int
    phases: str
    times: bool = True

    def title(self) -> str:
        phases = "random phases" if self.phases == "random" else "the same phase"
        times = "" if self.times and TIMED else ", no sample times"
        return f"scrape every {self.every} s ({phases}), check every {self.check} s{times}"

    def key(self) -> str:
        """The runs' seed (the same traffic with and without sample times)."""
        return f"{self.every}/{self.check}/{self.phases}"


SCRAPES = (
    Scrape(15, 15, "same"),
    Scrape(15, 15, "random", times=False),
    Scrape(15, 15, "random"),
    Scrape(5, 5, "random"),
    Scrape(15, 1, "random", times=False),
    Scrape(15, 1, "random"),
)
#: whether the controller's ``Reading`` carries the sample time and the scrape target (then an
#: interval is counted only once both gateways were scraped since the last one)
TIMED = {"time", "instance"} <= {f.name for f in fields(Reading)}


def _reading(requests: float, events: float, at: float | None, instance: str) -> Reading:
    if at is None or not TIMED:
        return Reading(requests, events)
    timed: Reading = cast(Any, Reading)(requests, events, time=at, instance=instance)
    return timed


def _phases(rng: random.Random, scrape: Scrape) -> tuple[int, int]:
    if scrape.phases == "same":
        phase = rng.randrange(scrape.every)
        return phase, phase
    return rng.randrange(scrape.every), rng.randrange(scrape.every)


def _scraped(traffic: Traffic, t: int, scrape: Scrape, phases: tuple[int, int]) -> tuple[Reading, Reading]:
    """The readings an instant query at ``t`` returns: each gateway's counters at its last scrape."""
    at = [max(0, phase + scrape.every * ((t - phase) // scrape.every)) for phase in phases]
    times: list[float | None] = [float(a) for a in at] if scrape.times else [None, None]
    return (
        _reading(float(traffic.target_requests[at[0]]), float(traffic.target_events[at[0]]), times[0], "asm"),
        _reading(float(traffic.source_requests[at[1]]), float(traffic.source_events[at[1]]), times[1], "source"),
    )


def scraped_migration(seed: int, scrape: Scrape, index: int) -> int:
    """(a)'s migration, its counters read from scrapes: how many steps the sequential gate rejected."""
    rng = _rng(seed, "scraped-migration", scrape.key(), index)
    traffic = Traffic(rng, MIGRATION_RPS)
    imbalance = rng.uniform(*IMBALANCE)
    phases = _phases(rng, scrape)
    for weight in WEIGHTS:
        for _ in range(STEP_CHECKS):
            traffic.second(min(0.95, weight / 100 * imbalance))
    rejected = 0
    for step in range(len(WEIGHTS)):
        evidence = _evidence()
        for t in range(step * STEP_CHECKS, (step + 1) * STEP_CHECKS + 1, scrape.check):
            evidence, _, _ = observe(evidence, *_scraped(traffic, t, scrape, phases), MIN_EFFECT, ALPHA)
        rejected += evidence.rejected
    return rejected


def scraped_detection(seed: int, scrape: Scrape, index: int, horizon: int) -> float:
    """(b)'s reference fault (r 10, 100 ASM req/s) at a random moment, the evidence starting at the
    check before it, the counters read from scrapes: seconds to the rejection (inf: none)."""
    effect, asm_rps = LONG_SCENARIO
    rng = _rng(seed, "scraped-detection", scrape.key(), index)
    traffic = Traffic(rng, asm_rps / ASM_SHARE)
    phases = _phases(rng, scrape)
    fault = max(WINDOWS) + scrape.check * rng.random()
    whole = math.floor(fault)
    for _ in range(whole):
        traffic.second(ASM_SHARE)
    traffic.second(ASM_SHARE, effect, fault_from=fault - whole)
    end = math.ceil(fault + horizon) + scrape.every
    for _ in range(whole + 1, end):
        traffic.second(ASM_SHARE, effect)
    evidence = _evidence()
    start = scrape.check * math.floor(fault / scrape.check)
    for t in range(start, math.floor(fault + horizon) + 1, scrape.check):
        evidence, _, _ = observe(evidence, *_scraped(traffic, t, scrape, phases), MIN_EFFECT, ALPHA)
        if evidence.rejected:
            return t - fault
    return math.inf


def _scraped_migrations(task: tuple[int, Scrape, int, int]) -> list[int]:
    seed, scrape, start, stop = task
    return [scraped_migration(seed, scrape, i) for i in range(start, stop)]


def _scraped_detections(task: tuple[int, Scrape, int, int, int]) -> list[float]:
    seed, scrape, start, stop, horizon = task
    return [scraped_detection(seed, scrape, i, horizon) for i in range(start, stop)]


# --- statistics ----------------------------------------------------------------------------------------


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95 % Wilson score interval of a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    phat = successes / n
    centre = (phat + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest rank (inf counts: an undetected run is never)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass(frozen=True)
class Times:
    median: float
    p90: float
    within: float  # share detected within the horizon
    n: int

    @classmethod
    def of(cls, values: Sequence[float], horizon: int) -> Times:
        caught = [max(0.0, v) for v in values]  # a rejection before the fault did roll the fault back
        return cls(
            quantile(caught, 0.5), quantile(caught, 0.9), sum(v <= horizon for v in caught) / len(caught), len(caught)
        )

    def key(self) -> tuple[float, float]:
        return self.median, self.p90

    def text(self, horizon: int) -> str:
        def s(v: float) -> str:
            return f"> {horizon}" if v > horizon else f"{v:.1f}"

        return f"{s(self.median)} / {s(self.p90)} ({100 * self.within:.0f} %)"


# --- the run --------------------------------------------------------------------------------------------


def _map(jobs: int, fn: Callable[[T], list[R]], tasks: Iterable[T]) -> list[R]:
    items = list(tasks)
    if jobs <= 1:
        return [r for task in items for r in fn(task)]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return [r for chunk in pool.map(fn, items) for r in chunk]


def _chunks(n: int) -> list[tuple[int, int]]:
    return [(i, min(n, i + CHUNK)) for i in range(0, n, CHUNK)]


def observe_cost(seed: int, calls: int = 20_000, repeats: int = 5) -> float:
    """Microseconds per ``observe`` call on the false-rollback study's traffic at weight 10 (median
    of ``repeats`` passes over the same readings)."""
    traffic = Traffic(_rng(seed, "cost"), MIGRATION_RPS)
    for _ in range(calls):
        traffic.second(0.10)
    readings = [traffic.readings(t) for t in range(calls + 1)]
    passes = []
    for _ in range(repeats):
        evidence = _evidence()
        began = time.perf_counter()
        for target, source in readings:
            evidence, _, _ = observe(evidence, target, source, MIN_EFFECT, ALPHA)
        passes.append((time.perf_counter() - began) / len(readings) * 1e6)
    return statistics.median(passes)


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def _ci(count: int, n: int) -> str:
    low, high = wilson(count, n)
    return f"{_pct(low)} - {_pct(high)}"


def _setting(s: Setting) -> str:
    return f"W {s[0]} s, limit {s[1]:g}, threshold {s[2]}"


def _effect(r: float) -> str:
    return f"0.5 % → {BASE_ERROR * r * 100:g} % (r {r:g})"


#: a gate of the study: a threshold setting, or the sequential gate at this alpha per step
Gate = Setting | float


def _gate(gate: Gate) -> str:
    if isinstance(gate, float):
        return f"sequential, alpha {gate:g} per step"
    return f"threshold, {_setting(gate)}"


class FalseRollbacks:
    """(a): which migrations (and steps) each gate rolled back, overall and split by bursts."""

    def __init__(self, migrations: Sequence[Migration]) -> None:
        self.n = len(migrations)
        self.calm = [m.bursts == 0 for m in migrations]
        strict = math.log(1 / STRICT_ALPHA)
        #: per gate, per migration, per step: rolled back
        self.failed: dict[Gate, list[tuple[bool, ...]]] = {
            ALPHA: [m.rejected for m in migrations],
            STRICT_ALPHA: [tuple(top >= strict for top in m.top) for m in migrations],
        }
        for wi, window in enumerate(WINDOWS):
            for ki, k in enumerate(FAILURE_THRESHOLDS):
                slot = wi * len(FAILURE_THRESHOLDS) + ki
                for limit in LIMITS:
                    self.failed[(window, limit, k)] = [
                        tuple(worst[slot] > limit for worst in m.worst) for m in migrations
                    ]

    def count(self, gate: Gate, calm: bool | None = None) -> tuple[int, int]:
        """Migrations rolled back and migrations, of those with no burst (``calm``), with one or more
        (not ``calm``), or all (None)."""
        picked = [any(f) for f, c in zip(self.failed[gate], self.calm, strict=True) if calm is None or c == calm]
        return sum(picked), len(picked)

    def at_step(self, gate: Gate, step: int) -> int:
        """How many migrations the gate rolled back at this step (a migration stops at its first rollback)."""
        return sum(f[step] and not any(f[:step]) for f in self.failed[gate])

    def steps(self, gate: Gate) -> int:
        """Steps that rolled back, counting every step of every migration (each is a test of its own)."""
        return sum(sum(f) for f in self.failed[gate])

    def rate(self, gate: Gate) -> float:
        count, n = self.count(gate)
        return count / n


class Detections:
    """(b): every run of every scenario."""

    def __init__(self, runs: dict[Scenario, list[Detection]], horizon: int) -> None:
        self.runs = runs
        self.horizon = horizon

    def _index(self, sc: Scenario, before: int, alpha: float) -> int:
        return sc.before.index(before) * len(SEQ_ALPHAS) + SEQ_ALPHAS.index(alpha)

    def times(self, sc: Scenario, gate: Gate, before: int = 0) -> Times:
        """The sequential gate's (``before`` healthy seconds in the step before the fault) or a threshold setting's."""
        if isinstance(gate, float):
            i = self._index(sc, before, gate)
            return Times.of([run.sequential[i] for run in self.runs[sc]], self.horizon)
        i = SETTINGS.index(gate)
        return Times.of([run.threshold[i] for run in self.runs[sc]], self.horizon)

    def early(self, sc: Scenario, before: int, alpha: float = ALPHA) -> int:
        """Runs in which the sequential gate rejected before the fault (healthy evidence)."""
        i = self._index(sc, before, alpha)
        return sum(run.sequential[i] < 0 for run in self.runs[sc])


def fastest(fr: FalseRollbacks, det: Detections, reference: Scenario, settings: Iterable[Setting]) -> Setting | None:
    """Of ``settings``, the one with false rollbacks <= alpha that detects the reference fault fastest
    (median, then p90, then fewer false rollbacks); None: none stays within alpha."""
    allowed = [s for s in settings if fr.rate(s) <= ALPHA]
    if not allowed:
        return None
    return min(allowed, key=lambda s: (*det.times(reference, s).key(), fr.rate(s)))


@dataclass(frozen=True)
class Choice:
    """The threshold settings the tables show: the typical one, the best of the asked grid, or (when
    none of it stays within alpha) the asked setting with the fewest false rollbacks and the best
    with the larger limits."""

    gates: tuple[tuple[str, Setting], ...]
    best: Setting | None
    best_asked: bool
    per_window: dict[int, Setting | None]


def choose(fr: FalseRollbacks, det: Detections, reference: Scenario) -> Choice:
    asked = [s for s in SETTINGS if s[1] in ASKED_LIMITS]
    gates: list[tuple[str, Setting]] = [("threshold typical", TYPICAL)]
    best = fastest(fr, det, reference, asked)
    best_asked = best is not None
    if best is not None:
        gates.append(("threshold best", best))
    else:
        fewest = min(asked, key=lambda s: (fr.rate(s), *det.times(reference, s).key()))
        gates.append((f"threshold, fewest false rollbacks with limits <= {max(ASKED_LIMITS):g}", fewest))
        best = fastest(fr, det, reference, SETTINGS)
        if best is not None:
            gates.append((f"threshold best, limits up to {max(LIMITS):g}", best))
    per_window = {w: fastest(fr, det, reference, (s for s in SETTINGS if s[0] == w)) for w in WINDOWS}
    return Choice(tuple(gates), best, best_asked, per_window)


def print_false_rollbacks(fr: FalseRollbacks, choice: Choice) -> None:
    print(
        f"### (a) False rollbacks: {fr.n} migrations, equal error rates, weights {', '.join(map(str, WEIGHTS))} "
        f"x {STEP_CHECKS} checks, {MIGRATION_RPS:g} req/s in all\n"
    )
    print(
        "| gate | false rollbacks | rate | 95 % CI (Wilson) | alpha | per step | migrations without a burst "
        "| with bursts |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows: list[tuple[str, Gate]] = [(_gate(alpha), alpha) for alpha in SEQ_ALPHAS]
    rows += [(f"{title} ({_setting(s)})", s) for title, s in choice.gates]
    for title, gate in rows:
        count, n = fr.count(gate)
        split = [fr.count(gate, calm) for calm in (True, False)]
        cells = " | ".join(f"{_pct(c / m) if m else '-'} ({c} / {m})" for c, m in split)
        per_step = _pct(fr.steps(gate) / (n * len(WEIGHTS)))
        print(f"| {title} | {count} / {n} | {_pct(count / n)} | {_ci(count, n)} | {ALPHA:g} | {per_step} | {cells} |")
    print(
        f"\nEach step is a sequential test of its own, so a migration of {len(WEIGHTS)} steps at alpha {ALPHA:g} per "
        f"step is only bounded by {len(WEIGHTS)} x alpha; alpha {STRICT_ALPHA:g} per step bounds the whole migration "
        f"by {ALPHA:g} (the same runs, judged against 1/{STRICT_ALPHA:g}). Where the migrations were rolled back "
        "(the first rollback of each):\n"
    )
    print("| ASM weight | ASM req/s | " + " | ".join(title for title, _ in rows) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in rows) + " |")
    for step, weight in enumerate(WEIGHTS):
        cells = " | ".join(str(fr.at_step(gate, step)) for _, gate in rows)
        print(f"| {weight} | ~{MIGRATION_RPS * weight / 100:g} | {cells} |")


def print_detections(det: Detections, scenarios: Sequence[Scenario], choice: Choice, runs: int) -> None:
    horizon = det.horizon
    print(
        f"\n### (b) Detection: seconds from the fault to the rollback, median / p90 "
        f"(share detected within {horizon} s); {runs} runs each, ASM share {ASM_SHARE * 100:g} %\n"
    )
    columns: list[tuple[str, Gate, int]] = [
        ("sequential, fault at the step's start", ALPHA, 0),
        ("sequential, fault 60 s into the step", ALPHA, 60),
        (f"sequential at alpha {STRICT_ALPHA:g}, fault at the step's start", STRICT_ALPHA, 0),
    ]
    columns += [(f"{title} ({_setting(s)})", s, 0) for title, s in choice.gates]
    print("| fault | ASM req/s | " + " | ".join(title for title, _, _ in columns) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in columns) + " |")
    for sc in scenarios:
        cells = " | ".join(det.times(sc, gate, before).text(horizon) for _, gate, before in columns)
        print(f"| {_effect(sc.effect)} | {sc.asm_rps} | {cells} |")
    fired = sum(det.early(sc, 60) for sc in scenarios)
    print(
        f"\nThe threshold gates' windows hold the healthy traffic before the fault; their failure count starts at "
        f"the fault. The sequential gate rejected in the 60 healthy seconds before the fault in {fired} of "
        f"{len(scenarios) * runs} runs (counted as detected at 0 s)."
    )


def print_before(det: Detections, reference: Scenario) -> None:
    print(
        f"\n### Healthy evidence before the fault slows the sequential gate "
        f"({_effect(reference.effect)}, {reference.asm_rps} ASM req/s)\n"
    )
    print(
        f"| healthy seconds in the step before the fault | median / p90 s (within horizon) "
        f"| at alpha {STRICT_ALPHA:g} | rejected before the fault |"
    )
    print("| --- | --- | --- | --- |")
    for before in reference.before:
        cells = [det.times(reference, alpha, before).text(det.horizon) for alpha in SEQ_ALPHAS]
        print(f"| {before} | {' | '.join(cells)} | {det.early(reference, before)} |")


def print_sweep(fr: FalseRollbacks, det: Detections, reference: Scenario, choice: Choice) -> None:
    print(
        f"\n### Threshold gate: per window, the fastest setting with false rollbacks <= alpha "
        f"({_effect(reference.effect)}, {reference.asm_rps} ASM req/s)\n"
    )
    print(
        f"Limits {', '.join(f'{x:g}' for x in ASKED_LIMITS)} were asked for; "
        f"{', '.join(f'{x:g}' for x in LIMITS if x not in ASKED_LIMITS)} were added to find settings within alpha.\n"
    )
    print("| window | limit, threshold | false rollbacks (95 % CI) | median / p90 s (within horizon) |")
    print("| --- | --- | --- | --- |")
    for window, setting in choice.per_window.items():
        if setting is None:
            fewest = min((s for s in SETTINGS if s[0] == window), key=fr.rate)
            count, n = fr.count(fewest)
            print(
                f"| {window} s | none within alpha (fewest: {fewest[1]:g}, {fewest[2]}) | "
                f"{_pct(count / n)} ({_ci(count, n)}) | - |"
            )
            continue
        count, n = fr.count(setting)
        print(
            f"| {window} s | {setting[1]:g}, {setting[2]} | {_pct(count / n)} ({_ci(count, n)}) | "
            f"{det.times(reference, setting).text(det.horizon)} |"
        )
    if choice.best is None:
        print("\nNo setting of the sweep stays within alpha.")
    elif not choice.best_asked:
        print(
            f"\nNo setting with the asked limits stays within alpha; the fastest with the added limits: "
            f"{_setting(choice.best)}."
        )
    else:
        print(f"\nThe best setting: {_setting(choice.best)}.")


def print_targets(fr: FalseRollbacks, det: Detections, reference: Scenario) -> None:
    times = det.times(reference, ALPHA)
    print(f"\n### Targets ({_effect(reference.effect)}, {reference.asm_rps} ASM req/s, fault at the step's start)\n")
    for label, value, limit in (
        ("median <= 2 s", times.median, TARGET_MEDIAN_S),
        ("p90 <= 3 s", times.p90, TARGET_P90_S),
    ):
        print(f"- {label}: {value:.1f} s, {'met' if value <= limit else 'NOT met'}")
    for alpha in SEQ_ALPHAS:
        count, n = fr.count(alpha)
        verdict = "met" if count / n <= ALPHA else "NOT met"
        print(
            f"- false rollbacks per migration <= {ALPHA:g}, alpha {alpha:g} per step: {_pct(count / n)} "
            f"(95 % CI {_ci(count, n)}), {verdict}"
        )


@dataclass(frozen=True)
class ScrapedResult:
    scrape: Scrape
    rejected_steps: list[int]
    times: Times


def print_scraped(fr: FalseRollbacks, det: Detections, reference: Scenario, rows: Sequence[ScrapedResult]) -> None:
    print(
        "\n### (c) Counters as Prometheus serves them: each gateway's at its last scrape (sequential gate)\n\n"
        f"(a)'s migrations and (b)'s {_effect(reference.effect)} at {reference.asm_rps} ASM req/s (the evidence "
        f"starting at the check before the fault); alpha {ALPHA:g} per step; no delay between a scrape and the "
        "query; the traffic of a scrape setting is the same with and without sample times.\n"
    )
    if not TIMED:
        print("This controller's `Reading` takes no sample time: every row is read without.\n")
    print(
        "| counters | false rollbacks per migration (95 % CI) | per step | detection median / p90 s (within horizon) |"
    )
    print("| --- | --- | --- | --- |")
    count, n = fr.count(ALPHA)
    steps = fr.steps(ALPHA)
    print(
        f"| exact at every check (1 s), as in (a) and (b) | {_pct(count / n)} ({_ci(count, n)}) | "
        f"{_pct(steps / (n * len(WEIGHTS)))} | {det.times(reference, ALPHA).text(det.horizon)} |"
    )
    for row in rows:
        n = len(row.rejected_steps)
        count = sum(r > 0 for r in row.rejected_steps)
        steps = sum(row.rejected_steps)
        print(
            f"| {row.scrape.title()} | {_pct(count / n)} ({_ci(count, n)}) | {_pct(steps / (n * len(WEIGHTS)))} | "
            f"{row.times.text(det.horizon)} |"
        )


def provenance() -> str:
    """The commit, and whether controller/core/sequential.py differs from it (the code measured)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if not git("status", "--short", "--", "controller/core/sequential.py"):
        return f"controller/core/sequential.py as committed at {commit}"
    digest = hashlib.sha256((ROOT / "controller/core/sequential.py").read_bytes()).hexdigest()[:12]
    return f"controller/core/sequential.py with uncommitted changes over {commit} (sha256 {digest})"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    code = provenance()
    seed, horizon = args.seed, args.horizon
    command = shlex.join([".venv/bin/python", "bench/sequential.py", *(sys.argv[1:] if argv is None else argv)])

    fr = FalseRollbacks(_map(args.jobs, _migrations, [(seed, a, b) for a, b in _chunks(args.migrations)]))
    time_a = time.monotonic() - began

    scenarios = [
        Scenario(r, rps, BEFORE_LONG if (r, rps) == LONG_SCENARIO else BEFORE) for r in EFFECTS for rps in ASM_RPS
    ]
    flat = _map(args.jobs, _detections, [(seed, sc, a, b, horizon) for sc in scenarios for a, b in _chunks(args.runs)])
    det = Detections({sc: flat[i * args.runs : (i + 1) * args.runs] for i, sc in enumerate(scenarios)}, horizon)
    time_b = time.monotonic() - began - time_a

    scraped = [
        ScrapedResult(
            scrape,
            _map(args.jobs, _scraped_migrations, [(seed, scrape, a, b) for a, b in _chunks(args.scrape_migrations)]),
            Times.of(
                _map(
                    args.jobs,
                    _scraped_detections,
                    [(seed, scrape, a, b, horizon) for a, b in _chunks(args.scrape_runs)],
                ),
                horizon,
            ),
        )
        for scrape in SCRAPES
    ]
    time_c = time.monotonic() - began - time_a - time_b

    reference = next(sc for sc in scenarios if (sc.effect, sc.asm_rps) == LONG_SCENARIO)
    choice = choose(fr, det, reference)
    cost = observe_cost(seed)

    print("## Sequential gate: simulation study\n")
    print(f"`{command}` (seed {seed}; {os.cpu_count()} cores, {args.jobs} worker(s); {code})\n")
    print(
        f"alpha {ALPHA:g}, minEffect {MIN_EFFECT:g}; checks every 1 s; base 5xx rate {BASE_ERROR * 100:g} % on both "
        f"gateways with bursts hitting both; threshold gate: at least {MIN_REQUESTS} requests a window on each "
        "gateway\n"
    )
    print_false_rollbacks(fr, choice)
    print_detections(det, scenarios, choice, args.runs)
    print_before(det, reference)
    print_sweep(fr, det, reference, choice)
    print_scraped(fr, det, reference, scraped)
    print_targets(fr, det, reference)
    print(f"\nper-check cost: {cost:.1f} µs per `observe` call (median of 5 x 20 000 calls)")
    wall = time.monotonic() - began
    print(f"\nwall time {wall:.0f} s ((a) {time_a:.0f} s, (b) {time_b:.0f} s, (c) {time_c:.0f} s)")
    if args.json is not None:
        write_json(
            args,
            command=command,
            fr=fr,
            det=det,
            scenarios=scenarios,
            scraped=scraped,
            choice=choice,
            cost=cost,
            wall=wall,
        )
    return 0


def write_json(
    args: argparse.Namespace,
    *,
    command: str,
    fr: FalseRollbacks,
    det: Detections,
    scenarios: Sequence[Scenario],
    scraped: Sequence[ScrapedResult],
    choice: Choice,
    cost: float,
    wall: float,
) -> None:
    def false_rollbacks(gate: Gate) -> dict[str, Any]:
        count, n = fr.count(gate)
        return {"count": count, "rate": count / n, "ci": list(wilson(count, n)), "steps": fr.steps(gate)}

    report: dict[str, Any] = {
        "config": {
            "seed": args.seed,
            "migrations": fr.n,
            "runs": args.runs,
            "horizon_s": args.horizon,
            "alpha": ALPHA,
            "strict_alpha": STRICT_ALPHA,
            "min_effect": MIN_EFFECT,
            "command": command,
            "code": provenance(),
        },
        "false_rollbacks": {
            "sequential": {str(alpha): false_rollbacks(alpha) for alpha in SEQ_ALPHAS},
            "threshold": [{"setting": list(s), **false_rollbacks(s)} for s in SETTINGS],
        },
        "best": list(choice.best) if choice.best is not None else None,
        "best_within_asked_limits": choice.best_asked,
        "shown": {title: list(s) for title, s in choice.gates},
        "detection": [
            {
                "effect": sc.effect,
                "asm_rps": sc.asm_rps,
                "sequential": {
                    f"{alpha:g}": {str(b): vars(det.times(sc, alpha, b)) for b in sc.before} for alpha in SEQ_ALPHAS
                },
                "threshold": {title: vars(det.times(sc, s)) for title, s in choice.gates},
            }
            for sc in scenarios
        ],
        "scraped": [
            {
                "scrape": vars(row.scrape),
                "migrations": len(row.rejected_steps),
                "false_rollbacks": sum(r > 0 for r in row.rejected_steps),
                "rejected_steps": sum(row.rejected_steps),
                "detection": vars(row.times),
            }
            for row in scraped
        ],
        "observe_us": cost,
        "wall_s": wall,
    }
    args.json.write_text(json.dumps(_finite(report), indent=2, default=str) + "\n")


def _finite(value: Any) -> Any:
    """JSON has no Infinity: a time never reached is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds (CI)")
    parser.add_argument("--seed", type=int, default=1, help="the seed of every run (default 1)")
    parser.add_argument("--migrations", type=int, help="false-rollback study (default 10000; --quick 300)")
    parser.add_argument("--runs", type=int, help="detection runs per fault and rate (default 2000; --quick 30)")
    parser.add_argument("--horizon", type=int, help="seconds watched after a fault (default 600)")
    parser.add_argument("--scrape-migrations", type=int, help="(c): migrations per scrape setting (default 4000)")
    parser.add_argument("--scrape-runs", type=int, help="(c): detection runs per scrape setting (default 500)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: cores)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else DEFAULTS
    for key, value in size.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.migrations, args.runs, args.horizon, args.jobs, args.scrape_migrations, args.scrape_runs) < 1:
        parser.error("every size and --jobs must be at least 1")
    return args


if __name__ == "__main__":
    sys.exit(main())
