"""Leader election over a ``coordination.k8s.io`` Lease, and the fencing token a term writes with.

Pure rules (no clock reads, no client): the elector in ``controller.runtime.leader`` reads the
Lease, asks ``next_move`` what to do, and writes what it answers.

The rules are client-go's, so a platform team reasons about them as about any controller:

* A candidate takes a Lease held by someone else only after it has *itself* seen the Lease
  unchanged for the lease duration (its own monotonic clock, never the holder's timestamps:
  clocks of two nodes may disagree; the time one process waits does not depend on them).
* A released Lease (no holder, as a leader leaves it on a clean shutdown) is taken at once.
* The holder renews every retry period and stops acting as leader once it has not renewed for
  the renew deadline, which is shorter than the lease duration: it stops before anyone else may
  start (``LeaseTiming.valid``).

Every acquisition starts a new *term*: ``leaseTransitions`` goes up by one, also when the same
process takes the Lease again after losing it. A term is named by its ``FenceToken``: the Lease
(its uid: a Lease deleted and created again is another one) and the term number. The token is
written into every state object the leader saves; a save finding a later term of the same Lease
there is refused (``FenceToken.supersedes``): the writer was deposed, even if it has not noticed
yet (a process paused past its Lease, then resumed).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from datetime import datetime

__all__ = ["FenceToken", "LeaseRecord", "LeaseTiming", "Move", "MoveKind", "next_move", "released"]


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    """The three durations of an election, in seconds (client-go's names and meaning)."""

    lease_duration: float
    renew_deadline: float
    retry_period: float

    def valid(self, renewed_at: float, now: float) -> bool:
        """Whether a leader that last renewed (its request sent) at ``renewed_at`` may still act at ``now``
        (both monotonic seconds): only within the renew deadline, which ends before the lease could
        be taken by another (``lease_duration``)."""
        return 0 <= now - renewed_at < self.renew_deadline


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """The Lease as read. ``created`` and ``uid`` name its lineage; ``version`` is its resourceVersion."""

    holder: str
    transitions: int
    duration_seconds: float | None = None
    acquired: datetime | None = None
    renewed: datetime | None = None
    created: datetime | None = None
    uid: str = ""
    version: str = ""

    def observed_key(self) -> tuple[object, ...]:
        """What a candidate compares to tell a renewal from silence (any change restarts its wait): every
        write moves the resourceVersion, even one whose holder's wall clock stands still."""
        return (self.version, self.holder, self.transitions, self.renewed, self.acquired, self.uid)


@dataclass(frozen=True, slots=True)
class FenceToken:
    """One term of one Lease: who held it, the Lease's lineage, and the term number."""

    holder: str
    term: int
    lease_created: datetime | None = None
    lease_uid: str = ""

    def supersedes(self, other: FenceToken) -> bool:
        """Whether this term came after ``other``'s of the same Lease (the same uid: one lineage).

        Tokens of two Leases are never ordered. A Lease of another name (a release renamed, then
        rolled back; a controller run by hand on the binary's default name) would otherwise depose
        every term of this one for good, and a Lease deleted and created again has its old holder
        stop by itself: its renewals find no Lease and its term ends within a retry period.
        """
        return self.lease_uid == other.lease_uid and self.term > other.term

    def as_dict(self) -> dict[str, object]:
        """The JSON kept in the state object (``data.leader``)."""
        return {
            "holder": self.holder,
            "term": self.term,
            "leaseCreated": None if self.lease_created is None else self.lease_created.isoformat(),
            "leaseUid": self.lease_uid,
        }

    @classmethod
    def from_dict(cls, data: object) -> FenceToken | None:
        """The token kept in a state object, or None when there is none or it cannot be read."""
        if not isinstance(data, dict):
            return None
        holder, term = data.get("holder"), data.get("term")
        created, uid = data.get("leaseCreated"), data.get("leaseUid", "")
        if not isinstance(holder, str) or not isinstance(term, int) or isinstance(term, bool):
            return None
        when: datetime | None = None
        if isinstance(created, str):
            try:
                when = datetime.fromisoformat(created)
            except ValueError:
                return None
            if when.tzinfo is None:
                return None
        return cls(holder, term, when, uid if isinstance(uid, str) else "")


class MoveKind(enum.StrEnum):
    """What the elector does after reading the Lease."""

    CREATE = "create"  # no Lease yet: create it, holding it
    ACQUIRE = "acquire"  # take it (released, expired, or ours from an earlier term): a new term
    RENEW = "renew"  # ours, this term: renew it
    WAIT = "wait"  # someone else holds it and it has not been silent long enough


@dataclass(frozen=True, slots=True)
class Move:
    """The answer of ``next_move``: what to write (for CREATE, ACQUIRE, RENEW) and why."""

    kind: MoveKind
    record: LeaseRecord | None
    why: str


def next_move(
    current: LeaseRecord | None,
    me: str,
    *,
    leading: bool,
    silent_for: float,
    timing: LeaseTiming,
    now: datetime,
) -> Move:
    """The elector's next step.

    ``leading``: this process holds the current term; ``silent_for``: seconds (monotonic) since this
    process first saw ``current`` as it is now; ``now``: the wall time written into the Lease (for
    people and for other clients; no decision here reads it back).
    """
    duration = timing.lease_duration
    if current is None:
        record = LeaseRecord(me, 0, duration, now, now)
        return Move(MoveKind.CREATE, record, "there is no Lease yet")
    if current.holder == me and leading:
        return Move(MoveKind.RENEW, replace(current, renewed=now, duration_seconds=duration), "renewing our term")
    new_term = replace(current, holder=me, transitions=current.transitions + 1, acquired=now, renewed=now)
    new_term = replace(new_term, duration_seconds=duration)
    if not current.holder:
        return Move(MoveKind.ACQUIRE, new_term, "the Lease was released")
    if current.holder == me:
        return Move(MoveKind.ACQUIRE, new_term, "the Lease names this process from an earlier term")
    # the holder's own duration counts (it may run with other settings), never less than ours
    limit = max(duration, current.duration_seconds or 0.0)
    if silent_for >= limit:
        return Move(MoveKind.ACQUIRE, new_term, f"{current.holder} has not renewed for {silent_for:.1f}s")
    return Move(MoveKind.WAIT, None, f"held by {current.holder}")


def released(current: LeaseRecord, now: datetime) -> LeaseRecord:
    """The Lease as a leader leaves it on a clean shutdown: no holder, so a candidate takes it at once."""
    return replace(current, holder="", renewed=now, duration_seconds=1.0)
