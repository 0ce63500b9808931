"""The pure election rules (controller.core.lease): who may take the Lease when, and which term wins."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.core.lease import FenceToken, LeaseRecord, LeaseTiming, MoveKind, next_move, released

TIMING = LeaseTiming(lease_duration=15.0, renew_deadline=10.0, retry_period=2.0)
NOW = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)


def held_by(holder: str, transitions: int = 3, duration: float | None = 15.0) -> LeaseRecord:
    return LeaseRecord(holder, transitions, duration, NOW, NOW, NOW - timedelta(days=1), "uid-1", "7")


def move(current: LeaseRecord | None, *, leading: bool = False, silent_for: float = 0.0, me: str = "b") -> object:
    return next_move(current, me, leading=leading, silent_for=silent_for, timing=TIMING, now=NOW)


def test_no_lease_is_created_holding_it_in_term_zero() -> None:
    answer = next_move(None, "a", leading=False, silent_for=0.0, timing=TIMING, now=NOW)
    assert answer.kind is MoveKind.CREATE
    assert answer.record is not None and (answer.record.holder, answer.record.transitions) == ("a", 0)
    assert answer.record.duration_seconds == 15.0


def test_a_lease_held_by_another_is_taken_only_after_this_process_saw_it_silent_for_the_duration() -> None:
    for silent in (0.0, 5.0, 14.99):
        assert next_move(held_by("a"), "b", leading=False, silent_for=silent, timing=TIMING, now=NOW).kind is (
            MoveKind.WAIT
        )
    taken = next_move(held_by("a"), "b", leading=False, silent_for=15.0, timing=TIMING, now=NOW)
    assert taken.kind is MoveKind.ACQUIRE
    assert taken.record is not None and (taken.record.holder, taken.record.transitions) == ("b", 4)
    assert taken.record.version == "7"  # the update is guarded by the version read


def test_the_holders_longer_duration_counts() -> None:
    """A holder running with a longer lease duration than ours is waited for that long."""
    longer = held_by("a", duration=60.0)
    assert next_move(longer, "b", leading=False, silent_for=30.0, timing=TIMING, now=NOW).kind is MoveKind.WAIT
    assert next_move(longer, "b", leading=False, silent_for=60.0, timing=TIMING, now=NOW).kind is MoveKind.ACQUIRE


def test_a_released_lease_is_taken_at_once_in_a_new_term() -> None:
    free = released(held_by("a"), NOW)
    assert free.holder == "" and free.duration_seconds == 1.0
    taken = next_move(free, "b", leading=False, silent_for=0.0, timing=TIMING, now=NOW)
    assert taken.kind is MoveKind.ACQUIRE and taken.record is not None and taken.record.transitions == 4


def test_the_leader_renews_its_term_without_a_new_one() -> None:
    renewed = next_move(held_by("b"), "b", leading=True, silent_for=0.0, timing=TIMING, now=NOW + timedelta(seconds=2))
    assert renewed.kind is MoveKind.RENEW
    assert renewed.record is not None and renewed.record.transitions == 3
    assert renewed.record.renewed == NOW + timedelta(seconds=2)


def test_a_lease_naming_this_process_from_an_earlier_term_starts_a_new_term() -> None:
    """A process that lost its term (renewals failed) and takes the Lease again gets a new token: the
    tick of its old term can never pass for the new one."""
    again = next_move(held_by("b"), "b", leading=False, silent_for=0.0, timing=TIMING, now=NOW)
    assert again.kind is MoveKind.ACQUIRE and again.record is not None and again.record.transitions == 4


def test_a_leader_may_act_only_within_the_renew_deadline() -> None:
    assert TIMING.valid(renewed_at=100.0, now=100.0)
    assert TIMING.valid(renewed_at=100.0, now=109.99)
    assert not TIMING.valid(renewed_at=100.0, now=110.0)
    assert not TIMING.valid(renewed_at=100.0, now=99.0)  # a clock that went back is not trusted
    assert not TIMING.valid(renewed_at=float("-inf"), now=0.0)


def test_a_later_term_of_the_same_lease_supersedes_an_earlier_one() -> None:
    created = NOW - timedelta(days=1)
    old, new = FenceToken("a", 3, created, "u1"), FenceToken("b", 4, created, "u1")
    assert new.supersedes(old) and not old.supersedes(new) and not old.supersedes(old)


def test_terms_of_two_leases_are_never_ordered() -> None:
    """A Lease of another name (a release renamed, then rolled back) or one deleted and created again:
    its tokens never depose this Lease's terms (that would lock this controller out for good); a
    deleted Lease's holder stops by itself when its renewals find no Lease."""
    old = FenceToken("a", 40, NOW - timedelta(days=1), "u1")
    new = FenceToken("b", 0, NOW, "u2")
    assert not new.supersedes(old) and not old.supersedes(new)


@given(
    holder=st.text(max_size=20),
    term=st.integers(min_value=0, max_value=2**40),
    created=st.none() | st.datetimes(timezones=st.just(UTC)),
    uid=st.text(max_size=40),
)
def test_the_token_in_a_state_object_reads_back_as_written(
    holder: str, term: int, created: datetime | None, uid: str
) -> None:
    token = FenceToken(holder, term, created, uid)
    assert FenceToken.from_dict(token.as_dict()) == token


@pytest.mark.parametrize(
    "garbage",
    [
        None,
        "a",
        [],
        {"holder": "a"},
        {"holder": 1, "term": 1},
        {"holder": "a", "term": True},
        {"holder": "a", "term": "1"},
        {"holder": "a", "term": 1, "leaseCreated": "yesterday"},
        {"holder": "a", "term": 1, "leaseCreated": "2026-11-29T10:00:00"},  # no zone
    ],
)
def test_an_unreadable_token_reads_as_none(garbage: object) -> None:
    assert FenceToken.from_dict(garbage) is None
