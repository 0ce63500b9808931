"""Judging one check: both gateways' samples + the policy's limits -> a CheckResult.

Each gate is judged on its own and needs only the data it uses: an absolute limit on the target
needs target traffic, a limit relative to the source needs traffic on both. So a target that is
plainly failing is reported as FAIL even while the source is too quiet to compare against, and a
FAIL is never hidden behind a sibling's INCONCLUSIVE.

"No data" is never read as 0: a query error is MetricsUnavailable, an empty answer NoData, NaN
NotANumber, and fewer than ``minRequests`` requests TooFewRequests.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from controller.core.enums import GatewayRole, InconclusiveCause, OnEmpty, Verdict
from controller.core.policy import CanaryPolicy
from controller.core.queries import (
    COUNTER_ERRORS,
    COUNTER_HISTOGRAM,
    COUNTER_REQUESTS,
    COUNTER_TIME,
    COUNTER_WITHIN,
    counters_query,
)
from controller.core.results import CheckResult, GateResult, GatewaySamples, QueryOutcome
from controller.core.sequential import (
    MAX_TARGETS,
    NO_NEW_SCRAPE,
    Evidence,
    Increment,
    Reading,
    confidence_sequence,
    estimate,
    log_e_value,
    observe,
)

__all__ = ["SequentialGateSpec", "describe_growth", "judge", "sequential_gates", "sequential_prior"]

#: When several gates are inconclusive, the check reports the most actionable cause.
_CAUSE_PRIORITY = (
    InconclusiveCause.METRICS_UNAVAILABLE,
    InconclusiveCause.TOO_FEW_REQUESTS,
    InconclusiveCause.NO_DATA,
    InconclusiveCause.NOT_A_NUMBER,
)


class _Unjudgeable(Exception):
    """Raised inside a gate when its inputs are missing; turned into an INCONCLUSIVE result."""

    def __init__(self, cause: InconclusiveCause, reason: str) -> None:
        super().__init__(reason)
        self.cause = cause
        self.reason = reason

    def result(self, gate: str, threshold: float, query: str, comparator: str = "<=") -> GateResult:
        """The gate's INCONCLUSIVE result, with why."""
        return GateResult(
            gate=gate,
            verdict=Verdict.INCONCLUSIVE,
            reason=f"{gate}: {self.reason}",
            threshold=threshold,
            comparator=comparator,
            cause=self.cause,
            query=query,
        )


def _number(outcome: QueryOutcome, what: str) -> float:
    if outcome.error is not None:
        raise _Unjudgeable(InconclusiveCause.METRICS_UNAVAILABLE, f"{what}: {outcome.error}")
    if outcome.value is None:
        raise _Unjudgeable(InconclusiveCause.NO_DATA, f"{what}: no data")
    if not outcome.has_number:
        raise _Unjudgeable(InconclusiveCause.NOT_A_NUMBER, f"{what}: not a number ({outcome.value})")
    return outcome.value


def _request_count(samples: GatewaySamples) -> float:
    """Requests in the window: an empty answer is no traffic (0). (Errors are the caller's to judge.)"""
    return samples.served or 0.0


def _traffic(samples: GatewaySamples, min_requests: int) -> float:
    """Requests in the window; an empty answer means no traffic (0), an error is unavailable."""
    outcome = samples.requests
    if outcome.error is not None:
        raise _Unjudgeable(InconclusiveCause.METRICS_UNAVAILABLE, f"{samples.role.value} requests: {outcome.error}")
    count = _request_count(samples)
    if count < min_requests:
        raise _Unjudgeable(
            InconclusiveCause.TOO_FEW_REQUESTS,
            f"{samples.role.value} had {count:.0f} requests in the window, needs {min_requests}",
        )
    return count


def _gate(
    name: str,
    query: QueryOutcome,
    threshold: float,
    compute: Callable[[], tuple[float, float | None]],
    *,
    comparator: str = "<=",
    unit: str = "",
) -> GateResult:
    """Run one gate's computation and turn its outcome into a result with its evidence."""
    try:
        value, baseline = compute()
    except _Unjudgeable as exc:
        return exc.result(name, threshold, query.query.promql, comparator)
    ok = value <= threshold if comparator == "<=" else value >= threshold
    shown = f"{value:.4g}{unit} {'within' if ok else 'breaks'} {comparator} {threshold:g}{unit}"
    if baseline is not None:
        shown += f" (source {baseline:.4g}{unit})"
    return GateResult(
        gate=name,
        verdict=Verdict.PASS if ok else Verdict.FAIL,
        reason=f"{name}: {shown}",
        value=value,
        threshold=threshold,
        comparator=comparator,
        baseline=baseline,
        query=query.query.promql,
    )


def judge(
    policy: CanaryPolicy,
    source: GatewaySamples,
    target: GatewaySamples,
    *,
    absolute_only: bool = False,
    evidence: Mapping[str, Evidence] | None = None,
) -> CheckResult:
    """Judge every configured gate and combine the verdicts.

    ``absolute_only``: the target alone, against its absolute limits (post-promotion verification,
    when the source has no traffic to compare with): the comparative gates are left out and the
    target must still have ``minRequests``. ``evidence``: the sequential gates' evidence so far in
    this step (``sequential_prior``); the result carries it updated.
    """
    if absolute_only:
        return _judge_absolute(policy, source, target)
    sequential = [
        _sequential_gate(gate, target, source, (evidence or {}).get(gate.name), policy.spec.analysis.min_requests)
        for gate in sequential_gates(policy)
    ]
    judged = _threshold_gates(policy, source, target)
    # Beside other gates, a sequential gate that only lacks traffic or a new scrape this check (its
    # first reading in a step, say) has no opinion, and is left out: it must not make every check
    # that starts a step inconclusive. Alone, or for any other reason, it counts as any gate does.
    opinions = [
        result for result, _ in sequential if not judged or result.cause is not InconclusiveCause.TOO_FEW_REQUESTS
    ]
    combined = _combine((*judged, *opinions), source, target, policy.spec.analysis.min_requests)
    return replace(combined, evidence=tuple(after for _, after in sequential))


def _threshold_gates(policy: CanaryPolicy, source: GatewaySamples, target: GatewaySamples) -> tuple[GateResult, ...]:
    """Every gate but the sequential ones, each judged on its own (combined by the caller)."""
    gates = policy.spec.gates
    minimum = policy.spec.analysis.min_requests
    results: list[GateResult] = []

    def target_only(outcome: QueryOutcome, what: str) -> Callable[[], tuple[float, float | None]]:
        def compute() -> tuple[float, float | None]:
            _traffic(target, minimum)
            return _number(outcome, f"target {what}"), None

        return compute

    def both(
        t: QueryOutcome, s: QueryOutcome, what: str, combine: Callable[[float, float], float]
    ) -> Callable[[], tuple[float, float | None]]:
        def compute() -> tuple[float, float | None]:
            _traffic(target, minimum)
            _traffic(source, minimum)
            t_value = _number(t, f"target {what}")
            s_value = _number(s, f"source {what}")
            return combine(t_value, s_value), s_value

        return compute

    if gates.error_rate is not None:
        if gates.error_rate.max is not None:
            results.append(
                _gate(
                    "errorRate",
                    target.error_rate,
                    gates.error_rate.max,
                    target_only(target.error_rate, "5xx ratio"),
                )
            )
        if gates.error_rate.max_increase is not None:
            results.append(
                _gate(
                    "errorRateIncrease",
                    target.error_rate,
                    gates.error_rate.max_increase,
                    both(target.error_rate, source.error_rate, "5xx ratio", lambda t, s: t - s),
                )
            )
    if gates.latency is not None:
        label = gates.latency.label
        if gates.latency.max_ms is not None:
            results.append(
                _gate(
                    f"latency{label.upper()}",
                    target.latency,
                    gates.latency.max_ms,
                    target_only(target.latency, f"{label} latency"),
                    unit="ms",
                )
            )
        if gates.latency.max_ratio is not None:
            results.append(
                _gate(
                    f"latency{label.upper()}Ratio",
                    target.latency,
                    gates.latency.max_ratio,
                    both(target.latency, source.latency, f"{label} latency", _ratio),
                )
            )
    if gates.response_mix.enabled:
        mix = gates.response_mix
        limits = (
            ("4xx", "responses4xx", mix.max_increase_4xx, "4xx"),
            ("auth", "responsesAuth", mix.max_increase_auth, "401/403"),
            ("noRoute", "responsesNoRoute", mix.max_increase_no_route, "404 NR (no route)"),
        )
        for kind, name, limit, what in limits:
            spec = _Excess(name, what, kind, "requests", limit)
            results.append(
                _excess_gate(spec, target, source, sigmas=mix.noise_sigmas, minimum=minimum, min_events=mix.min_excess)
            )
    if gates.tls_handshake is not None:
        limit = gates.tls_handshake.max_increase
        spec = _Excess("tlsHandshakeFailures", "TLS handshake failures", "tlsErrors", "connections", limit)
        mix = gates.response_mix
        results.append(
            _excess_gate(spec, target, source, sigmas=mix.noise_sigmas, minimum=minimum, min_events=mix.min_excess)
        )
    for custom in gates.custom:
        outcome = target.custom[custom.name]
        baseline = source.custom.get(custom.name)

        def measured(
            o: QueryOutcome = outcome,
            b: QueryOutcome | None = baseline,
            name: str = custom.name,
            zero: bool = custom.on_empty is OnEmpty.ZERO,
        ) -> tuple[float, float | None]:
            base = b.value if b is not None and b.has_number else None
            if zero and o.error is None and o.value is None:
                return 0.0, base  # the policy says an empty answer means "none of it"
            return _number(o, f"target {name}"), base

        if custom.max is not None:
            results.append(_gate(custom.name, outcome, custom.max, measured))
        if custom.min is not None:
            results.append(_gate(f"{custom.name}Min", outcome, custom.min, measured, comparator=">="))
    return tuple(results)


def gate_names(policy: CanaryPolicy, *, absolute_only: bool = False) -> tuple[str, ...]:
    """The gates a check judges (absolute_only: those post-promotion verification keeps)."""
    gates = policy.spec.gates
    names: list[str] = []
    if gates.error_rate is not None:
        if gates.error_rate.max is not None:
            names.append("errorRate")
        if gates.error_rate.max_increase is not None and not absolute_only:
            names.append("errorRateIncrease")
    if gates.latency is not None:
        label = gates.latency.label.upper()
        if gates.latency.max_ms is not None:
            names.append(f"latency{label}")
        if gates.latency.max_ratio is not None and not absolute_only:
            names.append(f"latency{label}Ratio")
    if gates.response_mix.enabled and not absolute_only:
        names += ["responses4xx", "responsesAuth", "responsesNoRoute"]
    if gates.tls_handshake is not None and not absolute_only:
        names.append("tlsHandshakeFailures")
    names += [custom.name for custom in gates.custom]
    if not absolute_only:
        names += [gate.name for gate in sequential_gates(policy)]
    return tuple(names)


def _judge_absolute(policy: CanaryPolicy, source: GatewaySamples, target: GatewaySamples) -> CheckResult:
    comparative = set(gate_names(policy)) - set(gate_names(policy, absolute_only=True))
    kept = tuple(g for g in _threshold_gates(policy, source, target) if g.gate not in comparative)
    minimum = policy.spec.analysis.min_requests
    count = _request_count(target)
    traffic = GateResult(
        gate="targetRequests",
        verdict=Verdict.PASS,
        reason=f"targetRequests: {count:.0f} requests in the window",
        value=count,
        threshold=float(minimum),
        comparator=">=",
        query=target.requests.query.promql,
    )
    if target.requests.error is not None:
        traffic = _Unjudgeable(
            InconclusiveCause.METRICS_UNAVAILABLE, f"target requests: {target.requests.error}"
        ).result("targetRequests", float(minimum), target.requests.query.promql, ">=")
    elif count < minimum:
        traffic = _Unjudgeable(
            InconclusiveCause.TOO_FEW_REQUESTS, f"target had {count:.0f} requests in the window, needs {minimum}"
        ).result("targetRequests", float(minimum), target.requests.query.promql, ">=")
    if not kept:  # no gate left judges the ASM gateway's health: that is no pass
        why = "no absolute gate (errorRate.max, a latency pNNMs.max, a custom gate) judges the ASM gateway alone"
        kept = (_Unjudgeable(InconclusiveCause.NO_DATA, why).result("absoluteGates", 0.0, "", ">="),)
    combined = _combine((traffic, *kept), source, target, minimum)
    starved = tuple(role for role in combined.starved if role is GatewayRole.TARGET)
    return replace(combined, starved=starved)


@dataclass(frozen=True, slots=True)
class _Excess:
    """One comparison of a kind of event per request (or connection), target against source."""

    name: str
    what: str
    kind: str
    per: str
    limit: float


def _excess_gate(
    spec: _Excess, target: GatewaySamples, source: GatewaySamples, *, sigmas: float, minimum: int, min_events: int
) -> GateResult:
    """Target ratio of ``kind`` per ``per`` against the source's: FAIL when the excess is over
    ``limit`` AND over ``sigmas`` standard deviations of a two-proportion test (both serve the
    same clients, so their ratios differ only by chance unless something is missing)."""
    name, what, kind, per, limit = spec.name, spec.what, spec.kind, spec.per, spec.limit
    query = target.mix[kind].query.promql
    try:
        counts = []
        for samples in (target, source):
            events = _number(samples.mix[kind], f"{samples.role.value} {what}")
            if per == "requests":
                total = _traffic(samples, minimum)
            else:
                total = _number(samples.mix[per], f"{samples.role.value} {per}")
                if total < minimum:
                    raise _Unjudgeable(
                        InconclusiveCause.TOO_FEW_REQUESTS,
                        f"{samples.role.value} had {total:.0f} {per} in the window, needs {minimum}",
                    )
            counts.append((min(events, total), total))
    except _Unjudgeable as exc:
        return exc.result(name, limit, query)
    (t_events, t_total), (s_events, s_total) = counts
    t_ratio, s_ratio = t_events / t_total, s_events / s_total
    excess = t_ratio - s_ratio
    pooled = (t_events + s_events) / (t_total + s_total)
    noise = math.sqrt(pooled * (1 - pooled) * (1 / t_total + 1 / s_total))
    # the normal approximation fails for a handful of events: a few more than expected are required too
    significant = excess > sigmas * noise and t_events - s_ratio * t_total >= min_events
    failed = excess > limit and significant
    standing = f"{excess / noise:.1f} sigma" if noise > 0 else "no noise"
    shown = (
        f"{what} {t_ratio:.2%} on the target vs {s_ratio:.2%} on the source: "
        f"+{excess:.2%} {'breaks' if failed else 'within'} <= {limit:.2%} ({standing}, {t_events:.0f} of {t_total:.0f})"
    )
    return GateResult(
        gate=name,
        verdict=Verdict.FAIL if failed else Verdict.PASS,
        reason=f"{name}: {shown}",
        value=excess,
        threshold=limit,
        baseline=s_ratio,
        query=query,
    )


def _ratio(target: float, source: float) -> float:
    if source <= 0:
        raise _Unjudgeable(InconclusiveCause.NOT_A_NUMBER, f"source latency is {source}, no ratio")
    return target / source


def _starved(samples: GatewaySamples, minimum: int) -> bool:
    return samples.requests.error is None and _request_count(samples) < minimum


def _combine(
    results: tuple[GateResult, ...], source: GatewaySamples, target: GatewaySamples, minimum: int
) -> CheckResult:
    starved = tuple(s.role for s in (source, target) if _starved(s, minimum))
    failed = [r for r in results if r.verdict is Verdict.FAIL]
    unsure = [r for r in results if r.verdict is Verdict.INCONCLUSIVE]
    cause: InconclusiveCause | None = None
    if failed:
        verdict, reason = Verdict.FAIL, "; ".join(r.reason for r in failed)
    elif unsure:
        causes = {r.cause for r in unsure}
        cause = next(c for c in _CAUSE_PRIORITY if c in causes)
        reasons = dict.fromkeys(r.reason.split(": ", 1)[-1] for r in unsure if r.cause is cause)
        verdict, reason = Verdict.INCONCLUSIVE, "; ".join(reasons)
    else:
        verdict, reason = Verdict.PASS, "; ".join(r.reason for r in results)
    return CheckResult(
        verdict=verdict,
        gates=results,
        reason=reason,
        cause=cause,
        starved=starved,
        source=source,
        target=target,
        baseline=_baseline(source, target, minimum),
    )


def _baseline(source: GatewaySamples, target: GatewaySamples, minimum: int) -> GateResult:
    """Is the source a baseline to start against (R7)? Every query answered, enough source traffic.

    An erroring query is never "ready": the source's numbers are unknown, and so is whether
    Prometheus can see the target once it gets traffic.
    """
    errors = [o for samples in (source, target) for o in samples.outcomes() if o.error is not None]
    count = _request_count(source)
    if errors:
        verdict, cause = Verdict.INCONCLUSIVE, InconclusiveCause.METRICS_UNAVAILABLE
        reason = f"baseline: {len(errors)} quer{'y' if len(errors) == 1 else 'ies'} failed: {errors[0].error}"
    elif count < minimum:
        verdict, cause = Verdict.INCONCLUSIVE, InconclusiveCause.TOO_FEW_REQUESTS
        reason = f"baseline: {GatewayRole.SOURCE.value} had {count:.0f} requests in the window, needs {minimum}"
    else:
        verdict, cause = Verdict.PASS, None
        reason = f"baseline: {GatewayRole.SOURCE.value} answered with {count:.0f} requests"
    return GateResult(
        gate="baseline",
        verdict=verdict,
        reason=reason,
        value=None if errors else count,
        threshold=float(minimum),
        comparator=">=",
        cause=cause,
        query=source.requests.query.promql,
    )


def describe_growth(
    target: Sequence[tuple[Mapping[str, str], float]],
    source: Sequence[tuple[Mapping[str, str], float]],
    target_requests: float,
    source_requests: float,
    top: int = 3,
) -> str | None:
    """The label sets (code, flags, route) whose share of ALL requests grew most on the target.

    Shares of each gateway's requests, so the gateways' different traffic does not matter and a
    kind both have (a scanner's 404 NR on both) still shows by how much it grew.
    """

    def shares(
        series: Sequence[tuple[Mapping[str, str], float]], requests: float
    ) -> dict[tuple[tuple[str, str], ...], float]:
        if requests <= 0:
            return {}
        return {
            tuple(sorted(labels.items())): value / requests
            for labels, value in series
            if math.isfinite(value) and value > 0
        }

    mine, theirs = shares(target, target_requests), shares(source, source_requests)
    growth = sorted(((share - theirs.get(key, 0.0), key) for key, share in mine.items()), reverse=True)
    named = [
        f"{_labels(key)}: {mine[key]:.2%} of the target's requests vs {theirs.get(key, 0.0):.2%} of the source's"
        for grew, key in growth[:top]
        if grew > 0
    ]
    return "; ".join(named) or None


def _labels(key: tuple[tuple[str, str], ...]) -> str:
    values = dict(key)
    code, flags = values.pop("response_code", "?"), values.pop("response_flags", "-")
    route = ", ".join(f"{name}={value}" for name, value in sorted(values.items()))
    return f"{code} {flags}" + (f" ({route})" if route else "")


# --- the sequential gates (controller.core.sequential) ---------------------------------------------


#: checks without a new scrape of both gateways over which a sequential gate's verdict stands
STANDING_CHECKS = 2
#: a scrape target's name as kept in the state
_INSTANCE_CHARS = 128


@dataclass(frozen=True, slots=True)
class SequentialGateSpec:
    """One sequential gate of a policy: what it counts as bad, and its settings."""

    name: str
    #: what a bad request is, in words
    what: str
    alpha: float
    min_effect: float
    #: the counters (``counters_query``'s names) of all requests and of the good or bad ones
    total: str
    part: str
    #: ``part`` counts the good requests (histogram bucket): bad = total - part
    part_is_good: bool
    #: the settings the evidence was gathered under (a change starts it afresh)
    settings: str


def sequential_gates(policy: CanaryPolicy) -> tuple[SequentialGateSpec, ...]:
    """The policy's sequential gates: 5xx (``errorRate.sequential``), slow requests (``latency.sequential``)."""
    gates = policy.spec.gates
    found: list[SequentialGateSpec] = []
    errors = gates.error_rate.sequential if gates.error_rate is not None else None
    if errors is not None:
        alpha, effect = errors.alpha, errors.min_effect
        found.append(
            SequentialGateSpec(
                "errorRateSequential", "5xx", alpha, effect, COUNTER_REQUESTS, COUNTER_ERRORS, False,
                f"alpha={alpha:g},minEffect={effect:g}",
            )
        )  # fmt: skip
    latency = gates.latency
    slow_ms = latency.slow_ms if latency is not None else None
    if latency is not None and latency.sequential is not None and slow_ms is not None:
        alpha, effect = latency.sequential.alpha, latency.sequential.min_effect
        found.append(
            SequentialGateSpec(
                "latencySequential", f"requests slower than {slow_ms:g}ms", alpha, effect, COUNTER_HISTOGRAM,
                COUNTER_WITHIN, True, f"alpha={alpha:g},minEffect={effect:g},slowerThanMs={slow_ms:g}",
            )
        )  # fmt: skip
    return tuple(found)


def sequential_prior(
    policy: CanaryPolicy, stored: Sequence[Evidence], target_weight: int, source_weight: int | None
) -> dict[str, Evidence]:
    """The evidence each sequential gate starts this check from: what the state kept, when it was
    gathered at these weights under these settings; else none (a new step, a rollback, an edit)."""
    prior: dict[str, Evidence] = {}
    # what is counted (selectors and all) is part of the key: a changed selector counts other series
    asked = "".join(query.promql for role in GatewayRole if (query := counters_query(policy, role)) is not None)
    counted = hashlib.sha256(asked.encode()).hexdigest()[:12]
    for gate in sequential_gates(policy):
        step = f"{target_weight}/{source_weight}/{gate.settings}/{counted}"
        kept = next((e for e in stored if e.gate == gate.name and e.step == step), None)
        prior[gate.name] = kept or Evidence(gate.name, step)
    return prior


def _reading(
    samples: GatewaySamples, gate: SequentialGateSpec
) -> tuple[tuple[Reading, ...] | None, _Unjudgeable | None]:
    """A gateway's counters for ``gate``, one Reading per scrape target; None with why when they
    cannot be read."""
    role = samples.role.value
    series = samples.counters
    if series is None:
        return None, _Unjudgeable(InconclusiveCause.NO_DATA, f"{role} counters were not asked")
    if series.error is not None:
        return None, _Unjudgeable(InconclusiveCause.METRICS_UNAVAILABLE, f"{role} counters: {series.error}")
    targets = sorted(instance for name, instance in series.values if name == gate.total)
    if not targets:
        # no series: the gateway never served a request (or its counters are gone); bases are kept
        return None, _Unjudgeable(InconclusiveCause.TOO_FEW_REQUESTS, f"{role} has no request counter")
    if len(targets) > MAX_TARGETS:
        why = f"{role} has {len(targets)} scrape targets, more than the {MAX_TARGETS} a sequential gate follows"
        return None, _Unjudgeable(InconclusiveCause.NO_DATA, why)
    readings = []
    for instance in targets:
        total = series.values[(gate.total, instance)]
        part = series.values.get((gate.part, instance))
        if part is None:  # only a bucket can be missing (5xx are 0 without series)
            bound = gate.what.rsplit(" ", 1)[-1]
            why = f"{role} has no latency histogram bucket at {bound}: slowerThanMs must be a bucket bound"
            return None, _Unjudgeable(InconclusiveCause.NO_DATA, why)
        at = series.values.get((COUNTER_TIME, instance))
        bad = total - part if gate.part_is_good else part
        if not all(math.isfinite(value) and value >= 0 for value in (total, bad, at if at is not None else 0.0)):
            return None, _Unjudgeable(InconclusiveCause.NOT_A_NUMBER, f"{role} counters are not counts")
        readings.append(Reading(requests=total, events=bad, time=at, instance=instance[:_INSTANCE_CHARS]))
    return tuple(readings), None


def _sequential_gate(
    gate: SequentialGateSpec,
    target: GatewaySamples,
    source: GatewaySamples,
    prior: Evidence | None,
    minimum: int,
) -> tuple[GateResult, Evidence]:
    """Count this check's increments into the evidence and judge it.

    FAIL (decisive) once the e-value reached 1/alpha in this step (confirmed: see ``observe``);
    INCONCLUSIVE while a rejection waits for confirmation; PASS only when the last interval counted
    had requests on both gateways and each had ``minRequests`` since the step began (it never passes
    on no traffic; without a new scrape of both the last verdict stands for ``STANDING_CHECKS``);
    else INCONCLUSIVE, saying why.
    """
    before = prior or Evidence(gate.name, "")
    t_reading, t_problem = _reading(target, gate)
    s_reading, s_problem = _reading(source, gate)
    after, increment, note = observe(before, t_reading, s_reading, gate.min_effect, gate.alpha)
    e_value = math.exp(min(log_e_value(after), 700.0))
    low, high = confidence_sequence(after, gate.alpha)
    totals, recent = after.totals, after.recent
    ratio = estimate(totals)
    level = f"{(1 - gate.alpha) * 100:g}%"
    step_ratio = "no estimate yet" if ratio is None else f"{ratio:.3g}x the source's"
    counts = f"{_counts(totals)} in {after.intervals} interval(s) this step"
    steady = f"{level} CS [{_bound(low)}, {_bound(high)}] if steady"
    if after.rejected:
        # the numbers since the statistic's low: where the excess most likely began (a late break
        # in a long step is not averaged away by the healthy time before it)
        since = estimate(recent)
        shown = "no estimate" if since is None else f"{since:.3g}x the source's"
        statement = (
            f"target {gate.what} rate {shown} since it most likely began ({_counts(recent)}); this step "
            f"{step_ratio}, {steady}; the test rejected: e-value reached {1 / gate.alpha:g} (now {e_value:.3g})"
        )
    else:
        statement = (
            f"target {gate.what} rate {step_ratio} this step, {steady}; e-value {e_value:.3g} < "
            f"{1 / gate.alpha:g}; {counts}"
        )
    query = target.counters.query.promql if target.counters is not None else ""

    def result(verdict: Verdict, reason: str, cause: InconclusiveCause | None = None) -> GateResult:
        return GateResult(
            gate=gate.name,
            verdict=verdict,
            reason=f"{gate.name}: {reason}",
            value=e_value,
            threshold=1 / gate.alpha,
            comparator="<",
            baseline=ratio,
            cause=cause,
            query=query,
            decisive=verdict is Verdict.FAIL,
        )

    if after.rejected:
        return result(Verdict.FAIL, f"credibly worse: {statement}"), after
    problem = t_problem or s_problem
    if after.confirming is not None:  # never a pass while a rejection waits for the other gateway
        why = f"the test reached 1/alpha and waits for both gateways' scrapes past {after.confirming:.3f} to confirm"
        problem = _Unjudgeable(InconclusiveCause.NO_DATA, why)
    # no new scrape of both since the last check: the last verdict stands for a check or two (a
    # check a little more often than the scrapes is no inconclusive one); after that, no pass
    standing = note == NO_NEW_SCRAPE and after.intervals > 0 and after.waited <= STANDING_CHECKS
    if problem is None and note is not None and not standing:
        problem = _Unjudgeable(InconclusiveCause.TOO_FEW_REQUESTS, note)
    if problem is None and (increment is not None or standing):
        if after.quiet:
            problem = _Unjudgeable(InconclusiveCause.TOO_FEW_REQUESTS, "no requests on a gateway in the last interval")
        elif min(totals.target_requests, totals.source_requests) < minimum:
            why = f"fewer than {minimum} requests on each gateway this step"
            problem = _Unjudgeable(InconclusiveCause.TOO_FEW_REQUESTS, why)
    if problem is not None:
        return result(Verdict.INCONCLUSIVE, f"{problem.reason} ({statement})", problem.cause), after
    return result(Verdict.PASS, f"no evidence of harm: {statement}"), after


def _counts(counts: Increment) -> str:
    return (
        f"target {counts.target_events:.0f} of {counts.target_requests:.0f} requests, source "
        f"{counts.source_events:.0f} of {counts.source_requests:.0f}"
    )


def _bound(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3g}"
