"""What ``status`` shows (controller.core.status.status_view) and what ``plan`` lays out
(controller.core.plan.plan_rows): content, not layout.

The states are the decision's own (driven through ``Rollout`` from tests/test_operator_rules.py),
so a view is checked against situations the controller really reaches.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from controller.core.cloud import Confirmation, ConfirmationState, Split
from controller.core.enums import Command, InconclusiveCause, Verdict
from controller.core.gates import gate_names
from controller.core.plan import plan_rows
from controller.core.results import CheckResult, GateResult
from controller.core.status import STATUS_VERSION, WaitingFor, status_view, step_position
from tests.helpers import FAIL, NO_DATA, PASS, TARGET_QUIET, at, make_policy
from tests.test_operator_rules import GATED, PLAIN, Rollout, at_weight, policy, started, verifying

#: raises only 12:00-12:05 UTC daily (T0 is 12:00)
WINDOWED = policy(windows={"windows": [{"hours": "12:00-12:05"}]})
NEXT_DAY_NOON = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def view(rollout: Rollout, t: float, check: CheckResult | None = PASS, **extra: Any) -> dict[str, Any]:
    result = status_view(rollout.policy, rollout.state, check, None if check is None else at(t), at(t), **extra)
    json.dumps(result, allow_nan=False)  # JSON types only, no NaN: the status travels as JSON
    return result


def waiting(rollout: Rollout, t: float, check: CheckResult | None = PASS) -> str:
    return str(view(rollout, t, check)["waiting"]["kind"])


# --- where the rollout stands -------------------------------------------------------------------------


def test_the_view_says_where_the_rollout_stands() -> None:
    rollout = started()
    rollout.every(PASS, 30, 60)  # 30 s of the 60 s bake covered
    shown = view(rollout, 60)
    assert shown["v"] == STATUS_VERSION and shown["policy"] == "shop" and shown["updatedAt"] == at(60).isoformat()
    assert shown["phase"] == "Progressing" and shown["reason"] == rollout.state.reason
    assert shown["step"] == {"index": 1, "count": 3, "weights": [10, 50, 100]}
    assert shown["weights"] == {"target": 10, "source": 90}
    assert shown["stepStartedAt"] == at(0).isoformat()
    assert shown["bake"] == {"needed": 60.0, "covered": 30.0}
    assert shown["next"] == {"weight": 50, "earliest": at(90).isoformat(), "needs": None, "promotes": False}
    assert shown["waiting"]["kind"] == WaitingFor.BAKE
    assert shown["approvals"] == {"at": [], "approved": []}
    assert shown["counts"] == {"failures": 0, "failureThreshold": 2, "inconclusive": {}}
    last = shown["lastCheck"]
    assert last["verdict"] == "PASS" and last["at"] == at(60).isoformat() and last["cause"] is None
    assert last["gates"][0]["gate"] == "errorRate" and last["gates"][0]["threshold"] == 0.01


@pytest.mark.parametrize(
    ("weight", "position"), [(0, (0, 3)), (9, (0, 3)), (10, (1, 3)), (49, (1, 3)), (50, (2, 3)), (100, (3, 3))]
)
def test_the_step_position_counts_the_steps_reached(weight: int, position: tuple[int, int]) -> None:
    assert step_position(PLAIN, weight) == position


def test_a_pending_rollout_waits_to_start_at_step_0() -> None:
    rollout = Rollout.fresh()
    shown = view(rollout, 0, None)
    assert shown["step"]["index"] == 0 and shown["waiting"]["kind"] == WaitingFor.START
    assert shown["next"]["weight"] == 10 and shown["lastCheck"] is None


# --- what it waits for ----------------------------------------------------------------------------------


def test_a_paused_rollout_waits_for_resume() -> None:
    rollout = started()
    rollout.tick(None, 10, command=Command.PAUSE)
    shown = view(rollout, 30)
    assert shown["waiting"] == {"kind": WaitingFor.PAUSED, "reason": "paused by an operator"}
    assert shown["next"]["needs"] == "resume" and shown["next"]["earliest"] is None


def test_an_awaited_approval_is_what_it_waits_for() -> None:
    rollout = at_weight(10, GATED)
    rollout.every(PASS, 600, 660)
    assert rollout.state.awaiting == 50
    shown = view(rollout, 660)
    assert (
        shown["waiting"]["kind"] == WaitingFor.APPROVAL and "gateway-canary approve shop" in shown["waiting"]["reason"]
    )
    assert shown["next"] == {"weight": 50, "earliest": None, "needs": "approve", "promotes": False}
    assert shown["approvals"] == {"at": [50, 100], "approved": []}


def test_an_approval_ahead_shows_in_next_before_the_wait_starts() -> None:
    rollout = at_weight(10, GATED)
    shown = view(rollout, 600)
    assert shown["waiting"]["kind"] == WaitingFor.BAKE and shown["next"]["needs"] == "approve"
    rollout.tick(PASS, 630, command=Command.APPROVE)
    approved = view(rollout, 630)
    assert approved["approvals"]["approved"] == [50] and approved["next"]["needs"] is None


def test_a_closed_window_is_what_a_baked_step_waits_for_with_the_next_opening() -> None:
    rollout = started(WINDOWED)
    rollout.every(PASS, 30, 60)
    rollout.every(PASS, 3600, 3660)  # 13:00: the bake is covered, the window closed
    assert rollout.target == 10
    shown = view(rollout, 3660)
    assert shown["waiting"]["kind"] == WaitingFor.WINDOW
    assert shown["waiting"]["reason"] == (
        "outside the advance windows (daily 12:00-12:05 UTC); next opens 2026-11-25 12:00 UTC"
    )
    assert datetime.fromisoformat(shown["next"]["earliest"]) == NEXT_DAY_NOON


def test_a_start_held_by_a_closed_window_waits_for_the_window() -> None:
    rollout = Rollout.fresh(WINDOWED)
    rollout.tick(TARGET_QUIET, 3600)  # 13:00: closed
    assert rollout.state.phase.value == "Pending" and rollout.target == 0
    shown = view(rollout, 3600, TARGET_QUIET)
    assert shown["waiting"]["kind"] == WaitingFor.WINDOW
    assert shown["waiting"]["reason"].endswith("next opens 2026-11-25 12:00 UTC")
    assert shown["step"]["index"] == 0 and shown["next"]["weight"] == 10
    assert datetime.fromisoformat(shown["next"]["earliest"]) == NEXT_DAY_NOON
    assert waiting(Rollout.fresh(WINDOWED), 60, TARGET_QUIET) == WaitingFor.START  # open: waits to start


def test_the_next_steps_earliest_time_is_the_end_of_the_bake_shifted_into_the_window() -> None:
    rollout = started(policy(bake="10m", windows={"windows": [{"hours": "12:00-12:05"}]}))
    rollout.every(PASS, 30, 120)  # 90 s of 600 s covered; the bake ends after the window closes
    shown = view(rollout, 120)
    assert shown["waiting"]["kind"] == WaitingFor.BAKE
    assert datetime.fromisoformat(shown["next"]["earliest"]) == NEXT_DAY_NOON
    inside = started(policy(bake="1m", windows={"windows": [{"hours": "12:00-12:05"}]}))
    inside.tick(PASS, 30)
    assert datetime.fromisoformat(view(inside, 30)["next"]["earliest"]) == at(90)  # inside: not shifted


def test_a_freeze_date_shifts_the_next_step_past_it() -> None:
    rollout = Rollout.fresh(policy(windows={"windows": [{}], "freezeDates": ["2026-11-24..2026-11-26"]}), 10, 90)
    rollout.tick(PASS, 0)
    shown = view(rollout, 30)
    assert shown["waiting"]["kind"] == WaitingFor.BAKE
    assert datetime.fromisoformat(shown["next"]["earliest"]) == datetime(2026, 11, 27, tzinfo=UTC)


def test_a_failing_or_inconclusive_check_is_what_it_waits_for_with_the_counts() -> None:
    rollout = started()
    rollout.tick(FAIL, 30)
    failing = view(rollout, 30, FAIL)
    assert failing["waiting"]["kind"] == WaitingFor.FAILING and "check failed (1/2)" in failing["waiting"]["reason"]
    assert failing["counts"]["failures"] == 1 and failing["lastCheck"]["verdict"] == "FAIL"
    rollout.tick(NO_DATA, 60)
    unsure = view(rollout, 60, NO_DATA)
    assert unsure["waiting"]["kind"] == WaitingFor.INCONCLUSIVE
    assert unsure["counts"]["inconclusive"] == {"NoData": {"count": 1, "limit": 10}}
    assert unsure["lastCheck"]["cause"] == "NoData"


def test_verification_is_what_it_waits_for_and_ends_in_promotion() -> None:
    rollout = verifying()
    t = (rollout.state.step_started_at - at(0)).total_seconds()  # type: ignore[operator]
    rollout.every(PASS, t + 30, t + 60)  # 30 s of 120 s covered
    shown = view(rollout, t + 60)
    assert shown["phase"] == "Verifying" and shown["waiting"]["kind"] == WaitingFor.VERIFYING
    assert shown["step"]["index"] == 3 and shown["bake"] == {"needed": 120.0, "covered": 30.0}
    assert shown["next"] == {"weight": 100, "earliest": at(t + 150).isoformat(), "needs": None, "promotes": True}


def test_a_verification_is_not_shifted_by_a_window() -> None:
    rollout = verifying(policy(verify_for="2m", windows={"windows": [{"hours": "12:00-12:05"}]}))
    t = 3600.0
    shown = view(rollout, t)
    assert datetime.fromisoformat(shown["next"]["earliest"]) == at(t + 120)


def test_a_rollback_being_written_comes_first() -> None:
    rollout = started()
    rollout.tick(FAIL, 30)
    rollout.tick(FAIL, 60, write=False)
    shown = view(rollout, 60, FAIL)
    assert shown["waiting"]["kind"] == WaitingFor.ROLLBACK and shown["waiting"]["reason"].startswith("rolled back")
    assert shown["next"] is None
    stepped = verifying(policy(verify_for="10m"))
    stepped.tick(FAIL, 3000)
    stepped.tick(FAIL, 3030, write=False)  # the step back to 50/50 is not written yet
    assert waiting(stepped, 3030, FAIL) == WaitingFor.ROLLBACK


def test_a_promoted_rollout_waits_for_nothing_and_a_rolled_back_one_for_a_retry() -> None:
    promoted = at_weight(100)
    shown = view(promoted, 3000, None)
    assert shown["waiting"]["kind"] == WaitingFor.NOTHING and shown["next"] is None
    assert shown["step"] == {"index": 3, "count": 3, "weights": [10, 50, 100]}
    rolled = started()
    rolled.tick(FAIL, 30)
    rolled.tick(FAIL, 60)
    assert waiting(rolled, 90, None) == WaitingFor.RETRY
    assert "gateway-canary retry shop" in view(rolled, 90, None)["waiting"]["reason"]


def test_a_refusal_and_an_unapplied_write_are_named() -> None:
    rollout = started()
    rollout.tick(PASS, 30, refusal="Service ns/asm lacks the CLB id annotation")
    shown = view(rollout, 30)
    assert shown["waiting"] == {"kind": WaitingFor.REFUSED, "reason": "Service ns/asm lacks the CLB id annotation"}
    cloud = started()
    cloud.tick(PASS, 30, cloud_refusal="the cloud did not confirm the last weight write")
    assert view(cloud, 30)["waiting"] == {
        "kind": WaitingFor.CLOUD,
        "reason": "the cloud did not confirm the last weight write",
    }


def test_a_paused_step_back_waits_for_the_operator() -> None:
    rollout = verifying(policy(verify_for="10m"))
    rollout.tick(FAIL, 3000)
    rollout.tick(FAIL, 3030)
    shown = view(rollout, 3030, FAIL)
    assert shown["phase"] == "Paused" and shown["waiting"]["kind"] == WaitingFor.PAUSED
    assert shown["weights"] == {"target": 50, "source": 50} and shown["step"]["index"] == 2
    assert shown["counts"]["failures"] == 1 and "stepped back" in shown["waiting"]["reason"]


def test_the_view_is_strict_json_even_with_nan_and_infinite_numbers() -> None:
    nan_gate = GateResult(
        gate="latencyP99Ratio",
        verdict=Verdict.INCONCLUSIVE,
        reason="ratio: not a number",
        value=math.nan,
        threshold=math.inf,
        baseline=-math.inf,
        cause=InconclusiveCause.NOT_A_NUMBER,
    )
    odd = CheckResult(
        verdict=Verdict.INCONCLUSIVE, gates=(nan_gate,), reason="x" * 2000, cause=InconclusiveCause.NOT_A_NUMBER
    )
    rollout = started()
    shown = view(
        rollout,
        30,
        odd,
        split=Split(10, 90, 0.1, 0.2, backends="20 nodes (Cluster)"),
        confirmation=ConfirmationState(Confirmation.WAITING, "no answer yet"),
    )
    gate = shown["lastCheck"]["gates"][0]
    assert (gate["value"], gate["threshold"], gate["baseline"]) == (None, None, None)
    assert len(shown["lastCheck"]["reason"]) == 500
    assert shown["split"] == {
        "requested": 0.1,
        "effective": 0.2,
        "text": "requested 10.0%, effective 20.0% (20 nodes (Cluster))",
    }
    assert shown["cloud"] == {"status": "Waiting", "reason": "no answer yet"}
    text = json.dumps(shown, allow_nan=False)
    assert json.loads(text) == shown


# --- plan -------------------------------------------------------------------------------------------------

START = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)  # a Tuesday


def test_a_plain_plan_lists_every_step_with_its_earliest_time() -> None:
    rows = plan_rows(make_policy(), START)  # steps [10, 50, 100], bake 5m
    assert [(r.step, r.target_weight, r.source_weight) for r in rows] == [(1, 10, 90), (2, 50, 50), (3, 100, 0)]
    assert [r.earliest for r in rows] == [START, START + timedelta(minutes=5), START + timedelta(minutes=10)]
    assert [r.bake for r in rows] == [timedelta(minutes=5), timedelta(minutes=5), timedelta(0)]
    assert rows[-1].promoted_at == rows[-1].earliest and all(r.promoted_at is None for r in rows[:-1])
    assert all(not r.approval and r.window is None for r in rows)
    assert all(r.gates == ("errorRate", "responses4xx", "responsesAuth", "responsesNoRoute") for r in rows)


def test_per_step_bakes_move_the_later_steps() -> None:
    rows = plan_rows(make_policy(schedule={"steps": [{"weight": 5, "bakeTime": "30m"}, 10], "bakeTime": "1m"}), START)
    assert [(r.target_weight, r.bake) for r in rows] == [
        (5, timedelta(minutes=30)),
        (10, timedelta(minutes=1)),
        (100, timedelta(0)),
    ]
    assert [r.earliest for r in rows] == [START, START + timedelta(minutes=30), START + timedelta(minutes=31)]


def test_approvals_mark_the_step_that_reaches_or_passes_them() -> None:
    rows = plan_rows(make_policy(schedule={"steps": [10, 50], "bakeTime": "1m", "approvalAt": [30, 100]}), START)
    assert [(r.target_weight, r.approval) for r in rows] == [(10, False), (50, True), (100, True)]
    first = plan_rows(make_policy(schedule={"steps": [10, 50], "bakeTime": "1m", "approvalAt": [5]}), START)
    assert [r.approval for r in first] == [True, False, False]


def test_verification_is_the_last_rows_bake_with_absolute_gates_only() -> None:
    verified = make_policy(
        gates={"errorRate": {"max": 0.01, "maxIncrease": 0.005}, "latency": {"p99Ms": {"max": 300}, "maxRatio": 2}},
        promotion={"verifyFor": "15m"},
    )
    rows = plan_rows(verified, START)
    assert rows[-1].bake == timedelta(minutes=15)
    assert rows[-1].promoted_at == rows[-1].earliest + timedelta(minutes=15)  # type: ignore[operator]
    assert rows[-1].gates == ("errorRate", "latencyP99") == gate_names(verified, absolute_only=True)
    assert rows[0].gates == (
        "errorRate",
        "errorRateIncrease",
        "latencyP99",
        "latencyP99Ratio",
        "responses4xx",
        "responsesAuth",
        "responsesNoRoute",
    )
    assert all(row.gates == rows[0].gates for row in rows[:-1])


def test_windows_shift_a_step_to_the_next_opening_and_say_why() -> None:
    windowed = make_policy(
        schedule={
            "steps": [10, 50],
            "bakeTime": "2h",
            "advanceWindows": {
                "timeZone": "UTC",
                "windows": [{"days": ["Mon", "Tue", "Wed", "Thu", "Fri"], "hours": "08:00-12:00"}],
            },
        }
    )
    rows = plan_rows(windowed, START)  # Tue 09:00
    assert rows[0].earliest == START and rows[0].window is None
    assert rows[1].earliest == START + timedelta(hours=2) and rows[1].window is None  # 11:00: still open
    assert rows[2].earliest == datetime(2026, 11, 25, 8, 0, tzinfo=UTC)  # 13:00 is closed: Wed 08:00
    assert rows[2].window == "outside the windows (Mon-Fri 08:00-12:00 UTC)"
    friday = plan_rows(windowed, datetime(2026, 11, 27, 11, 0, tzinfo=UTC))
    assert [r.earliest for r in friday][1:] == [
        datetime(2026, 11, 30, 8, 0, tzinfo=UTC),
        datetime(2026, 11, 30, 10, 0, tzinfo=UTC),
    ]


def test_a_plan_with_no_window_within_a_year_has_no_earliest_time() -> None:
    frozen = make_policy(
        schedule={
            "steps": [10],
            "bakeTime": "1m",
            "advanceWindows": {"windows": [{}], "freezeDates": ["2026-01-01..2028-01-01"]},
        }
    )
    rows = plan_rows(frozen, START)
    assert [r.earliest for r in rows] == [None, None]
    assert rows[0].window == "no window opens within a year" and rows[-1].promoted_at is None


def test_target_only_mode_leaves_the_source_until_promotion() -> None:
    rows = plan_rows(make_policy(schedule={"steps": [10, 50], "bakeTime": "1m", "weightMode": "target-only"}), START)
    assert [r.source_weight for r in rows] == [None, None, 0]


def test_a_plans_earliest_times_are_a_lower_bound_across_a_dst_change() -> None:
    """A bake is covered by real time: 24 h of passing checks after an opening on the Saturday
    before Berlin's clocks go forward end 24 h later, which is 10:00 CEST, not 09:00."""
    berlin = make_policy(
        schedule={
            "steps": [10, 50],
            "bakeTime": "24h",
            "advanceWindows": {"timeZone": "Europe/Berlin", "windows": [{"hours": "09:00-17:00"}]},
        }
    )
    rows = plan_rows(berlin, datetime(2026, 3, 27, 20, 0, tzinfo=UTC))  # Fri 21:00 CET: closed
    first, second = rows[0].earliest, rows[1].earliest
    assert first is not None and second is not None
    assert first.astimezone(UTC) == datetime(2026, 3, 28, 8, 0, tzinfo=UTC)  # Sat 09:00 CET
    assert second.astimezone(UTC) - first.astimezone(UTC) >= timedelta(hours=24), (
        f"step 2 planned {second.astimezone(UTC) - first.astimezone(UTC)} after step 1 with a 24h bake"
    )
