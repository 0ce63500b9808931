"""Measuring both gateways: run every query of a check concurrently, errors as values.

Concurrency matters against a remote Prometheus (ARMS): a check's latency is that of its
slowest query, not the sum, and so is the time to a rollback.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from controller.core.enums import GatewayRole
from controller.core.gates import judge
from controller.core.policy import CanaryPolicy
from controller.core.queries import CheckQueries, queries_for
from controller.core.results import CheckResult, GatewaySamples, QueryOutcome, RenderedQuery
from controller.errors import MetricsUnavailable
from controller.ports import MetricsSource

__all__ = ["Collector"]


class Collector:
    """Runs a policy's queries through a MetricsSource and judges the answers."""

    def __init__(self, *, workers: int = 8) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="queries")

    def check(self, policy: CanaryPolicy, source: MetricsSource) -> CheckResult:
        """One complete check of both gateways."""
        plans = queries_for(policy)
        queries = [query for plan in plans.values() for query in plan.all()]
        outcomes = dict(zip(queries, self._pool.map(lambda q: _ask(source, q), queries), strict=True))
        return judge(
            policy,
            _samples(plans[GatewayRole.SOURCE], outcomes),
            _samples(plans[GatewayRole.TARGET], outcomes),
        )

    def close(self) -> None:
        """Stop the worker threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _ask(source: MetricsSource, query: RenderedQuery) -> QueryOutcome:
    started = time.perf_counter()
    try:
        value = source.query(query)
    except MetricsUnavailable as exc:
        return QueryOutcome(query, error=str(exc), seconds=time.perf_counter() - started)
    return QueryOutcome(query, value=value, seconds=time.perf_counter() - started)


def _samples(plan: CheckQueries, outcomes: dict[RenderedQuery, QueryOutcome]) -> GatewaySamples:
    return GatewaySamples(
        role=plan.role,
        requests=outcomes[plan.requests],
        error_rate=outcomes[plan.error_rate],
        latency=outcomes[plan.latency],
        custom={name: outcomes[query] for name, query in plan.custom.items()},
    )
