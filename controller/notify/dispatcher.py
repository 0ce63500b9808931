"""Delivering alerts without ever delaying the rollback that raised them, and without losing one.

``submit`` only enqueues. Each receiver has a queue and a worker thread of its own, so a dead or
hanging receiver delays nobody else. A delivery is retried with capped exponential backoff until
it succeeds or its deadline passes (hours for critical alerts: a rollback must reach a human).

Every alert has a stable id (``Alert.id``), sent to receivers as an idempotency key. A receiver is
never sent an id it has acknowledged; a delivery that timed out is "unknown" (it may have
arrived) and is retried later with the same id, after a longer timeout for critical alerts
rather than a storm of quick re-sends. What is not yet delivered is listed by ``pending`` so the
runner can keep it in the policy's state object (the outbox) and submit it again after a restart.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from controller.core.alerts import Alert
from controller.core.enums import Severity
from controller.errors import NotificationError, NotificationTimeout
from controller.ports import Notifier

__all__ = ["AlertDispatcher", "DeliveryPolicy"]

_log = structlog.get_logger("controller.notify")
_REMEMBERED = 4096  # delivered (receiver, id) pairs kept to refuse repeats


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    """How hard to try; from the settings."""

    backoff_seconds: float = 0.5
    backoff_max_seconds: float = 60.0
    timeout_seconds: float = 5.0
    critical_timeout_seconds: float = 60.0
    deadline_seconds: float = 3600.0
    critical_deadline_seconds: float = 6 * 3600.0

    def timeout(self, alert: Alert) -> float:
        return self.critical_timeout_seconds if alert.severity is Severity.CRITICAL else self.timeout_seconds

    def deadline(self, alert: Alert) -> float:
        return self.critical_deadline_seconds if alert.severity is Severity.CRITICAL else self.deadline_seconds


@dataclass(order=True)
class _Job:
    due: float
    seq: int
    alert: Alert = field(compare=False)
    receiver: Notifier = field(compare=False)
    first_at: float = field(compare=False)
    give_up_at: float = field(compare=False)
    attempts: int = field(default=0, compare=False)
    delay: float = field(default=0.0, compare=False)


class _ReceiverQueue:
    """One receiver's jobs, due first, worked by one thread."""

    def __init__(self, name: str, dispatcher: AlertDispatcher) -> None:
        self.name = name
        self.jobs: list[_Job] = []
        self.wake = threading.Condition(dispatcher.lock)
        self.thread = threading.Thread(target=dispatcher.work, args=(self,), name=f"alerts-{name}", daemon=True)


class AlertDispatcher:
    """Asynchronous, isolated, retrying, idempotent alert delivery."""

    def __init__(
        self,
        policy: DeliveryPolicy | None = None,
        *,
        on_outcome: Callable[[str, str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy or DeliveryPolicy()
        self._on_outcome = on_outcome or (lambda receiver, kind, outcome: None)
        self._clock = clock
        self.lock = threading.Lock()
        self._queues: dict[str, _ReceiverQueue] = {}
        self._pending: dict[tuple[str, str], _Job] = {}
        self._delivered: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._closing = threading.Event()
        self._flush_until = 0.0
        self._seq = itertools.count()

    # -- submitting --------------------------------------------------------------------------------

    def submit(self, alert: Alert, receivers: Sequence[Notifier], *, age_seconds: float = 0.0) -> None:
        """Queue ``alert`` for every receiver that has neither acknowledged nor queued its id.

        ``age_seconds`` is how long ago it was first queued (an outbox entry after a restart), so
        its deadline is not extended by the restart.
        """
        now = self._clock()
        with self.lock:
            for receiver in receivers:
                key = (receiver.name, alert.id)
                if key in self._delivered or key in self._pending:
                    self._outcome(receiver.name, alert.kind.value, "deduplicated")
                    continue
                if self._closing.is_set():
                    _log.warning("alert not queued: shutting down", receiver=receiver.name, policy=alert.policy)
                    continue
                first = now - age_seconds
                job = _Job(now, next(self._seq), alert, receiver, first, first + self.policy.deadline(alert))
                self._pending[key] = job
                queue = self._queues.get(receiver.name)
                if queue is None:
                    queue = self._queues[receiver.name] = _ReceiverQueue(receiver.name, self)
                    queue.thread.start()
                heapq.heappush(queue.jobs, job)
                queue.wake.notify()

    def pending(self, policy: str) -> list[tuple[Alert, tuple[str, ...], float]]:
        """Alerts of ``policy`` not yet delivered: (alert, receiver names, seconds since first queued)."""
        now = self._clock()
        by_id: dict[str, tuple[Alert, list[str], float]] = {}
        with self.lock:
            for (name, alert_id), job in self._pending.items():
                if job.alert.policy != policy:
                    continue
                entry = by_id.setdefault(alert_id, (job.alert, [], now - job.first_at))
                entry[1].append(name)
        return [(alert, tuple(sorted(names)), age) for alert, names, age in by_id.values()]

    def abandon(self, deliveries: set[tuple[str, str]]) -> int:
        """Stop delivering these (receiver name, alert id) pairs; how many were pending.

        For a replica whose term ended: these alerts are in the state objects' outboxes, which the
        next leader delivers from (with the same ids). Delivering them here too would page twice on
        receivers that do not de-duplicate by id (chat robots, Slack).
        """
        with self.lock:
            dropped = [key for key in deliveries if self._pending.pop(key, None) is not None]
            for queue in self._queues.values():
                kept = [job for job in queue.jobs if (job.receiver.name, job.alert.id) not in deliveries]
                if len(kept) != len(queue.jobs):
                    heapq.heapify(kept)
                    queue.jobs = kept
        return len(dropped)

    def oldest_pending_seconds(self) -> float:
        """Age of the oldest undelivered alert (0 when all are delivered): alerting broken is an alert."""
        now = self._clock()
        with self.lock:
            return max((now - job.first_at for job in self._pending.values()), default=0.0)

    # -- delivering ----------------------------------------------------------------------------------

    def work(self, queue: _ReceiverQueue) -> None:
        """The worker of one receiver: deliver due jobs, one at a time. When closing, every queued
        job gets one more attempt (a rollback decided just before SIGTERM still goes out)."""
        while True:
            with self.lock:
                while not self._closing.is_set() and (not queue.jobs or queue.jobs[0].due > self._clock()):
                    wait = None if not queue.jobs else max(0.0, queue.jobs[0].due - self._clock())
                    queue.wake.wait(wait)
                if not queue.jobs or (self._closing.is_set() and time.monotonic() > self._flush_until):
                    return
                job = heapq.heappop(queue.jobs)
            self._attempt(job, queue)

    def _attempt(self, job: _Job, queue: _ReceiverQueue) -> None:
        alert, receiver = job.alert, job.receiver
        with self.lock:
            if (receiver.name, alert.id) not in self._pending:  # abandoned since it was taken off the queue
                return
        job.attempts += 1
        log = _log.bind(receiver=receiver.name, policy=alert.policy, kind=alert.kind.value, alert_id=alert.id)
        started = self._clock()
        timeout = self.policy.timeout(alert)
        try:
            receiver.send(alert, timeout=timeout)
        except Exception as exc:  # a receiver's bug must not kill its worker and strand its queue
            timed_out = isinstance(exc, NotificationTimeout)
            outcome = "unknown" if timed_out else "failed"
            error = str(exc) if isinstance(exc, NotificationError) else f"{type(exc).__name__} in the receiver"
            self._outcome(receiver.name, alert.kind.value, outcome)
            self._retry_or_expire(job, queue, log, outcome, error)
            return
        took = self._clock() - started
        with self.lock:
            self._pending.pop((receiver.name, alert.id), None)
            self._delivered[(receiver.name, alert.id)] = None
            while len(self._delivered) > _REMEMBERED:
                self._delivered.popitem(last=False)
        late = took > self.policy.timeout_seconds
        self._outcome(receiver.name, alert.kind.value, "delivered_late" if late else "delivered")
        log.info("alert delivered", attempt=job.attempts, seconds=round(took, 3), late=late)

    def _outcome(self, receiver: str, kind: str, outcome: str) -> None:
        try:
            self._on_outcome(receiver, kind, outcome)
        except Exception:  # counting must never stop delivering
            _log.exception("could not count a delivery outcome", receiver=receiver)

    def _retry_or_expire(
        self, job: _Job, queue: _ReceiverQueue, log: structlog.typing.FilteringBoundLogger, outcome: str, error: str
    ) -> None:
        now = self._clock()
        job.delay = min(self.policy.backoff_max_seconds, max(self.policy.backoff_seconds, job.delay * 2))
        if self._closing.is_set():
            log.warning("alert not delivered before shutdown; the outbox keeps it for the next start")
            return
        with self.lock:
            abandoned = (job.receiver.name, job.alert.id) not in self._pending
        if abandoned:  # (left to the next leader while this attempt was under way)
            return
        if now + job.delay > job.give_up_at:
            with self.lock:
                self._pending.pop((job.receiver.name, job.alert.id), None)
            self._outcome(job.receiver.name, job.alert.kind.value, "expired")
            log.error("alert not delivered before its deadline", attempts=job.attempts, error=error)
            return
        log.warning("alert delivery failed; retrying", attempt=job.attempts, outcome=outcome, error=error,
                    retry_in_s=round(job.delay, 3))  # fmt: skip
        with self.lock:
            job.due = now + job.delay
            heapq.heappush(queue.jobs, job)
            queue.wake.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Stop retrying: each queued alert gets one last attempt, all within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self.lock:
            self._flush_until = deadline
            self._closing.set()
            for queue in self._queues.values():
                queue.wake.notify_all()
            threads = [queue.thread for queue in self._queues.values()]
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
