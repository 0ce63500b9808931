"""``gateway-canary plan``: the schedule a policy will follow, with no cluster.

Pure: the policy and a start time in, the rows out. The earliest time of each step assumes every
check passes, approvals come at once, and the cloud applies each write at once: nothing can be
faster, so a plan is a lower bound to plan a change window with, not a promise.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from controller.core.gates import gate_names
from controller.core.policy import CanaryPolicy
from controller.core.schedule import FULL, target_steps, weights_for
from controller.core.windows import describe, next_opening

__all__ = ["PlanRow", "gate_names", "plan_rows"]


@dataclass(frozen=True, slots=True)
class PlanRow:
    """One step of the schedule."""

    step: int
    target_weight: int
    #: None: target-only mode leaves the source as it is
    source_weight: int | None
    #: how long it bakes before the next raise (at 100: the post-promotion verification)
    bake: timedelta
    gates: tuple[str, ...]
    #: an operator must approve before the rollout reaches this weight
    approval: bool
    #: why the raise to this weight waits past the bake (an advance window or a freeze date), None: it does not
    window: str | None
    #: the earliest wall-clock time the weight can be reached (None: nothing opens within a year)
    earliest: datetime | None
    #: when verification ends at 100 and the rollout is Promoted (last row only)
    promoted_at: datetime | None = None


def plan_rows(policy: CanaryPolicy, start: datetime) -> list[PlanRow]:
    """Every step from the first to 100, with its earliest time from ``start``."""
    schedule = policy.spec.schedule
    windows = schedule.advance_windows
    verify = policy.spec.promotion.verify_for
    rows: list[PlanRow] = []
    reached: datetime | None = start
    previous = 0
    for index, weight in enumerate(target_steps(schedule), start=1):
        held = None
        if reached is not None and windows is not None:
            opening = next_opening(windows, reached)
            if opening != reached:
                held = f"outside the windows ({describe(windows)})" if opening else "no window opens within a year"
            reached = opening
        promoting = weight >= FULL
        pair = (
            weights_for(FULL, schedule.weight_mode, promoted=True)
            if promoting
            else weights_for(weight, schedule.weight_mode)
        )
        bake = verify if promoting else schedule.bake_for(weight)
        rows.append(
            PlanRow(
                step=index,
                target_weight=weight,
                source_weight=pair.source,
                bake=bake,
                gates=gate_names(policy, absolute_only=promoting and verify > timedelta(0)),
                approval=any(previous < gate <= weight for gate in schedule.approval_at),
                window=held,
                earliest=reached,
                promoted_at=None if reached is None or not promoting else reached.astimezone(UTC) + verify,
            )
        )
        previous = weight
        # elapsed time is added in UTC: a bake across a DST change lasts its full length
        reached = None if reached is None else reached.astimezone(UTC) + bake
    return rows
