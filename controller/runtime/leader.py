"""Leader election: one thread that takes and renews the Lease, and the Fence every write asks.

Only the leader ticks and writes. The elector's rules are pure (``controller.core.lease``); this
module runs them on a timer and keeps the one fact writes depend on: when this process last
renewed its term. ``check()`` answers from the monotonic clock, not from the elector thread, so
a leader whose renewals hang, or a process paused (SIGSTOP, a frozen VM) and resumed after its
Lease ran out, refuses its next write even before the elector thread has run again.

Losing the term (renewals failing for the renew deadline, someone else in the Lease, a newer
token found in a state object): ``on_stopped`` runs in the elector thread and returns only once
no tick of the old term is running (the service removes the ticks and waits for the one in
flight, whose writes the Fence refuses); only then may this process become a candidate again, so
two terms never run in one process. ``on_started`` runs when a term begins: the service builds
fresh runners that read everything from the state objects, never from an earlier term's memory.

A clean shutdown releases the Lease (no holder) after the last tick, so a rolling update hands
over at once instead of after the lease duration.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

import structlog

from controller.core.lease import FenceToken, LeaseRecord, LeaseTiming, MoveKind, next_move, released
from controller.errors import ClusterError, ClusterUnavailable, NotLeader
from controller.ports import Clock, LeaseStore

__all__ = ["LeaderElector"]

_log = structlog.get_logger("controller.leader")
#: candidates wait the retry period times up to this (client-go's jitter): two do not knock in step
_JITTER = 0.2


def _since_boot() -> float:
    """Seconds on a clock that never goes back and counts a suspended machine's sleep too (Linux's
    CLOCK_BOOTTIME; elsewhere the monotonic clock): a node that slept through its Lease wakes up
    knowing its term is over."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


class LeaderElector:
    """Takes and keeps the Lease for this process; the Fence of its writes."""

    def __init__(
        self,
        leases: LeaseStore,
        identity: str,
        timing: LeaseTiming,
        *,
        clock: Clock,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        self.identity = identity
        self.timing = timing
        self._leases = leases
        self._clock = clock
        self._on_started: Callable[[FenceToken], None] = lambda token: None
        self._on_stopped: Callable[[str], None] = lambda why: None
        self._on_reachable: Callable[[bool], None] = lambda reachable: None
        self._monotonic = monotonic or _since_boot
        self._trouble_seen: str | None = None
        self._lock = threading.Lock()
        self._term: FenceToken | None = None
        self._renewed_at = float("-inf")  # monotonic time the last successful renewal was sent
        self._record: LeaseRecord | None = None  # the Lease as this process last wrote it
        self._seen: tuple[object, ...] | None = None  # the Lease as last read, and since when unchanged
        self._seen_at = 0.0
        self._deposed: str | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        #: monotonic seconds from one term's end (or this process's start) to the next term's start
        self.started_at = self._monotonic()

    # -- the Fence ----------------------------------------------------------------------------------

    def token(self) -> FenceToken | None:
        """The token of the term this process holds (None while it holds none)."""
        with self._lock:
            return self._term

    def check(self) -> None:
        """NotLeader unless this process holds a term, renewed within the renew deadline."""
        with self._lock:
            term, renewed_at, deposed = self._term, self._renewed_at, self._deposed
        if term is None:
            raise NotLeader(f"{self.identity} does not hold the leader Lease")
        if deposed is not None:
            raise NotLeader(f"{self.identity} was deposed: {deposed}")
        if not self.timing.valid(renewed_at, self._monotonic()):
            raise NotLeader(
                f"{self.identity} has not renewed the leader Lease for {self.timing.renew_deadline:g}s "
                "(its term may be over)"
            )

    def deposed(self, why: str) -> None:
        """A newer term's token was found: no more writes; the elector thread ends the term."""
        with self._lock:
            if self._term is None or self._deposed is not None:
                return
            self._deposed = why
        _log.warning("deposed: a newer leader wrote", identity=self.identity, why=why)
        self._wake.set()

    @property
    def leading(self) -> bool:
        """Whether this process holds a term and may write now."""
        try:
            self.check()
        except NotLeader:
            return False
        return True

    # -- the thread ---------------------------------------------------------------------------------

    def start(
        self,
        *,
        on_started: Callable[[FenceToken], None],
        on_stopped: Callable[[str], None],
        on_reachable: Callable[[bool], None] = lambda reachable: None,
    ) -> None:
        """Start campaigning (and leading, once elected) in a thread of its own.

        ``on_started`` runs when a term starts, ``on_stopped`` when it ends (and must return only once
        nothing of that term runs any more), ``on_reachable`` with every answer or failure to reach
        the API server. All three run in the elector thread.
        """
        self._on_started, self._on_stopped, self._on_reachable = on_started, on_stopped, on_reachable
        self._thread = threading.Thread(target=self._run, name="leader-election", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        """Whether the elector thread runs (for /healthz)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, *, release: bool = True, timeout: float = 10.0) -> None:
        """Stop the thread; ``release``: leave the Lease with no holder, so a peer takes it at once.

        The caller has stopped every tick before: nothing of this term writes after the release.
        """
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
        with self._lock:
            record, term = self._record, self._term
            self._term = None
        if not release or term is None or record is None:
            return
        try:
            self._leases.update(released(record, self._clock.now()))
            _log.info("released the leader Lease", identity=self.identity, term=term.term)
        except ClusterError as exc:  # the peer takes over after the lease duration instead
            _log.warning("could not release the leader Lease", identity=self.identity, error=str(exc))

    def _run(self) -> None:
        _log.info("campaigning for the leader Lease", identity=self.identity)
        while not self._stop.is_set():
            try:
                self.round()
            except Exception:  # a bug must not end the election thread (and with it all ticks)
                _log.exception("leader election round failed")
            pause = self.timing.retry_period
            if self.token() is None:
                pause *= 1 + random.random() * _JITTER
            self._wake.wait(pause)
            self._wake.clear()

    def round(self) -> None:
        """One look at the Lease: renew the term, end it, or try to start one."""
        now = self._monotonic()
        with self._lock:
            term, renewed_at, deposed = self._term, self._renewed_at, self._deposed
        if term is not None and deposed is not None:
            self._end(f"deposed: {deposed}")
            return
        if term is not None and not self.timing.valid(renewed_at, now):
            self._end(f"not renewed for {self.timing.renew_deadline:g}s (the renew deadline)")
            return
        try:
            current = self._leases.get()
        except ClusterError as exc:
            self._trouble(exc, "read")
            return
        # seen when the answer came, not when it was asked for (client-go's observedTime): a slow read
        # must not shorten a candidate's wait for a renewal that landed while it was in flight
        now = self._monotonic()
        self._on_reachable(True)
        self._trouble_seen = None
        if current is None or current.observed_key() != self._seen:
            self._seen, self._seen_at = (None if current is None else current.observed_key()), now
        if term is not None and current is not None and current.holder != self.identity:
            self._end(f"the Lease names {current.holder or 'nobody'} now")
            return
        if term is not None and current is None:
            self._end("the Lease was deleted")
            return
        move = next_move(
            current,
            self.identity,
            leading=term is not None,
            silent_for=now - self._seen_at,
            timing=self.timing,
            now=self._clock.now(),
        )
        if move.kind is MoveKind.WAIT or move.record is None:
            return
        sent = self._monotonic()
        try:
            if move.kind is MoveKind.CREATE:
                written = self._leases.create(move.record)
            else:
                written = self._leases.update(move.record)
        except ClusterError as exc:  # a Conflict: another candidate (or holder) wrote first
            self._trouble(exc, move.kind.value)
            return
        self._seen, self._seen_at = written.observed_key(), self._monotonic()
        if move.kind is MoveKind.RENEW:
            with self._lock:
                self._renewed_at, self._record = sent, written
            return
        token = FenceToken(self.identity, written.transitions, written.created, written.uid)
        with self._lock:
            self._term, self._renewed_at, self._record, self._deposed = token, sent, written, None
        waited = self._monotonic() - self.started_at
        _log.info("became the leader", identity=self.identity, term=token.term, why=move.why, waited_s=round(waited, 2))
        try:
            self._on_started(token)
        except Exception:  # a term this process cannot run must not be held: another replica leads
            _log.exception("starting the term failed; giving it up")
            self._end("starting the term failed")

    def _end(self, why: str) -> None:
        """The term is over: no more writes (``check`` already refuses), then the ticks stop."""
        with self._lock:
            term = self._term
            self._term, self._deposed, self._record = None, None, None
        _log.warning("stopped leading", identity=self.identity, term=None if term is None else term.term, why=why)
        self._on_stopped(why)
        self.started_at = self._monotonic()

    def _trouble(self, exc: ClusterError, step: str) -> None:
        if isinstance(exc, ClusterUnavailable):
            self._on_reachable(False)
        if str(exc) != self._trouble_seen:  # once per distinct trouble, not every retry period
            self._trouble_seen = str(exc)
            _log.warning("leader election: the Lease could not be written or read", step=step, error=str(exc))
