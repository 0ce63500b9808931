"""Delivering alerts without ever delaying the rollback that raised them.

``submit`` only enqueues. Worker threads deliver to each receiver with exponential backoff,
drop repeats of the same alert (same dedup key) to the same receiver, and count outcomes. A
receiver that is down is retried and logged; nothing it does reaches the decision path.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import structlog

from controller.core.alerts import Alert
from controller.errors import NotificationError
from controller.ports import Notifier

__all__ = ["AlertDispatcher"]

_log = structlog.get_logger("controller.notify")


class AlertDispatcher:
    """Asynchronous, retrying, de-duplicating alert delivery."""

    def __init__(
        self,
        *,
        attempts: int = 5,
        backoff_seconds: float = 0.5,
        dedup_seconds: float = 3600.0,
        on_outcome: Callable[[str, str], None] | None = None,
        workers: int = 4,
    ) -> None:
        self._attempts = attempts
        self._backoff = backoff_seconds
        self._dedup_seconds = dedup_seconds
        self._on_outcome = on_outcome or (lambda receiver, outcome: None)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="alerts")
        self._sent: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()

    def submit(self, alert: Alert, receivers: Sequence[Notifier]) -> None:
        """Queue ``alert`` for every receiver not already sent this dedup key recently."""
        now = time.monotonic()
        for receiver in receivers:
            key = (receiver.name, alert.dedup_key)
            with self._lock:
                last = self._sent.get(key)
                if last is not None and now - last < self._dedup_seconds:
                    self._on_outcome(receiver.name, "deduplicated")
                    continue
                self._sent[key] = now
            try:
                self._pool.submit(self._deliver, alert, receiver)
            except RuntimeError:  # shutting down
                _log.warning("alert dropped at shutdown", receiver=receiver.name, policy=alert.policy)

    def _deliver(self, alert: Alert, receiver: Notifier) -> None:
        log = _log.bind(receiver=receiver.name, policy=alert.policy, kind=alert.kind.value)
        delay = self._backoff
        for attempt in range(1, self._attempts + 1):
            try:
                receiver.send(alert)
            except NotificationError as exc:
                log.warning("alert delivery failed", attempt=attempt, error=str(exc))
                if attempt == self._attempts or self._closing.wait(delay):
                    break
                delay *= 2
                continue
            log.info("alert delivered", attempt=attempt)
            self._on_outcome(receiver.name, "delivered")
            return
        with self._lock:  # let a later identical alert try again
            self._sent.pop((receiver.name, alert.dedup_key), None)
        self._on_outcome(receiver.name, "failed")
        log.error("alert not delivered")

    def close(self, timeout: float = 10.0) -> None:
        """Stop retry waits and finish what is in flight, for at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        self._closing.set()
        self._pool.shutdown(wait=False, cancel_futures=False)
        for thread in list(getattr(self._pool, "_threads", ())):
            thread.join(max(0.0, deadline - time.monotonic()))
