"""What ``gateway-canary status`` shows: where a rollout stands and why, as a JSON-ready value.

Pure (policy, state, last check, now -> dict). The controller writes it beside the state in the
state object (``data.status``), so the CLI needs nothing but read access to that object: no port
into the controller's pod, no Prometheus.

``waiting`` names the one thing the rollout waits for, in the order an operator acts on them: a
rollback being written, a pause, an approval, a refusal, the cloud, a window, the evidence
(failing or inconclusive checks), the bake, the post-promotion verification.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

from controller.core.cloud import ConfirmationState, Split
from controller.core.decision import TERMINAL_PHASES, approval_needed, before_start, inconclusive_limit
from controller.core.enums import InconclusiveCause, Phase, Verdict
from controller.core.policy import CanaryPolicy
from controller.core.results import CheckResult
from controller.core.schedule import next_target_weight, target_steps
from controller.core.state import RolloutState
from controller.core.windows import next_opening, window_blocker

__all__ = ["STATUS_VERSION", "WaitingFor", "status_view", "step_position"]

STATUS_VERSION = 1


class WaitingFor:
    """The values of ``waiting.kind`` (strings: they travel as JSON and label a metric)."""

    ROLLBACK = "rollback"
    PAUSED = "paused"
    APPROVAL = "approval"
    REFUSED = "refused"
    CLOUD = "cloud"
    WINDOW = "window"
    FAILING = "failing"
    INCONCLUSIVE = "inconclusive"
    BAKE = "bake"
    VERIFYING = "verifying"
    START = "start"
    #: rolled back: an operator's retry (or a policy change) starts again
    RETRY = "retry"
    NOTHING = "nothing"


def step_position(policy: CanaryPolicy, weight: int) -> tuple[int, int]:
    """(i, n): the step the target weight stands at (0 before the first), of n (100 included)."""
    steps = target_steps(policy.spec.schedule)
    index = sum(1 for step in steps if step <= weight)
    return index, len(steps)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _bake_seconds(policy: CanaryPolicy, state: RolloutState) -> float:
    if state.phase is Phase.VERIFYING:
        return policy.spec.promotion.verify_for.total_seconds()
    return policy.spec.schedule.bake_for(state.target_weight).total_seconds()


def _waiting(policy: CanaryPolicy, state: RolloutState, check: CheckResult | None, now: datetime) -> tuple[str, str]:
    remaining = max(0.0, _bake_seconds(policy, state) - state.covered_seconds)
    window = window_blocker(policy.spec.schedule.advance_windows, now)
    due = state.phase is Phase.PENDING or (state.phase is Phase.PROGRESSING and remaining <= 0)
    # before the start, too few requests on the ASM gateway is expected, not a doubt
    quiet_start = before_start(state, check) and check is not None and check.cause is InconclusiveCause.TOO_FEW_REQUESTS
    unsure = check is not None and check.verdict is Verdict.INCONCLUSIVE and not quiet_start
    rules: list[tuple[bool, str, str]] = [
        (state.pending is not None and state.pending.rollback, WaitingFor.ROLLBACK, state.reason),
        (
            state.phase is Phase.ROLLED_BACK,
            WaitingFor.RETRY,
            f"rolled back: `gateway-canary retry {policy.name}` "
            "(or a change of the policy) starts again from the first step",
        ),
        (state.phase in TERMINAL_PHASES, WaitingFor.NOTHING, state.reason),
        (state.phase is Phase.PAUSED, WaitingFor.PAUSED, state.reason),
        (state.awaiting is not None, WaitingFor.APPROVAL, state.reason),
        (state.refusal is not None, WaitingFor.REFUSED, state.refusal or ""),
        (state.cloud_refusal is not None, WaitingFor.CLOUD, state.cloud_refusal or ""),
        (check is not None and check.verdict is Verdict.FAIL, WaitingFor.FAILING, state.reason),
        (unsure, WaitingFor.INCONCLUSIVE, state.reason),
        (due and window is not None, WaitingFor.WINDOW, window or ""),  # a raise is due, and held
        (state.phase is Phase.PENDING, WaitingFor.START, state.reason),
        (state.phase is Phase.VERIFYING, WaitingFor.VERIFYING, state.reason),
        (remaining > 0, WaitingFor.BAKE, state.reason),
    ]
    for applies, kind, reason in rules:
        if applies:
            return kind, reason
    return WaitingFor.NOTHING, state.reason


def _next_step(policy: CanaryPolicy, state: RolloutState, now: datetime) -> dict[str, Any] | None:
    """The next weight and the earliest it could be reached (bake left, then the next window)."""
    if state.phase in TERMINAL_PHASES:
        return None
    if state.phase is Phase.VERIFYING:
        weight: int | None = 100
    else:
        weight = next_target_weight(policy.spec.schedule, state.target_weight)
    if weight is None:
        return None
    left = timedelta(seconds=max(0.0, _bake_seconds(policy, state) - state.covered_seconds))
    earliest: datetime | None = now.astimezone(UTC) + left
    windows = policy.spec.schedule.advance_windows
    if windows is not None and earliest is not None and state.phase is not Phase.VERIFYING:
        earliest = next_opening(windows, earliest)
    blocked_by = None
    if state.phase is Phase.PAUSED:
        blocked_by = "resume"
    elif state.awaiting is not None or approval_needed(policy, state, weight) is not None:
        blocked_by = "approve"
    return {
        "weight": weight,
        "earliest": None if blocked_by else _iso(earliest),
        "needs": blocked_by,
        "promotes": state.phase is Phase.VERIFYING,
    }


def status_view(
    policy: CanaryPolicy,
    state: RolloutState,
    check: CheckResult | None,
    checked_at: datetime | None,
    now: datetime,
    *,
    split: Split | None = None,
    confirmation: ConfirmationState | None = None,
) -> dict[str, Any]:
    """Everything ``status`` shows for one policy (JSON types only)."""
    index, count = step_position(policy, state.target_weight)
    kind, reason = _waiting(policy, state, check, now)
    threshold = policy.spec.analysis.failure_threshold
    view: dict[str, Any] = {
        "v": STATUS_VERSION,
        "policy": policy.name,
        "updatedAt": now.isoformat(),
        "phase": state.phase.value,
        "reason": state.reason,
        "step": {"index": index, "count": count, "weights": list(target_steps(policy.spec.schedule))},
        "weights": {"target": state.target_weight, "source": state.source_weight},
        "stepStartedAt": _iso(state.step_started_at),
        "bake": {"needed": _bake_seconds(policy, state), "covered": round(state.covered_seconds, 3)},
        "next": _next_step(policy, state, now),
        "waiting": {"kind": kind, "reason": reason},
        "approvals": {"at": list(policy.spec.schedule.approval_at), "approved": list(state.approved)},
        "counts": {
            "failures": state.consecutive_failures,
            "failureThreshold": threshold,
            "inconclusive": {
                cause.value: {"count": n, "limit": inconclusive_limit(policy, cause).after_checks}
                for cause, n in state.inconclusive
            },
        },
        "lastCheck": None,
    }
    if check is not None:
        view["lastCheck"] = {
            "at": _iso(checked_at),
            "verdict": check.verdict.value,
            "cause": None if check.cause is None else check.cause.value,
            "reason": check.reason[:500],
            "observedTargetShare": _finite(check.observed_target_share),
            "gates": [
                {
                    "gate": gate.gate,
                    "verdict": gate.verdict.value,
                    "value": _finite(gate.value),
                    "threshold": _finite(gate.threshold),
                    "comparator": gate.comparator,
                    "baseline": _finite(gate.baseline),
                }
                for gate in check.gates
            ],
        }
    if split is not None:
        view["split"] = {
            "requested": _finite(split.requested),
            "effective": _finite(split.effective),
            "text": split.describe(),
        }
    if confirmation is not None:
        view["cloud"] = {"status": confirmation.status.value, "reason": confirmation.reason}
    return view


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
