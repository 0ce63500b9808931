"""Adversarial review of issue 11 (commands, approvals, windows, verification, status, receivers).

Every test here states what the promise requires and FAILS against the reviewed code; each
docstring names the hole. Pure decision tests first, then the runner with in-memory adapters,
then the Kubernetes adapters against the real kube-apiserver (the ``kube`` fixture).
"""

from __future__ import annotations

import contextlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from controller.adapters.memory import InMemoryGatewayPair, InMemoryStateStore
from controller.core.commands import COMMAND_ANNOTATION, CommandRequest, encode_command
from controller.core.decision import Action, Observation, initial_state, recovered_state
from controller.core.enums import AlertKind, Command, Phase, Severity
from controller.core.policy import CanaryPolicy
from controller.core.state import CommandRecord, RolloutState
from controller.errors import ClusterUnavailable, GatewayCanaryError
from controller.ports import StoredState
from tests.helpers import (
    FAIL,
    PASS,
    T0,
    TARGET_QUIET,
    FlakyPair,
    HandClock,
    Rollout,
    ScriptedChecks,
    at,
    make_policy,
    runner_for,
)


def policy(
    *, verify_for: str | None = "10m", mode: str | None = None, approval_at: list[int] | None = None
) -> CanaryPolicy:
    """steps [10, 50, 100] baking 1m, interval 30s, failureThreshold 2."""
    schedule: dict[str, Any] = {"steps": [10, 50, 100], "bakeTime": "1m"}
    if mode is not None:
        schedule["weightMode"] = mode
    if approval_at is not None:
        schedule["approvalAt"] = approval_at
    extra: dict[str, Any] = {}
    if verify_for is not None:
        extra["promotion"] = {"verifyFor": verify_for}
    return make_policy(schedule=schedule, **extra)


def baked_to(weight: int, rollout: Rollout) -> tuple[Rollout, float, dict[int, float]]:
    """Every check passing until the target shows ``weight``; the ASM share judged at each step."""
    assert rollout.tick(TARGET_QUIET, 0).action is Action.START
    judged: dict[int, float] = {}
    t = 30.0
    while rollout.target != weight:
        judged[rollout.target or 0] = rollout.share()
        rollout.tick(PASS, t)
        t += 30
        assert t < 3600
    return rollout, t, judged


# --- 1. the step back while verifying (R10) -------------------------------------------------------


def test_review_target_only_step_back_gives_the_asm_gateway_a_share_never_judged() -> None:
    """R10 promises the step back goes to 'the last step's split, which was judged healthy against
    the old gateway'. In target-only mode that split was 50 against the source's own 100 (a third of
    the requests); ``_step_back`` writes Weights(50, 50) (half of them), a share that was never judged.
    (tests/test_operator_rules.py asserts 50/50 'in either mode': that test encodes the hole.)"""
    rollout, t, judged = baked_to(100, Rollout.fresh(policy(mode="target-only")))
    assert rollout.state.phase is Phase.VERIFYING
    rollout.tick(FAIL, t)
    stepped = rollout.tick(FAIL, t + 30)
    assert stepped.action is Action.ROLLBACK and rollout.target == 50
    assert rollout.share() <= judged[50] + 1e-9, (
        f"stepped back to {rollout.target}/{rollout.source} (ASM share {rollout.share():.0%}); the split "
        f"judged at 50 was {judged[50]:.0%}"
    )


def test_review_step_back_after_promote_full_goes_to_a_weight_never_judged() -> None:
    """``promote --full`` at 10 skips 50; a failed verification then 'steps back' to steps[-2] = 50,
    a weight the ASM gateway never carried, instead of the split it came from (or 0)."""
    rollout = Rollout.fresh(policy())
    rollout.tick(TARGET_QUIET, 0)  # Start: 10/90
    promoted = rollout.tick(PASS, 30, command=Command.PROMOTE)
    assert promoted.action is Action.PROMOTE and rollout.state.phase is Phase.VERIFYING
    rollout.tick(FAIL, 60)
    stepped = rollout.tick(FAIL, 90)
    assert stepped.weights is not None
    assert stepped.weights.target <= 10, f"a failed verification put the ASM gateway at {stepped.weights}"


def test_review_cloud_not_applying_a_step_back_pages_like_an_unapplied_rollback() -> None:
    """After a failed verification the ASM gateway must leave 100. If the cloud does not apply the
    step back, the gateway still carries everything with failing checks, exactly like an unapplied
    rollback (which pages CRITICAL); ``_report_cloud`` only pages when the phase is RolledBack, and
    the step back leaves it Paused: a WARNING 'holding at the weights written'."""
    rollout, t, _ = baked_to(100, Rollout.fresh(policy()))
    rollout.tick(FAIL, t)
    assert rollout.tick(FAIL, t + 30).action is Action.ROLLBACK  # stepped back to 50/50 (annotations)
    unapplied = rollout.tick(PASS, t + 60, cloud_refusal="the CLB did not apply the weights (SyncLoadBalancerFailed)")
    said = [(n.kind, n.severity) for n in unapplied.notices]
    assert (AlertKind.CLOUD_NOT_APPLIED, Severity.CRITICAL) in said, said


def test_review_an_unreadable_state_during_verification_becomes_promoted_and_unarmed() -> None:
    """R10: 'Promoted means verified at 100'. ``recovered_state`` still takes a target at 100 as
    Promoted, so a state that becomes unreadable while verifying (garbage, a bad hand edit) ends the
    verification: terminal, no checks, no step back, no rollback, whatever the ASM gateway does."""
    verified = policy()
    state = recovered_state(verified, Observation(100, 0), at(0), "stored state is not JSON")
    assert state.phase is not Phase.PROMOTED, "an unverified promotion, unarmed"


def test_review_pause_is_rejected_while_the_same_tick_completes_an_unfinished_raise() -> None:
    """R9: a pause holds raises. With an unfinished raise (patch failed, crash) the tick completes the
    raise (``_progress`` returns ``_complete`` before ``_apply_command``) and answers the operator's
    pause 'rejected': the weight goes up in the very tick the operator asked to stop."""
    rollout = Rollout.fresh(policy(verify_for=None))
    rollout.tick(TARGET_QUIET, 0)
    rollout.tick(PASS, 30)
    rollout.tick(PASS, 60)
    raised = rollout.tick(PASS, 90, write=False)  # the raise to 50 is recorded, its patch failed
    assert raised.action is Action.ADVANCE and rollout.target == 10
    decision = rollout.tick(PASS, 120, command=Command.PAUSE)
    wrote_up = decision.weights is not None and decision.weights.target > 10
    assert not wrote_up, f"paused? {decision.outcome}; wrote {decision.weights}"


# --- 2. the runner (in-memory adapters) -----------------------------------------------------------


class FlakyStore(InMemoryStateStore):
    failing: bool = False

    def save(self, policy, state, previous: StoredState, outbox=(), status=None) -> StoredState:  # type: ignore[no-untyped-def]
        if self.failing:
            raise ClusterUnavailable("write ConfigMap: API server answered 500: etcdserver: request timed out")
        return super().save(policy, state, previous, outbox, status)


RUNNER_POLICY = make_policy(schedule={"steps": [10, 50, 100], "bakeTime": "10m"}, analysis={"interval": "30s"})


def test_review_an_operator_command_makes_the_runner_forget_an_unsaved_rollback() -> None:
    """R2: a rollback is remembered until both Services show it. A rollback decided while the API
    server is in a brownout (its intent save and its patches fail) lives only in the runner's memory;
    a command annotated meanwhile (the on-call just got the CRITICAL page: ``pause``) moves the
    object's version, ``_same_as_memory`` compares the stored state with the UNSAVED memory, finds
    them different and drops the memory: the stored Progressing state wins, the pause is applied and
    the ASM gateway stays at 10 with no rollback pending, after people were told it rolled back."""
    pair, store, checks, clock = (
        FlakyPair(target_weight=0, source_weight=100),
        FlakyStore(),
        ScriptedChecks(),
        HandClock(),
    )
    sink: list[Any] = []
    runner = runner_for(RUNNER_POLICY, pair=pair, store=store, metrics=object(), collector=checks, clock=clock)
    runner._send = sink.append  # the alerts, as the dispatcher would get them
    runner.tick()  # Start: 10/90
    assert pair.target_weight == 10
    checks.next = FAIL
    clock.at += timedelta(seconds=30)
    runner.tick()  # 1/2
    store.failing = pair.failing = True
    clock.at += timedelta(seconds=30)
    runner.tick()  # 2/2: rollback decided, intent not saved, patches failed
    assert any(alert.kind is AlertKind.ROLLED_BACK for alert in sink), "the rollback was announced"
    store.failing = pair.failing = False
    store.give("shop", encode_command(CommandRequest(Command.PAUSE, "p1", "oncall")))
    checks.next = PASS  # one passing check (noise) must not cancel a rollback (R2)
    clock.at += timedelta(seconds=30)
    runner.tick()
    assert pair.target_weight == 0, (
        f"announced as rolled back, but the ASM gateway is at {pair.target_weight}; "
        f"state {store.state_of('shop').phase if store.state_of('shop') else None}"  # type: ignore[union-attr]
    )


def test_review_a_bug_in_the_status_view_costs_every_rollback(monkeypatch: pytest.MonkeyPatch) -> None:
    """``_describe`` (the status view, the waiting metric) and the status JSON in ``_save`` run before
    the rollback is written, outside any guard: a bug there (any exception, e.g. a NaN that
    ``json.dumps(allow_nan=False)`` refuses) crashes every tick before the weight write. The cloud
    checks are guarded for exactly this reason; the status, which protects nothing, is not."""
    pair, store, checks, clock = (
        InMemoryGatewayPair(target_weight=0, source_weight=100),
        InMemoryStateStore(),
        ScriptedChecks(),
        HandClock(),
    )
    runner = runner_for(RUNNER_POLICY, pair=pair, store=store, metrics=object(), collector=checks, clock=clock)
    runner.tick()
    assert pair.target_weight == 10

    def broken(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise ValueError("Out of range float values are not JSON compliant")

    monkeypatch.setattr("controller.runtime.reconciler.status_view", broken)
    checks.next = FAIL
    for _ in range(4):
        clock.at += timedelta(seconds=30)
        runner.tick()
    assert pair.target_weight == 0, "failing checks, and no rollback: the status view crashed every tick"


# --- 3. the Kubernetes adapters against the real kube-apiserver -----------------------------------


def _store(kube: Any) -> Any:
    from controller.adapters.kube_api import build_api_client
    from controller.adapters.kube_state import KubernetesStateStore

    return KubernetesStateStore(build_api_client(kube.write_kubeconfig()), kube.ns)


def _operator(kube: Any, tmp_path: Path) -> Any:
    from controller.adapters.kube_api import build_api_client
    from controller.adapters.operator import KubernetesOperator

    admin = tmp_path / "admin.kubeconfig"
    admin.write_text(kube.admin_kubeconfig())
    return KubernetesOperator(build_api_client(admin), kube.ns)


def _configmap(kube: Any) -> str:
    return f"/api/v1/namespaces/{kube.ns}/configmaps/gateway-canary-shop"


def _answer(state: RolloutState, request: CommandRequest) -> RolloutState:
    record = CommandRecord(request.id, request.command, request.by, T0, True, "applied")
    return state.evolve(phase=Phase.PAUSED, reason="paused by an operator", last_command=record)


def test_review_take_back_reports_taken_back_while_the_controller_applies_it(kube: Any, tmp_path: Path) -> None:
    """The CLI's --wait runs out while the controller's tick is under way (a slow Prometheus): it
    takes the command back (a merge patch guarded by resourceVersion) and exits 3, 'the command was
    taken back'. The controller's save then meets a Conflict, ``_moved_metadata_only`` sees only
    metadata moved and writes again: the command is applied and recorded as applied. The operator
    was told the opposite (think ``promote`` or ``abort``)."""
    policy = kube.policy()
    kube.grant(policy)
    store, operator = _store(kube), _operator(kube, tmp_path)
    store.save(policy, initial_state(policy, Observation(10, 90), T0), store.load(policy))
    request = CommandRequest(Command.PAUSE, "c0ffee", "alice")
    operator.give("shop", request)
    read = store.load(policy)  # the controller's tick reads it...
    assert read.command is not None and read.command.id == "c0ffee"
    assert operator.take_back("shop", "c0ffee") is None  # ...the CLI gives up: "taken back", exit 3
    with contextlib.suppress(GatewayCanaryError):  # a Conflict: the next tick sees no command, as the CLI said
        store.save(policy, _answer(read.state, request), read)  # ...the tick ends, answering it
    after = store.load(policy).state
    assert after.last_command is None or after.last_command.id != "c0ffee", (
        "the CLI said the command was taken back; the controller applied it"
    )


def test_review_a_bare_word_command_is_applied_again_after_a_metadata_only_conflict(kube: Any, tmp_path: Path) -> None:
    """A bare word (``kubectl annotate ... gateway-canary.io/command=approve``) is named by the
    object's resourceVersion. If anything touches the object's metadata between the tick's read and
    its save (a label, another annotation), the Conflict retry re-reads it: the same word now has a
    new id, is not 'answered', is not removed, and the next tick applies it a second time (a second
    approve approves the next approvalAt in advance; a second retry/resume/promote likewise)."""
    policy = kube.policy()
    kube.grant(policy)
    store = _store(kube)
    store.save(policy, initial_state(policy, Observation(10, 90), T0), store.load(policy))
    kube.plane.call("PATCH", _configmap(kube), {"metadata": {"annotations": {COMMAND_ANNOTATION: "approve"}}})
    read = store.load(policy)
    assert read.command is not None and read.command.command is Command.APPROVE
    kube.plane.call("PATCH", _configmap(kube), {"metadata": {"labels": {"team": "payments"}}})  # meanwhile
    store.save(policy, _answer(read.state, read.command), read)
    again = store.load(policy)
    assert again.command is None or again.state.last_command.id == again.command.id, (
        f"the answered command is still waiting as a new one ({again.command.id}): it will be applied twice"
    )


def test_review_a_second_command_silently_replaces_an_unanswered_abort(kube: Any, tmp_path: Path) -> None:
    """``KubernetesOperator.give`` is a merge patch with no precondition: a ``pause`` given by a
    colleague a second after an ``abort`` (before the controller's next read) overwrites it. The
    abort is never applied; its CLI then finds another command waiting, 'takes back' nothing and
    says 'no answer from a controller ... is gateway-canary running?' (exit 3)."""
    policy = kube.policy()
    kube.grant(policy)
    store, operator = _store(kube), _operator(kube, tmp_path)
    store.save(policy, initial_state(policy, Observation(10, 90), T0), store.load(policy))
    operator.give("shop", CommandRequest(Command.ABORT, "abort1", "alice"))
    try:
        operator.give("shop", CommandRequest(Command.PAUSE, "pause1", "bob"))
    except GatewayCanaryError:
        return  # refused while another command waits: fine
    waiting = store.load(policy).command
    assert waiting is not None and waiting.command is Command.ABORT, f"the abort was replaced by {waiting}"


def test_review_the_status_refresh_deletes_the_unreadable_state_kept_for_an_operator(kube: Any) -> None:
    """``data.unreadable-state`` keeps the garbage for an operator. The merge patch sends
    ``unreadable-state: null`` on every save whose ``previous`` was readable, and the status refresh
    now saves every ``statusRefreshSeconds`` (60 s) even while nothing changes: the copy is gone a
    minute after recovery, while the recovered rollout is still Paused waiting for that operator."""
    from controller.adapters.kube_state import UNREADABLE_KEY

    policy = kube.policy()
    kube.grant(policy)
    garbage = '{"v": 2, "policy": "shop", "target_weight": Infinity}'
    kube.plane.call(
        "POST",
        f"/api/v1/namespaces/{kube.ns}/configmaps",
        {"metadata": {"name": "gateway-canary-shop"}, "data": {"state": garbage}},
    )
    store = _store(kube)
    loaded = store.load(policy)
    recovered = recovered_state(policy, Observation(10, 90), T0, loaded.error or "")
    saved = store.save(policy, recovered, loaded, status='{"v":1}')
    store.save(policy, recovered, saved, status='{"v":1,"refreshed":true}')  # the status refresh, 60 s on
    body = kube.plane.call("GET", _configmap(kube))
    assert body["data"].get(UNREADABLE_KEY) == garbage, "the operator's copy of the unreadable state is gone"


# --- 4. smaller ----------------------------------------------------------------------------------------


def test_review_an_unknown_receiver_type_names_the_chat_receivers_too() -> None:
    """``loader._explain`` still says 'allowed: slack, webhook, alertmanager' (and ``_strip_union_tags``
    keeps 'dingtalk'/'feishu'/'wecom' in error paths): a typo'd ``type: dingding`` is told the chat
    receivers do not exist."""
    from controller.core.loader import parse_policy_text

    text = """
metadata: {name: shop}
spec:
  source: {service: istio-system/istio-ingressgateway}
  target: {service: istio-system/istio-ingressgateway-asm}
  schedule: {steps: [10, 100]}
  gates: {errorRate: {max: 0.01}}
  alerts: [{type: dingding, urlFromEnv: DINGTALK_URL}]
"""
    result = parse_policy_text(text, "shop.yaml")
    messages = " ".join(error.message for error in result.errors)
    assert "dingtalk" in messages, messages
