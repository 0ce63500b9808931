"""The elector's rounds, one at a time, over an in-memory Lease (the real one: test_leader_election.py).

The in-memory LeaseStore behaves as the API server does for one object: create fails when it
exists, update fails when the version moved (Conflict), and a switch makes it unreachable.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest

from controller.core.lease import FenceToken, LeaseRecord, LeaseTiming
from controller.errors import ClusterUnavailable, Conflict, NotLeader
from controller.runtime.leader import LeaderElector
from tests.helpers import HandClock

TIMING = LeaseTiming(lease_duration=15.0, renew_deadline=10.0, retry_period=2.0)


@dataclass
class MemoryLease:
    record: LeaseRecord | None = None
    versions: int = 0
    down: bool = False
    writes: list[LeaseRecord] = field(default_factory=list)

    def get(self) -> LeaseRecord | None:
        if self.down:
            raise ClusterUnavailable("test: API server unreachable")
        return self.record

    def create(self, record: LeaseRecord) -> LeaseRecord:
        if self.down:
            raise ClusterUnavailable("test: API server unreachable")
        if self.record is not None:
            raise Conflict("test: exists")
        return self._store(replace(record, uid="uid-1"))

    def update(self, record: LeaseRecord) -> LeaseRecord:
        if self.down:
            raise ClusterUnavailable("test: API server unreachable")
        if self.record is None or record.version != self.record.version:
            raise Conflict("test: version moved")
        return self._store(record)

    def _store(self, record: LeaseRecord) -> LeaseRecord:
        self.versions += 1
        self.record = replace(record, version=str(self.versions))
        self.writes.append(self.record)
        return self.record


class Seconds:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def elector(lease: MemoryLease, seconds: Seconds, name: str = "me") -> tuple[LeaderElector, list[str]]:
    said: list[str] = []
    made = LeaderElector(lease, name, TIMING, clock=HandClock(), monotonic=seconds)
    # its thread is not started: the test runs the rounds itself
    made._on_started = lambda token: said.append(f"started {token.term}")
    made._on_stopped = lambda why: said.append(f"stopped: {why}")
    return made, said


def test_renewals_failing_for_the_renew_deadline_end_the_term_and_writes_stop_at_once() -> None:
    lease, seconds = MemoryLease(), Seconds()
    me, said = elector(lease, seconds)
    me.round()
    assert said == ["started 0"] and me.leading
    lease.down = True
    seconds.now += TIMING.retry_period
    me.round()  # a failed renewal: still within the deadline
    me.check()
    seconds.now += TIMING.renew_deadline - TIMING.retry_period
    with pytest.raises(NotLeader):  # the deadline passed: no write, before the next round runs
        me.check()
    me.round()
    assert said[-1].startswith("stopped: not renewed for 10s")
    assert me.token() is None


def test_a_lease_taken_by_another_ends_the_term() -> None:
    lease, seconds = MemoryLease(), Seconds()
    me, said = elector(lease, seconds)
    me.round()
    assert lease.record is not None
    lease._store(replace(lease.record, holder="other", transitions=lease.record.transitions + 1))
    seconds.now += 1
    me.round()
    assert said[-1] == "stopped: the Lease names other now"
    with pytest.raises(NotLeader):
        me.check()


def test_a_newer_token_found_in_a_state_object_ends_the_term_at_the_next_round() -> None:
    lease, seconds = MemoryLease(), Seconds()
    me, said = elector(lease, seconds)
    me.round()
    me.deposed("term 7 of other saved the state of shop")
    with pytest.raises(NotLeader, match="deposed"):
        me.check()
    me.round()
    assert said[-1] == "stopped: deposed: term 7 of other saved the state of shop"
    # campaigning again: the Lease still names this process, so it starts a new, later term
    me.round()
    assert said[-1] == "started 1"
    token = me.token()
    assert token is not None and token.supersedes(FenceToken("me", 0, None, "uid-1"))


def test_a_term_that_cannot_start_is_given_up() -> None:
    lease, seconds = MemoryLease(), Seconds()
    me, said = elector(lease, seconds)

    def broken(token: FenceToken) -> None:
        raise RuntimeError("test: the service could not start the term")

    me._on_started = broken
    me.round()
    assert me.token() is None and said == ["stopped: starting the term failed"]


def test_a_candidate_waits_the_lease_duration_from_its_own_first_look() -> None:
    lease, seconds = MemoryLease(), Seconds()
    leader, _ = elector(lease, seconds, "leader")
    leader.round()
    candidate, said = elector(lease, seconds, "candidate")
    candidate.round()  # first look: the clock of its wait starts now
    seconds.now += TIMING.lease_duration - 0.1
    candidate.round()
    assert said == []
    seconds.now += 0.1
    candidate.round()
    assert said == ["started 1"] and lease.record is not None and lease.record.holder == "candidate"
    with pytest.raises(NotLeader):  # the old leader never renewed since: its deadline passed long ago
        leader.check()
