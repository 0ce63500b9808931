"""The runner with the cloud's view (R8), in process: what is stamped for confirmation, and that the
cloud checks never stand in the way of a rollback (fault-injecting in-memory adapters)."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from typing import Any

import pytest

from controller.core.cloud import Backends
from controller.core.enums import AlertKind, GatewayRole, Phase, Severity
from controller.core.policy import CanaryPolicy, ServiceRef
from controller.notify.dispatcher import AlertDispatcher
from controller.runtime.cloud_watch import CloudWatch
from controller.runtime.reconciler import PolicyRunner
from controller.runtime.telemetry import Telemetry
from tests.helpers import FAIL, PASS, T0, TARGET_QUIET, RecordingNotifier, make_policy
from tests.test_model import Clock, FaultyCloud, FaultyPair, FaultyStore, ScriptedCollector

POLICY = make_policy(
    schedule={"steps": [10, 50, 100], "bakeTime": "60s"},
    analysis={"interval": "30s", "failureThreshold": 2},
    cloud={"confirmTimeout": "3m"},
)


class Rig:
    def __init__(self, policy: CanaryPolicy = POLICY, cloud: Any = None, *, verify_writes: bool = True) -> None:
        self.policy = policy
        self.pair = FaultyPair(target_weight=0, source_weight=100)
        self.store = FaultyStore()
        self.clock = Clock()
        self.collector = ScriptedCollector()
        self.cloud = cloud if cloud is not None else FaultyCloud()
        self.notifier = RecordingNotifier()
        self.dispatcher = AlertDispatcher()
        self.verify_writes = verify_writes
        self.runner = self.new_runner()

    def new_runner(self) -> PolicyRunner:
        return PolicyRunner(
            self.policy,
            pair=self.pair,
            store=self.store,
            metrics=object(),  # type: ignore[arg-type]
            receivers=[self.notifier],
            dispatcher=self.dispatcher,
            collector=self.collector,  # type: ignore[arg-type]
            clock=self.clock,
            telemetry=Telemetry(),
            stopping=threading.Event(),
            cloud=CloudWatch(self.cloud, verify_writes=self.verify_writes),
        )

    def tick(self, check: Any, at: float, *, answer: str = "silent", fault: str | None = None) -> Any:
        self.clock.t = T0 + timedelta(seconds=at)
        self.collector.next = check
        self.pair.fault = fault
        outcome = self.runner.tick()
        self.pair.fault = None
        self.cloud.answer(answer, self.clock.t)
        return outcome

    def state(self) -> Any:
        return self.runner._memory

    def sent(self, kind: AlertKind) -> list[Any]:
        self.dispatcher.close(timeout=5)
        return [alert for alert in self.notifier.alerts if alert.kind is kind]


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_a_confirmed_write_stays_confirmed_when_its_events_expire_or_a_later_reconcile_fails() -> None:
    rig = Rig()
    rig.tick(TARGET_QUIET, 0, answer="ok")  # starts at 10; the cloud confirms it
    assert rig.pair.target_weight == 10
    rig.tick(PASS, 30)
    assert rig.state().confirmed_at == at(30)
    rig.cloud.answers.clear()  # an hour on: the API server has deleted the Events
    rig.cloud.answer("fail", at(40))  # and an unrelated reconcile failed since
    for t in range(60, 150, 30):
        rig.tick(PASS, t)
    assert rig.pair.target_weight == 50  # baked and raised: the confirmation stood
    assert rig.sent(AlertKind.CLOUD_NOT_APPLIED) == []


def test_a_rollback_written_in_two_attempts_is_judged_on_both_sides() -> None:
    rig = Rig()
    rig.tick(TARGET_QUIET, 0, answer="ok")
    rig.tick(PASS, 30)
    rig.tick(FAIL, 60)
    rig.tick(FAIL, 90, fault="between")  # rollback: the target is cut to 0, the source patch fails
    assert (rig.pair.target_weight, rig.pair.source_weight) == (0, 90)
    first = rig.state()
    assert first.written_roles == (GatewayRole.TARGET, GatewayRole.SOURCE) and first.written_at == at(90)
    rig.tick(FAIL, 120)  # the retry writes only the source: the target's write is still to be confirmed
    assert (rig.pair.target_weight, rig.pair.source_weight) == (0, 100)
    retried = rig.state()
    assert retried.written_at == at(90) and retried.written_roles == (GatewayRole.TARGET, GatewayRole.SOURCE)
    # the cloud never answers: the rollback is reported as not applied, paged, once
    for t in range(150, 450, 30):
        rig.tick(None, t)
    (alert,) = rig.sent(AlertKind.CLOUD_NOT_APPLIED)
    assert alert.severity is Severity.CRITICAL and "has not applied the rollback" in alert.reason
    assert "istio-ingressgateway-asm" in alert.reason  # the target's side, written on the first attempt


def test_a_crash_between_the_writes_and_the_save_keeps_the_stamp_of_the_new_write() -> None:
    rig = Rig()
    rig.tick(TARGET_QUIET, 0, answer="ok")
    rig.tick(PASS, 30)
    rig.tick(PASS, 60)
    rig.store.failing = False
    rig.tick(PASS, 90, fault="after")  # 10 -> 50 written, the answer lost: the intent stays recorded
    assert rig.pair.target_weight == 50
    rig.runner = rig.new_runner()  # a restart: only the store survives
    rig.tick(PASS, 120)  # completes: both Services show the intent
    state = rig.state()
    assert state.written_at == at(90) and state.confirmed_at is None
    for t in range(150, 300, 30):  # the ok answers to the earlier write do not confirm this one
        rig.tick(PASS, t)
    assert rig.pair.target_weight == 50
    assert "not confirmed" in rig.state().reason


def test_failing_checks_do_not_wait_for_the_cloud_and_a_broken_check_only_holds_raises() -> None:
    class Exploding(FaultyCloud):
        calls = 0
        broken = False

        def backends(self, ref: ServiceRef) -> Backends | None:
            self.calls += 1
            if self.broken:
                raise ValueError("a bug in a check")
            return super().backends(ref)

    cloud = Exploding()
    rig = Rig(cloud=cloud)
    rig.tick(TARGET_QUIET, 0, answer="ok")
    rig.tick(PASS, 30)
    before = cloud.calls
    cloud.broken = True
    assert rig.tick(PASS, 60).error is None  # no crash: the tick decided
    assert "the cloud checks failed (ValueError)" in rig.state().reason
    rig.tick(FAIL, 90)
    rig.tick(FAIL, 120)
    assert rig.pair.target_weight == 0 and rig.state().phase is Phase.ROLLED_BACK
    assert cloud.calls == before + 1  # failing ticks read nothing from the cloud (one read: the tick at 60)
    assert rig.runner.failing_since is None


def test_a_dry_run_neither_waits_for_confirmations_nor_for_traffic() -> None:
    rig = Rig(verify_writes=False)
    rig.tick(TARGET_QUIET, 0)  # the cloud never answers (nothing was written)
    for t in range(30, 150, 30):
        rig.tick(PASS, t)
    assert rig.pair.target_weight == 50
    assert rig.sent(AlertKind.CLOUD_NOT_APPLIED) == []


@pytest.mark.parametrize("answer", ["fail", "silent"])
def test_an_unapplied_raise_is_said_once_and_held(answer: str) -> None:
    rig = Rig()
    rig.tick(TARGET_QUIET, 0, answer=answer)
    for t in range(30, 600, 30):
        rig.tick(PASS, t, answer=answer)
    assert rig.pair.target_weight == 10
    (alert,) = rig.sent(AlertKind.CLOUD_NOT_APPLIED)
    assert alert.severity is Severity.WARNING
