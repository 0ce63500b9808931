"""Operator commands, approvals, advance windows (R9) and post-promotion verification (R10), at the
level of the pure decision, with injected time; plus the per-step bake and the RECOVERED notices.

``Rollout`` plays the runner's part as in tests/test_decision.py, and also says who gives a command
(``Observation.command_by``). Times are seconds after ``T0`` (2026-11-24 12:00 UTC, a Tuesday).
The last test drives the runner itself: which gates the checks at 100 judge is the runner's choice.
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

import pytest

from controller.adapters.memory import InMemoryGatewayPair, InMemoryStateStore
from controller.core.decision import Action, CommandOutcome, Decision
from controller.core.enums import AlertKind, Command, GatewayRole, InconclusiveCause, Phase, Severity, Verdict
from controller.core.gates import judge
from controller.core.policy import CanaryPolicy
from controller.core.results import CheckResult
from controller.core.schedule import Weights
from controller.core.state import MAX_HISTORY
from controller.notify.dispatcher import AlertDispatcher
from controller.runtime.reconciler import PolicyRunner
from controller.runtime.telemetry import Telemetry
from tests import helpers
from tests.helpers import FAIL, NO_DATA, PASS, PROM_DOWN, TARGET_QUIET, at, make_policy, samples

OPERATOR = "alice"
MACHINE = "gateway-canary"


def policy(
    *,
    steps: list[Any] | None = None,
    bake: str = "1m",
    approval_at: list[int] | None = None,
    windows: dict[str, Any] | None = None,
    verify_for: str | None = None,
    mode: str | None = None,
    analysis: dict[str, Any] | None = None,
) -> CanaryPolicy:
    """steps [10, 50, 100] baking 1m, interval 30s, failureThreshold 2, unless told otherwise."""
    schedule: dict[str, Any] = {"steps": steps or [10, 50, 100], "bakeTime": bake}
    if approval_at is not None:
        schedule["approvalAt"] = approval_at
    if windows is not None:
        schedule["advanceWindows"] = windows
    if mode is not None:
        schedule["weightMode"] = mode
    extra: dict[str, Any] = {}
    if verify_for is not None:
        extra["promotion"] = {"verifyFor": verify_for}
    if analysis is not None:
        extra["analysis"] = {"interval": "30s", "window": "1m", "minRequests": 50, "failureThreshold": 2, **analysis}
    return make_policy(schedule=schedule, **extra)


PLAIN = policy()
GATED = policy(approval_at=[50, 100])
VERIFIED = policy(verify_for="2m")
#: raises only 12:00-12:05 UTC (T0 is 12:00)
WINDOWED = policy(windows={"windows": [{"hours": "12:00-12:05"}]})
DAY = 86400


class Rollout(helpers.Rollout):
    """The rollout of these tests: the plain policy by default, commands given by OPERATOR."""

    DEFAULT_POLICY = PLAIN
    OPERATOR = OPERATOR


def started(policy: CanaryPolicy = PLAIN, t: float = 0) -> Rollout:
    rollout = Rollout.fresh(policy)
    assert rollout.tick(TARGET_QUIET, t).action is Action.START
    return rollout


def at_weight(weight: int, policy: CanaryPolicy = PLAIN) -> Rollout:
    """Baked up to ``weight`` (fault-free, every check passing, approvals given when asked)."""
    rollout = started(policy)
    t = 30.0
    while rollout.target != weight:
        command = Command.APPROVE if rollout.state.awaiting is not None else None
        rollout.tick(PASS, t, command=command)
        t += 30
        assert t < 3600, "never got there"
    return rollout


def verifying(policy: CanaryPolicy = VERIFIED) -> Rollout:
    rollout = at_weight(100, policy)
    assert rollout.state.phase is Phase.VERIFYING
    return rollout


def kinds(decision: Decision) -> list[AlertKind]:
    return [notice.kind for notice in decision.notices]


def last_t(rollout: Rollout) -> float:
    return (rollout.decisions[-1].state.history[-1].at - at(0)).total_seconds() if rollout.decisions else 0.0


# --- per-step bake --------------------------------------------------------------------------------------


def test_a_step_with_its_own_bake_time_bakes_that_long_and_plain_steps_bake_bake_time() -> None:
    rollout = started(policy(steps=[{"weight": 5, "bakeTime": "30m"}, 10, 100], bake="1m"))
    assert rollout.target == 5
    for decision in rollout.every(PASS, 30, 1800):  # 1770 s covered of 1800 s
        assert decision.weights is None, decision.reason
    assert "1800s of passing checks needed" in rollout.state.reason
    assert rollout.tick(PASS, 1830).action is Action.ADVANCE and rollout.target == 10
    rollout.every(PASS, 1860, 1890)  # the plain step: bakeTime, 1m
    assert rollout.target == 10
    assert rollout.tick(PASS, 1920).action is Action.PROMOTE and rollout.target == 100


def test_a_step_may_bake_shorter_than_bake_time() -> None:
    rollout = started(policy(steps=[{"weight": 5, "bakeTime": "0s"}, 10], bake="1h"))
    assert rollout.tick(PASS, 30).action is Action.ADVANCE and rollout.target == 10
    rollout.every(PASS, 60, 1800)
    assert rollout.target == 10


def test_plain_steps_serialise_as_plain_numbers_and_keep_the_rollout_fingerprint() -> None:
    # Fingerprints computed by the release before per-step bakes (commit 9634e01) for the same
    # policies: a running rollout must not see its policy as changed after the upgrade.
    assert make_policy().rollout_fingerprint() == "f9f0c917720fe3dd"
    assert make_policy(schedule={"steps": [5, 25, 100], "bakeTime": "30m"}).rollout_fingerprint() == "c92133560e90e78b"
    assert make_policy(schedule={"stepWeight": 20, "bakeTime": "1m"}).rollout_fingerprint() == "2605853b367043b5"
    plain = make_policy(schedule={"steps": [5, 25, 100], "bakeTime": "30m"})
    dumped = plain.spec.schedule.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    assert dumped["steps"] == [5, 25, 100]
    mixed = make_policy(schedule={"steps": [{"weight": 5, "bakeTime": "30m"}, 25, {"weight": 50}], "bakeTime": "1m"})
    dumped = mixed.spec.schedule.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    assert dumped["steps"] == [{"weight": 5, "bakeTime": "1800s"}, 25, 50]
    assert (
        mixed.rollout_fingerprint()
        != make_policy(schedule={"steps": [5, 25, 50], "bakeTime": "1m"}).rollout_fingerprint()
    )
    # who approves and when raises may happen do not steer the evidence
    gated = make_policy(
        schedule={
            "steps": [5, 25, 100],
            "bakeTime": "30m",
            "approvalAt": [25],
            "advanceWindows": {"windows": [{"hours": "10:00-11:00"}]},
        }
    )
    assert gated.rollout_fingerprint() == "c92133560e90e78b"


# --- advance windows (R9) ------------------------------------------------------------------------------


def test_a_due_raise_waits_outside_the_windows_and_happens_in_the_next_one() -> None:
    rollout = started(policy(windows={"windows": [{"hours": "12:00-12:01"}]}))
    rollout.every(PASS, 30, 60)
    held = rollout.tick(PASS, 90)  # 12:01:30, bake covered
    assert held.action is Action.HOLD and held.weights is None and rollout.target == 10
    assert held.reason == (
        "not raising the weight: outside the advance windows (daily 12:00-12:01 UTC); next opens 2026-11-25 12:00 UTC"
    )
    assert held.state.phase is Phase.PROGRESSING and held.state.covered_seconds == 60  # analysis goes on
    for t in range(120, 3600, 30):
        assert rollout.tick(PASS, t).weights is None
    raised = rollout.tick(PASS, DAY)  # the next day at 12:00: what was covered stays covered
    assert raised.action is Action.ADVANCE and rollout.target == 50


def test_the_start_waits_for_a_window_too() -> None:
    rollout = Rollout.fresh(WINDOWED)
    held = rollout.tick(TARGET_QUIET, 300)  # 12:05: closed
    assert held.action is Action.HOLD and held.weights is None and rollout.state.phase is Phase.PENDING
    assert "outside the advance windows (daily 12:00-12:05 UTC); next opens 2026-11-25 12:00 UTC" in held.reason
    assert rollout.tick(TARGET_QUIET, DAY - 30).weights is None  # 11:59:30
    assert rollout.tick(TARGET_QUIET, DAY).action is Action.START


def test_a_freeze_date_holds_every_raise_that_day() -> None:
    frozen = policy(windows={"windows": [{}], "freezeDates": ["2026-11-24"]})
    rollout = Rollout.fresh(frozen)
    held = rollout.tick(TARGET_QUIET, 0)
    assert held.weights is None
    assert held.reason == (
        "not raising the weight: a freeze date (2026-11-24 UTC) holds raises; next opens 2026-11-25 00:00 UTC"
    )
    assert rollout.tick(TARGET_QUIET, 12 * 3600 - 1).weights is None  # 23:59:59
    assert rollout.tick(TARGET_QUIET, 12 * 3600).action is Action.START


def test_outside_the_windows_failures_are_counted_and_roll_back() -> None:
    rollout = started(WINDOWED)
    rollout.every(PASS, 30, 90)
    rollout.tick(FAIL, 3600)  # 13:00: closed
    assert rollout.state.consecutive_failures == 1
    decision = rollout.tick(FAIL, 3630)
    assert decision.action is Action.ROLLBACK and rollout.weights == (0, 100)
    assert kinds(decision) == [AlertKind.ROLLED_BACK]


def test_outside_the_windows_an_abort_rolls_back() -> None:
    rollout = started(WINDOWED)
    decision = rollout.tick(PASS, 3600, command=Command.ABORT)
    assert decision.action is Action.ROLLBACK and rollout.weights == (0, 100)
    assert decision.outcome == CommandOutcome(True, "rolled back to 0")


def test_an_unfinished_raise_is_completed_only_inside_a_window() -> None:
    rollout = started(WINDOWED)
    rollout.every(PASS, 30, 60)
    raised = rollout.tick(PASS, 90, write=False)  # decided inside, the patches failed
    assert raised.action is Action.ADVANCE and rollout.weights == (10, 90)
    rollout.target = 50  # later the target patch lands; the source patch did not
    held = rollout.tick(PASS, 3600)  # 13:00: closed
    assert held.action is Action.HOLD and held.weights is None and held.state.pending == raised.state.pending
    assert held.reason.startswith("unfinished weight change waits: outside the advance windows")
    completed = rollout.tick(PASS, DAY + 30)
    assert completed.action is Action.COMPLETE_WRITE and rollout.weights == (50, 50)


def test_a_lowering_write_is_not_held_by_a_window() -> None:
    """A failed verification steps back to the last split outside any window (R10 is a rollback)."""
    rollout = verifying(policy(verify_for="10m", windows={"windows": [{"hours": "12:00-12:05"}]}))
    rollout.tick(FAIL, 3600)
    stepped = rollout.tick(FAIL, 3630)
    assert stepped.action is Action.ROLLBACK and rollout.weights == (50, 50)


def test_windows_do_not_delay_a_promotion_check_that_raises_nothing() -> None:
    """Verification finishing at 100 writes nothing: it ends outside a window too."""
    rollout = verifying(policy(verify_for="2m", windows={"windows": [{"hours": "12:00-12:05"}]}))
    decisions = rollout.every(PASS, 3600, 3720)  # 13:00-13:02: closed
    assert rollout.state.phase is Phase.PROMOTED, rollout.state.reason
    assert kinds(decisions[-1]) == [AlertKind.PROMOTED] and all(d.weights is None for d in decisions)


# --- approvals (R9) -------------------------------------------------------------------------------------


def test_the_rollout_awaits_approval_before_an_approval_weight_and_says_so_once() -> None:
    rollout = at_weight(10, GATED)
    decisions = rollout.every(PASS, 600, 900)
    assert all(d.weights is None for d in decisions) and rollout.target == 10
    awaiting = [d for d in decisions if AlertKind.AWAITING_APPROVAL in kinds(d)]
    assert len(awaiting) == 1, "the wait is said once, not on every check"
    notice = awaiting[0].notices[0]
    assert notice.severity is Severity.INFO and "approvalAt 50" in notice.reason
    assert "gateway-canary approve shop" in notice.reason
    assert rollout.state.awaiting == 50
    # an inconclusive check in between, a failing one, the bake again: still said only once
    rollout.tick(NO_DATA, 930)
    rollout.tick(FAIL, 960)
    later = rollout.every(PASS, 990, 1200)
    assert not any(AlertKind.AWAITING_APPROVAL in kinds(d) for d in later)
    assert rollout.state.awaiting == 50 and rollout.target == 10


def test_approve_raises_on_the_same_tick_when_everything_is_ready() -> None:
    rollout = at_weight(10, GATED)
    rollout.every(PASS, 600, 690)
    assert rollout.state.awaiting == 50
    decision = rollout.tick(PASS, 720, command=Command.APPROVE)
    assert decision.action is Action.ADVANCE and rollout.weights == (50, 50)
    assert decision.outcome is not None and decision.outcome.applied
    assert "approved the raise to 50" in decision.outcome.reason
    assert decision.state.awaiting is None and decision.state.approved == (50,)
    assert decision.state.history[-1].by == OPERATOR


def test_approve_without_a_passing_check_approves_and_the_raise_waits_for_one() -> None:
    rollout = at_weight(10, GATED)
    rollout.every(PASS, 600, 690)
    decision = rollout.tick(NO_DATA, 720, command=Command.APPROVE)
    assert decision.weights is None and decision.outcome is not None and decision.outcome.applied
    assert decision.state.approved == (50,) and decision.state.awaiting is None
    assert rollout.target == 10
    raised = rollout.tick(PASS, 750)  # the bake was covered before the inconclusive check
    assert raised.action is Action.ADVANCE and rollout.target == 50, "approved: the next passing check raises"


def test_approve_in_advance_approves_the_next_approval_weight_ahead() -> None:
    rollout = started(GATED)
    decision = rollout.tick(PASS, 30, command=Command.APPROVE)
    assert decision.outcome == CommandOutcome(True, "approved the raise to 50 in advance")
    assert decision.state.approved == (50,) and decision.state.awaiting is None
    rollout.every(PASS, 60, 90)
    assert rollout.target == 50  # no wait at 50
    rollout.every(PASS, 120, 300)
    assert rollout.target == 50 and rollout.state.awaiting == 100  # but 100 is asked for
    second = rollout.tick(PASS, 330, command=Command.APPROVE)
    assert second.outcome is not None and "approved the raise to 100" in second.outcome.reason
    assert rollout.target == 100 and rollout.state.phase is Phase.PROMOTED


def test_a_raise_that_passes_an_approval_weight_waits_for_it() -> None:
    rollout = at_weight(10, policy(approval_at=[30]))
    rollout.every(PASS, 600, 690)
    assert rollout.target == 10 and rollout.state.awaiting == 30
    assert "10 -> 50 (approvalAt 30)" in rollout.state.reason
    rollout.tick(PASS, 720, command=Command.APPROVE)
    assert rollout.target == 50


def test_an_approval_at_the_first_step_holds_the_start() -> None:
    rollout = Rollout.fresh(policy(approval_at=[10]))
    first = rollout.tick(TARGET_QUIET, 0)
    assert first.weights is None and first.state.awaiting == 10 and kinds(first) == [AlertKind.AWAITING_APPROVAL]
    assert rollout.tick(TARGET_QUIET, 30).notices == ()
    decision = rollout.tick(TARGET_QUIET, 60, command=Command.APPROVE)
    assert decision.action is Action.START and rollout.target == 10


def test_approve_with_nothing_to_approve_is_rejected_with_the_reason() -> None:
    rollout = started()
    decision = rollout.tick(PASS, 30, command=Command.APPROVE)
    assert decision.outcome == CommandOutcome(False, "nothing to approve: no approvalAt weight lies ahead")
    assert decision.state.approved == ()
    assert decision.state.history[-1].action == "approve" and decision.state.history[-1].by == OPERATOR
    assert decision.state.history[-1].reason.startswith("rejected: nothing to approve")
    promoted = at_weight(100, GATED)
    answer = promoted.tick(None, 2000, command=Command.APPROVE)
    assert answer.outcome == CommandOutcome(False, "nothing to approve: the rollout is Promoted")
    passed = at_weight(50, policy(approval_at=[50]))  # the only approval weight is behind
    assert not passed.tick(PASS, 2000, command=Command.APPROVE).outcome.applied  # type: ignore[union-attr]


def test_approvals_reset_on_retry() -> None:
    rollout = started(GATED)
    rollout.tick(PASS, 30, command=Command.APPROVE)
    assert rollout.state.approved == (50,)
    rollout.tick(FAIL, 60)
    rollout.tick(FAIL, 90)
    assert rollout.state.phase is Phase.ROLLED_BACK
    retried = rollout.tick(None, 120, command=Command.RETRY)
    assert retried.outcome == CommandOutcome(True, "starting again")
    assert retried.state.approved == () and retried.state.awaiting is None
    rollout.tick(TARGET_QUIET, 150)
    rollout.every(PASS, 180, 600)
    assert rollout.target == 10 and rollout.state.awaiting == 50, "the old approval was used again"


def test_approvals_reset_when_a_policy_change_restarts_a_rolled_back_rollout() -> None:
    """A policy change after a rollback starts a new rollout (Action.RETRY): an approval given in
    the old one must not let the new one pass its approval weights (I10: 'in this rollout')."""
    rollout = started(GATED)
    rollout.tick(PASS, 30, command=Command.APPROVE)
    rollout.tick(FAIL, 60)
    rollout.tick(FAIL, 90)
    assert rollout.state.phase is Phase.ROLLED_BACK
    rollout.policy = policy(approval_at=[50, 100], bake="2m")
    restarted = rollout.tick(None, 120)
    assert restarted.action is Action.RETRY and restarted.state.phase is Phase.PENDING
    assert restarted.state.approved == (), "an approval of the rolled-back rollout survived the restart"


def test_promote_approves_everything_remaining() -> None:
    rollout = at_weight(10, GATED)
    rollout.every(PASS, 600, 690)
    assert rollout.state.awaiting == 50
    decision = rollout.tick(PASS, 720, command=Command.PROMOTE)
    assert decision.action is Action.PROMOTE and rollout.weights == (100, 0)
    assert decision.outcome == CommandOutcome(True, decision.reason)
    assert decision.state.approved == (50, 100) and decision.state.awaiting is None
    assert decision.state.phase is Phase.PROMOTED and kinds(decision) == [AlertKind.PROMOTED]
    assert decision.state.history[-1].by == OPERATOR and decision.state.history[-1].action == "Promote"


def test_an_approval_given_in_a_tick_that_rolls_back_does_not_make_the_rollback_the_operators() -> None:
    rollout = at_weight(10, GATED)
    rollout.tick(FAIL, 600)
    decision = rollout.tick(FAIL, 630, command=Command.APPROVE)
    assert decision.action is Action.ROLLBACK
    rollback = [entry for entry in decision.state.history if entry.action == "Rollback"]
    assert rollback and rollback[-1].by == MACHINE, "a rollback the checks caused is attributed to the approver"


# --- commands (R9) -------------------------------------------------------------------------------------


def in_phase(phase: Phase) -> Rollout:
    """A rollout standing in ``phase`` (at 10 unless the phase says otherwise)."""
    if phase is Phase.PENDING:
        return Rollout.fresh()
    if phase is Phase.PROGRESSING:
        return started()
    if phase is Phase.PAUSED:
        rollout = started()
        rollout.tick(None, 10, command=Command.PAUSE)
        return rollout
    if phase is Phase.VERIFYING:
        return verifying()
    if phase is Phase.PROMOTED:
        return at_weight(100)
    rollout = started()
    rollout.tick(FAIL, 10)
    rollout.tick(FAIL, 20)
    assert rollout.state.phase is Phase.ROLLED_BACK
    return rollout


@pytest.mark.parametrize(
    ("phase", "applied"),
    [
        (Phase.PENDING, True),
        (Phase.PROGRESSING, True),
        (Phase.VERIFYING, True),
        (Phase.PAUSED, False),
        (Phase.PROMOTED, False),
        (Phase.ROLLED_BACK, False),
    ],
)
def test_pause_applies_to_a_live_rollout_only(phase: Phase, applied: bool) -> None:
    rollout = in_phase(phase)
    weights = rollout.weights
    decision = rollout.tick(None, 3000, command=Command.PAUSE)
    assert decision.outcome is not None and decision.outcome.applied is applied
    assert decision.weights is None and rollout.weights == weights
    if applied:
        assert decision.action is Action.PAUSE and decision.state.phase is Phase.PAUSED
        assert decision.state.reason == "paused by an operator"
        assert decision.state.history[-1].by == OPERATOR and decision.state.history[-1].action == "Pause"
    else:
        assert decision.state.phase is phase
        assert decision.outcome.reason.startswith(f"not applied in phase {phase.value}")
        assert decision.state.history[-1].reason.startswith("rejected: not applied")


def test_a_pause_given_with_a_policy_change_stays_paused() -> None:
    """The policy was edited before the operator paused: the edit must not lift the pause a tick later."""
    rollout = started()
    rollout.policy = policy(bake="2m")
    paused = rollout.tick(PASS, 30, command=Command.PAUSE)
    assert paused.outcome == CommandOutcome(True, "paused") and paused.state.phase is Phase.PAUSED
    after = rollout.tick(PASS, 60)
    assert after.state.phase is Phase.PAUSED, f"the pause was lifted: {after.reason}"


def test_a_paused_rollout_holds_with_the_rollback_armed_and_resume_restarts_the_bake() -> None:
    rollout = started()
    rollout.every(PASS, 30, 60)
    rollout.tick(None, 70, command=Command.PAUSE)
    for t in range(90, 600, 30):
        assert rollout.tick(PASS, t).weights is None
    assert rollout.target == 10
    resumed = rollout.tick(PASS, 600, command=Command.RESUME)
    assert resumed.outcome == CommandOutcome(True, "resumed") and resumed.action is Action.RESUME
    assert resumed.state.phase is Phase.PROGRESSING and resumed.state.step_started_at == at(600)
    assert resumed.state.covered_seconds == 0
    rollout.every(PASS, 630, 660)
    assert rollout.target == 10  # 30 s covered since the resume
    assert rollout.tick(PASS, 690).action is Action.ADVANCE
    paused = started()
    paused.tick(None, 10, command=Command.PAUSE)
    paused.tick(FAIL, 30)
    assert paused.tick(FAIL, 60).action is Action.ROLLBACK


@pytest.mark.parametrize("phase", [Phase.PENDING, Phase.PROGRESSING, Phase.VERIFYING, Phase.PROMOTED])
def test_resume_is_rejected_unless_paused(phase: Phase) -> None:
    rollout = in_phase(phase)
    decision = rollout.tick(None, 3000, command=Command.RESUME)
    assert decision.outcome is not None and not decision.outcome.applied
    assert decision.state.phase is phase


def test_retry_starts_a_rolled_back_rollout_again_from_the_first_step() -> None:
    rollout = in_phase(Phase.ROLLED_BACK)
    retried = rollout.tick(None, 100, command=Command.RETRY, by="bob")
    assert retried.action is Action.RETRY and retried.outcome == CommandOutcome(True, "starting again")
    state = retried.state
    assert state.phase is Phase.PENDING and state.consecutive_failures == 0 and state.inconclusive == ()
    assert state.history[-1].by == "bob" and state.history[-1].action == "Retry"
    assert rollout.tick(TARGET_QUIET, 130).action is Action.START and rollout.target == 10


@pytest.mark.parametrize("phase", [Phase.PENDING, Phase.PROGRESSING, Phase.PAUSED, Phase.VERIFYING, Phase.PROMOTED])
def test_retry_is_rejected_unless_rolled_back(phase: Phase) -> None:
    rollout = in_phase(phase)
    decision = rollout.tick(None, 3000, command=Command.RETRY)
    assert decision.outcome is not None and not decision.outcome.applied
    assert decision.state.phase is phase


@pytest.mark.parametrize("phase", [Phase.PROGRESSING, Phase.PAUSED, Phase.VERIFYING, Phase.PROMOTED])
def test_abort_rolls_back_to_0_wherever_the_target_carries_traffic(phase: Phase) -> None:
    rollout = in_phase(phase)
    assert (rollout.target or 0) > 0
    decision = rollout.tick(PASS, 3000, command=Command.ABORT, by="carol")
    assert decision.action is Action.ROLLBACK and decision.force and rollout.weights == (0, 100)
    assert decision.outcome == CommandOutcome(True, "rolled back to 0")
    assert decision.state.phase is Phase.ROLLED_BACK
    assert [(n.kind, n.severity) for n in decision.notices] == [(AlertKind.ROLLED_BACK, Severity.CRITICAL)]
    assert "aborted by an operator" in decision.reason
    assert decision.state.history[-1].by == "carol" and decision.state.history[-1].action == "Rollback"


def test_abort_with_nothing_to_abort_is_rejected() -> None:
    rollout = in_phase(Phase.ROLLED_BACK)
    decision = rollout.tick(None, 3000, command=Command.ABORT)
    assert decision.weights is None and decision.outcome is not None and not decision.outcome.applied
    assert decision.outcome.reason.startswith("not applied in phase RolledBack")


def test_abort_while_a_rollback_is_pending_says_it_is_being_written() -> None:
    rollout = started()
    rollout.tick(FAIL, 30)
    rollout.tick(FAIL, 60, write=False)
    decision = rollout.tick(None, 90, command=Command.ABORT)
    assert decision.action is Action.ROLLBACK and rollout.weights == (0, 100)
    assert decision.outcome == CommandOutcome(True, "a rollback was already being written")


def test_abort_while_a_step_back_is_pending_goes_to_0() -> None:
    """The operator's abort outranks the verification's step back to the last split (I11)."""
    rollout = verifying()
    rollout.tick(FAIL, 3000)
    stepped = rollout.tick(FAIL, 3030, write=False)  # the step back to 50/50 is not written yet
    assert stepped.state.pending is not None and stepped.state.pending.weights == Weights(50, 50)
    decision = rollout.tick(None, 3060, command=Command.ABORT)
    assert decision.action is Action.ROLLBACK
    assert decision.weights == Weights(0, 100), f"abort answered {decision.outcome} but wrote {decision.weights}"


def test_promote_is_applied_only_on_a_passing_check() -> None:
    rollout = started()
    for check in (FAIL, NO_DATA, None):
        decision = rollout.tick(check, 30, command=Command.PROMOTE)
        assert decision.outcome is not None and not decision.outcome.applied
        assert decision.outcome.reason.startswith("refused: promotion needs a passing check")
        assert rollout.target == 10
    rollout = started()
    decision = rollout.tick(PASS, 30, command=Command.PROMOTE, by="dave")
    assert decision.action is Action.PROMOTE and rollout.weights == (100, 0)
    assert decision.outcome == CommandOutcome(True, decision.reason)
    assert decision.state.history[-1].by == "dave"


@pytest.mark.parametrize(
    ("observed", "why"),
    [
        ({"refusal": "alerts[0].urlFromEnv: PAGER is not set"}, "PAGER is not set"),
        ({"settling": "settling: the weight write is not confirmed"}, "is INCONCLUSIVE"),
        ({"cloud_refusal": "the cloud did not confirm the last weight write"}, "the cloud did not confirm"),
    ],
)
def test_promote_goes_through_the_permission_rules_and_is_rejected_with_their_reason(
    observed: dict[str, Any], why: str
) -> None:
    rollout = started()
    decision = rollout.tick(PASS, 30, command=Command.PROMOTE, **observed)
    assert decision.weights is None and rollout.target == 10
    assert decision.outcome is not None and not decision.outcome.applied
    assert why in decision.outcome.reason
    assert decision.state.approved == ()


def test_promote_outside_the_windows_is_rejected_with_the_window() -> None:
    rollout = started(WINDOWED)
    decision = rollout.tick(PASS, 3600, command=Command.PROMOTE)
    assert decision.weights is None and rollout.target == 10
    assert decision.outcome is not None and not decision.outcome.applied
    assert "outside the advance windows (daily 12:00-12:05 UTC)" in decision.outcome.reason


def test_promote_with_verification_enters_verifying() -> None:
    rollout = started(VERIFIED)
    decision = rollout.tick(PASS, 30, command=Command.PROMOTE)
    assert decision.outcome is not None and decision.outcome.applied
    assert decision.state.phase is Phase.VERIFYING and rollout.weights == (100, 0)
    assert kinds(decision) == []


@pytest.mark.parametrize("command", list(Command))
@pytest.mark.parametrize(
    "phase", [Phase.PENDING, Phase.PROGRESSING, Phase.PAUSED, Phase.VERIFYING, Phase.PROMOTED, Phase.ROLLED_BACK]
)
@pytest.mark.parametrize("check", [PASS, FAIL, NO_DATA, None], ids=["PASS", "FAIL", "NO_DATA", "none"])
def test_every_command_is_answered_and_recorded_in_the_history(
    command: Command, phase: Phase, check: CheckResult | None
) -> None:
    rollout = in_phase(phase)
    decision = rollout.tick(check, 3000, command=command, by="erin")
    assert decision.outcome is not None
    assert len(decision.state.history) <= MAX_HISTORY
    mine = [entry for entry in decision.state.history if entry.by == "erin" and entry.at == at(3000)]
    assert mine, f"{command} in {phase}: no history entry by the operator"
    if not decision.outcome.applied:
        assert any(entry.action == command.value and entry.reason.startswith("rejected: ") for entry in mine)


def test_every_command_is_answered_when_the_services_show_an_unfinished_or_outside_change() -> None:
    for command in Command:
        unfinished = started()
        unfinished.every(PASS, 30, 60)
        unfinished.tick(PASS, 90, write=False)
        assert unfinished.tick(PASS, 120, command=command).outcome is not None
        edited = started()
        edited.target, edited.source = 30, 70
        assert edited.tick(PASS, 30, command=command).outcome is not None


def test_the_history_keeps_the_last_transitions_newest_last_with_who_made_them() -> None:
    rollout = started()
    assert rollout.state.history[-1].by == MACHINE and rollout.state.history[-1].action == "Start"
    t = 30
    for _ in range(8):
        rollout.tick(None, t, command=Command.PAUSE, by="frank")
        rollout.tick(None, t + 1, command=Command.RESUME, by="grace")
        t += 10
    history = rollout.state.history
    assert len(history) == MAX_HISTORY
    assert [entry.at for entry in history] == sorted(entry.at for entry in history)
    assert history[-1].action == "Resume" and history[-1].by == "grace" and history[-2].by == "frank"
    rollout.every(PASS, 1000, 1060)
    assert rollout.state.history[-1].action == "Advance" and rollout.state.history[-1].by == MACHINE


def test_an_approval_in_advance_given_on_an_automatic_raise_is_recorded_and_the_raise_is_the_controllers() -> None:
    rollout = started(policy(approval_at=[100]))
    rollout.every(PASS, 30, 60)
    decision = rollout.tick(PASS, 90, command=Command.APPROVE)  # the bake at 10 is covered: 10 -> 50
    assert decision.action is Action.ADVANCE and decision.outcome is not None and decision.outcome.applied
    entries = decision.state.history[-2:]
    assert any(e.action == "approve" and "approved the raise to 100 in advance" in e.reason for e in entries), [
        (e.action, e.by, e.reason) for e in decision.state.history
    ]
    advance = [e for e in entries if e.action == "Advance"]
    assert advance and advance[0].by == MACHINE


# --- post-promotion verification (R10) ------------------------------------------------------------------


def test_the_raise_to_100_verifies_before_promoted() -> None:
    rollout = at_weight(50, VERIFIED)
    t = last_t(rollout) + 30
    rollout.every(PASS, t, t + 60)
    assert rollout.target == 100
    entering = next(d for d in rollout.decisions if d.state.phase is Phase.VERIFYING)
    assert entering.action is Action.PROMOTE and entering.weights == Weights(100, 0)
    assert kinds(entering) == [] and "verifying for 120s before promoted" in entering.reason
    t = (rollout.state.step_started_at - at(0)).total_seconds()  # type: ignore[operator]
    decisions = rollout.every(PASS, t + 30, t + 150)  # the first pass starts the run: 120 s covered at t+150
    assert [d.state.phase for d in decisions].count(Phase.PROMOTED) == 1
    assert decisions[-1].state.phase is Phase.PROMOTED and kinds(decisions[-1]) == [AlertKind.PROMOTED]
    assert decisions[-1].reason == "promoted: verified at 100 for 120s of passing checks"
    assert all(d.state.phase is Phase.VERIFYING for d in decisions[:-1])
    assert all(d.weights is None for d in decisions)


def test_verification_needs_covered_passes() -> None:
    rollout = verifying()
    t = (rollout.state.step_started_at - at(0)).total_seconds()  # type: ignore[operator]
    rollout.every(PASS, t + 30, t + 90)  # 60 s covered
    rollout.tick(PROM_DOWN, t + 120)  # closes the run
    rollout.tick(PASS, t + 150)  # a new run: nothing added
    assert rollout.state.phase is Phase.VERIFYING and rollout.state.covered_seconds == 60
    rollout.tick(PASS, t + 180)
    rollout.tick(PASS, t + 3600)  # a gap: covers nothing
    assert rollout.state.phase is Phase.VERIFYING and rollout.state.covered_seconds == 90
    assert rollout.tick(PASS, t + 3630).state.phase is Phase.PROMOTED  # 120 s covered in three runs


@pytest.mark.parametrize("mode", ["complementary", "target-only"])
def test_a_failure_while_verifying_steps_back_to_the_last_split_one_fail_from_0(mode: str) -> None:
    rollout = verifying(policy(verify_for="10m", mode=mode))
    held = rollout.tick(FAIL, 3000)
    assert held.weights is None and held.state.phase is Phase.VERIFYING
    assert held.reason.startswith("verifying at 100: check failed (1/2)")
    stepped = rollout.tick(FAIL, 3030)
    assert stepped.action is Action.ROLLBACK and stepped.force and stepped.transition
    # back to the split judged at 50: 50/50, or in target-only mode 50 against the source's own 100
    judged = (50, 50) if mode == "complementary" else (50, 100)
    assert stepped.weights == Weights(*judged) and rollout.weights == judged
    assert stepped.state.phase is Phase.PAUSED and stepped.state.consecutive_failures == 1
    assert [(n.kind, n.severity) for n in stepped.notices] == [(AlertKind.ROLLED_BACK, Severity.CRITICAL)]
    assert "stepped back to target weight 50" in stepped.reason
    assert AlertKind.PROMOTED not in [k for d in rollout.decisions for k in kinds(d)]
    final = rollout.tick(FAIL, 3060)  # one more FAIL: to 0
    assert final.action is Action.ROLLBACK and final.weights is not None and final.weights.target == 0
    assert final.state.phase is Phase.ROLLED_BACK and rollout.target == 0


def test_after_a_step_back_a_pass_clears_the_failures_and_the_rollout_stays_paused() -> None:
    rollout = verifying(policy(verify_for="10m"))
    rollout.tick(FAIL, 3000)
    rollout.tick(FAIL, 3030)
    passed = rollout.tick(PASS, 3060)
    assert passed.weights is None and passed.state.phase is Phase.PAUSED and passed.state.consecutive_failures == 0
    assert rollout.tick(FAIL, 3090).action is Action.HOLD
    assert rollout.weights == (50, 50)


def test_a_pending_step_back_is_retried_with_its_own_weights() -> None:
    rollout = verifying(policy(verify_for="10m"))
    rollout.tick(FAIL, 3000)
    rollout.tick(FAIL, 3030, write=False)  # the patches failed: the Services still show 100/0
    for t in (3060, 3090):
        again = rollout.tick(PASS, t, write=False)
        assert again.action is Action.ROLLBACK and again.force and again.weights == Weights(50, 50)
        assert again.notices == () and not again.transition
    rollout.tick(PASS, 3120)
    assert rollout.weights == (50, 50) and rollout.state.pending is None
    assert rollout.state.phase is Phase.PAUSED


def test_a_pending_step_back_never_raises_the_target_over_a_lower_weight_someone_set() -> None:
    """A step back is a rollback that is not to 0: retried over someone else's lower weight it would
    raise the ASM gateway's share, on any check and outside any window."""
    rollout = verifying(policy(verify_for="10m"))
    rollout.tick(FAIL, 3000)
    rollout.tick(FAIL, 3030, write=False)  # the step back to 50/50 is not written yet
    rollout.target, rollout.source = 20, 80  # an operator lowers the ASM gateway by hand meanwhile
    decision = rollout.tick(PASS, 3060)
    assert decision.weights is None or decision.weights.target <= 20, f"wrote {decision.weights} over 20/80"


def test_a_rollback_worthy_inconclusive_run_while_verifying_steps_back_too() -> None:
    rollout = verifying(
        policy(verify_for="10m", analysis={"onMetricsUnavailable": {"action": "rollback", "afterChecks": 2}})
    )
    rollout.tick(PROM_DOWN, 3000)
    stepped = rollout.tick(PROM_DOWN, 3030)
    assert stepped.weights == Weights(50, 50) and stepped.state.phase is Phase.PAUSED
    assert stepped.state.inconclusive == () and stepped.state.consecutive_failures == 1
    assert rollout.tick(FAIL, 3060).weights == Weights(0, 100)


def test_with_a_failure_threshold_of_1_a_step_back_is_still_one_fail_from_0() -> None:
    rollout = verifying(policy(verify_for="10m", analysis={"failureThreshold": 1}))
    stepped = rollout.tick(FAIL, 3000)
    assert stepped.weights == Weights(50, 50) and stepped.state.consecutive_failures == 0
    assert rollout.tick(FAIL, 3030).weights == Weights(0, 100)


def test_a_single_step_schedule_has_no_split_to_step_back_to() -> None:
    rollout = Rollout.fresh(policy(steps=[100], verify_for="10m"))
    assert rollout.tick(TARGET_QUIET, 0).action is Action.PROMOTE and rollout.state.phase is Phase.VERIFYING
    rollout.tick(FAIL, 3000)
    decision = rollout.tick(FAIL, 3030)
    assert decision.weights == Weights(0, 100) and decision.state.phase is Phase.ROLLED_BACK


def test_an_abort_while_verifying_goes_to_0_not_to_the_last_split() -> None:
    rollout = verifying()
    decision = rollout.tick(PASS, 3000, command=Command.ABORT)
    assert decision.weights == Weights(0, 100) and decision.state.phase is Phase.ROLLED_BACK


def test_a_promoted_rollout_is_not_rolled_back_by_checks() -> None:
    rollout = at_weight(100, VERIFIED)
    t = (rollout.state.step_started_at - at(0)).total_seconds()  # type: ignore[operator]
    rollout.every(PASS, t + 30, t + 150)
    assert rollout.state.phase is Phase.PROMOTED
    for s in (30, 60, 90):
        assert rollout.tick(FAIL, t + 150 + s).weights is None
    assert rollout.weights == (100, 0)


def test_a_verification_paused_and_resumed_verifies_again() -> None:
    """Resume continues where the pause stopped: verifying at 100 (absolute gates, a step back on
    failure), not a bake at 100 as if Progressing."""
    rollout = verifying(policy(verify_for="10m"))
    rollout.tick(None, 3000, command=Command.PAUSE)
    resumed = rollout.tick(None, 3010, command=Command.RESUME)
    assert resumed.outcome is not None and resumed.outcome.applied
    assert resumed.state.phase is Phase.VERIFYING, f"resumed into {resumed.state.phase}"


def test_a_failure_after_a_paused_verification_was_resumed_still_steps_back() -> None:
    rollout = verifying(policy(verify_for="10m"))
    rollout.tick(None, 3000, command=Command.PAUSE)
    rollout.tick(None, 3010, command=Command.RESUME)
    rollout.tick(FAIL, 3030)
    decision = rollout.tick(FAIL, 3060)
    assert decision.weights == Weights(50, 50), f"a failed verification wrote {decision.weights}"


# --- absolute-only checks (R10) ---------------------------------------------------------------------------


def test_verification_judges_the_target_alone_against_its_absolute_limits() -> None:
    gated = make_policy(gates={"errorRate": {"max": 0.01, "maxIncrease": 0.005}, "latency": {"p99Ms": {"max": 300}}})
    idle_source = samples(GatewayRole.SOURCE, requests=None, error_rate=None, latency=None)
    healthy = samples(GatewayRole.TARGET, requests=1000.0, error_rate=0.002, latency=120.0)
    full = judge(gated, idle_source, healthy)
    assert full.verdict is Verdict.INCONCLUSIVE  # the old gateway has no traffic to compare with
    verified = judge(gated, idle_source, healthy, absolute_only=True)
    assert verified.verdict is Verdict.PASS
    names = {gate.gate for gate in verified.gates}
    assert "errorRateIncrease" not in names and {"errorRate", "latencyP99", "targetRequests"} <= names
    failing = judge(gated, idle_source, samples(GatewayRole.TARGET, error_rate=0.05), absolute_only=True)
    assert failing.verdict is Verdict.FAIL and failing.failing[0].gate == "errorRate"
    quiet = judge(gated, idle_source, samples(GatewayRole.TARGET, requests=10.0), absolute_only=True)
    assert quiet.verdict is Verdict.INCONCLUSIVE and quiet.cause is InconclusiveCause.TOO_FEW_REQUESTS
    assert quiet.starved == (GatewayRole.TARGET,)
    down = judge(gated, idle_source, samples(GatewayRole.TARGET, error="boom"), absolute_only=True)
    assert down.verdict is Verdict.INCONCLUSIVE and down.cause is InconclusiveCause.METRICS_UNAVAILABLE


# --- RECOVERED notices ----------------------------------------------------------------------------------


def test_a_stuck_rollout_says_so_once_and_recovered_once_when_checks_pass() -> None:
    rollout = started(policy(analysis={"onMissingData": {"action": "hold", "afterChecks": 2}}))
    notices = [kinds(rollout.tick(NO_DATA, t)) for t in (30, 60, 90)]
    assert notices == [[], [AlertKind.STUCK_INCONCLUSIVE], []]
    recovered = rollout.tick(PASS, 120)
    assert kinds(recovered) == [AlertKind.RECOVERED]
    assert recovered.notices[0].severity is Severity.INFO and "NoData" in recovered.notices[0].reason
    assert recovered.state.stuck_reported == ()
    assert rollout.tick(PASS, 150).notices == ()


def test_a_refusal_that_clears_is_said_once() -> None:
    rollout = started()
    refusal = "alerts[0].urlFromEnv: environment variable PAGER is not set"
    assert kinds(rollout.tick(PASS, 30, refusal=refusal)) == [AlertKind.POLICY_REFUSED]
    cleared = rollout.tick(PASS, 60)
    # no Recovered for a refusal: one also ends by being overwritten (an unreadable state), where
    # "recovered" would be wrong; status shows whether anything still refuses
    assert cleared.notices == () and cleared.state.refusal is None
    assert rollout.tick(PASS, 90).notices == ()


def test_a_cloud_refusal_that_clears_is_said_once() -> None:
    rollout = started()
    refusal = "the cloud did not confirm the last weight write: ns/asm: SyncLoadBalancerFailed"
    assert kinds(rollout.tick(PASS, 30, cloud_refusal=refusal)) == [AlertKind.CLOUD_NOT_APPLIED]
    cleared = rollout.tick(PASS, 60)
    assert kinds(cleared) == [AlertKind.RECOVERED] and cleared.notices[0].severity is Severity.INFO
    assert refusal in cleared.notices[0].reason
    assert rollout.tick(PASS, 90).notices == ()


# --- the runner: which gates a check at 100 judges ------------------------------------------------------

#: at 100/0 the old gateway has no traffic: a full check cannot judge there
SOURCE_STARVED = CheckResult(
    verdict=Verdict.INCONCLUSIVE,
    gates=NO_DATA.gates,
    reason="source had 0 requests in the window, needs 50",
    cause=InconclusiveCause.TOO_FEW_REQUESTS,
    starved=(GatewayRole.SOURCE,),
    baseline=NO_DATA.baseline,
)


class AtFullCollector:
    """The collector at 100/0: the absolute gates pass, a full check is starved; records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[bool] = []

    def check(
        self, policy: CanaryPolicy, metrics: object, *, absolute_only: bool = False, evidence: object = None
    ) -> CheckResult:
        self.asked.append(absolute_only)
        return PASS if absolute_only else SOURCE_STARVED


class Clock:
    def __init__(self) -> None:
        self.t = at(0)

    def now(self) -> datetime:
        return self.t


def test_a_verification_paused_at_100_is_judged_on_the_absolute_gates_and_not_rolled_back_for_a_quiet_source() -> None:
    """Paused while verifying, the rollout stands at 100/0 where the old gateway has no traffic to
    compare with: full (comparative) checks can never judge there, and with onMissingData: rollback
    they roll a healthy target back to 0."""
    verified = policy(verify_for="10m", analysis={"onMissingData": {"action": "rollback", "afterChecks": 2}})
    store, pair, clock, collector = InMemoryStateStore(), InMemoryGatewayPair(100, 0), Clock(), AtFullCollector()
    store.save(verified, verifying(verified).state, store.load(verified))
    runner = PolicyRunner(
        verified,
        pair=pair,
        store=store,
        metrics=object(),  # type: ignore[arg-type]
        receivers=[],
        dispatcher=AlertDispatcher(),
        collector=collector,  # type: ignore[arg-type]
        clock=clock,
        telemetry=Telemetry(),
        stopping=threading.Event(),
    )
    clock.t = at(3000)
    runner.tick()
    assert collector.asked == [True]  # verifying: the absolute gates only
    clock.t = at(3010)
    runner.tick(Command.PAUSE)
    for t in (3040, 3070, 3100):
        clock.t = at(t)
        runner.tick()
    assert (pair.target_weight, pair.source_weight) == (100, 0), "a paused verification was rolled back"
    assert collector.asked[1:] == [True] * 4, f"checks at 100 while paused asked absolute_only={collector.asked}"
