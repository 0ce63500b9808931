"""Measuring both gateways: run every query of a check concurrently, errors as values.

Concurrency matters against a remote Prometheus (ARMS): a check's latency is that of its
slowest query, not the sum, and so is the time to a rollback.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from controller.core.enums import GatewayRole, Verdict
from controller.core.gates import describe_growth, judge
from controller.core.policy import CanaryPolicy
from controller.core.queries import COUNTER_NAMES, CheckQueries, SharedMeasure, queries_for
from controller.core.results import CheckResult, CounterSeries, GatewaySamples, QueryOutcome, RenderedQuery
from controller.core.sequential import Evidence
from controller.errors import MetricsUnavailable
from controller.ports import MetricsSource
from controller.runtime.sharing import MISSING, SharedQueries

__all__ = ["Collector"]

#: response-mix gates and the kind of response each counts
_MIX_GATES = {"responses4xx": "4xx", "responsesAuth": "auth", "responsesNoRoute": "noRoute"}


class Collector:
    """Runs a policy's queries through a MetricsSource and judges the answers.

    ``share_seconds`` > 0: the built-in measures are asked through ``SharedQueries`` (one query
    for all the policies on a Prometheus that answers groups), each answer at most that old and
    never older than half the policy's interval; 0: every check asks its own.
    """

    def __init__(self, *, workers: int = 8, share_seconds: float = 0.0) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="queries")
        self._share_seconds = share_seconds
        self.shared = SharedQueries()

    def check(
        self,
        policy: CanaryPolicy,
        source: MetricsSource,
        *,
        absolute_only: bool = False,
        evidence: Mapping[str, Evidence] | None = None,
    ) -> CheckResult:
        """One complete check of both gateways; a failed response-mix gate says which routes grew.

        ``evidence``: the sequential gates' so far in this step (``gates.sequential_prior``).
        """
        plans = queries_for(policy)
        max_age = min(self._share_seconds, policy.spec.analysis.interval.total_seconds() / 2)
        share = max_age > 0 and getattr(source, "answers_groups", False) is True

        def shared(plan: CheckQueries, query: RenderedQuery, measure: SharedMeasure, lead: bool) -> QueryOutcome | None:
            """The gateway's value from a shared answer; None: none serves it yet (and ``lead`` was off)."""
            started = time.perf_counter()
            try:
                value = self.shared.ask(
                    source, measure, query, plan.labels, asker=policy.name, max_age=max_age, lead_if_missing=lead
                )
            except MetricsUnavailable as exc:
                # The shared query failed: for its size (a server's limit on samples, series or time),
                # its form (a POST), the wait for it, or the server itself. Only this gateway's own
                # query tells which, so it is asked, as every check did before sharing: one gateway's
                # evidence never depends on a query about hundreds of others.
                own = _ask(source, query)
                return replace(own, seconds=time.perf_counter() - started, error=own.error and f"{own.error} ({exc})")
            if value is MISSING:
                return None
            return QueryOutcome(query, value=value, seconds=time.perf_counter() - started)

        def ask(plan: CheckQueries, query: RenderedQuery) -> QueryOutcome:
            measure = plan.shared.get(query) if share else None
            if measure is None:
                return _ask(source, query)
            outcome = shared(plan, query, measure, True)
            assert outcome is not None
            return outcome

        asked = [(plan, query) for plan in plans.values() for query in plan.all()]
        outcomes: dict[RenderedQuery, QueryOutcome] = {}
        pending = {}
        if share:  # the own queries (custom gates) are sent first; meanwhile an answer already there
            # (or on its way) is a lookup on this thread; only what none serves yet needs a thread
            pending = {
                query: self._pool.submit(_ask, source, query) for plan, query in asked if query not in plan.shared
            }
            for plan, query in asked:
                if query in plan.shared:
                    found = shared(plan, query, plan.shared[query], False)
                    if found is not None:
                        outcomes[query] = found
        counted = [plan.counters for plan in plans.values() if plan.counters is not None and not absolute_only]
        counters = {query: self._pool.submit(_counters, source, query) for query in counted}
        pending |= {q: self._pool.submit(ask, p, q) for p, q in asked if q not in outcomes and q not in pending}
        outcomes.update({query: future.result() for query, future in pending.items()})
        read = {query: future.result() for query, future in counters.items()}
        result = judge(
            policy,
            _samples(plans[GatewayRole.SOURCE], outcomes, read),
            _samples(plans[GatewayRole.TARGET], outcomes, read),
            absolute_only=absolute_only,
            evidence=evidence,
        )
        failed = [gate.gate for gate in result.gates if gate.verdict is Verdict.FAIL and gate.gate in _MIX_GATES]
        if not failed:
            return result
        details = self._breakdowns(plans, failed, source, result)
        gates = tuple(replace(g, detail=details.get(g.gate)) if g.gate in details else g for g in result.gates)
        return replace(result, gates=gates)

    def _breakdowns(
        self, plans: dict[GatewayRole, CheckQueries], failed: list[str], source: MetricsSource, result: CheckResult
    ) -> dict[str, str | None]:
        """Per failed gate, the responses that grew most on the target by route labels (None: unknown).

        All asked at once (one round trip before the rollback decision, not one per gate); any
        trouble only loses the detail, never the check.
        """
        roles = (GatewayRole.TARGET, GatewayRole.SOURCE)
        asked = [plans[role].breakdown(_MIX_GATES[gate]) for gate in failed for role in roles]
        try:
            answers = list(self._pool.map(source.query_vector, asked))
        except Exception:  # a detail for the alert: never worth a failed check
            return dict.fromkeys(failed)
        totals = [_request_total(result.target), _request_total(result.source)]
        return {
            gate: describe_growth(answers[2 * i], answers[2 * i + 1], totals[0], totals[1])
            for i, gate in enumerate(failed)
        }

    def close(self) -> None:
        """Stop the worker threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _request_total(samples: GatewaySamples | None) -> float:
    served = None if samples is None else samples.served
    return max(served or 0.0, 0.0)


def _ask(source: MetricsSource, query: RenderedQuery) -> QueryOutcome:
    started = time.perf_counter()
    try:
        value = source.query(query)
    except MetricsUnavailable as exc:
        return QueryOutcome(query, error=str(exc), seconds=time.perf_counter() - started)
    return QueryOutcome(query, value=value, seconds=time.perf_counter() - started)


def _counters(source: MetricsSource, query: RenderedQuery) -> CounterSeries:
    """The sequential gates' raw counters by (name, scrape target)."""
    started = time.perf_counter()
    try:
        answer = source.query_vector(query)
    except MetricsUnavailable as exc:
        return CounterSeries(query, error=str(exc), seconds=time.perf_counter() - started)
    values: dict[tuple[str, str], float] = {}
    for labels, value in answer:
        key = (labels.get("counter", ""), labels.get("instance", ""))
        if key in values:  # two series for one counter of one target: not what was asked, never guessed
            why = f"two series for the counter {key[0]} of {key[1] or 'one target'}"
            return CounterSeries(query, error=why, seconds=time.perf_counter() - started)
        if key[0] in COUNTER_NAMES:
            values[key] = value
    return CounterSeries(query, values=values, seconds=time.perf_counter() - started)


def _samples(
    plan: CheckQueries,
    outcomes: dict[RenderedQuery, QueryOutcome],
    counters: Mapping[RenderedQuery, CounterSeries],
) -> GatewaySamples:
    read = counters.get(plan.counters) if plan.counters is not None else None
    return GatewaySamples(
        role=plan.role,
        requests=outcomes[plan.requests],
        error_rate=outcomes[plan.error_rate],
        latency=outcomes[plan.latency],
        custom={name: outcomes[query] for name, query in plan.custom.items()},
        mix={kind: outcomes[query] for kind, query in plan.mix.items()},
        counters=read,
    )
