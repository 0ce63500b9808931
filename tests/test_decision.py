"""The pure rollout decision, driven with injected time: each rule of controller.core.decision.

``Rollout`` plays the runner's part without I/O: it feeds checks at given times, writes what a
decision asks (completing the intent, as the runner's step 4 does) and keeps the weights the
Services would show. Tests named ``test_r<N>_...`` guard rule R<N> of the module docstring.
"""

from __future__ import annotations

import itertools

from controller.core.decision import Action, Decision, Observation, decide, initial_state, recovered_state
from controller.core.enums import AlertKind, Command, GatewayRole, InconclusiveCause, Phase, Severity, Verdict
from controller.core.policy import CanaryPolicy
from tests.helpers import FAIL, NO_DATA, PASS, PROM_DOWN, SOURCE_ERRORING, TARGET_QUIET, Rollout, at, check, make_policy

POLICY = make_policy()  # steps [10, 50, 100], bake 5m, interval 30s, failureThreshold 2


def started(policy: CanaryPolicy = POLICY) -> Rollout:
    rollout = Rollout.fresh(policy)
    assert rollout.tick(TARGET_QUIET, 0).action is Action.START
    return rollout


def kinds(decision: Decision) -> list[AlertKind]:
    return [notice.kind for notice in decision.notices]


# --- starting --------------------------------------------------------------------------------------


def test_pending_starts_at_first_step_when_only_the_target_is_quiet() -> None:
    rollout = Rollout.fresh()
    assert rollout.state.phase is Phase.PENDING
    decision = rollout.tick(TARGET_QUIET, 0)
    assert decision.action is Action.START and decision.transition
    assert (decision.weights.target, decision.weights.source) == (10, 90)
    assert decision.state.phase is Phase.PROGRESSING
    assert decision.state.pending is not None and decision.state.pending.from_target == 0  # the intent


def test_pending_never_starts_while_prometheus_is_unreachable() -> None:
    rollout = Rollout.fresh()
    for decision in rollout.every(PROM_DOWN, 0, 3000):
        assert decision.weights is None
    assert rollout.state.phase is Phase.PENDING


def test_r7_an_erroring_source_is_no_baseline_to_start_against() -> None:
    rollout = Rollout.fresh()
    for decision in rollout.every(SOURCE_ERRORING, 0, 600):
        assert decision.weights is None
        assert "baseline" in decision.reason
    assert rollout.tick(TARGET_QUIET, 630).action is Action.START


# --- baking and advancing (R4) -----------------------------------------------------------------------


def test_r4_advances_only_once_passing_checks_cover_the_bake() -> None:
    rollout = started()
    for decision in rollout.every(PASS, 30, 300):  # covered: 270 s of the 300 s bake
        assert decision.weights is None
    assert rollout.state.covered_seconds == 270
    decision = rollout.tick(PASS, 330)
    assert decision.action is Action.ADVANCE and (decision.weights.target, decision.weights.source) == (50, 50)
    assert decision.state.covered_seconds == 0 and decision.state.step_started_at == at(330)


def test_r4_one_pass_after_a_long_gap_is_not_a_bake() -> None:
    rollout = started()
    rollout.tick(PASS, 30)
    assert rollout.tick(PASS, 3600).weights is None  # the controller was down an hour: nothing covered
    assert rollout.state.covered_seconds == 0
    rollout.every(PASS, 3630, 3870)
    assert rollout.state.target_weight == 10  # 240 s covered since the gap
    assert rollout.tick(PASS, 3900).action is Action.ADVANCE


def test_r4_inconclusive_time_does_not_count_and_a_pass_after_an_outage_does_not_advance() -> None:
    rollout = started()
    rollout.every(PASS, 30, 150)  # 120 s covered
    rollout.every(PROM_DOWN, 180, 480)  # five minutes of Prometheus outage
    assert rollout.state.covered_seconds == 120
    assert rollout.tick(PASS, 510).weights is None  # the first pass after it restarts the run, adds nothing
    assert rollout.state.covered_seconds == 120
    rollout.every(PASS, 540, 660)
    assert rollout.state.covered_seconds == 270
    assert rollout.tick(PASS, 690).action is Action.ADVANCE


def test_a_failed_check_below_threshold_empties_the_bake() -> None:
    rollout = started()
    rollout.every(PASS, 30, 210)
    failed = rollout.tick(FAIL, 240)
    assert failed.action is Action.HOLD and failed.weights is None
    assert failed.state.consecutive_failures == 1 and failed.state.covered_seconds == 0
    rollout.every(PASS, 270, 540)
    assert rollout.state.target_weight == 10  # 270 s covered since the failure
    assert rollout.tick(PASS, 570).action is Action.ADVANCE


def test_final_step_promotes_to_100_and_0() -> None:
    policy = make_policy(schedule={"steps": [50], "bakeTime": "1m"})
    rollout = started(policy)
    rollout.every(PASS, 30, 60)
    decision = rollout.tick(PASS, 90)
    assert decision.action is Action.PROMOTE
    assert (decision.weights.target, decision.weights.source) == (100, 0)
    assert kinds(decision) == [AlertKind.PROMOTED]


def test_adopts_an_existing_weight_and_bakes_before_raising() -> None:
    rollout = Rollout.fresh(target=10, source=90)
    assert rollout.state.phase is Phase.PROGRESSING and rollout.state.target_weight == 10
    assert rollout.tick(PASS, 0).weights is None
    rollout.every(PASS, 30, 270)
    assert rollout.tick(PASS, 300).weights.target == 50


# --- rolling back (R1, R2) ------------------------------------------------------------------------------


def test_rolls_back_on_consecutive_failures_and_alerts_critical() -> None:
    rollout = started()
    rollout.tick(FAIL, 30)
    decision = rollout.tick(FAIL, 45)
    assert decision.action is Action.ROLLBACK and decision.force
    assert (decision.weights.target, decision.weights.source) == (0, 100)
    assert decision.state.phase is Phase.ROLLED_BACK
    assert [(n.kind, n.severity) for n in decision.notices] == [(AlertKind.ROLLED_BACK, Severity.CRITICAL)]


def test_inconclusive_neither_breaks_nor_extends_a_failure_run() -> None:
    rollout = started()
    rollout.tick(FAIL, 30)
    rollout.tick(PROM_DOWN, 60)
    assert rollout.state.consecutive_failures == 1
    assert rollout.tick(FAIL, 90).action is Action.ROLLBACK
    rollout = started()  # ...but a PASS resets it
    rollout.tick(FAIL, 30)
    rollout.tick(PASS, 60)
    assert rollout.tick(FAIL, 90).action is Action.HOLD


def test_r1_a_failing_check_is_judged_while_a_raise_is_half_written() -> None:
    """The source patch of a raise failed: every later tick must still count the check."""
    rollout = started()
    rollout.every(PASS, 30, 300)
    raised = rollout.tick(PASS, 330, write=False)  # decided 50/50, intent recorded...
    assert raised.action is Action.ADVANCE
    rollout.target = 50  # ...the target patch landed, the source patch did not
    first = rollout.tick(FAIL, 360, write=False)  # completing would raise the share: held, but counted
    assert first.action is Action.HOLD and first.weights is None and first.state.consecutive_failures == 1
    second = rollout.tick(FAIL, 375, write=False)
    assert second.action is Action.ROLLBACK, "a half-written raise must not shield a failing target"
    assert (second.weights.target, second.weights.source) == (0, 100)


def test_r1_an_unfinished_raise_is_completed_only_on_a_passing_check() -> None:
    rollout = started()
    rollout.every(PASS, 30, 300)
    rollout.tick(PASS, 330, write=False)
    held = rollout.tick(PROM_DOWN, 360)  # crash before any patch: nothing visible yet, Prometheus down
    assert held.action is Action.HOLD and held.weights is None and held.state.pending is not None
    completed = rollout.tick(PASS, 390)
    assert completed.action is Action.COMPLETE_WRITE and (rollout.target, rollout.source) == (50, 50)


def test_r2_a_rollback_not_yet_written_is_retried_and_a_pass_does_not_cancel_it() -> None:
    rollout = started()
    rollout.tick(FAIL, 30)
    decided = rollout.tick(FAIL, 45, write=False)  # the patches failed (403, 409, a crash)
    assert decided.action is Action.ROLLBACK and decided.state.pending.rollback
    for t in (60, 90, 120):
        again = rollout.tick(PASS, t, write=False)
        assert again.action is Action.ROLLBACK and again.force
        assert again.notices == () and not again.transition  # told once, when it was decided
    rollout.target = 0  # the target patch lands, the source still shows 90
    again = rollout.tick(PASS, 150)
    assert again.action is Action.ROLLBACK and (rollout.target, rollout.source) == (0, 100)
    assert rollout.tick(None, 180).action is Action.NONE and rollout.state.pending is None


def test_r2_nothing_else_is_written_while_a_rollback_is_pending() -> None:
    rollout = started()
    rollout.tick(FAIL, 30)
    rollout.tick(FAIL, 45, write=False)
    changed = make_policy(schedule={"steps": [5, 100], "bakeTime": 0})
    for command in (None, Command.RETRY, Command.RESUME):
        rollout.policy = changed
        decision = rollout.tick(PASS, 60, command=command, write=False)
        assert decision.action is Action.ROLLBACK and decision.weights.target == 0


def test_inconclusive_rollback_action_rolls_back_at_its_limit() -> None:
    policy = make_policy(analysis={"onMetricsUnavailable": {"action": "rollback", "afterChecks": 2}})
    rollout = started(policy)
    rollout.tick(PROM_DOWN, 30)
    decision = rollout.tick(PROM_DOWN, 60)
    assert decision.action is Action.ROLLBACK and "MetricsUnavailable" in decision.reason


# --- refusals (R3) ---------------------------------------------------------------------------------------


def test_r3_a_refusal_stops_raising_never_the_rollback_and_is_reported_once() -> None:
    refusal = "alerts[0].urlFromEnv: environment variable PAGER_URL is not set"
    rollout = started()
    rollout.every(PASS, 30, 300)
    first = rollout.tick(PASS, 330, refusal=refusal)
    assert first.weights is None and "not raising" in first.reason
    assert kinds(first) == [AlertKind.POLICY_REFUSED]
    for t in (360, 390):
        assert rollout.tick(PASS, t, refusal=refusal).notices == ()  # once, not every tick
    rollout.tick(FAIL, 420, refusal=refusal)
    decision = rollout.tick(FAIL, 435, refusal=refusal)
    assert decision.action is Action.ROLLBACK and rollout.target == 0
    assert rollout.state.refusal == refusal


def test_r3_a_refused_policy_does_not_start() -> None:
    rollout = Rollout.fresh()
    decision = rollout.tick(TARGET_QUIET, 0, refusal="Service x lacks the CLB id")
    assert decision.weights is None and rollout.state.phase is Phase.PENDING
    assert rollout.tick(TARGET_QUIET, 30).action is Action.START  # once the refusal is gone


# --- terminal phases and unreadable state (R5) --------------------------------------------------------


def test_r5_rolled_back_stays_until_retry_or_policy_change() -> None:
    rollout = started()
    rollout.tick(FAIL, 30)
    rollout.tick(FAIL, 31)
    assert rollout.state.phase is Phase.ROLLED_BACK
    for t in (60, 90, 5000):
        assert rollout.tick(PASS, t).weights is None
    rolled = rollout.state
    retried = rollout.tick(None, 6000, command=Command.RETRY)
    assert retried.state.phase is Phase.PENDING
    changed = make_policy(gates={"errorRate": {"max": 0.02}})
    decision = decide(changed, rolled, Observation(0, 100, PASS), at(6000))
    assert decision.state.phase is Phase.PENDING and decision.state.fingerprint == changed.rollout_fingerprint()


def test_r5_a_weight_edit_after_promotion_is_reported_once_and_never_rolls_back() -> None:
    policy = make_policy(schedule={"steps": [50], "bakeTime": 0})
    rollout = started(policy)
    assert rollout.tick(PASS, 30).action is Action.PROMOTE and rollout.state.phase is Phase.PROMOTED
    rollout.target, rollout.source = 90, 10  # someone shifts a little traffic back
    seen = rollout.tick(None, 60)
    assert kinds(seen) == [AlertKind.WEIGHT_CHANGED_EXTERNALLY] and seen.weights is None
    assert rollout.state.phase is Phase.PROMOTED
    for t in (90, 120, 150):
        decision = rollout.tick(FAIL, t)
        assert decision.weights is None and decision.notices == ()
    assert rollout.state.phase is Phase.PROMOTED and rollout.target == 90


def test_r5_an_unreadable_state_holds_at_the_weights_seen_and_keeps_the_rollback_armed() -> None:
    # a rolled-back rollout whose state got corrupted: never a Start
    state = recovered_state(POLICY, Observation(0, 100), at(0), "not JSON")
    rollout = Rollout(POLICY, state)
    for t in (0, 30, 60, 90):
        assert rollout.tick(TARGET_QUIET, t).weights is None
    assert rollout.state.phase is Phase.PAUSED
    # a live rollout at 50 whose state got corrupted: a failing target still goes to 0
    live = Rollout(POLICY, recovered_state(POLICY, Observation(50, 50), at(0), "future version"), 50, 50)
    live.tick(FAIL, 30)
    assert live.tick(FAIL, 60).action is Action.ROLLBACK and live.target == 0


def test_weight_changed_by_someone_else_pauses_and_is_reported() -> None:
    rollout = started()
    rollout.target, rollout.source = 40, 60
    decision = rollout.tick(PASS, 30)
    assert decision.action is Action.PAUSE and decision.weights is None
    assert kinds(decision) == [AlertKind.WEIGHT_CHANGED_EXTERNALLY]
    assert decision.state.target_weight == 40
    assert rollout.tick(PASS, 5000).weights is None  # paused: no advancing, rollback armed
    rollout.tick(FAIL, 5030)
    assert rollout.tick(FAIL, 5060).action is Action.ROLLBACK


def test_an_unfinished_source_write_is_completed_not_mistaken_for_a_human() -> None:
    rollout = Rollout.fresh()
    rollout.tick(TARGET_QUIET, 0, write=False)
    rollout.target = 10  # the target patch landed, the source patch did not
    completing = rollout.tick(PASS, 30)
    assert completing.action is Action.COMPLETE_WRITE and completing.notices == ()
    assert (rollout.target, rollout.source) == (10, 90)
    judged = rollout.tick(FAIL, 60)
    assert judged.state.pending is None and judged.state.consecutive_failures == 1
    other = Rollout.fresh()  # a different source value is someone else's edit
    other.tick(TARGET_QUIET, 0, write=False)
    other.target, other.source = 10, 70
    assert kinds(other.tick(PASS, 30)) == [AlertKind.WEIGHT_CHANGED_EXTERNALLY]


def test_a_source_without_a_weight_annotation_is_completed_not_taken_for_an_edit() -> None:
    rollout = Rollout(POLICY, initial_state(POLICY, Observation(0, None), at(0)), 0, None)
    rollout.tick(TARGET_QUIET, 0, write=False)
    rollout.target = 10  # the source (no annotation before) was not written yet
    decision = rollout.tick(PASS, 30)
    assert decision.action is Action.COMPLETE_WRITE and rollout.source == 90
    assert AlertKind.WEIGHT_CHANGED_EXTERNALLY not in kinds(decision)


# --- inconclusive counters (R6) ------------------------------------------------------------------------


def test_r6_each_inconclusive_cause_has_its_own_counter_and_limit() -> None:
    policy = make_policy(
        analysis={
            "onMissingData": {"action": "hold", "afterChecks": 10},
            "onMetricsUnavailable": {"action": "rollback", "afterChecks": 5},
        }
    )
    rollout = started(policy)
    for t in range(30, 150, 30):
        rollout.tick(NO_DATA, t)  # four no-data checks
    decision = rollout.tick(PROM_DOWN, 150)  # ...and one Prometheus error: not five of one cause
    assert decision.action is not Action.ROLLBACK
    assert rollout.state.inconclusive_count(InconclusiveCause.NO_DATA) == 4
    assert rollout.state.inconclusive_count(InconclusiveCause.METRICS_UNAVAILABLE) == 1
    for t in range(180, 300, 30):
        rollout.tick(PROM_DOWN, t)
    assert rollout.state.phase is Phase.ROLLED_BACK


def test_inconclusive_hold_warns_once_and_never_moves_weights() -> None:
    policy = make_policy(analysis={"onMissingData": {"action": "hold", "afterChecks": 3}})
    rollout = started(policy)
    alerts = []
    for i in range(10):
        decision = rollout.tick(NO_DATA, 30 * (i + 1))
        assert decision.weights is None
        alerts.append(kinds(decision))
    assert alerts.count([AlertKind.STUCK_INCONCLUSIVE]) == 1
    assert alerts.index([AlertKind.STUCK_INCONCLUSIVE]) == 2


# --- commands, policy changes, modes ------------------------------------------------------------------


def test_policy_change_keeps_weight_and_restarts_bake() -> None:
    rollout = started()
    rollout.every(PASS, 30, 270)
    rollout.policy = make_policy(schedule={"steps": [10, 20, 100], "bakeTime": "5m"})
    decision = rollout.tick(PASS, 300)
    assert decision.action is Action.RESTART_BAKE and decision.weights is None
    assert decision.state.step_started_at == at(300) and decision.state.covered_seconds == 0
    rollout.every(PASS, 330, 600)
    assert rollout.tick(PASS, 630).weights.target == 20


def test_a_policy_change_continues_a_paused_rollout() -> None:
    rollout = started()
    rollout.target, rollout.source = 40, 60
    assert rollout.tick(PASS, 30).state.phase is Phase.PAUSED
    rollout.policy = make_policy(schedule={"steps": [10, 50, 100], "bakeTime": "1m"})
    decision = rollout.tick(PASS, 60)
    assert decision.state.phase is Phase.PROGRESSING and decision.weights is None
    rollout.every(PASS, 90, 120)
    assert rollout.tick(PASS, 150).weights.target == 50


def test_abort_and_pause_resume_commands() -> None:
    rollout = started()
    assert rollout.tick(None, 10, command=Command.PAUSE).state.phase is Phase.PAUSED
    resumed = rollout.tick(None, 20, command=Command.RESUME).state
    assert resumed.phase is Phase.PROGRESSING and resumed.step_started_at == at(20)
    aborted = rollout.tick(None, 30, command=Command.ABORT)
    assert aborted.action is Action.ROLLBACK and aborted.weights.target == 0


def test_target_only_mode_leaves_source_and_never_both_zero() -> None:
    policy = make_policy(schedule={"steps": [10, 100], "bakeTime": "1m", "weightMode": "target-only"})
    rollout = Rollout.fresh(policy, target=0, source=0)
    assert rollout.tick(TARGET_QUIET, 0).weights.source is None
    rollout.tick(FAIL, 10)
    decision = rollout.tick(FAIL, 20)
    assert decision.action is Action.ROLLBACK
    assert (decision.weights.target, decision.weights.source) == (0, 100)


def test_no_sequence_of_checks_sets_both_weights_to_zero() -> None:
    results = [PASS, FAIL, NO_DATA, PROM_DOWN, TARGET_QUIET]
    for mode in ("complementary", "target-only"):
        policy = make_policy(
            schedule={"steps": [10, 50, 100], "bakeTime": "30s", "weightMode": mode}, analysis={"failureThreshold": 1}
        )
        for sequence in itertools.product(results, repeat=4):
            rollout = Rollout.fresh(policy)
            for i, result in enumerate(sequence):
                rollout.tick(result, 20 * (i + 1))
                assert (rollout.target, rollout.source) != (0, 0), (mode, sequence)


# --- found by review ---------------------------------------------------------------------------------------


def test_a_failing_check_during_an_unfinished_promotion_keeps_the_rollback_armed() -> None:
    policy = make_policy(schedule={"steps": [50], "bakeTime": 0})
    rollout = started(policy)
    promoting = rollout.tick(PASS, 30, write=False)  # decided 100/0, the target patch failed
    assert promoting.action is Action.PROMOTE and rollout.state.phase is Phase.PROMOTED
    voided = rollout.tick(FAIL, 45, write=False)  # the Services still show 50/50, and the target fails
    assert voided.state.phase is Phase.PROGRESSING and voided.state.pending is None
    assert rollout.tick(FAIL, 60).action is Action.ROLLBACK and rollout.target == 0


def test_a_pending_start_that_never_landed_is_not_traffic_to_roll_back() -> None:
    policy = make_policy(analysis={"onMetricsUnavailable": {"action": "rollback", "afterChecks": 2}})
    rollout = Rollout.fresh(policy)
    rollout.tick(TARGET_QUIET, 0, write=False)  # START recorded; the target patch failed: still 0/100
    for t in (30, 60, 90):
        decision = rollout.tick(PROM_DOWN, t, write=False)
        assert decision.action is not Action.ROLLBACK, "a CRITICAL page for a gateway that never got traffic"


def test_an_abort_at_weight_0_is_no_critical_page() -> None:
    rollout = Rollout.fresh()
    decision = rollout.tick(None, 0, command=Command.ABORT)
    assert decision.action is Action.ROLLBACK
    assert [n.severity for n in decision.notices] == [Severity.WARNING]


def test_a_retry_at_an_adopted_weight_bakes_there_before_raising() -> None:
    rollout = started()
    rollout.tick(FAIL, 30)
    rollout.tick(FAIL, 45)
    assert rollout.state.phase is Phase.ROLLED_BACK
    rollout.target, rollout.source = 30, 70  # an operator puts some traffic back by hand...
    rollout.tick(None, 60)
    retried = rollout.tick(None, 90, command=Command.RETRY)  # ...and retries
    assert retried.state.phase is Phase.PROGRESSING  # not Pending: 30 is a step to bake at first
    assert rollout.tick(PASS, 120).weights is None  # one pass is no bake


def test_no_stuck_warning_after_a_rollback_for_inconclusive_checks() -> None:
    policy = make_policy(analysis={"onMetricsUnavailable": {"action": "rollback", "afterChecks": 2}})
    rollout = started(policy)
    rollout.tick(PROM_DOWN, 30)
    assert rollout.tick(PROM_DOWN, 60).action is Action.ROLLBACK
    after = rollout.tick(None, 90)
    assert after.notices == ()


# --- R8: a step bakes only on traffic that follows its weights ------------------------------------

SETTLING = "settling: the ASM gateway gets 2.0% of requests, the weights give it 20.0% (tolerance 5.0%)"


def test_r8_passes_while_settling_do_not_bake_and_the_bake_starts_once_settled() -> None:
    rollout = started()
    for t in range(30, 330, 30):  # ten minutes of passing checks on traffic that has not moved yet
        decision = rollout.tick(PASS, t, settling=SETTLING)
        assert decision.action is not Action.ADVANCE
    assert rollout.state.covered_seconds == 0
    assert rollout.state.inconclusive_count(InconclusiveCause.SETTLING) == 10
    assert "Settling" in rollout.state.reason and "2.0%" in rollout.state.reason
    # settled: the bake counts from here, and needs its whole bakeTime
    rollout.every(PASS, 330, 600)
    assert rollout.target == 10
    assert rollout.tick(PASS, 630).action is Action.ADVANCE and rollout.target == 50


def test_r8_a_fail_is_never_softened_by_settling() -> None:
    rollout = started()
    rollout.tick(FAIL, 30, settling=SETTLING)
    decision = rollout.tick(FAIL, 60, settling=SETTLING)
    assert decision.action is Action.ROLLBACK and rollout.target == 0


def test_r8_settling_too_long_warns_once_and_holds_never_rolls_back() -> None:
    policy = make_policy(cloud={"settleTimeout": "2m"})  # 4 checks at 30 s
    rollout = started(policy)
    stuck = []
    for t in range(30, 330, 30):
        decision = rollout.tick(PASS, t, settling=SETTLING)
        assert decision.action is not Action.ROLLBACK
        stuck += [n for n in decision.notices if n.kind is AlertKind.STUCK_INCONCLUSIVE]
    assert len(stuck) == 1 and "Settling" in stuck[0].reason
    assert rollout.target == 10


def test_r8_the_cloud_refusing_a_write_holds_and_is_said_once_whatever_its_messages() -> None:
    rollout = started()
    failed = (
        "the cloud did not confirm the last weight write: ns/asm: the cloud controller answered SyncLoadBalancerFailed"
    )
    not_confirmed = "settling: the weight write is not confirmed"
    decisions = [
        # the cloud controller's message carries a new request id on every retry
        rollout.tick(PASS, t, cloud_refusal=failed, cloud_detail=f"Throttling RequestId: {t}", settling=not_confirmed)
        for t in range(30, 930, 30)
    ]
    assert [kinds(d) for d in decisions[:2]] == [[AlertKind.CLOUD_NOT_APPLIED], []]
    notice = decisions[0].notices[0]
    assert notice.severity is Severity.WARNING and "Throttling RequestId: 30" in notice.reason
    assert sum(len(d.notices) for d in decisions) == 2  # that, and settling too long (once each)
    assert all(d.action is not Action.ADVANCE for d in decisions) and rollout.target == 10
    # confirmed later: the refusal clears, and the bake runs from then, its whole bakeTime
    assert rollout.tick(PASS, 930).state.cloud_refusal is None
    rollout.every(PASS, 960, 1200)
    assert rollout.target == 10
    assert rollout.tick(PASS, 1230).action is Action.ADVANCE


def test_r8_a_rollback_the_cloud_did_not_apply_pages_but_not_on_the_rollback_tick() -> None:
    rollout = started()
    rollout.tick(FAIL, 30)
    earlier = "the cloud did not confirm the last weight write: ns/asm: no EnsuredLoadBalancer since 00:00:00"
    decision = rollout.tick(FAIL, 60, cloud_refusal=earlier)  # about the raise before the rollback
    assert decision.action is Action.ROLLBACK
    assert [(n.kind, n.severity) for n in decision.notices] == [
        (AlertKind.ROLLED_BACK, Severity.CRITICAL),
        (AlertKind.CLOUD_NOT_APPLIED, Severity.WARNING),
    ]
    unconfirmed = "the cloud did not confirm the last weight write: ns/asm: no EnsuredLoadBalancer since 00:01:00"
    decision = rollout.tick(None, 300, cloud_refusal=unconfirmed)  # about the rollback itself
    assert kinds(decision) == [AlertKind.CLOUD_NOT_APPLIED]
    assert decision.notices[0].severity is Severity.CRITICAL
    assert "has not applied the rollback" in decision.notices[0].reason
    assert decision.state.phase is Phase.ROLLED_BACK  # R5: still terminal; the weights stay 0


def test_r8_settling_never_switches_off_a_rollback_on_missing_data() -> None:
    policy = make_policy(analysis={"interval": "30s", "onMissingData": {"action": "rollback", "afterChecks": 2}})
    rollout = started(policy)
    quiet_target = check(Verdict.INCONCLUSIVE, InconclusiveCause.TOO_FEW_REQUESTS, (GatewayRole.TARGET,))
    settling = "settling: the ASM gateway gets 0.0% of requests, the weights give it 20.0% (tolerance 5.0%)"
    rollout.tick(quiet_target, 30, settling=settling)
    decision = rollout.tick(quiet_target, 60, settling=settling)
    assert decision.action is Action.ROLLBACK and rollout.target == 0
    # and the settle deadline counted alongside
    assert decision.state.inconclusive_count(InconclusiveCause.SETTLING) == 2


DEFICIT = "traffic deficit: the ASM gateway gets 2.0% of requests, the weights give it 20.0%: requests fail before HTTP"


def test_r8_a_persistent_traffic_deficit_rolls_back_with_its_reason() -> None:
    rollout = started()  # onTrafficDeficit: rollback after 3 checks (the default)
    assert rollout.tick(PASS, 30, deficit=DEFICIT).action is not Action.ROLLBACK
    assert rollout.tick(PASS, 60, deficit=DEFICIT).action is not Action.ROLLBACK
    decision = rollout.tick(PASS, 90, deficit=DEFICIT)
    assert decision.action is Action.ROLLBACK and rollout.target == 0
    assert "3 inconclusive checks (TrafficDeficit)" in decision.state.reason and DEFICIT in decision.state.reason
    assert decision.notices[0].severity is Severity.CRITICAL


def test_r8_a_deficit_also_counts_when_the_target_is_too_quiet_to_judge_and_a_clean_pass_resets_it() -> None:
    rollout = started()
    quiet_target = check(Verdict.INCONCLUSIVE, InconclusiveCause.TOO_FEW_REQUESTS, (GatewayRole.TARGET,))
    rollout.tick(quiet_target, 30, deficit=DEFICIT)
    rollout.tick(quiet_target, 60, deficit=DEFICIT)
    rollout.tick(PASS, 90)  # the traffic is back: the run is broken
    assert rollout.state.inconclusive_count(InconclusiveCause.TRAFFIC_DEFICIT) == 0
    rollout.tick(quiet_target, 120, deficit=DEFICIT)
    assert rollout.tick(quiet_target, 150, deficit=DEFICIT).action is not Action.ROLLBACK
    assert rollout.tick(quiet_target, 180, deficit=DEFICIT).action is Action.ROLLBACK


def test_r8_a_deficit_on_hold_only_holds_and_warns_once() -> None:
    policy = make_policy(analysis={"interval": "30s", "onTrafficDeficit": {"action": "hold", "afterChecks": 2}})
    rollout = started(policy)
    decisions = [rollout.tick(PASS, t, deficit=DEFICIT) for t in range(30, 300, 30)]
    assert all(d.action is not Action.ROLLBACK for d in decisions) and rollout.target == 10
    stuck = [n for d in decisions for n in d.notices if n.kind is AlertKind.STUCK_INCONCLUSIVE]
    assert len(stuck) == 1 and "TrafficDeficit" in stuck[0].reason
