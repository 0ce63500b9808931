"""One query per measure for all the policies that share a Prometheus and a window.

Without it a check asks about a dozen queries (three built-in measures and three response kinds,
per gateway): 500 policies at a 5 s interval are 1 200 queries a second, which ARMS meters and
rate-limits. Here the first check that needs a measure asks it for every gateway that asked it
recently (``sum by`` the selector's labels), and the checks that come within ``max_age`` take
their gateway's group from that answer: the queries a second stay at about
``measures / max_age`` however many policies there are.

What no sharing may do:

* count evidence twice: a policy never judges an answer it judged before (each check's answer
  was sent after the one its previous check used), so N consecutive failures are N answers;
* judge old data: an answer serves only checks that ask within ``max_age`` of when it was sent
  (the caller bounds it by half the policy's interval), and a check asking while it is in flight
  waits for it;
* spread one policy's trouble: a gateway missing from the answer has no data (only it); a failed
  query is "metrics unavailable" for the checks it served (the ones that share its Prometheus and
  window); custom gates are never shared.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from controller.core.queries import SharedMeasure, shared_index, shared_value
from controller.core.results import RenderedQuery
from controller.errors import MetricsUnavailable
from controller.ports import MetricsSource

__all__ = ["MISSING", "Missing", "SharedQueries"]

#: a gateway that has not asked for this long leaves the shared query (its policy was removed)
_FORGET_SECONDS = 600.0
_Labels = tuple[tuple[str, str], ...]


class Missing(enum.Enum):
    """No answer serves this ask yet (``SharedQueries.ask(lead_if_missing=False)``)."""

    MISSING = "missing"


MISSING = Missing.MISSING


@dataclass
class _Answer:
    """One shared query: who it covers, when it was sent, what came back."""

    members: frozenset[_Labels]
    sent_at: float
    done: threading.Event = field(default_factory=threading.Event)
    index: dict[tuple[str, ...], list[float]] | None = None  # the answer by group
    error: str | None = None


@dataclass
class _Shared:
    """Everything known of one (source, measure): the gateways that ask it and its recent answers."""

    asked: dict[_Labels, float] = field(default_factory=dict)  # gateway -> when it last asked
    #: the answers some check may still take (see SharedQueries._longest), oldest first
    recent: list[_Answer] = field(default_factory=list)


class SharedQueries:
    """Shares the built-in measures' queries between the checks of many policies (thread-safe)."""

    def __init__(self, *, wait_seconds: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._wait = wait_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._shared: dict[tuple[int, SharedMeasure], _Shared] = {}
        # (asker, source, measure, gateway) -> sent_at of the answer it judged last
        self._judged: dict[tuple[str, int, SharedMeasure, _Labels], float] = {}
        self._pruned = clock()
        self._longest = 0.0  # the longest max_age any check asked with
        self.sent = 0  # shared queries sent, for the benchmarks and tests

    def ask(
        self,
        source: MetricsSource,
        measure: SharedMeasure,
        query: RenderedQuery,
        labels: Mapping[str, str],
        *,
        asker: str,
        max_age: float,
        lead_if_missing: bool = True,
    ) -> float | Missing | None:
        """The value of ``measure`` for the gateway ``labels`` selects; raise MetricsUnavailable.

        ``query`` is what the answer is sent as (its meaning, for a simulated source). Without
        ``lead_if_missing``, ``MISSING`` when no answer serves it yet (a check asks again, on a
        thread of its own, only then): most asks are a lookup, not worth a thread.
        """
        gateway: _Labels = tuple(sorted(labels.items()))
        key = (id(source), measure)
        judged_key = (asker, id(source), measure, gateway)
        with self._lock:
            now = self._clock()
            shared = self._shared.setdefault(key, _Shared())
            shared.asked[gateway] = now
            after = self._judged.get(judged_key)
            answer = self._usable(shared, gateway, now, max_age, after)
            if answer is None and not lead_if_missing:
                return MISSING
            lead = answer is None
            if lead:
                self._prune(now)
                # A gateway new to a round under way (the fresh answers do not name it) asks only for
                # the gateways none of them names: policies loaded together (a start, a takeover)
                # would otherwise each name every gateway again. Otherwise a new round, for all.
                fresh = [a for a in shared.recent if now - a.sent_at <= max_age]
                named = frozenset().union(*(a.members for a in fresh))
                everyone = frozenset(shared.asked)
                answer = _Answer(everyone if gateway in named else (everyone - named) | {gateway}, now)
                # kept while some check may still take it: the longest max_age asked with (each answer
                # holds every gateway's value: a minute of them was ~60 MB with 500 policies)
                self._longest = max(self._longest, max_age)
                shared.recent = [a for a in shared.recent if now - a.sent_at <= self._longest] + [answer]
                self.sent += 1
            assert answer is not None
            self._judged[judged_key] = answer.sent_at
        if lead:
            self._send(source, measure, query, answer)
        elif not answer.done.wait(self._wait):
            raise MetricsUnavailable(f"the shared query did not come back within {self._wait:g}s")
        if answer.error is not None:
            raise MetricsUnavailable(answer.error)
        assert answer.index is not None
        try:
            return shared_value(measure, answer.index, labels)
        except ValueError as exc:
            raise MetricsUnavailable(str(exc)) from None

    @staticmethod
    def _usable(shared: _Shared, gateway: _Labels, now: float, max_age: float, after: float | None) -> _Answer | None:
        """The newest answer that names ``gateway``, is at most ``max_age`` old and newer than ``after``."""
        for answer in reversed(shared.recent):
            if now - answer.sent_at > max_age:
                return None
            if gateway in answer.members and (after is None or answer.sent_at > after):
                return answer
        return None

    def _prune(self, now: float) -> None:
        """Forget the gateways that stopped asking (their policy was removed) and what they judged.

        Never sooner: a policy edited or taken over keeps its name and its state's counts, so what
        it judged must stay judged (a replaced runner would otherwise count an answer again).
        """
        if now - self._pruned < _FORGET_SECONDS / 10:
            return
        self._pruned = now
        for shared in self._shared.values():
            for gone in [g for g, at in shared.asked.items() if now - at > _FORGET_SECONDS]:
                del shared.asked[gone]
        for key in [k for k, at in self._judged.items() if now - at > _FORGET_SECONDS]:
            del self._judged[key]

    def _send(self, source: MetricsSource, measure: SharedMeasure, query: RenderedQuery, answer: _Answer) -> None:
        try:
            members = tuple(sorted(answer.members))
            promql = measure.promql(dict(member) for member in members)
            shared = RenderedQuery(promql, query.measure, query.role, query.gate, groups=members)
            answer.index = shared_index(measure, source.query_vector(shared))
        except MetricsUnavailable as exc:
            answer.error = str(exc)
        except Exception as exc:  # a bug in a source: unavailable for those it served, never a crash
            answer.error = f"the shared query failed: {type(exc).__name__}: {exc}"
        finally:
            answer.done.set()
