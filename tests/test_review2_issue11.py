"""Second adversarial review of issue 11: only the fixes of c29065f..HEAD.

Every test states what the promise requires and FAILS against the reviewed code; each docstring
names the hole. The runner is driven with in-memory adapters (the store mirrors kube_state's
CommandWithdrawn logic); the checks at 100 go through the real Collector and gates.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from controller.adapters.memory import InMemoryGatewayPair, InMemoryStateStore
from controller.core.commands import CommandRequest
from controller.core.enums import AlertKind, Command, GatewayRole, Measure, Phase, Verdict
from controller.core.policy import CanaryPolicy
from controller.core.results import CheckResult, RenderedQuery
from controller.runtime.collector import Collector
from tests.helpers import FAIL, PASS, T0, TARGET_QUIET, FlakyPair, HandClock, make_policy, runner_for


class SlowChecks:
    """A check during which something happens to the state object (``during``: a slow Prometheus)."""

    def __init__(self) -> None:
        self.next: CheckResult = TARGET_QUIET
        self.during: Callable[[], None] | None = None

    def check(self, policy, metrics, *, absolute_only=False, evidence=None) -> CheckResult:  # type: ignore[no-untyped-def]
        during, self.during = self.during, None
        if during is not None:
            during()
        return self.next


def _rig(kube: Any, tmp_path: Path) -> tuple[FlakyPair, Any, Any, SlowChecks, HandClock, Any, list[Any]]:
    """The real state store and the operator's CLI adapter on the real apiserver; Services in memory.
    Started at 10/90, one FAIL counted (failureThreshold 2)."""
    from controller.adapters.kube_api import build_api_client
    from controller.adapters.kube_state import KubernetesStateStore
    from controller.adapters.operator import KubernetesOperator

    policy = kube.policy(schedule={"steps": [10, 50, 100], "bakeTime": "10m"}, analysis={"interval": "30s"})
    kube.grant(policy)
    store = KubernetesStateStore(build_api_client(kube.write_kubeconfig()), kube.ns)
    admin = tmp_path / "admin.kubeconfig"
    admin.write_text(kube.admin_kubeconfig())
    operator = KubernetesOperator(build_api_client(admin), kube.ns)
    pair, checks, clock = FlakyPair(target_weight=0, source_weight=100), SlowChecks(), HandClock()
    runner = runner_for(policy, pair=pair, store=store, metrics=object(), collector=checks, clock=clock)
    sink: list[Any] = []
    runner._send = sink.append  # the alerts as the dispatcher would get them
    runner.tick()  # Start: 10/90
    assert pair.target_weight == 10
    checks.next = FAIL
    clock.at += timedelta(seconds=30)
    runner.tick()  # FAIL 1/2
    return pair, store, operator, checks, clock, runner, sink


def _fail_with_a_withdrawn_pause(operator: Any, checks: SlowChecks, clock: HandClock, runner: Any) -> None:
    """The on-call gives ``pause``; the tick reads it, Prometheus is slow, the CLI's --wait runs out
    and takes it back (``operate.give_command``); the check is the 2nd FAIL: a rollback, whose state
    also carries the answer to the (withdrawn) pause."""
    operator.give("shop", CommandRequest(Command.PAUSE, "p1", "oncall"))
    checks.during = lambda: operator.take_back("shop", "p1")
    clock.at += timedelta(seconds=30)
    runner.tick()


# --- 1. CommandWithdrawn on the save of a rollback --------------------------------------------------


def test_review2_a_withdrawn_command_turns_a_written_rollback_into_someone_elses_edit(
    kube: Any, tmp_path: Path
) -> None:
    """The rollback is written (forced), but both saves (intent, then done) raise CommandWithdrawn
    because the decision also carries the answer to the withdrawn pause; ``_save`` drops memory and
    the rollback state is never stored. The next tick decides from the old Progressing state (1/2
    failures) at 0/100: a FAIL decides the same rollback again and pages a second RolledBack; a PASS
    'adopts someone else's change' instead (WeightChangedExternally, Paused not RolledBack, so a
    resume restarts the rollout without a retry). Either way a human hears twice."""
    pair, store, operator, checks, clock, runner, sink = _rig(kube, tmp_path)
    _fail_with_a_withdrawn_pause(operator, checks, clock, runner)
    assert pair.target_weight == 0, "the rollback is written whatever the store says"
    clock.at += timedelta(seconds=30)
    runner.tick()
    state = store.load(runner.policy).state
    kinds = [alert.kind for alert in sink]
    assert state is not None and state.phase is Phase.ROLLED_BACK, (
        f"stored phase {None if state is None else state.phase}: {None if state is None else state.reason}"
    )
    assert kinds.count(AlertKind.ROLLED_BACK) == 1 and AlertKind.WEIGHT_CHANGED_EXTERNALLY not in kinds, kinds


def test_review2_a_withdrawn_command_loses_an_announced_rollback_whose_patch_failed(kube: Any, tmp_path: Path) -> None:
    """R2: a rollback is remembered until both Services show it. Same tick, and the Service patch
    fails too (the API server is slow: that is why the CLI timed out). Before this fix the pending
    rollback stayed in the runner's memory; now CommandWithdrawn drops the memory, nothing was
    stored, and the next tick decides from the stored 1/2-failures state: one passing check (noise)
    and the ASM gateway stays at 10 for good, after 'rolled back' was paged."""
    pair, store, operator, checks, clock, runner, sink = _rig(kube, tmp_path)
    pair.failing = True
    _fail_with_a_withdrawn_pause(operator, checks, clock, runner)
    assert any(alert.kind is AlertKind.ROLLED_BACK for alert in sink), "the rollback was announced"
    pair.failing = False
    checks.next = PASS
    for _ in range(3):
        clock.at += timedelta(seconds=30)
        runner.tick()
    stored = store.load(runner.policy).state
    assert pair.target_weight == 0, (
        f"announced as rolled back, the ASM gateway is at {pair.target_weight}; stored {stored.phase}: {stored.reason}"
    )


def test_review2_an_abort_replacing_a_waiting_pause_pages_the_rollback_twice(kube: Any, tmp_path: Path) -> None:
    """``give`` lets an abort replace a waiting pause (by design). If the tick that read the pause is
    rolling back on a FAIL (its patch failing), the replacement makes its saves raise CommandWithdrawn
    (the answered command 'changed', compared by text): the rollback is forgotten, and the next tick's
    abort decides a new one: a human hears of one rollback twice."""
    pair, _, operator, checks, clock, runner, sink = _rig(kube, tmp_path)
    pair.failing = True
    operator.give("shop", CommandRequest(Command.PAUSE, "p1", "bob"))
    checks.during = lambda: operator.give("shop", CommandRequest(Command.ABORT, "a1", "alice"))
    clock.at += timedelta(seconds=30)
    runner.tick()
    pair.failing = False
    clock.at += timedelta(seconds=30)
    runner.tick()
    assert pair.target_weight == 0
    pages = [alert for alert in sink if alert.kind is AlertKind.ROLLED_BACK]
    assert len(pages) == 1, f"a human heard of one rollback {len(pages)} times: {[a.reason for a in pages]}"


# --- 2. absolute-only checks at 100 -----------------------------------------------------------------


class Numbers:
    """A Prometheus whose ASM gateway answers 5xx on half of its requests, the old gateway on none."""

    def query(self, query: RenderedQuery) -> float | None:
        if query.measure is Measure.REQUESTS:
            return 1000.0
        if query.measure is Measure.ERROR_RATE:
            return 0.5 if query.role is GatewayRole.TARGET else 0.0
        if query.measure is Measure.LATENCY:
            return 100.0
        return 0.0

    def query_vector(self, query: RenderedQuery) -> list[tuple[dict[str, str], float]]:
        return []


def _hand_edited_to_100(policy: CanaryPolicy, *, source: int) -> tuple[InMemoryGatewayPair, InMemoryStateStore, Any]:
    """Progressing at 10, then someone sets the target's weight to 100 by hand: adopted, Paused, armed."""
    pair, store, clock = InMemoryGatewayPair(target_weight=10, source_weight=90), InMemoryStateStore(), HandClock()
    from controller.core.decision import Observation, initial_state

    start = initial_state(policy, Observation(10, 90), T0).evolve(
        phase=Phase.PROGRESSING, target_weight=10, source_weight=90
    )
    store.save(policy, start, store.load(policy))
    runner = runner_for(policy, pair=pair, store=store, metrics=Numbers(), collector=Collector(), clock=clock)
    pair.target_weight, pair.source_weight = 100, source
    return pair, store, runner


def test_review2_target_only_at_100_drops_the_comparative_gates_while_the_old_gateway_serves_half() -> None:
    """``_check`` judges absolute gates only whenever ``state.target_weight >= 100``. In target-only
    mode a target at 100 beside a source still at 100 is a 50/50 split: the old gateway has traffic to
    compare with, but the comparative gates are left out. With a policy whose only gate is
    comparative (errorRate.maxIncrease), an ASM gateway failing half its requests PASSes: never
    rolled back."""
    policy = make_policy(
        schedule={"steps": [10, 50, 100], "bakeTime": "10m", "weightMode": "target-only"},
        analysis={"interval": "30s", "failureThreshold": 2},
        gates={"errorRate": {"maxIncrease": 0.01}},
    )
    pair, _, runner = _hand_edited_to_100(policy, source=100)
    for _ in range(4):
        outcome = runner.tick()
    assert pair.target_weight == 0, (
        f"the ASM gateway fails 50% of its half of the traffic and stays at {pair.target_weight}/"
        f"{pair.source_weight}; last check {outcome.check.verdict if outcome.check else None}: "
        f"{outcome.check.reason if outcome.check else None}"
    )


def test_review2_at_100_a_policy_with_only_comparative_gates_reports_a_failing_gateway_as_passing() -> None:
    """Complementary mode, hand-edited to 100/0, gates comparative only (no verifyFor, so the loader's
    'verifyFor needs an absolute gate' never applies). Before the fix every check was inconclusive
    (no baseline: onMissingData decides, a stuck alert or a rollback); now ``_judge_absolute`` keeps
    only 'targetRequests' and the check is PASS: a gateway failing half of ALL requests is reported
    healthy, its failure count is cleared, and nobody hears of it."""
    policy = make_policy(
        schedule={"steps": [10, 50, 100], "bakeTime": "10m"},
        analysis={"interval": "30s", "failureThreshold": 2},
        gates={"errorRate": {"maxIncrease": 0.01}},
    )
    _, _, runner = _hand_edited_to_100(policy, source=0)
    runner.tick()
    outcome = runner.tick()
    assert outcome.check is not None and outcome.check.verdict is not Verdict.PASS, (
        f"no gate judged the ASM gateway's health, yet: {outcome.check.verdict if outcome.check else None} "
        f"({outcome.check.reason if outcome.check else None})"
    )
