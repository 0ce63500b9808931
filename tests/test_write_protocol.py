"""The write-ahead protocol of a weight change, killed at each of its crash points.

``controller.runtime.reconciler`` records the intent in the state object (1), patches the target
(2), then the source (3), then marks the change complete (4). A crash is a process that dies:
here an exception no handler catches (BaseException), after which a NEW runner (nothing kept in
memory) works from what the Services and the state object show.
"""

from __future__ import annotations

import pytest

from controller.adapters.memory import InMemoryGatewayPair, InMemoryStateStore
from controller.core.enums import GatewayRole, Phase
from controller.core.results import CheckResult
from controller.core.schedule import Weights
from controller.ports import PairSnapshot, StoredState
from controller.runtime.reconciler import PolicyRunner
from tests.helpers import FAIL, PASS, T0, TARGET_QUIET, make_policy, runner_for

POLICY = make_policy(schedule={"steps": [10, 50, 100], "bakeTime": 0}, analysis={"failureThreshold": 1})


class Crash(BaseException):
    """The process dies here."""


class CrashingPair(InMemoryGatewayPair):
    crash_after: GatewayRole | None = None  # die right after this Service's patch

    def write_weights(self, policy, seen: PairSnapshot, weights: Weights, *, force=False, drop_legacy_state=False):  # type: ignore[no-untyped-def]
        for role in (GatewayRole.TARGET, GatewayRole.SOURCE):
            self.write_one(role, seen, weights, force=force)
            if self.crash_after is role:
                self.crash_after = None
                raise Crash(f"killed after the {role.value} patch")


class CrashingStore(InMemoryStateStore):
    crash_on_save: int | None = None  # die after this many more successful saves

    def save(self, policy, state, previous: StoredState, outbox=(), status=None) -> StoredState:  # type: ignore[no-untyped-def]
        saved = super().save(policy, state, previous, outbox, status)
        if self.crash_on_save is not None:
            self.crash_on_save -= 1
            if self.crash_on_save < 0:
                self.crash_on_save = None
                raise Crash("killed right after a state save")
        return saved


class Checks:
    def __init__(self) -> None:
        self.next: CheckResult = PASS

    def check(self, policy, metrics, *, absolute_only=False, evidence=None) -> CheckResult:  # type: ignore[no-untyped-def]
        return self.next


class Clock:
    def now(self):  # type: ignore[no-untyped-def]
        return T0


def new_runner(pair: InMemoryGatewayPair, store: InMemoryStateStore, checks: Checks) -> PolicyRunner:
    return runner_for(POLICY, pair=pair, store=store, metrics=object(), collector=checks, clock=Clock())


def started() -> tuple[CrashingPair, CrashingStore, Checks]:
    pair, store, checks = CrashingPair(target_weight=0, source_weight=100), CrashingStore(), Checks()
    checks.next = TARGET_QUIET
    new_runner(pair, store, checks).tick()  # Start: 10/90
    assert (pair.target_weight, pair.source_weight) == (10, 90)
    checks.next = PASS
    return pair, store, checks


def crash_during_raise(point: str) -> tuple[CrashingPair, CrashingStore, Checks]:
    pair, store, checks = started()
    if point == "1-intent-recorded":
        store.crash_on_save = 0
    elif point == "2-target-patched":
        pair.crash_after = GatewayRole.TARGET
    elif point == "3-both-patched":
        pair.crash_after = GatewayRole.SOURCE
    with pytest.raises(Crash):
        new_runner(pair, store, checks).tick()  # the raise 10 -> 50 dies at the crash point
    return pair, store, checks


EXPECTED_AFTER_CRASH = {
    "1-intent-recorded": (10, 90),
    "2-target-patched": (50, 90),
    "3-both-patched": (50, 50),
}


@pytest.mark.parametrize("point", sorted(EXPECTED_AFTER_CRASH))
def test_a_raise_killed_at_each_crash_point_is_completed_on_a_pass(point: str) -> None:
    pair, store, checks = crash_during_raise(point)
    assert (pair.target_weight, pair.source_weight) == EXPECTED_AFTER_CRASH[point]
    stored = store.state_of("shop")
    assert stored is not None and stored.pending is not None and stored.pending.weights == Weights(50, 50)
    outcome = new_runner(pair, store, checks).tick()  # a restarted controller, a passing check
    assert outcome.error is None and outcome.decision is not None
    after = store.state_of("shop")
    assert after is not None and after.pending is None
    assert (pair.target_weight, pair.source_weight) == (after.target_weight, after.source_weight)
    if point == "3-both-patched":  # the change was complete: recognised, and the rollout goes on (bake 0)
        assert (pair.target_weight, pair.source_weight) == (100, 0)
    else:  # finished by the restarted controller
        assert outcome.decision.action.value == "CompleteWrite" and (pair.target_weight, pair.source_weight) == (50, 50)
    assert not [e for e in pair.events if e.reason in ("Paused", "WeightChangedExternally")]


@pytest.mark.parametrize("point", sorted(EXPECTED_AFTER_CRASH))
def test_a_raise_killed_at_each_crash_point_is_resolved_by_a_rollback_if_the_check_fails(point: str) -> None:
    pair, store, checks = crash_during_raise(point)
    checks.next = FAIL
    new_runner(pair, store, checks).tick()
    assert (pair.target_weight, pair.source_weight) == (0, 100)
    state = store.state_of("shop")
    assert state is not None and state.phase is Phase.ROLLED_BACK and state.pending is None


@pytest.mark.parametrize("point", ["1-intent-recorded", "2-target-patched", "3-both-patched"])
def test_a_rollback_killed_at_each_crash_point_is_finished_by_the_restarted_controller(point: str) -> None:
    pair, store, checks = started()
    checks.next = FAIL
    if point == "1-intent-recorded":
        store.crash_on_save = 0
    else:
        pair.crash_after = GatewayRole.TARGET if point == "2-target-patched" else GatewayRole.SOURCE
    with pytest.raises(Crash):
        new_runner(pair, store, checks).tick()
    checks.next = PASS  # R2: a pass after the crash does not cancel the rollback
    outcome = new_runner(pair, store, checks).tick()
    assert outcome.error is None and (pair.target_weight, pair.source_weight) == (0, 100)
    state = store.state_of("shop")
    assert state is not None and state.phase is Phase.ROLLED_BACK and state.pending is None
    rollbacks = [e for e in pair.events if e.reason == "RolledBack"]
    assert len(rollbacks) <= 1  # told once (not again by the controller that finished it)
