"""The rollout decision: (policy, state, observation, now) -> (new state, action).

Pure: no I/O, no clock, no clients. Every rule about when a weight moves lives here, so it can
be tested exhaustively in milliseconds and read in one place. ``decide`` is a few steps, and the
safety rules are the shape of it, not the order of early returns::

    check    = _settled(...)           R8: a pass on traffic that does not follow the weights waits
    counted  = _count_evidence(...)    R1, R4, R6: the check is counted, whatever else happens
    approval = _take_approval(...)     R9: an operator's approval is recorded like evidence
    rollback = _protection(...)        R1, R2: do the evidence, a pending rollback or an abort demand it?
    decision = _rollback(...)          ...if so, that is the decision (R10: a step back while verifying)
             | _permit(_progress(...)) otherwise: everything else, and a raise needs permission (R3, R7-R9)
    decision = _report_cloud(_report_refusal(decision))   R3, R8: each refusal reported once
    return _record(_answer(decision))  R9: every command answered, every transition in the history

The rules
---------
R1  The check is always judged. Completing an unfinished write, adopting an outside change, a
    policy change, a command, a refusal: none of them skips ``_count_evidence``, and
    ``_protection`` reads only what it counted. A FAIL while the target carries traffic always
    advances the failure count; reaching ``failureThreshold`` always rolls back. A FAIL also voids
    a raise that is not fully written (the bake it stood on is gone).
R2  A rollback always wins and is remembered. It is a pending ``Intent(rollback=True)`` in the
    state until both Services show it; ``_protection`` returns it on every tick until then (a later
    PASS cannot cancel it), and while it is pending nothing else is written.
R3  Refusal stops advancing, never protection. A refusal (a missing receiver secret, an access
    review that denies a patch, a Service that lost its CLB annotations, an unreadable state, an
    invalid policy file) reaches only ``_permit``, which turns a write that would raise the ASM
    gateway's share into a hold. Observation, counting and rollback go on. Each refusal is
    reported once (remembered in ``state.refusal``).
R4  A bake is covered by evidence. The bake clock runs only across a run of passing checks, each
    at most ``COVERAGE_GAP_INTERVALS`` intervals after the previous one: an inconclusive check
    closes the run (the time after its last pass is not counted), a gap (the controller down, a
    scheduler stall) starts a new run, and a FAIL empties the bake. A step advances on a passing
    check once the covered time (``state.covered_seconds``) reaches ``bakeTime``; one pass after a
    long gap covers nothing. A restart closes the open run uncounted (the time of its last pass is
    not stored, so a healthy bake writes nothing).
R5  Terminal means terminal. Promoted and RolledBack are left only by an operator's retry or a
    policy change. A weight edit seen there is adopted and reported once, and never re-arms a
    rollback. A state that cannot be read becomes ``recovered_state``: Paused at the weights seen
    (rollback armed while the target carries traffic), waiting for an operator; never a Start.
R6  Counters per cause. Inconclusive checks are counted per cause since the last pass, each
    compared with its own limit (``onMissingData`` for no data, too few requests and NaN;
    ``onMetricsUnavailable`` for Prometheus errors).
R7  The baseline must be real. Starting (0 -> first step) needs a check whose baseline passed:
    every query answered and the source had ``minRequests``; an erroring source is not ready.
R8  A step bakes only on traffic that follows its weights. A passing check counts as a pass only
    once the cloud confirmed the last write and the observed share of requests is within
    tolerance of the effective share (``controller.core.cloud``); until then it is inconclusive
    (``Settling``, its own counter and limit: ``cloud.settleTimeout``, a hold, never a rollback),
    and no raise is written. Only a pass is relabelled: a FAIL is never softened, and another
    inconclusive check keeps its cause and limit (and counts as settling besides). The cloud
    saying it did not apply a write (or saying nothing within ``cloud.confirmTimeout``) holds
    raises like a refusal and is said once (``CloudNotApplied``); about a rollback, it pages.
    Once settled (confirmed, and one window on), an ASM gateway that misses a large part of the
    requests the CLB sends it (they fail before HTTP) has a traffic deficit: a pass is then
    ``TrafficDeficit`` (a quiet check counts it besides), with its own limit
    ``analysis.onTrafficDeficit``: rollback after 3 by default.

R9  People decide when, not whether it is safe. Operator commands (``Observation.command``),
    ``schedule.approvalAt`` and ``schedule.advanceWindows`` only ever hold a raise or ask for one:
    an approval is a recorded fact (``_take_approval``, beside the counting), a window is one more
    blocker in ``_permit``, and a promotion an operator asks for (``promote --full``) needs this
    tick's PASS and then all of ``_permit``. ``abort`` is protection's (``_protection``): it rolls
    back whatever the phase while the ASM gateway carries traffic. Pause, resume and retry change
    the phase only. Every command is answered in the tick that reads it (``_answer``: applied, or
    rejected and why) and, with every transition, goes into the state's history with who gave it
    (``_record``). Nothing here can skip ``_count_evidence`` or ``_protection``.
R10 Promoted means verified at 100. With ``promotion.verifyFor`` the last raise leads to Verifying
    (armed), judged on absolute gates only (the old gateway has no traffic to compare with), and
    Promoted once passing checks cover ``verifyFor`` (R4's coverage). A failure there that demands
    a rollback (not an abort) steps back to the last step's split, which was judged healthy against
    the old gateway, at once, as a rollback intent (R2: written whatever happens, retried with its
    own weights); the rollout is then Paused there, armed, one counted FAIL from a rollback to 0.
R11 An anytime-valid gate decides on its own evidence. A sequential gate (``errorRate.sequential``,
    ``latency.sequential``) counts every request once, across checks and restarts (its evidence is
    counted with the check, R1, and kept in the state). Its rejection is final for the step and a
    FAIL that rolls back at once: its ``alpha`` is its guard against noise, as ``failureThreshold``
    is the threshold gates'. It passes a step only as any gate does (R4, R8), never on no traffic,
    and its evidence starts again at each step, after a rollback and when its settings change.

Also: both weights are never 0 at once; a weight moved by someone else pauses the rollout (the
change is adopted and reported, never fought), with rollback still armed; an unfinished raise is
completed only with the permission a raise needs.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from controller.core.enums import (
    AlertKind,
    Command,
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
from controller.core.state import MAX_HISTORY, Intent, RolloutState, Transition
from controller.core.text import bounded
from controller.core.windows import window_blocker

__all__ = [
    "ARMED_PHASES",
    "COVERAGE_GAP_INTERVALS",
    "TERMINAL_PHASES",
    "Action",
    "CommandOutcome",
    "Decision",
    "Notice",
    "Observation",
    "approval_needed",
    "before_start",
    "decide",
    "inconclusive_limit",
    "initial_state",
    "raises_share",
    "recovered_state",
]

#: Phases in which a failing target that carries traffic is rolled back.
ARMED_PHASES = frozenset({Phase.PENDING, Phase.PROGRESSING, Phase.PAUSED, Phase.VERIFYING})
#: Phases left only by an operator's retry or a policy change (R5).
TERMINAL_PHASES = frozenset({Phase.PROMOTED, Phase.ROLLED_BACK})
#: Two passing checks further apart than this many intervals do not cover the time between (R4).
COVERAGE_GAP_INTERVALS = 2
#: The reason of a rollback an operator asked for (``abort``).
ABORTED = "aborted by an operator"


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
    ADOPT = "Adopt"


@dataclass(frozen=True, slots=True)
class Observation:
    """What the edges saw this tick.

    ``check`` is None when no check ran (terminal phases). ``refusal`` says why this policy may
    not raise a weight now (R3); it never stops anything else.
    """

    target_weight: int | None
    source_weight: int | None
    check: CheckResult | None = None
    command: Command | None = None
    refusal: str | None = None
    #: a refusal its source has already reported (an invalid policy file): blocks raises, no alert
    reported_refusal: str | None = None
    #: why the traffic does not follow the weights yet (unconfirmed write, observed share off): R8
    settling: str | None = None
    #: the cloud did not apply the last write (failed, skipped, unconfirmed), in words stable
    #: while it lasts: blocks raises, said once, paged after a rollback (the ASM gateway may
    #: still carry traffic)
    cloud_refusal: str | None = None
    #: the cloud controller's own message about it (changes on every retry: only shown)
    cloud_detail: str | None = None
    #: the ASM gateway persistently gets fewer requests than the CLB sends it (R8)
    deficit: str | None = None
    #: who gave ``command`` (the kubeconfig user, or ``--by``), for the history
    command_by: str = "operator"


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    """How an operator command was answered: applied, or rejected and why (the CLI shows it)."""

    applied: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Notice:
    """An alert (and Event) the decision asks for."""

    kind: AlertKind
    severity: Severity
    reason: str


@dataclass(frozen=True, slots=True)
class Decision:
    """The new state, what to write now, and whom to tell.

    ``weights`` is what to write this tick (None: nothing); ``state.pending`` the intent the
    runner records before writing. ``force`` writes even over a concurrent change (rollbacks).
    """

    state: RolloutState
    action: Action
    weights: Weights | None = None
    notices: tuple[Notice, ...] = ()
    transition: bool = False
    force: bool = False
    #: the answer to this tick's operator command (None: there was none)
    outcome: CommandOutcome | None = None

    @property
    def reason(self) -> str:
        """Why, in a sentence (the new state's reason)."""
        return self.state.reason

    def notify(self, *notices: Notice) -> Decision:
        """The same decision with more notices."""
        return replace(self, notices=self.notices + notices)


def initial_state(policy: CanaryPolicy, observed: Observation, now: datetime) -> RolloutState:
    """State for a policy seen for the first time (no stored state at all).

    An annotated non-zero target weight is adopted as the current step: the rollout must bake
    and pass there before going higher, so nothing unverified is ever raised.
    """
    target = observed.target_weight or 0
    base = RolloutState(
        policy=policy.name,
        fingerprint=policy.rollout_fingerprint(),
        phase=Phase.PENDING,
        reason="waiting for a check that shows metrics reachable and traffic on the source",
        target_weight=target,
        source_weight=observed.source_weight,
        changed_at=now,
    )
    if target > 0:
        return base.evolve(
            phase=Phase.PROMOTED if target >= FULL else Phase.PROGRESSING,
            reason=f"adopted the target weight {target} found on the Service; baking before going higher",
            step_started_at=now,
        )
    return base


def recovered_state(policy: CanaryPolicy, observed: Observation, now: datetime, why: str) -> RolloutState:
    """State for a policy whose stored state cannot be read (R5).

    Never a Start and never a silent restart of a rolled-back rollout: Paused at the weights the
    Services show, rollback armed while the target carries traffic, waiting for an operator
    (resume, retry, or a policy change). A target at 100 is taken as promoted, as on first sight.
    """
    # all traffic already moved: never sent back; but a promotion is verified first (R10): at 100
    # with verifyFor the rollout holds there Paused, armed, for an operator to resume (verify) or retry
    promoted = (observed.target_weight or 0) >= FULL and policy.spec.promotion.verify_for.total_seconds() == 0
    return RolloutState(
        policy=policy.name,
        fingerprint=policy.rollout_fingerprint(),
        phase=Phase.PROMOTED if promoted else Phase.PAUSED,
        reason=(
            f"stored state cannot be used ({why}); holding at the weights the Services show"
            + ("" if promoted else ", rollback armed; resume or change the policy to continue")
        ),
        target_weight=observed.target_weight or 0,
        source_weight=observed.source_weight,
        changed_at=now,
        step_started_at=now,
    )


def decide(policy: CanaryPolicy, state: RolloutState, observed: Observation, now: datetime) -> Decision:
    """Count the evidence, protect, then progress with permission; see the module docstring."""
    writes, written = _reconcile_writes(state, observed)
    observed = replace(observed, check=_settled(observed.check, observed.settling, observed.deficit))
    counted = _count_evidence(policy, written, observed.check, now, observed)
    if writes is _Writes.UNFINISHED and _failed(observed.check) and not _pending_rollback(counted):
        writes, counted = _Writes.SETTLED, _void_unfinished_raise(counted, observed)
    counted, approval = _take_approval(policy, counted, observed.command)  # R9: a recorded fact, like a check
    why_rollback = _protection(policy, counted, observed)
    if why_rollback is not None:
        decision = _rollback(policy, counted, observed, now, why_rollback)
    else:
        decision = _permit(policy, _progress(policy, counted, observed, writes, now), counted, observed, now)
    decision = _report_stuck(policy, decision, written.stuck_reported, observed.check)
    decision = _report_cloud(_report_refusal(decision, observed.refusal), observed)
    caused = observed.command is not Command.APPROVE and decision.outcome is not None and decision.outcome.applied
    return _record(_answer(observed.command, decision, approval), observed, now, by_operator=caused)


# --- 1. what the Services show against what we last wrote ------------------------------------


class _Writes(enum.StrEnum):
    SETTLED = "settled"  # the Services show what the state says
    UNFINISHED = "unfinished"  # our own recorded change, partly visible
    EXTERNAL = "external"  # someone else changed a weight


def _reconcile_writes(state: RolloutState, observed: Observation) -> tuple[_Writes, RolloutState]:
    """Classify what the Services show; a change they fully show is no longer pending.

    A target weight that cannot be read (None: absent or malformed, which the adapter refuses) is
    not taken for an outside change: the refusal says it, and the rollback stays armed.
    """
    seen_target = state.target_weight if observed.target_weight is None else observed.target_weight
    intent = state.pending
    if intent is None:
        moved = seen_target != state.target_weight or observed.source_weight != state.source_weight
        return (_Writes.EXTERNAL if moved else _Writes.SETTLED), state
    target_done = seen_target == intent.target
    source_done = intent.source is None or observed.source_weight == intent.source
    if target_done and source_done:
        return _Writes.SETTLED, state.evolve(pending=None)
    target_ours = target_done or seen_target == intent.from_target
    source_ours = source_done or observed.source_weight == intent.from_source
    return (_Writes.UNFINISHED if target_ours and source_ours else _Writes.EXTERNAL), state


# --- 2. the evidence: always counted (R1, R4, R6, R8) ------------------------------------------


def _settled(check: CheckResult | None, settling: str | None, deficit: str | None) -> CheckResult | None:
    """A pass on traffic that does not follow the weights is no pass (R8): TrafficDeficit when the
    ASM gateway persistently misses requests the CLB sends it, Settling while the split catches up.

    Only a pass is relabelled: a FAIL stays a FAIL, and any other inconclusive check keeps its
    cause and its limit (``onMissingData: rollback`` included); it counts as either besides.
    """
    if check is None or check.verdict is not Verdict.PASS:
        return check
    if deficit is not None:
        return replace(check, verdict=Verdict.INCONCLUSIVE, cause=InconclusiveCause.TRAFFIC_DEFICIT, reason=deficit)
    if settling is not None:
        return replace(check, verdict=Verdict.INCONCLUSIVE, cause=InconclusiveCause.SETTLING, reason=settling)
    return check


def _count_evidence(
    policy: CanaryPolicy, state: RolloutState, check: CheckResult | None, now: datetime, observed: Observation
) -> RolloutState:
    if check is None:
        return state
    if check.verdict is Verdict.INCONCLUSIVE:  # R8: its clocks run whatever else keeps the check inconclusive
        for cause, present in (
            (InconclusiveCause.TRAFFIC_DEFICIT, observed.deficit),
            (InconclusiveCause.SETTLING, observed.settling),
        ):
            if present is not None and check.cause is not cause:
                state = state.count_inconclusive(cause)
    state = state.evolve(evidence=check.evidence)  # R11: the sequential gates' running evidence
    if check.verdict is Verdict.FAIL:
        failures = state.consecutive_failures + 1
        if any(gate.decisive for gate in check.failing):  # R11: its own false-alarm control, no count
            failures = max(failures, policy.spec.analysis.failure_threshold)
        return state.evolve(
            consecutive_failures=failures,
            last_verdict=Verdict.FAIL,
            last_failed_gate=check.failing[0].gate if check.failing else None,
            baked_seconds=0.0,
            run_started_at=None,
            last_pass_at=None,
        )
    if check.verdict is Verdict.INCONCLUSIVE:
        cause = check.cause or InconclusiveCause.NO_DATA
        return _close_run(state.count_inconclusive(cause)).evolve(last_verdict=Verdict.INCONCLUSIVE)
    passed = state.evolve(
        consecutive_failures=0,
        inconclusive=(),
        stuck_reported=(),
        last_verdict=Verdict.PASS,
        last_failed_gate=None,
    )
    if state.pending is not None:  # a step is baked only once it is fully written
        return passed.evolve(run_started_at=None, last_pass_at=None)
    if _extends_run(policy, state, now):
        return passed.evolve(last_pass_at=now)
    return _close_run(passed).evolve(run_started_at=now, last_pass_at=now)


def _extends_run(policy: CanaryPolicy, state: RolloutState, now: datetime) -> bool:
    """A pass extends the current run if the previous pass is at most a few intervals back (R4)."""
    if state.run_started_at is None or state.last_pass_at is None:
        return False
    gap = now - state.last_pass_at
    return timedelta(0) <= gap <= policy.spec.analysis.interval * COVERAGE_GAP_INTERVALS


def _close_run(state: RolloutState) -> RolloutState:
    """End the current run of passes, keeping what it covered up to its last pass."""
    return state.evolve(baked_seconds=state.covered_seconds, run_started_at=None, last_pass_at=None)


def _failed(check: CheckResult | None) -> bool:
    return check is not None and check.verdict is Verdict.FAIL


def _pending_rollback(state: RolloutState) -> bool:
    return state.pending is not None and state.pending.rollback


def _void_unfinished_raise(state: RolloutState, observed: Observation) -> RolloutState:
    """A FAIL empties the bake, and so voids a raise that is not fully written (R1, R4).

    The rollout stays at what the Services show (our own partial write included), bakes there
    again, and the rollback stays armed; nothing is written to undo or finish the raise.
    """
    target = state.target_weight if observed.target_weight is None else observed.target_weight
    return state.evolve(
        pending=None,
        # an unfinished promotion is no promotion: the rollout stays live, and armed
        phase=Phase.PROGRESSING if target > 0 else Phase.PENDING,
        target_weight=target,
        source_weight=observed.source_weight,
        reason="a check failed before the raise was fully written; staying at the weights the Services show",
    )


# --- 3. protection: does the evidence demand a rollback? (R1, R2) ------------------------------


def _protection(policy: CanaryPolicy, state: RolloutState, observed: Observation) -> str | None:
    """Why the target must go to 0 now, or None. Reads only counted evidence and the pending write."""
    pending = state.pending
    if pending is not None and pending.rollback and pending.target == 0:
        return "the rollback is not fully written yet; writing it again"
    if observed.command is Command.ABORT and (state.phase in ARMED_PHASES or _carries_traffic(state, observed)):
        return ABORTED  # also over a step back still being written: abort means 0
    if pending is not None and pending.rollback:
        return "the step back is not fully written yet; writing it again"
    if not _armed(state) or not _carries_traffic(state, observed):
        return None
    analysis = policy.spec.analysis
    check = observed.check
    evidence = f": {check.reason}" if check is not None else ""
    if state.consecutive_failures >= analysis.failure_threshold:
        decisive = [gate.gate for gate in check.failing if gate.decisive] if check is not None else []
        if decisive:
            return f"{', '.join(decisive)} rejected: the evidence suffices (anytime-valid){evidence}"
        return (
            f"{state.consecutive_failures} consecutive failed check(s) "
            f"(threshold {analysis.failure_threshold}){evidence}"
        )
    for cause, count in state.inconclusive:
        limit = inconclusive_limit(policy, cause)
        if limit.action is OnInconclusive.ROLLBACK and count >= limit.after_checks:
            why = (
                f": {observed.deficit}" if cause is InconclusiveCause.TRAFFIC_DEFICIT and observed.deficit else evidence
            )
            return f"{count} inconclusive checks ({cause.value}) since the last pass, policy says rollback{why}"
    return None


def _armed(state: RolloutState) -> bool:
    """A live phase, or a raise (even a promotion) not fully written: its target may carry traffic."""
    unfinished_raise = state.pending is not None and not state.pending.rollback
    return state.phase in ARMED_PHASES or unfinished_raise


def _carries_traffic(state: RolloutState, observed: Observation) -> bool:
    """Whether the ASM gateway gets traffic: what the Services show, or what we wrote and they may
    show late; a raise recorded but not written yet (a START whose patch failed) is not traffic."""
    seen = observed.target_weight or 0
    pending = state.pending
    if pending is not None and not pending.rollback:
        return seen > 0
    return max(state.target_weight, seen) > 0


def _rollback(policy: CanaryPolicy, state: RolloutState, observed: Observation, now: datetime, why: str) -> Decision:
    intent = state.pending
    if intent is not None and intent.rollback and why != ABORTED:
        if intent.target > 0 and observed.target_weight is not None and observed.target_weight < intent.target:
            # a step back never raises the ASM gateway over a lower weight someone set meanwhile
            kept = state.evolve(
                pending=None,
                target_weight=observed.target_weight,
                source_weight=observed.source_weight,
                reason=f"the step back found the target weight lowered to {observed.target_weight} by someone "
                "else; keeping it, paused with rollback armed",
            )
            return Decision(state=kept, action=Action.HOLD)
        # R2: the same rollback (or step back) again, to the weights it recorded; told once, when decided
        pending = replace(intent, from_target=observed.target_weight, from_source=observed.source_weight)
        # decided under this policy: an edit made meanwhile never restarts it (R5)
        retried = state.evolve(pending=pending, fingerprint=policy.rollout_fingerprint())
        return Decision(state=retried, action=Action.ROLLBACK, weights=intent.weights, force=True)
    back_to = _step_back_weights(state, why)
    if back_to is not None:
        return _step_back(policy, state, observed, now, why, weights=back_to)
    mode = policy.spec.schedule.weight_mode
    weights = weights_for(0, mode)
    if mode is WeightMode.TARGET_ONLY:
        weights = _never_both_zero(weights, observed.source_weight)
    intent = Intent(
        target=0,
        source=weights.source,
        from_target=observed.target_weight,
        from_source=observed.source_weight,
        rollback=True,
    )
    rolled = state.evolve(
        phase=Phase.ROLLED_BACK,
        # decided under this policy: an edit made before the rollback never restarts it (R5)
        fingerprint=policy.rollout_fingerprint(),
        target_weight=0,
        source_weight=weights.source if weights.source is not None else observed.source_weight,
        pending=intent,
        awaiting=None,
        verifying_from=None,
        rolled_back_last=True,
        evidence=(),  # R11: a retry gathers its own
    )
    # A rollback of a gateway that carried traffic pages; one that carried none (an abort before
    # the start landed) is said, not paged.
    severity = Severity.CRITICAL if _carries_traffic(state, observed) else Severity.WARNING
    rolled = rolled.evolve(
        reason=f"rolled back from target weight {state.target_weight}: {why}",
        changed_at=now,
        step_started_at=None,
        baked_seconds=0.0,
        run_started_at=None,
        last_pass_at=None,
    )
    return Decision(
        state=rolled,
        action=Action.ROLLBACK,
        weights=weights,
        notices=(Notice(AlertKind.ROLLED_BACK, severity, rolled.reason),),
        transition=True,
        force=True,
        outcome=CommandOutcome(True, "rolled back to 0") if why == ABORTED else None,
    )


def _step_back_weights(state: RolloutState, why: str) -> Weights | None:
    """Where a failed post-promotion verification goes (R10): the split the Services showed before
    the promotion, the one judged healthy against the old gateway (in either weight mode, after a
    ``promote --full`` too); None for a rollback to 0 (an abort, or nothing judged before 100)."""
    before = state.verifying_from
    if state.phase is not Phase.VERIFYING or why == ABORTED or before is None or not 0 < before[0] < FULL:
        return None
    target, source = before
    return Weights(target, FULL - target if source is None else source)


def _step_back(
    policy: CanaryPolicy, state: RolloutState, observed: Observation, now: datetime, why: str, *, weights: Weights
) -> Decision:
    """R10: verification failed at 100: back to the judged split at once, Paused there with the
    rollback armed one check from 0 (a further FAIL rolls back to 0; a pass clears it)."""
    intent = Intent(weights.target, weights.source, observed.target_weight, observed.source_weight, rollback=True)
    reason = (
        f"verification at 100 failed, stepped back to target weight {weights.target}: {why}; paused with "
        "rollback armed (one more failed check rolls back to 0)"
    )
    stepped = _restart_bake(state, now).evolve(
        evidence=(),  # R11: the split stepped back to is a step of its own
        phase=Phase.PAUSED,
        reason=reason,
        fingerprint=policy.rollout_fingerprint(),
        target_weight=weights.target,
        source_weight=weights.source,
        pending=intent,
        consecutive_failures=max(0, policy.spec.analysis.failure_threshold - 1),
        inconclusive=(),
        stuck_reported=(),
        verifying_from=None,
        rolled_back_last=True,
    )
    return Decision(
        state=stepped,
        action=Action.ROLLBACK,
        weights=weights,
        notices=(Notice(AlertKind.ROLLED_BACK, Severity.CRITICAL, reason),),
        transition=True,
        force=True,
    )


# --- 4. everything else, in order of precedence ---------------------------------------------------


def _progress(
    policy: CanaryPolicy, state: RolloutState, observed: Observation, writes: _Writes, now: datetime
) -> Decision:
    if writes is _Writes.EXTERNAL:
        return _adopt_external_change(state, observed, now)
    if writes is _Writes.UNFINISHED and observed.command is Command.PAUSE:
        # R9: a pause stops moving: the raise not fully written stays where the Services show it
        state = _void_unfinished_raise(state, observed)
    elif writes is _Writes.UNFINISHED:
        return _complete(state)
    commanded = _apply_command(policy, state, observed, now)
    if commanded is not None:
        return commanded
    if state.fingerprint != policy.rollout_fingerprint():
        return _policy_changed(policy, state, now)
    check = observed.check
    if state.phase in TERMINAL_PHASES or check is None:
        return Decision(state=state, action=Action.NONE)
    if state.phase is Phase.PENDING:
        return _start(policy, state, observed, now)
    if state.phase is Phase.PAUSED:
        return Decision(state=state, action=Action.HOLD)
    if state.phase is Phase.VERIFYING:
        return _verifying(policy, state, check, now)
    return _progressing(policy, state, observed, check, now)


def _adopt_external_change(state: RolloutState, observed: Observation, now: datetime) -> Decision:
    """Someone else moved a weight: adopt it, say so once, never fight it."""
    intent = state.pending
    expected = Weights(state.target_weight, state.source_weight)
    in_progress = ""
    if intent is not None:  # what stood before our change, or the change itself
        expected = Weights(intent.from_target or 0, intent.from_source)
        in_progress = f" (or {intent.weights}, a change in progress)"
    seen = Weights(
        state.target_weight if observed.target_weight is None else observed.target_weight, observed.source_weight
    )
    terminal = state.phase in TERMINAL_PHASES
    what = f"weights changed outside gateway-canary: found {seen}, expected {expected}{in_progress}"
    # R5: a terminal rollout stays terminal; a live one pauses with its rollback still armed.
    reason = (
        f"{what}; adopted them, the rollout stays {state.phase.value}"
        if terminal
        else f"{what}; adopted them and paused (resume or change the policy to continue)"
    )
    adopted = state.evolve(
        rolled_back_last=False,  # the weights now shown are someone else's
        phase=state.phase if terminal else Phase.PAUSED,
        reason=reason,
        target_weight=seen.target,
        source_weight=seen.source,
        pending=None,
        changed_at=now,
    )
    return Decision(
        state=adopted,
        action=Action.ADOPT if terminal else Action.PAUSE,
        notices=(Notice(AlertKind.WEIGHT_CHANGED_EXTERNALLY, Severity.WARNING, reason),),
        transition=True,
    )


def _complete(state: RolloutState) -> Decision:
    """Finish our own change that is partly visible (crash, API error or conflict between the writes)."""
    assert state.pending is not None  # _reconcile_writes says UNFINISHED only with an intent
    return Decision(
        state=state.evolve(reason=_completing_reason(state)),
        action=Action.COMPLETE_WRITE,
        weights=state.pending.weights,
    )


def _apply_command(policy: CanaryPolicy, state: RolloutState, observed: Observation, now: datetime) -> Decision | None:
    """Operator commands (ABORT is protection's, in ``_protection``; APPROVE is ``_take_approval``'s).

    A command that does not fit the phase is not applied here; ``_answer`` says why.
    """
    command = observed.command
    if command is Command.RETRY and state.phase is Phase.ROLLED_BACK:
        fresh = _reset_step(state, now).evolve(
            phase=_live_phase(state),
            reason="retry requested by an operator",
            approved=(),
            awaiting=None,
            rolled_back_last=False,
        )
        return Decision(
            state=fresh, action=Action.RETRY, transition=True, outcome=CommandOutcome(True, "starting again")
        )
    if command is Command.PAUSE and state.phase in (Phase.PENDING, Phase.PROGRESSING, Phase.VERIFYING):
        # a policy change in the same tick is taken in (its bake restarts), and stays paused
        changed = state.fingerprint != policy.rollout_fingerprint()
        base = _restart_bake(state, now) if changed else state
        paused = base.evolve(
            phase=Phase.PAUSED, reason="paused by an operator", changed_at=now, fingerprint=policy.rollout_fingerprint()
        )
        return Decision(state=paused, action=Action.PAUSE, transition=True, outcome=CommandOutcome(True, "paused"))
    if command is Command.RESUME and state.phase is Phase.PAUSED:
        resumed = _restart_bake(state, now).evolve(
            phase=_live_phase(state),
            reason="resumed by an operator; the bake at this step restarts",
        )
        return Decision(state=resumed, action=Action.RESUME, transition=True, outcome=CommandOutcome(True, "resumed"))
    if command is Command.PROMOTE and state.phase in (Phase.PENDING, Phase.PROGRESSING, Phase.PAUSED):
        check = observed.check
        if check is None or check.verdict is not Verdict.PASS:
            why = "no check this tick" if check is None else f"{check.verdict.value}: {check.reason}"
            return Decision(
                state=state,
                action=Action.HOLD,
                outcome=CommandOutcome(False, f"refused: promotion needs a passing check; the last one is {why}"),
            )
        # the operator's promotion approves what was left to approve (R9); _permit still judges it
        approved = state.evolve(approved=tuple(sorted({*state.approved, *policy.spec.schedule.approval_at})))
        promoted = _step_to(policy, approved, observed, FULL, now, action=Action.PROMOTE)
        return replace(promoted, outcome=CommandOutcome(True, promoted.reason))
    return None


def _take_approval(
    policy: CanaryPolicy, state: RolloutState, command: Command | None
) -> tuple[RolloutState, CommandOutcome | None]:
    """R9: ``approve`` approves the approval the rollout waits at, or else the next one ahead."""
    if command is not Command.APPROVE:
        return state, None
    if state.phase in TERMINAL_PHASES:
        return state, CommandOutcome(False, f"nothing to approve: the rollout is {state.phase.value}")
    ahead = [w for w in policy.spec.schedule.approval_at if w > state.target_weight and w not in state.approved]
    weight = state.awaiting if state.awaiting is not None else (ahead[0] if ahead else None)
    if weight is None:
        return state, CommandOutcome(False, "nothing to approve: no approvalAt weight lies ahead")
    approved = state.evolve(approved=tuple(sorted({*state.approved, weight})), awaiting=None)
    when = "" if state.awaiting == weight else " in advance"
    return approved, CommandOutcome(True, f"approved the raise to {weight}{when}")


def approval_needed(policy: CanaryPolicy, state: RolloutState, weight: int) -> int | None:
    """The first ``approvalAt`` weight a raise to ``weight`` reaches that is not approved yet (R9)."""
    for gate in policy.spec.schedule.approval_at:
        if state.target_weight < gate <= weight and gate not in state.approved:
            return gate
    return None


def _await_approval(state: RolloutState, gate: int, weight: int, name: str) -> Decision:
    """Hold for an approval; said once, when the wait starts (R9)."""
    reason = (
        f"waiting for approval to raise the target weight {state.target_weight} -> {weight} (approvalAt {gate}): "
        f"gateway-canary approve {name}"
    )
    waiting = state.evolve(awaiting=gate, reason=reason)
    if state.awaiting == gate:
        return Decision(state=waiting, action=Action.HOLD)
    return Decision(
        state=waiting, action=Action.HOLD, notices=(Notice(AlertKind.AWAITING_APPROVAL, Severity.INFO, reason),)
    )


def _verifying(policy: CanaryPolicy, state: RolloutState, check: CheckResult, now: datetime) -> Decision:
    """R10: at 100, absolute gates only, for ``promotion.verifyFor`` of covered passing checks."""
    verify = policy.spec.promotion.verify_for.total_seconds()
    if check.verdict is not Verdict.PASS:
        return _holding(policy, state, check, "verifying at 100: ")
    if state.covered_seconds < verify:
        return Decision(
            state=state.evolve(reason=f"verifying at 100: checks pass, {verify:g}s of passing checks needed"),
            action=Action.NONE,
        )
    reason = f"promoted: verified at 100 for {verify:g}s of passing checks"
    promoted = state.evolve(phase=Phase.PROMOTED, reason=reason, changed_at=now, verifying_from=None)
    return Decision(
        state=promoted,
        action=Action.PROMOTE,
        notices=(Notice(AlertKind.PROMOTED, Severity.INFO, reason),),
        transition=True,
    )


def _policy_changed(policy: CanaryPolicy, state: RolloutState, now: datetime) -> Decision:
    updated = state.evolve(fingerprint=policy.rollout_fingerprint())
    if state.phase is Phase.PROMOTED:
        return Decision(
            state=updated.evolve(reason="policy changed after promotion; nothing to do"), action=Action.NONE
        )
    restarted = _restart_bake(updated, now)
    if state.phase is Phase.ROLLED_BACK:
        # a new rollout: the old evidence led to the rollback, and the old approvals were for it
        restarted = _reset_step(updated, now).evolve(approved=(), awaiting=None, rolled_back_last=False)
        pending = restarted.evolve(phase=_live_phase(state), reason="policy changed after a rollback; starting again")
        return Decision(state=pending, action=Action.RETRY, transition=True)
    # a changed policy is how a paused rollout is continued
    phase: Phase = _live_phase(state) if state.phase is Phase.PAUSED else state.phase
    restarted = restarted.evolve(
        phase=phase, reason=f"policy changed; keeping target weight {state.target_weight} and restarting the bake"
    )
    return Decision(state=restarted, action=Action.RESTART_BAKE, transition=True)


def _start(policy: CanaryPolicy, state: RolloutState, observed: Observation, now: datetime) -> Decision:
    """Pending: start once the baseline is real (R7); the target cannot have traffic of its own yet."""
    why_not = _start_blocker(observed.check)
    if why_not is not None:
        return Decision(state=state.evolve(reason=f"waiting to start: {why_not}"), action=Action.HOLD)
    first = target_steps(policy.spec.schedule)[0]
    gate = approval_needed(policy, state, first)
    if gate is not None:
        return _await_approval(state, gate, first, policy.name)
    return _step_to(policy, state, observed, first, now, action=Action.START)


def _holding(policy: CanaryPolicy, state: RolloutState, check: CheckResult, where: str) -> Decision:
    """A FAIL or an inconclusive check: hold, saying how far it is from its limit (``where``: a prefix)."""
    if check.verdict is Verdict.FAIL:
        threshold = policy.spec.analysis.failure_threshold
        return Decision(
            state=state.evolve(
                reason=f"{where}check failed ({state.consecutive_failures}/{threshold}); bake restarts: {check.reason}"
            ),
            action=Action.HOLD,
        )
    cause = check.cause or InconclusiveCause.NO_DATA
    limit = inconclusive_limit(policy, cause)
    count = state.inconclusive_count(cause)
    return Decision(
        state=state.evolve(reason=f"{where}inconclusive ({cause.value} {count}/{limit.after_checks}): {check.reason}"),
        action=Action.HOLD,
    )


def _progressing(
    policy: CanaryPolicy, state: RolloutState, observed: Observation, check: CheckResult, now: datetime
) -> Decision:
    if check.verdict is not Verdict.PASS:
        return _holding(policy, state, check, "")
    bake = policy.spec.schedule.bake_for(state.target_weight).total_seconds()
    if state.covered_seconds < bake:
        # Stable wording (no running numbers): the state is persisted only when it changes.
        return Decision(
            state=state.evolve(
                reason=f"baking at target weight {state.target_weight}: checks pass, {bake:g}s of passing checks needed"
            ),
            action=Action.NONE,
        )
    upcoming = next_target_weight(policy.spec.schedule, state.target_weight)
    weight = upcoming if upcoming is not None else FULL
    gate = approval_needed(policy, state, weight)
    if gate is not None:
        return _await_approval(state, gate, weight, policy.name)
    return _step_to(policy, state, observed, weight, now, action=Action.ADVANCE)


def _step_to(
    policy: CanaryPolicy, state: RolloutState, observed: Observation, weight: int, now: datetime, *, action: Action
) -> Decision:
    promoting = weight >= FULL
    mode = policy.spec.schedule.weight_mode
    weights = weights_for(FULL, mode, promoted=True) if promoting else weights_for(weight, mode)
    weights = _never_both_zero(weights, observed.source_weight)
    intent = Intent(
        target=weights.target,
        source=weights.source,
        from_target=observed.target_weight,
        from_source=observed.source_weight,
    )
    verify = policy.spec.promotion.verify_for.total_seconds()
    if promoting and verify > 0:
        reason = (
            f"target weight {state.target_weight} -> {FULL}, source -> {weights.source}; verifying for {verify:g}s "
            "before promoted"
        )
    elif promoting:
        reason = f"promoted: target weight {state.target_weight} -> {FULL}, source -> {weights.source}"
    elif action is Action.START:
        reason = f"started: target weight 0 -> {weight}; baseline ready: source has traffic, metrics answer"
    else:
        reason = f"target weight {state.target_weight} -> {weight} after a covered bake"
    verifying = promoting and verify > 0
    seen = (observed.target_weight or 0, observed.source_weight)
    moved = _reset_step(state, now).evolve(
        phase=Phase.VERIFYING if verifying else Phase.PROMOTED if promoting else Phase.PROGRESSING,
        reason=reason,
        target_weight=weights.target,
        source_weight=weights.source if weights.source is not None else state.source_weight,
        pending=intent,
        awaiting=None,
        verifying_from=seen if verifying else None,
        rolled_back_last=False,
    )
    notices = (Notice(AlertKind.PROMOTED, Severity.INFO, reason),) if promoting and not verifying else ()
    return Decision(
        state=moved,
        action=Action.PROMOTE if promoting else action,
        weights=weights,
        notices=notices,
        transition=True,
    )


# --- 5. permission: a raise needs evidence and no refusal (R3, R7) --------------------------------


def raises_share(weights: Weights, target: int | None, source: int | None) -> bool:
    """Whether writing ``weights`` over (``target``, ``source``) gives the ASM gateway a larger share."""
    up = weights.target > (target or 0)
    source_down = weights.source is not None and source is not None and weights.source < source
    return up or (source_down and weights.target > 0)


def _permit(
    policy: CanaryPolicy, proposal: Decision, counted: RolloutState, observed: Observation, now: datetime
) -> Decision:
    """Let a write that raises the ASM share through only on this tick's evidence, no refusal, and
    inside an advance window (R9).

    A refused new step is dropped (the state stays as counted); a refused completion of an
    unfinished raise keeps its intent and waits.
    """
    weights = proposal.weights
    if weights is None or not raises_share(weights, observed.target_weight, observed.source_weight):
        return proposal
    blocker = (
        observed.refusal
        or observed.cloud_refusal
        or observed.reported_refusal
        or observed.deficit  # R8: not on traffic that does not follow the last write
        or observed.settling
        or _raise_blocker(observed.check, observed.target_weight or 0)
        or window_blocker(policy.spec.schedule.advance_windows, now)
    )
    if blocker is None:
        return proposal
    if proposal.action is Action.COMPLETE_WRITE:
        held = proposal.state.evolve(reason=f"unfinished weight change waits: {blocker}")
    else:
        held = counted.evolve(reason=f"not raising the weight: {blocker}")
    return Decision(state=held, action=Action.HOLD)


def _raise_blocker(check: CheckResult | None, from_target: int) -> str | None:
    """What this tick's evidence lacks for a raise: a pass, or at weight 0 a real baseline (R7)."""
    if from_target == 0:
        return _start_blocker(check)
    if check is None:
        return "no check this tick"
    if check.verdict is not Verdict.PASS:
        return f"this tick's check is {check.verdict.value}: {check.reason}"
    return None


def _start_blocker(check: CheckResult | None) -> str | None:
    if check is None:
        return "no check this tick"
    if check.verdict is Verdict.FAIL:
        return f"check failed: {check.reason}"
    if check.baseline.verdict is not Verdict.PASS:
        return check.baseline.reason
    if check.verdict is Verdict.INCONCLUSIVE and check.cause is not InconclusiveCause.TOO_FEW_REQUESTS:
        return f"inconclusive: {check.reason}"
    return None


# --- 6. telling people: once per refusal, cloud refusal and stuck cause (R3, R6, R8) ------------


def _report_refusal(decision: Decision, refusal: str | None) -> Decision:
    state = decision.state
    if (refusal and bounded(refusal)) == state.refusal:  # the state keeps it bounded: compare alike
        return decision
    updated = replace(decision, state=state.evolve(refusal=refusal))
    if refusal is None:  # (no Recovered: a refusal also ends by being overwritten, e.g. an unreadable state)
        return updated
    why = f"refused to raise weights (observing and rollback continue): {refusal}"
    return updated.notify(Notice(AlertKind.POLICY_REFUSED, Severity.WARNING, why))


def _report_cloud(decision: Decision, observed: Observation) -> Decision:
    """Say once that the cloud has not applied the last write; page when that write was a rollback."""
    refusal = observed.cloud_refusal
    state = decision.state
    if (refusal and bounded(refusal)) == state.cloud_refusal:
        return decision
    updated = replace(decision, state=state.evolve(cloud_refusal=refusal))
    if refusal is None:
        why = f"the cloud applied the weights it had not applied ({state.cloud_refusal})"
        return updated.notify(Notice(AlertKind.RECOVERED, Severity.INFO, why))
    detail = f" ({observed.cloud_detail})" if observed.cloud_detail else ""
    # On the rollback's own tick the refusal is about the write before it; from the next tick on,
    # about the rollback, which may not have reached the load balancer.
    rollback_unapplied = state.rolled_back_last and decision.action is not Action.ROLLBACK
    if rollback_unapplied:
        why = f"the cloud has not applied the rollback, the ASM gateway may still get traffic: {refusal}{detail}"
        return updated.notify(Notice(AlertKind.CLOUD_NOT_APPLIED, Severity.CRITICAL, why))
    why = f"holding at the weights written: the cloud has not applied them: {refusal}{detail}"
    return updated.notify(Notice(AlertKind.CLOUD_NOT_APPLIED, Severity.WARNING, why))


def _report_stuck(
    policy: CanaryPolicy, decision: Decision, was_stuck: tuple[InconclusiveCause, ...], check: CheckResult | None
) -> Decision:
    """Warn once per cause whose count reached its limit without a rollback; say when it passes again."""
    state = decision.state
    if was_stuck and check is not None and check.verdict is Verdict.PASS and decision.action is not Action.ROLLBACK:
        causes = ", ".join(cause.value for cause in was_stuck)
        recovered = Notice(AlertKind.RECOVERED, Severity.INFO, f"checks pass again after being stuck ({causes})")
        decision = decision.notify(recovered)
    if decision.action is Action.ROLLBACK or state.phase in TERMINAL_PHASES:
        return decision  # nothing is held in a finished rollout
    # a start held (a window, an approval) is a wait, not a stuck rollout
    expected = before_start(state, check)
    stuck = [
        (cause, count)
        for cause, count in state.inconclusive
        if count >= inconclusive_limit(policy, cause).after_checks
        and cause not in state.stuck_reported
        and not (expected and cause is InconclusiveCause.TOO_FEW_REQUESTS)
    ]
    if not stuck:
        return decision
    reason = "; ".join(
        f"stuck: {count} inconclusive checks ({cause.value}) since the last pass, holding" for cause, count in stuck
    )
    reported = state.evolve(stuck_reported=tuple(sorted({*state.stuck_reported, *(c for c, _ in stuck)})))
    return replace(decision, state=reported).notify(Notice(AlertKind.STUCK_INCONCLUSIVE, Severity.WARNING, reason))


# --- 7. the operator's answer and the history (R9) ------------------------------------------------


def _answer(command: Command | None, decision: Decision, approval: CommandOutcome | None) -> Decision:
    """Every command gets an answer in the tick that reads it: applied, or rejected and why."""
    if command is None:
        return decision
    outcome = approval if command is Command.APPROVE else decision.outcome
    if approval is not None and approval.applied and decision.action is Action.HOLD:
        outcome = CommandOutcome(True, f"{approval.reason}; {decision.reason}")
    if outcome is None and command is Command.ABORT and decision.action is Action.ROLLBACK:
        outcome = CommandOutcome(True, "a rollback was already being written")
    if outcome is None:
        outcome = CommandOutcome(False, f"not applied in phase {decision.state.phase.value}: {decision.reason}")
    return replace(decision, outcome=outcome)


def _record(decision: Decision, observed: Observation, now: datetime, *, by_operator: bool) -> Decision:
    """Transitions and commands go into the state's history, with who made them happen: a transition
    is the operator's only when their command caused it (an approval never does: the raise that
    follows is the controller's, on its evidence)."""
    state, outcome = decision.state, decision.outcome
    entries: list[Transition] = []
    if decision.transition:
        by = observed.command_by if by_operator else "gateway-canary"
        entries.append(Transition(now, decision.action.value, state.phase, by, state.reason))
    if observed.command is not None and outcome is not None and not (decision.transition and by_operator):
        verb = "applied" if outcome.applied else "rejected"
        entries.append(
            Transition(now, observed.command.value, state.phase, observed.command_by, f"{verb}: {outcome.reason}")
        )
    if not entries:
        return decision
    return replace(decision, state=state.evolve(history=(*state.history, *entries)[-MAX_HISTORY:]))


# --- small helpers -------------------------------------------------------------------------------


def _restart_bake(state: RolloutState, now: datetime) -> RolloutState:
    """The bake starts again; the evidence about the target's health is kept (R1)."""
    return state.evolve(step_started_at=now, changed_at=now, baked_seconds=0.0, run_started_at=None, last_pass_at=None)


def _reset_step(state: RolloutState, now: datetime) -> RolloutState:
    """A new step (or an operator's retry): the bake, the counters and the sequential evidence start again."""
    return _restart_bake(state, now).evolve(consecutive_failures=0, inconclusive=(), stuck_reported=(), evidence=())


def before_start(state: RolloutState, check: CheckResult | None) -> bool:
    """Pending on a real baseline: at 0 the ASM gateway has no traffic, so too few requests there is
    what a start expects (R7), not a sign of trouble."""
    return state.phase is Phase.PENDING and check is not None and check.baseline.verdict is Verdict.PASS


def _live_phase(state: RolloutState) -> Phase:
    """Where a rollout continues: Pending at 0 (start on a real baseline), verifying at 100 when it was
    (R10), else bake where it stands."""
    if state.target_weight >= FULL and state.verifying_from is not None:
        return Phase.VERIFYING
    return Phase.PROGRESSING if state.target_weight > 0 else Phase.PENDING


def _never_both_zero(weights: Weights, observed_source: int | None) -> Weights:
    """Target-only mode leaves the source alone, unless leaving it would make both weights 0."""
    if weights.source is None and weights.target == 0 and observed_source == 0:
        return Weights(target=0, source=FULL)
    return weights


def inconclusive_limit(policy: CanaryPolicy, cause: InconclusiveCause) -> InconclusivePolicy:
    """The limit of a run of inconclusive checks of ``cause``: the policy's, or settling's time limit."""
    analysis = policy.spec.analysis
    if cause is InconclusiveCause.TRAFFIC_DEFICIT:
        return analysis.on_traffic_deficit
    if cause is InconclusiveCause.SETTLING:  # R8: a time limit, as checks; settling only ever holds
        checks = math.ceil(policy.spec.cloud.settle_timeout / analysis.interval)
        return InconclusivePolicy(action=OnInconclusive.HOLD, after_checks=max(1, min(checks, 10_000)))
    if cause is InconclusiveCause.METRICS_UNAVAILABLE:
        return analysis.on_metrics_unavailable
    return analysis.on_missing_data


def _completing_reason(state: RolloutState) -> str:
    suffix = " (completing the weight write)"
    return state.reason if state.reason.endswith(suffix) else state.reason + suffix
