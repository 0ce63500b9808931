"""The elector's rounds, one at a time, over an in-memory Lease (the real one: test_leader_election.py).

The in-memory Lease (tests/helpers.py ``SharedLease``, seen through a ``Connection``) behaves as
the API server does for one object: create fails when it exists, update fails when the version
moved (Conflict), and a connection can be cut off.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from controller.core.lease import FenceToken
from controller.errors import NotLeader
from controller.runtime.leader import LeaderElector
from tests.helpers import TIMING, Connection, Seconds, SharedLease, hand_elector


def elector(lease: SharedLease, seconds: Seconds, name: str = "me") -> tuple[LeaderElector, list[str], Connection]:
    connection = Connection(lease)
    made, said = hand_elector(connection, seconds, name)
    return made, said, connection


def test_renewals_failing_for_the_renew_deadline_end_the_term_and_writes_stop_at_once() -> None:
    lease, seconds = SharedLease(), Seconds()
    me, said, connection = elector(lease, seconds)
    me.round()
    assert said == ["started 0"] and me.leading
    connection.down = True
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
    lease, seconds = SharedLease(), Seconds()
    me, said, _connection = elector(lease, seconds)
    me.round()
    assert lease.record is not None
    lease.store(replace(lease.record, holder="other", transitions=lease.record.transitions + 1))
    seconds.now += 1
    me.round()
    assert said[-1] == "stopped: the Lease names other now"
    with pytest.raises(NotLeader):
        me.check()


def test_a_newer_token_found_in_a_state_object_ends_the_term_at_the_next_round() -> None:
    lease, seconds = SharedLease(), Seconds()
    me, said, _connection = elector(lease, seconds)
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
    assert token is not None and token.supersedes(FenceToken("me", 0, None, lease.uid))


def test_a_term_that_cannot_start_is_given_up() -> None:
    lease, seconds = SharedLease(), Seconds()
    me, said, _connection = elector(lease, seconds)

    def broken(token: FenceToken) -> None:
        raise RuntimeError("test: the service could not start the term")

    me._on_started = broken
    me.round()
    assert me.token() is None and said == ["stopped: starting the term failed"]


def test_a_candidate_waits_the_lease_duration_from_its_own_first_look() -> None:
    lease, seconds = SharedLease(), Seconds()
    leader, _, _ = elector(lease, seconds, "leader")
    leader.round()
    candidate, said, _ = elector(lease, seconds, "candidate")
    candidate.round()  # first look: the clock of its wait starts now
    seconds.now += TIMING.lease_duration - 0.1
    candidate.round()
    assert said == []
    seconds.now += 0.1
    candidate.round()
    assert said == ["started 1"] and lease.record is not None and lease.record.holder == "candidate"
    with pytest.raises(NotLeader):  # the old leader never renewed since: its deadline passed long ago
        leader.check()
