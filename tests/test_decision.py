"""The pure rollout decision, driven with injected time: each rule of controller.core.decision."""

from __future__ import annotations

from controller.core.decision import Action, Observation, decide, initial_state
from controller.core.enums import AlertKind, Command, Phase, Severity
from controller.core.state import RolloutState
from tests.helpers import FAIL, NO_DATA, PASS, PROM_DOWN, TARGET_QUIET, at, make_policy

POLICY = make_policy()


def start(policy=POLICY) -> RolloutState:
    state = initial_state(policy, Observation(0, 100), at(0))
    decision = decide(policy, state, Observation(0, 100, TARGET_QUIET), at(0))
    assert decision.action is Action.START
    return decision.state


def run(policy, state, weights, result, t, command=None):
    return decide(policy, state, Observation(weights[0], weights[1], result, command), at(t))


def test_pending_starts_at_first_step_when_only_the_target_is_quiet() -> None:
    state = initial_state(POLICY, Observation(0, 100), at(0))
    assert state.phase is Phase.PENDING
    decision = decide(POLICY, state, Observation(0, 100, TARGET_QUIET), at(0))
    assert decision.action is Action.START
    assert (decision.weights.target, decision.weights.source) == (10, 90)
    assert decision.state.phase is Phase.PROGRESSING
    assert decision.transition


def test_pending_never_starts_while_prometheus_is_unreachable() -> None:
    state = initial_state(POLICY, Observation(0, 100), at(0))
    for t in range(0, 3000, 30):
        decision = decide(POLICY, state, Observation(0, 100, PROM_DOWN), at(t))
        assert decision.weights is None
        state = decision.state
    assert state.phase is Phase.PENDING


def test_advances_only_after_bake_and_on_a_passing_check() -> None:
    state = start()
    # passing checks before the bake time: stay
    for t in (30, 60, 290):
        decision = run(POLICY, state, (10, 90), PASS, t)
        assert decision.weights is None, t
        state = decision.state
    # bake elapsed, but this check is inconclusive: stay (fresh evidence needed)
    decision = run(POLICY, state, (10, 90), NO_DATA, 301)
    assert decision.weights is None
    state = decision.state
    decision = run(POLICY, state, (10, 90), PASS, 330)
    assert decision.action is Action.ADVANCE
    assert (decision.weights.target, decision.weights.source) == (50, 50)
    assert decision.state.step_started_at == at(330)


def test_a_failed_check_below_threshold_restarts_the_bake() -> None:
    state = start()
    state = run(POLICY, state, (10, 90), PASS, 30).state
    failed = run(POLICY, state, (10, 90), FAIL, 200)
    assert failed.action is Action.HOLD and failed.weights is None
    assert failed.state.consecutive_failures == 1
    state = run(POLICY, failed.state, (10, 90), PASS, 310).state  # 5m after start but not after the FAIL
    assert state.target_weight == 10
    decision = run(POLICY, state, (10, 90), PASS, 200 + 300)
    assert decision.action is Action.ADVANCE


def test_rolls_back_on_consecutive_failures_and_alerts_critical() -> None:
    state = start()
    state = run(POLICY, state, (10, 90), FAIL, 30).state
    decision = run(POLICY, state, (10, 90), FAIL, 35)
    assert decision.action is Action.ROLLBACK
    assert (decision.weights.target, decision.weights.source) == (0, 100)
    assert decision.state.phase is Phase.ROLLED_BACK
    assert decision.alert is AlertKind.ROLLED_BACK and decision.severity is Severity.CRITICAL


def test_inconclusive_neither_breaks_nor_extends_a_failure_run() -> None:
    state = start()
    state = run(POLICY, state, (10, 90), FAIL, 30).state
    state = run(POLICY, state, (10, 90), PROM_DOWN, 60).state
    assert state.consecutive_failures == 1
    decision = run(POLICY, state, (10, 90), FAIL, 90)
    assert decision.action is Action.ROLLBACK
    # ...but a PASS resets it
    state = start()
    state = run(POLICY, state, (10, 90), FAIL, 30).state
    state = run(POLICY, state, (10, 90), PASS, 60).state
    assert run(POLICY, state, (10, 90), FAIL, 90).action is Action.HOLD


def test_inconclusive_hold_warns_once_and_never_moves_weights() -> None:
    policy = make_policy(analysis={"onMissingData": {"action": "hold", "afterChecks": 3}})
    state = start(policy)
    alerts = []
    for i in range(10):
        decision = run(policy, state, (10, 90), NO_DATA, 30 * (i + 1))
        assert decision.weights is None
        alerts.append(decision.alert)
        state = decision.state
    assert alerts.count(AlertKind.STUCK_INCONCLUSIVE) == 1
    assert alerts.index(AlertKind.STUCK_INCONCLUSIVE) == 2


def test_inconclusive_rollback_action_rolls_back_at_its_limit() -> None:
    policy = make_policy(analysis={"onMetricsUnavailable": {"action": "rollback", "afterChecks": 2}})
    state = start(policy)
    state = run(policy, state, (10, 90), PROM_DOWN, 30).state
    decision = run(policy, state, (10, 90), PROM_DOWN, 60)
    assert decision.action is Action.ROLLBACK
    assert "MetricsUnavailable" in decision.reason


def test_final_step_promotes_to_100_and_0() -> None:
    policy = make_policy(schedule={"steps": [50], "bakeTime": "1m"})
    state = start(policy)
    decision = run(policy, state, (50, 50), PASS, 61)
    assert decision.action is Action.PROMOTE
    assert (decision.weights.target, decision.weights.source) == (100, 0)
    assert decision.alert is AlertKind.PROMOTED
    assert run(policy, decision.state, (100, 0), FAIL, 90).weights is None  # promoted is final


def test_rolled_back_stays_until_retry_or_policy_change() -> None:
    state = start()
    state = run(POLICY, state, (10, 90), FAIL, 30).state
    state = run(POLICY, state, (10, 90), FAIL, 31).state
    assert state.phase is Phase.ROLLED_BACK
    for t in (60, 90, 5000):
        assert run(POLICY, state, (0, 100), PASS, t).weights is None
    retried = run(POLICY, state, (0, 100), None, 6000, Command.RETRY)
    assert retried.state.phase is Phase.PENDING
    changed = make_policy(gates={"errorRate": {"max": 0.02}})
    decision = run(changed, state, (0, 100), PASS, 6000)
    assert decision.state.phase is Phase.PENDING
    assert decision.state.fingerprint == changed.rollout_fingerprint()


def test_policy_change_keeps_weight_and_restarts_bake() -> None:
    state = start()
    state = run(POLICY, state, (10, 90), PASS, 290).state
    changed = make_policy(schedule={"steps": [10, 20, 100], "bakeTime": "5m"})
    decision = run(changed, state, (10, 90), PASS, 310)
    assert decision.action is Action.RESTART_BAKE and decision.weights is None
    assert decision.state.step_started_at == at(310)
    advanced = run(changed, decision.state, (10, 90), PASS, 611)
    assert advanced.weights.target == 20


def test_weight_changed_by_someone_else_pauses_and_is_reported() -> None:
    state = start()
    decision = run(POLICY, state, (40, 60), PASS, 30)
    assert decision.action is Action.PAUSE and decision.weights is None
    assert decision.alert is AlertKind.WEIGHT_CHANGED_EXTERNALLY
    assert decision.state.target_weight == 40
    # paused: no advancing however long it passes, but rollback stays armed
    state = decision.state
    assert run(POLICY, state, (40, 60), PASS, 5000).weights is None
    state = run(POLICY, state, (40, 60), FAIL, 5030).state
    assert run(POLICY, state, (40, 60), FAIL, 5060).action is Action.ROLLBACK


def test_target_only_mode_leaves_source_and_never_both_zero() -> None:
    policy = make_policy(schedule={"steps": [10, 100], "bakeTime": "1m", "weightMode": "target-only"})
    state = initial_state(policy, Observation(0, 0), at(0))
    started = decide(policy, state, Observation(0, 0, TARGET_QUIET), at(0))
    assert started.weights.source is None
    state = run(policy, started.state, (10, 0), FAIL, 10).state
    decision = run(policy, state, (10, 0), FAIL, 20)
    assert decision.action is Action.ROLLBACK
    assert (decision.weights.target, decision.weights.source) == (0, 100)


def test_adopts_an_existing_weight_and_bakes_before_raising() -> None:
    state = initial_state(POLICY, Observation(10, 90), at(0))
    assert state.phase is Phase.PROGRESSING and state.target_weight == 10
    assert run(POLICY, state, (10, 90), PASS, 100).weights is None
    assert run(POLICY, state, (10, 90), PASS, 301).weights.target == 50


def test_abort_and_pause_resume_commands() -> None:
    state = start()
    paused = run(POLICY, state, (10, 90), None, 10, Command.PAUSE).state
    assert paused.phase is Phase.PAUSED
    resumed = run(POLICY, paused, (10, 90), None, 20, Command.RESUME).state
    assert resumed.phase is Phase.PROGRESSING and resumed.step_started_at == at(20)
    aborted = run(POLICY, resumed, (10, 90), None, 30, Command.ABORT)
    assert aborted.action is Action.ROLLBACK and aborted.weights.target == 0


def test_no_sequence_of_checks_sets_both_weights_to_zero() -> None:
    import itertools

    results = [PASS, FAIL, NO_DATA, PROM_DOWN, TARGET_QUIET]
    for mode in ("complementary", "target-only"):
        policy = make_policy(
            schedule={"steps": [10, 50, 100], "bakeTime": "30s", "weightMode": mode}, analysis={"failureThreshold": 1}
        )
        for sequence in itertools.product(results, repeat=4):
            state = initial_state(policy, Observation(0, 100), at(0))
            weights = (0, 100)
            for i, result in enumerate(sequence):
                decision = decide(policy, state, Observation(weights[0], weights[1], result), at(40 * (i + 1)))
                state = decision.state
                if decision.weights is not None:
                    source = decision.weights.source if decision.weights.source is not None else weights[1]
                    weights = (decision.weights.target, source)
                assert weights != (0, 0), (mode, sequence)


def test_a_policy_change_continues_a_paused_rollout() -> None:
    state = start()
    paused = run(POLICY, state, (40, 60), PASS, 30).state  # someone else moved the weights
    assert paused.phase is Phase.PAUSED
    changed = make_policy(schedule={"steps": [10, 50, 100], "bakeTime": "1m"})
    decision = run(changed, paused, (40, 60), PASS, 60)
    assert decision.state.phase is Phase.PROGRESSING and decision.weights is None
    assert run(changed, decision.state, (40, 60), PASS, 121).weights.target == 50


def test_an_unfinished_source_write_is_completed_not_mistaken_for_a_human() -> None:
    started = decide(
        POLICY, initial_state(POLICY, Observation(0, 100), at(0)), Observation(0, 100, TARGET_QUIET), at(0)
    )
    state = started.state
    assert state.source_weight_before == 100
    # the target patch (with the state) landed, the source patch did not
    completing = run(POLICY, state, (10, 100), PASS, 30)
    assert completing.action is Action.COMPLETE_WRITE and completing.alert is None
    assert (completing.weights.target, completing.weights.source) == (10, 90)
    # once the source shows it, the marker is cleared and the tick is judged as usual
    judged = run(POLICY, completing.state, (10, 90), FAIL, 60)
    assert judged.state.source_weight_before is None and judged.state.consecutive_failures == 1
    # a different source value is someone else's edit
    assert run(POLICY, state, (10, 70), PASS, 30).alert is AlertKind.WEIGHT_CHANGED_EXTERNALLY
