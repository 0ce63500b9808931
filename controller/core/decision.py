"""The rollout decision: (policy, state, observation, now) -> (new state, action).

Pure: no I/O, no clock, no clients. Every rule about when a weight moves lives here, so it can
be tested exhaustively in milliseconds and read in one place.

Rules
-----
* Start (weight 0 -> first step) when the metrics are reachable and the source gateway has
  traffic: the target cannot have any yet, so that is the only evidence there can be.
* Advance to the next step only on a check that PASSES, when the bake time at the current step
  has elapsed, the step has had a passing check, and no check has FAILED since the bake began
  (a FAIL below the threshold restarts the bake). Requiring the advancing check itself to pass
  means a restarted controller always has fresh evidence before it raises a weight.
* Roll back (target 0, source 100) on ``failureThreshold`` consecutive FAILs; an INCONCLUSIVE
  check neither extends nor breaks that run, only a PASS does. Roll back as well when a run of
  inconclusive checks reaches its limit and that cause's action is ``rollback``; with ``hold``
  the rollout waits and reports itself stuck once.
* Rollback stays armed while Paused: pausing stops advancing, never protection.
* Weights observed on the Services that differ from the ones last written mean someone else
  changed them: the rollout pauses, adopts what it sees and reports it, and does not fight.
* RolledBack stays rolled back until an operator retries or the policy changes; a Paused rollout
  continues when the policy changes (or an operator resumes). Promoted is final. Both weights
  are never 0 at once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from controller.core.enums import (
    AlertKind,
    Command,
    GatewayRole,
    InconclusiveCause,
    OnInconclusive,
    Phase,
    Severity,
    Verdict,
    WeightMode,
)
from controller.core.policy import CanaryPolicy, InconclusivePolicy
from controller.core.results import CheckResult
from controller.core.schedule import FULL, Weights, next_target_weight, target_steps, weights_for
from controller.core.state import RolloutState

__all__ = ["Action", "Decision", "Observation", "decide", "initial_state"]


class Action(enum.StrEnum):
    """What the decision asks the edges to do."""

    NONE = "None"
    START = "Start"
    ADVANCE = "Advance"
    PROMOTE = "Promote"
    ROLLBACK = "Rollback"
    HOLD = "Hold"
    PAUSE = "Pause"
    RESUME = "Resume"
    RETRY = "Retry"
    RESTART_BAKE = "RestartBake"
    COMPLETE_WRITE = "CompleteWrite"


@dataclass(frozen=True, slots=True)
class Observation:
    """What the edges saw this tick: the Services' weights, the check, an operator command.

    ``check`` is None when no check ran (e.g. a command-only tick); a later issue adds a check
    that is "not yet confirmed" (weight change not yet seen in the traffic), which the rules
    already treat like any other non-PASS, non-FAIL verdict.
    """

    target_weight: int | None
    source_weight: int | None
    check: CheckResult | None = None
    command: Command | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The new state and what to do about it."""

    state: RolloutState
    action: Action
    weights: Weights | None = None
    alert: AlertKind | None = None
    severity: Severity = Severity.INFO
    transition: bool = False

    @property
    def reason(self) -> str:
        """Why, in a sentence (the new state's reason)."""
        return self.state.reason


def initial_state(policy: CanaryPolicy, observed: Observation, now: datetime) -> RolloutState:
    """State for a policy seen for the first time (or whose stored state was unreadable).

    An annotated non-zero target weight is adopted as the current step: the rollout must bake
    and pass there before going higher, so nothing unverified is ever raised.
    """
    target = observed.target_weight or 0
    if target > 0:
        return RolloutState(
            policy=policy.name,
            fingerprint=policy.rollout_fingerprint(),
            phase=Phase.PROMOTED if target >= FULL else Phase.PROGRESSING,
            reason=f"adopted the target weight {target} found on the Service; baking before going higher",
            target_weight=target,
            source_weight=observed.source_weight,
            changed_at=now,
            step_started_at=now,
        )
    return RolloutState(
        policy=policy.name,
        fingerprint=policy.rollout_fingerprint(),
        phase=Phase.PENDING,
        reason="waiting for a check that shows metrics reachable and traffic on the source",
        target_weight=0,
        source_weight=observed.source_weight,
        changed_at=now,
    )


def decide(policy: CanaryPolicy, state: RolloutState, observed: Observation, now: datetime) -> Decision:
    """The single entry point: apply commands, then drift, then policy change, then the check."""
    if observed.command is not None:
        commanded = _apply_command(policy, state, observed, now)
        if commanded is not None:
            return commanded
    if state.source_weight_before is not None and observed.source_weight == state.source_weight:
        state = state.evolve(source_weight_before=None)  # our last write is complete
    unfinished = _complete_unfinished_write(state, observed)
    if unfinished is not None:
        return unfinished
    drift = _detect_external_change(state, observed, now)
    if drift is not None:
        return drift
    if state.fingerprint != policy.rollout_fingerprint():
        return _policy_changed(policy, state, now)
    if state.phase is Phase.PROMOTED or state.phase is Phase.ROLLED_BACK:
        return Decision(state=state, action=Action.NONE)
    if observed.check is None:
        return Decision(state=state, action=Action.NONE)
    return _judge(policy, state, observed, observed.check, now)


# --- the parts, in the order decide() consults them ---------------------------------------------


def _apply_command(policy: CanaryPolicy, state: RolloutState, observed: Observation, now: datetime) -> Decision | None:
    command = observed.command
    if command is Command.ABORT and state.phase not in (Phase.ROLLED_BACK, Phase.PROMOTED):
        return _rollback(policy, state, observed, now, "aborted by an operator")
    if command is Command.RETRY and state.phase is Phase.ROLLED_BACK:
        fresh = _reset_step(state, now).evolve(
            phase=Phase.PENDING, reason="retry requested by an operator", changed_at=now
        )
        return Decision(state=fresh, action=Action.RETRY, transition=True)
    if command is Command.PAUSE and state.phase in (Phase.PENDING, Phase.PROGRESSING):
        paused = state.evolve(phase=Phase.PAUSED, reason="paused by an operator", changed_at=now)
        return Decision(state=paused, action=Action.PAUSE, transition=True)
    if command is Command.RESUME and state.phase is Phase.PAUSED:
        phase = Phase.PROGRESSING if state.target_weight > 0 else Phase.PENDING
        resumed = _reset_step(state, now).evolve(
            phase=phase, reason="resumed by an operator; the bake at this step restarts", changed_at=now
        )
        return Decision(state=resumed, action=Action.RESUME, transition=True)
    return None


def _complete_unfinished_write(state: RolloutState, observed: Observation) -> Decision | None:
    """Finish a weight change whose source write did not land (crash or API error between patches).

    The target patch carries the state, so a state that names a source weight the Service does not
    show, while the Service still shows the weight from before the change, is our own unfinished
    write, not someone else's edit. (decide() clears the marker once the source shows the new weight.)
    """
    before = state.source_weight_before
    if before is not None and observed.target_weight == state.target_weight and observed.source_weight == before:
        return Decision(
            state=state.evolve(reason=f"{state.reason} (completing the source weight write)"),
            action=Action.COMPLETE_WRITE,
            weights=Weights(state.target_weight, state.source_weight),
        )
    return None


def _detect_external_change(state: RolloutState, observed: Observation, now: datetime) -> Decision | None:
    target_moved = observed.target_weight is not None and observed.target_weight != state.target_weight
    source_moved = state.source_weight is not None and observed.source_weight != state.source_weight
    if not (target_moved or source_moved):
        return None
    expected = Weights(state.target_weight, state.source_weight)
    seen = Weights(observed.target_weight or 0, observed.source_weight)
    paused = state.evolve(
        phase=Phase.PAUSED if state.phase is not Phase.ROLLED_BACK else state.phase,
        reason=(
            f"weights changed outside gateway-canary: found {seen}, expected {expected}; "
            "adopted them and paused (resume or change the policy to continue)"
        ),
        target_weight=seen.target,
        source_weight=seen.source,
        changed_at=now,
    )
    return Decision(
        state=paused,
        action=Action.PAUSE,
        alert=AlertKind.WEIGHT_CHANGED_EXTERNALLY,
        severity=Severity.WARNING,
        transition=True,
    )


def _policy_changed(policy: CanaryPolicy, state: RolloutState, now: datetime) -> Decision:
    updated = _reset_step(state, now).evolve(fingerprint=policy.rollout_fingerprint(), changed_at=now)
    if state.phase is Phase.ROLLED_BACK:
        pending = updated.evolve(phase=Phase.PENDING, reason="policy changed after a rollback; starting again")
        return Decision(state=pending, action=Action.RETRY, transition=True)
    if state.phase is Phase.PROMOTED:
        return Decision(
            state=updated.evolve(reason="policy changed after promotion; nothing to do"), action=Action.NONE
        )
    phase = state.phase
    if phase is Phase.PAUSED:  # a changed policy is how a paused rollout is continued
        phase = Phase.PROGRESSING if state.target_weight > 0 else Phase.PENDING
    restarted = updated.evolve(
        phase=phase,
        reason=f"policy changed; keeping target weight {state.target_weight} and restarting the bake",
    )
    return Decision(state=restarted, action=Action.RESTART_BAKE, transition=True)


def _judge(
    policy: CanaryPolicy, state: RolloutState, observed: Observation, check: CheckResult, now: datetime
) -> Decision:
    analysis = policy.spec.analysis
    if check.verdict is Verdict.FAIL:
        failures = state.consecutive_failures + 1
        gate = check.failing[0].gate if check.failing else None
        failed = state.evolve(
            consecutive_failures=failures,
            last_verdict=Verdict.FAIL,
            last_failed_gate=gate,
            first_pass_at=None,
            step_started_at=now if state.phase is not Phase.PENDING else state.step_started_at,
        )
        if failures >= analysis.failure_threshold and state.target_weight > 0:
            return _rollback(
                policy,
                failed,
                observed,
                now,
                f"{failures} consecutive failed check(s) (threshold {analysis.failure_threshold}): {check.reason}",
            )
        return Decision(
            state=failed.evolve(
                reason=f"check failed ({failures}/{analysis.failure_threshold}); bake restarts: {check.reason}"
            ),
            action=Action.HOLD,
        )
    if check.verdict is Verdict.PASS:
        passed = state.evolve(
            consecutive_failures=0,
            consecutive_inconclusive=0,
            inconclusive_cause=None,
            stuck_reported=False,
            last_verdict=Verdict.PASS,
            last_failed_gate=None,
            first_pass_at=state.first_pass_at or now,
        )
        return _maybe_advance(policy, passed, check, now)
    return _inconclusive(policy, state, observed, check, now)


def _inconclusive(
    policy: CanaryPolicy, state: RolloutState, observed: Observation, check: CheckResult, now: datetime
) -> Decision:
    cause = check.cause or InconclusiveCause.NO_DATA
    if state.phase is Phase.PENDING and _baseline_ready(check):
        return _start(policy, state, now)
    count = state.consecutive_inconclusive + 1
    limits = _limit_for(policy, cause)
    waiting = state.evolve(consecutive_inconclusive=count, inconclusive_cause=cause, last_verdict=Verdict.INCONCLUSIVE)
    if count < limits.after_checks:
        return Decision(
            state=waiting.evolve(reason=f"inconclusive ({count}/{limits.after_checks}): {check.reason}"),
            action=Action.HOLD,
        )
    if limits.action is OnInconclusive.ROLLBACK and state.target_weight > 0:
        return _rollback(
            policy,
            waiting,
            observed,
            now,
            f"{count} inconclusive checks in a row ({cause.value}), policy says rollback: {check.reason}",
        )
    reason = f"stuck: {count} inconclusive checks in a row ({cause.value}), holding: {check.reason}"
    if state.stuck_reported:
        return Decision(state=waiting.evolve(reason=reason), action=Action.HOLD)
    return Decision(
        state=waiting.evolve(reason=reason, stuck_reported=True),
        action=Action.HOLD,
        alert=AlertKind.STUCK_INCONCLUSIVE,
        severity=Severity.WARNING,
    )


def _maybe_advance(policy: CanaryPolicy, state: RolloutState, check: CheckResult, now: datetime) -> Decision:
    if state.phase is Phase.PENDING:
        return _start(policy, state, now)
    if state.phase is Phase.PAUSED:
        return Decision(state=state.evolve(reason=f"paused; check passed: {check.reason}"), action=Action.HOLD)
    bake = policy.spec.schedule.bake_time
    started = state.step_started_at or now
    elapsed = now - started
    if elapsed < bake:
        # Stable wording (no elapsed time): the reason is persisted, and an unchanged state is not rewritten.
        until = (started + bake).isoformat()
        return Decision(
            state=state.evolve(reason=f"baking at target weight {state.target_weight} until {until}; checks pass"),
            action=Action.NONE,
        )
    upcoming = next_target_weight(policy.spec.schedule, state.target_weight)
    if upcoming is None:
        return _promote(policy, state, now)
    return _step_to(policy, state, upcoming, now, Action.ADVANCE)


def _start(policy: CanaryPolicy, state: RolloutState, now: datetime) -> Decision:
    first = target_steps(policy.spec.schedule)[0]
    return _step_to(policy, state, first, now, Action.START)


def _step_to(policy: CanaryPolicy, state: RolloutState, weight: int, now: datetime, action: Action) -> Decision:
    if weight >= FULL:
        return _promote(policy, state, now)
    weights = _never_both_zero(weights_for(weight, policy.spec.schedule.weight_mode), state.source_weight)
    moved = _reset_step(state, now).evolve(
        phase=Phase.PROGRESSING,
        reason=f"target weight {state.target_weight} -> {weight} after a passing bake",
        target_weight=weights.target,
        source_weight=weights.source if weights.source is not None else state.source_weight,
        source_weight_before=_before(weights, state),
        changed_at=now,
    )
    if action is Action.START:
        moved = moved.evolve(reason=f"started: target weight 0 -> {weight}; metrics reachable, source has traffic")
    return Decision(state=moved, action=action, weights=weights, transition=True)


def _promote(policy: CanaryPolicy, state: RolloutState, now: datetime) -> Decision:
    weights = weights_for(FULL, policy.spec.schedule.weight_mode, promoted=True)
    promoted = _reset_step(state, now).evolve(
        phase=Phase.PROMOTED,
        reason=f"promoted: target weight {state.target_weight} -> {FULL}, source -> {weights.source}",
        target_weight=weights.target,
        source_weight=weights.source,
        source_weight_before=_before(weights, state),
        changed_at=now,
    )
    return Decision(
        state=promoted,
        action=Action.PROMOTE,
        weights=weights,
        alert=AlertKind.PROMOTED,
        severity=Severity.INFO,
        transition=True,
    )


def _rollback(policy: CanaryPolicy, state: RolloutState, observed: Observation, now: datetime, why: str) -> Decision:
    mode = policy.spec.schedule.weight_mode
    weights = weights_for(0, mode)
    if mode is WeightMode.TARGET_ONLY:
        weights = _never_both_zero(weights, observed.source_weight)
    rolled = state.evolve(
        phase=Phase.ROLLED_BACK,
        reason=f"rolled back from target weight {state.target_weight}: {why}",
        target_weight=0,
        source_weight=weights.source if weights.source is not None else state.source_weight,
        source_weight_before=_before(weights, state),
        changed_at=now,
        step_started_at=None,
        first_pass_at=None,
    )
    return Decision(
        state=rolled,
        action=Action.ROLLBACK,
        weights=weights,
        alert=AlertKind.ROLLED_BACK,
        severity=Severity.CRITICAL,
        transition=True,
    )


# --- small helpers -------------------------------------------------------------------------------


def _before(weights: Weights, state: RolloutState) -> int | None:
    """The source weight a change replaces, when the change writes the source at all."""
    if weights.source is None or weights.source == state.source_weight:
        return None
    return state.source_weight


def _reset_step(state: RolloutState, now: datetime) -> RolloutState:
    return state.evolve(
        step_started_at=now,
        first_pass_at=None,
        consecutive_failures=0,
        consecutive_inconclusive=0,
        inconclusive_cause=None,
        stuck_reported=False,
    )


def _never_both_zero(weights: Weights, observed_source: int | None) -> Weights:
    """Target-only mode leaves the source alone, unless leaving it would make both weights 0."""
    if weights.source is None and weights.target == 0 and observed_source == 0:
        return Weights(target=0, source=FULL)
    return weights


def _baseline_ready(check: CheckResult) -> bool:
    """At weight 0 the target has no traffic by design; the source and Prometheus must be fine."""
    return check.cause is InconclusiveCause.TOO_FEW_REQUESTS and check.starved == (GatewayRole.TARGET,)


def _limit_for(policy: CanaryPolicy, cause: InconclusiveCause) -> InconclusivePolicy:
    analysis = policy.spec.analysis
    if cause is InconclusiveCause.METRICS_UNAVAILABLE:
        return analysis.on_metrics_unavailable
    return analysis.on_missing_data
