"""The rules of shared queries (controller.runtime.sharing), model-based: policies ask for their
gateways' measures at random moments with random ages allowed, while the source fails, drops a
gateway's series or answers +Inf for one; every answer must be fresh enough, newer than what that
policy judged before (no evidence counted twice), exactly that gateway's value, and a fault must
reach only the gateways it hit. Plus the threaded case: checks asking while a query is in flight
wait for it instead of sending their own.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from controller.core.enums import GatewayRole, Measure
from controller.core.queries import SharedMeasure
from controller.core.results import RenderedQuery
from controller.errors import MetricsUnavailable
from controller.runtime.sharing import SharedQueries
from tests.servers import wait_for

GATEWAYS = [{"reporter": "source", "source_workload": f"gw-{i}", "source_workload_namespace": "ns"} for i in range(4)]
POLICIES = {"a": (0, 1), "b": (2, 3), "c": (1, 3)}  # c shares gateways with a and b (a rollout of a rollout)
MEASURES = [
    SharedMeasure(Measure.ERROR_RATE, "1m", ("reporter", "source_workload", "source_workload_namespace")),
    SharedMeasure(Measure.RESPONSES, "1m", ("reporter", "source_workload", "source_workload_namespace"), "4xx"),
]
QUERY = RenderedQuery("unused", Measure.ERROR_RATE, GatewayRole.TARGET)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FaultySource:
    """Answers each group with ``100 * answer number + gateway number``; faults are armed for the next query."""

    answers_groups = True

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.sent_at: list[float] = []  # answer number -> when it was asked
        self.fail_next = False
        self.drop_next: int | None = None
        self.infinite_next: int | None = None
        self.faults: dict[int, dict[str, int | None]] = {}  # answer number -> fault -> gateway hit
        self.latest: dict[int, int] = {}  # measure (index in MEASURES) -> number of its latest answer
        self.named: dict[int, tuple[int, set[int]]] = {}  # answer number -> (measure, gateways it names)

    def query(self, query: RenderedQuery) -> float | None:
        raise AssertionError("a shared measure is asked as a vector")

    def query_vector(self, query: RenderedQuery) -> list[tuple[dict[str, str], float]]:
        number = len(self.sent_at)
        self.sent_at.append(self.clock())
        measure = 1 if 'response_code=~"4.."' in query.promql else 0
        self.latest[measure] = number
        self.named[number] = (measure, {int(dict(g)["source_workload"].removeprefix("gw-")) for g in query.groups})
        assert query.groups, "a shared query names the gateways it groups by"
        if self.fail_next:
            self.fail_next = False
            self.faults[number] = {"failed": None}
            raise MetricsUnavailable(f"answer {number} failed")
        series = []
        for group in query.groups:
            labels = dict(group)
            index = int(labels["source_workload"].removeprefix("gw-"))
            if index == self.drop_next:
                self.faults.setdefault(number, {})["dropped"] = index
                continue
            value = float("inf") if index == self.infinite_next else 100.0 * number + index
            if index == self.infinite_next:
                self.faults.setdefault(number, {})["infinite"] = index
            series.append(({**labels, "extra": "ignored"}, value))
        self.drop_next = self.infinite_next = None
        return series


class SharingMachine(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.clock = Clock()
        self.source = FaultySource(self.clock)
        self.shared = SharedQueries(clock=self.clock)
        self.judged: dict[tuple[str, int, int], int] = {}  # (policy, measure, gateway) -> answer number
        self.asks = 0

    @rule(seconds=st.sampled_from([0.0, 0.05, 0.3, 0.9, 2.5, 700.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule()
    def next_query_fails(self) -> None:
        self.source.fail_next = True

    @rule(gateway=st.integers(0, 3))
    def next_query_drops(self, gateway: int) -> None:
        self.source.drop_next = gateway

    @rule(gateway=st.integers(0, 3))
    def next_query_infinite(self, gateway: int) -> None:
        self.source.infinite_next = gateway

    @rule(
        policy=st.sampled_from(sorted(POLICIES)),
        measure=st.integers(0, len(MEASURES) - 1),
        max_age=st.sampled_from([0.1, 0.5, 1.0, 2.0]),
        which=st.integers(0, 1),
    )
    def check(self, policy: str, measure: int, max_age: float, which: int) -> None:
        gateway = POLICIES[policy][which]
        before = len(self.source.sent_at)
        self.asks += 1
        try:
            value: float | None = self.shared.ask(
                self.source, MEASURES[measure], QUERY, GATEWAYS[gateway], asker=policy, max_age=max_age
            )
            error = None
        except MetricsUnavailable as exc:
            value, error = None, str(exc)
        # which answer served this check: a new one, or the newest of this measure that names the gateway
        if len(self.source.sent_at) > before:
            number = self.source.latest[measure]
        else:
            number = max(n for n, (m, named) in self.source.named.items() if m == measure and gateway in named)
        assert len(self.source.sent_at) - before <= 1, "one check of one gateway sends one query at most"
        faults = self.source.faults.get(number, {})
        # fresh enough, and never an answer this policy judged for this gateway before
        assert self.clock.now - self.source.sent_at[number] <= max_age
        previous = self.judged.get((policy, measure, gateway))
        assert previous is None or number > previous, f"answer {number} judged twice by {policy}"
        self.judged[(policy, measure, gateway)] = number
        # exactly this gateway's value; a fault reaches only the gateways it hit
        if "failed" in faults:
            assert error is not None and f"answer {number} failed" in error
        elif faults.get("infinite", -1) == gateway:
            assert error is not None and "no finite value" in error
        elif faults.get("dropped", -1) == gateway:
            assert error is None and value == MEASURES[measure].absent
        else:
            assert error is None and value == 100.0 * number + gateway

    @invariant()
    def shares(self) -> None:
        assert len(self.source.sent_at) <= self.asks


SharingMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_sharing_rules = SharingMachine.TestCase


def test_checks_asking_while_a_query_is_in_flight_wait_for_it() -> None:
    """Ten policies' checks arrive while the first one's query is under way: one query answers all."""
    release = threading.Event()
    asked: list[RenderedQuery] = []

    class SlowSource:
        answers_groups = True

        def query(self, query: RenderedQuery) -> float | None:
            raise AssertionError("vector only")

        def query_vector(self, query: RenderedQuery) -> list[tuple[dict[str, str], float]]:
            asked.append(query)
            release.wait(10)
            return [(dict(group), float(i)) for i, group in enumerate(query.groups)]

    clock = Clock()
    shared = SharedQueries(clock=clock)
    source = SlowSource()
    results: dict[str, Any] = {}
    labels = [{"source_workload": f"gw-{i}"} for i in range(10)]
    measure = SharedMeasure(Measure.REQUESTS, "1m", ("source_workload",))
    # every gateway asks once first, so the next query covers all ten
    release.set()
    for i in range(10):
        shared.ask(source, measure, QUERY, labels[i], asker=f"warm-{i}", max_age=5.0)
    release.clear()
    clock.now += 10  # the warm-up's answer is too old now
    sent = len(asked)

    def check(i: int) -> None:
        results[f"p{i}"] = shared.ask(source, measure, QUERY, labels[i], asker=f"p{i}", max_age=5.0)

    threads = [threading.Thread(target=check, args=(i,)) for i in range(10)]
    threads[0].start()
    wait_for(lambda: len(asked) == sent + 1, timeout=5, what="the first check's query under way")
    for thread in threads[1:]:
        thread.start()
    wait_for(lambda: sum(t.is_alive() for t in threads) == 10, timeout=5, what="all ten waiting")
    release.set()
    for thread in threads:
        thread.join(10)
    assert len(asked) == sent + 1, "the nine checks that came while it was in flight sent nothing"
    groups = [dict(group)["source_workload"] for group in asked[-1].groups]
    assert results == {f"p{i}": float(groups.index(f"gw-{i}")) for i in range(10)}


def test_a_check_that_waits_too_long_is_unavailable_not_stuck() -> None:
    class Hanging:
        answers_groups = True

        def query(self, query: RenderedQuery) -> float | None:
            raise AssertionError

        def query_vector(self, query: RenderedQuery) -> list[tuple[dict[str, str], float]]:
            gate.wait(10)
            return []

    gate = threading.Event()
    shared = SharedQueries(wait_seconds=0.2)
    measure = SharedMeasure(Measure.REQUESTS, "1m", ("source_workload",))
    source = Hanging()
    first = threading.Thread(
        target=shared.ask, args=(source, measure, QUERY, {"source_workload": "a"}), kwargs={"asker": "x", "max_age": 5}
    )
    first.start()
    wait_for(lambda: shared.sent == 1, timeout=5, what="the first query under way")
    with pytest.raises(MetricsUnavailable, match="did not come back"):
        shared.ask(source, measure, QUERY, {"source_workload": "a"}, asker="y", max_age=5)
    gate.set()
    first.join(10)
