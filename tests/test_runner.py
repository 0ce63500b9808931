"""One policy's tick: the safety rules around the decision (stop, outages, dry run)."""

from __future__ import annotations

import json
import threading

import pytest
from structlog.testing import capture_logs

from controller.adapters.dry_run import DryRunGatewayPair, DryRunStateStore
from controller.adapters.kube_api import build_api_client
from controller.adapters.kube_state import KubernetesStateStore
from controller.adapters.kubernetes import KubernetesGatewayPair
from controller.adapters.memory import InMemoryGatewayPair, InMemoryStateStore
from controller.adapters.prometheus import PrometheusMetricsSource
from controller.core.enums import GatewayRole, Phase
from controller.core.policy import CanaryPolicy
from controller.core.results import RenderedQuery
from controller.demo import SimulatedGateways
from controller.notify.dispatcher import AlertDispatcher
from controller.runtime.clock import SystemClock
from controller.runtime.collector import Collector
from controller.runtime.reconciler import PolicyRunner
from controller.runtime.telemetry import Telemetry
from controller.settings import PrometheusConnection, Settings
from tests.helpers import RecordingNotifier, make_policy, runner_for
from tests.kube_cluster import CLB, Cluster
from tests.kube_cluster import SOURCE as SRC
from tests.kube_cluster import TARGET as TGT
from tests.servers import STATE, WEIGHT, free_port, wait_for

POLICY = make_policy(schedule={"steps": [10, 100], "bakeTime": 0}, analysis={"failureThreshold": 1})


def runner(pair, metrics, stopping=None, policy: CanaryPolicy = POLICY, store=None) -> PolicyRunner:
    return PolicyRunner(
        policy,
        pair=pair,
        store=store if store is not None else InMemoryStateStore(),
        metrics=metrics,
        receivers=[],
        dispatcher=AlertDispatcher(),
        collector=Collector(),
        clock=SystemClock(),
        telemetry=Telemetry(),
        stopping=stopping or threading.Event(),
    )


class StopDuringCheck:
    """Wraps the simulated gateways and raises the stop flag while a check is in flight.

    Hitting a SIGTERM exactly between a real Prometheus query and the write is not reproducible,
    so this boundary is simulated; everything after the query is the production path.
    """

    def __init__(self, inner: SimulatedGateways, stopping: threading.Event) -> None:
        self.inner, self.stopping = inner, stopping

    def query(self, query: RenderedQuery) -> float | None:
        self.stopping.set()
        return self.inner.query(query)


def test_stop_during_a_check_abandons_a_raise_but_writes_a_rollback() -> None:
    pair = InMemoryGatewayPair(target_weight=0, source_weight=100)
    gateways = SimulatedGateways(pair)
    stopping = threading.Event()
    outcome = runner(pair, StopDuringCheck(gateways, stopping), stopping).tick()
    assert outcome.decision is None and (pair.target_weight, pair.source_weight) == (0, 100)
    assert pair.writes == 0

    stopping.clear()
    runner(pair, gateways).tick()  # starts at 10
    assert pair.target_weight == 10
    gateways.error_ratio[GatewayRole.TARGET] = 0.5
    outcome = runner(pair, StopDuringCheck(gateways, stopping), stopping).tick()
    assert outcome.decision is not None and outcome.decision.state.phase is Phase.ROLLED_BACK
    assert (pair.target_weight, pair.source_weight) == (0, 100)


def policy_in(kube: Cluster, source: str = SRC, steps: list[int] | None = None) -> CanaryPolicy:
    return kube.policy(
        source=source, schedule={"steps": steps or [10, 100], "bakeTime": 0}, analysis={"failureThreshold": 1}
    )


class TrafficFollowsTheCluster:
    """The simulated gateways' split follows the Services' real weight annotations, as behind a CLB."""

    def __init__(self, kube: Cluster) -> None:
        self.kube = kube

    @property
    def target_weight(self) -> int:
        return int(self.kube.annotations(TGT)[WEIGHT])

    @property
    def source_weight(self) -> int:
        return int(self.kube.annotations(SRC)[WEIGHT])


def healthy_traffic(kube: Cluster) -> SimulatedGateways:
    # Prometheus is exercised elsewhere; here the subject is the API server, so metrics are simulated.
    return SimulatedGateways(TrafficFollowsTheCluster(kube))  # type: ignore[arg-type]


def as_controller(kube: Cluster, *, check_write_access: bool = True) -> KubernetesGatewayPair:
    return KubernetesGatewayPair(
        build_api_client(kube.write_kubeconfig()), state_namespace=kube.ns, check_write_access=check_write_access
    )


def state_store(kube: Cluster) -> KubernetesStateStore:
    """The state objects in the test's namespace, as the controller's identity."""
    return KubernetesStateStore(build_api_client(kube.write_kubeconfig()), kube.ns)


class OthersWriteAfterEachRead(KubernetesGatewayPair):
    """Another client edits the Services between the controller's read and its write, every tick:
    the window a concurrent ``kubectl annotate`` lands in by chance, made to happen each time."""

    def __init__(self, kube: Cluster, edit) -> None:
        super().__init__(build_api_client(kube.write_kubeconfig()), state_namespace=kube.ns)
        self._edit = edit

    def observe(self, policy: CanaryPolicy):
        seen = super().observe(policy)
        self._edit()
        return seen


def run_until_settled(policy_runner: PolicyRunner, ticks: int = 12) -> list:
    outcomes = []
    for _ in range(ticks):
        outcome = policy_runner.tick()
        outcomes.append(outcome)
        if outcome.decision is not None and outcome.decision.state.phase in (Phase.PROMOTED, Phase.ROLLED_BACK):
            break
    return outcomes


def test_unreachable_prometheus_never_raises_a_weight(kube: Cluster) -> None:
    kube.add_gateways("10", "90")
    policy = policy_in(kube)
    kube.grant(policy)
    dead = PrometheusMetricsSource(
        PrometheusConnection(
            Settings(prometheus_url=f"http://127.0.0.1:{free_port()}", prometheus_timeout_seconds=0.5), None
        )
    )
    policy_runner = runner(as_controller(kube), dead, policy=policy, store=state_store(kube))
    for _ in range(3):
        outcome = policy_runner.tick()
        assert outcome.check is not None and outcome.check.cause is not None
        assert outcome.check.cause.value == "MetricsUnavailable"
    assert kube.annotations(TGT)[WEIGHT] == "10"
    assert all(WEIGHT not in patch["metadata"]["annotations"] for _, patch in kube.patches)


def test_unreachable_api_server_ends_the_tick_without_writes(kube: Cluster) -> None:
    config = kube.workdir / "dead-kubeconfig"
    config.write_text(kube.kubeconfig().replace(kube.plane.url, f"https://127.0.0.1:{free_port()}"))
    pair = KubernetesGatewayPair(build_api_client(config))
    outcome = runner(pair, SimulatedGateways(InMemoryGatewayPair()), policy=policy_in(kube)).tick()
    assert outcome.decision is None and outcome.error is not None and "unreachable" in outcome.error


def test_dry_run_needs_only_read_access_progresses_in_memory_and_writes_nothing(kube: Cluster) -> None:
    kube.add_gateways()
    kube.set_rules(
        [
            {"apiGroups": [""], "resources": ["services"], "resourceNames": [TGT, SRC], "verbs": ["get"]},
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": ["gateway-canary-shop"],
                "verbs": ["get"],
            },
        ]
    )
    policy = policy_in(kube)
    pair = DryRunGatewayPair(as_controller(kube, check_write_access=False))
    gateways = SimulatedGateways(InMemoryGatewayPair(target_weight=0, source_weight=100))
    first = runner(pair, gateways, policy=policy, store=DryRunStateStore(state_store(kube))).tick()
    assert first.decision is not None and first.decision.weights is not None
    assert pair.observe(policy).target_weight == 10  # the intended write is remembered
    assert kube.controller_writes() == [] and kube.events == []
    assert kube.state() is None


def test_the_documented_role_is_enough_for_a_whole_rollout(kube: Cluster) -> None:
    kube.add_gateways()
    policy = policy_in(kube, steps=[10, 50, 100])
    kube.grant(policy)  # exactly what `gateway-canary rbac` prints for this policy
    outcomes = run_until_settled(
        runner(as_controller(kube), healthy_traffic(kube), policy=policy, store=state_store(kube))
    )
    assert [o.error for o in outcomes if o.error] == []
    assert outcomes[-1].decision is not None and outcomes[-1].decision.state.phase is Phase.PROMOTED
    assert (kube.annotations(TGT)[WEIGHT], kube.annotations(SRC)[WEIGHT]) == ("100", "0")
    assert kube.weight_writes(TGT, WEIGHT) == ["10", "50", "100"]
    assert {w.code for w in kube.controller_writes()} <= {200, 201}  # not one refusal on the way
    reasons = [e["reason"] for e in kube.events]
    assert reasons[0] == "Started" and "Promoted" in reasons


def test_a_service_outside_the_grant_is_refused_clearly_and_nothing_is_written(kube: Cluster) -> None:
    kube.add_gateways()
    kube.add_service("someone-elses-gw", {**CLB, WEIGHT: "100"})
    kube.grant(policy_in(kube))
    outside = policy_in(kube, source="someone-elses-gw")
    policy_runner = runner(as_controller(kube), healthy_traffic(kube), policy=outside)
    for _ in range(2):
        outcome = policy_runner.tick()
        assert outcome.decision is None and outcome.error is not None
        assert "403" in outcome.error and 'services "someone-elses-gw" is forbidden' in outcome.error
    assert [w for w in kube.controller_writes() if w.resource == "services"] == []
    assert kube.annotations(TGT)[WEIGHT] == "0" and kube.state() is None
    refused = [e for e in kube.events if e["reason"] == "PolicyRefused"]
    assert len(refused) == 1 and "gateway-canary rbac" in refused[0]["message"]  # reported once, not per tick


def test_an_unrelated_concurrent_writer_neither_breaks_the_rollout_nor_loses_its_annotations(kube: Cluster) -> None:
    kube.add_gateways()
    policy = policy_in(kube, steps=[10, 30, 60, 100])
    kube.grant(policy)
    touches = iter(range(1000))

    def touch() -> None:
        n = str(next(touches))
        kube.edit(TGT, {"team.example.com/last-touch": n})
        kube.edit(SRC, {"team.example.com/last-touch": n})

    pair = OthersWriteAfterEachRead(kube, touch)
    outcomes = run_until_settled(runner(pair, healthy_traffic(kube), policy=policy, store=state_store(kube)))
    assert outcomes[-1].decision is not None and outcomes[-1].decision.state.phase is Phase.PROMOTED
    assert kube.weight_writes(TGT, WEIGHT) == ["10", "30", "60", "100"]
    last = str(next(touches) - 1)
    for name in (TGT, SRC):
        assert kube.annotations(name)["team.example.com/last-touch"] == last
    assert kube.state()["phase"] == "Promoted"
    conflicts = [w for w in kube.controller_writes() if w.verb == "patch" and w.code == 409]
    assert len(conflicts) >= 4  # every raise met a real 409 from the API server and retried
    assert not any(e["reason"] in ("Paused", "WeightChangedExternally", "PolicyRefused") for e in kube.events)


def test_a_concurrent_weight_change_is_detected_reported_and_not_fought(kube: Cluster) -> None:
    kube.add_gateways()
    policy = policy_in(kube, steps=[10, 50, 100])
    kube.grant(policy)
    policy_runner = runner(as_controller(kube), healthy_traffic(kube), policy=policy, store=state_store(kube))
    assert policy_runner.tick().decision is not None  # Start: 10/90
    human = runner(
        OthersWriteAfterEachRead(kube, lambda: kube.edit(TGT, {WEIGHT: "5"})),
        healthy_traffic(kube),
        policy=policy,
        store=state_store(kube),
    )
    raced = human.tick()
    assert raced.error is not None and "changed from 10 to 5 by someone else" in raced.error
    assert kube.annotations(TGT)[WEIGHT] == "5" and kube.annotations(SRC)[WEIGHT] == "90"
    paused = policy_runner.tick()
    assert paused.decision is not None and paused.decision.state.phase is Phase.PAUSED
    for _ in range(3):
        policy_runner.tick()
    assert kube.annotations(TGT)[WEIGHT] == "5"  # adopted, never written back
    assert kube.weight_writes(TGT, WEIGHT) == ["10"]
    paused_events = [e for e in kube.events if e["reason"] == "Paused"]
    assert len(paused_events) == 1 and paused_events[0]["type"] == "Warning"
    assert (
        "weights changed outside gateway-canary: found target=5 source=90, expected target=10 source=90"
        in paused_events[0]["message"]
    )


def test_a_source_write_lost_to_a_revoked_grant_is_completed_once_granted_again(kube: Cluster) -> None:
    kube.add_gateways()
    policy = policy_in(kube)
    kube.grant(policy)
    narrowed = [
        {"apiGroups": [""], "resources": ["services"], "resourceNames": [TGT, SRC], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["services"], "resourceNames": [TGT], "verbs": ["patch"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
        *kube.state_rules(),
    ]

    def narrow_the_grant() -> None:  # after the access check passed, before the writes
        kube.set_rules(narrowed)
        kube.wait_until_allowed("patch", policy.spec.source.service, allowed=False)

    first = runner(
        OthersWriteAfterEachRead(kube, narrow_the_grant), healthy_traffic(kube), policy=policy, store=state_store(kube)
    ).tick()
    assert first.error is not None and "403" in first.error
    assert kube.annotations(TGT)[WEIGHT] == "10" and kube.annotations(SRC)[WEIGHT] == "100"  # half-written

    pair = as_controller(kube)
    policy_runner = runner(pair, healthy_traffic(kube), policy=policy, store=state_store(kube))
    denied = policy_runner.tick()  # the grant is still narrow: the completion is refused, and said so
    assert denied.error is not None and f'services "{SRC}" is forbidden' in denied.error
    assert kube.annotations(SRC)[WEIGHT] == "100"
    kube.grant(policy)
    completed = policy_runner.tick()
    assert completed.decision is not None and completed.decision.action.value == "CompleteWrite"
    assert kube.annotations(SRC)[WEIGHT] == "90"
    assert not any(e["reason"] in ("Paused", "WeightChangedExternally") for e in kube.events)


def test_a_rollback_cuts_the_target_even_when_the_source_patch_is_denied(kube: Cluster) -> None:
    kube.add_gateways()
    policy = policy_in(kube, steps=[10, 50, 100])
    kube.grant(policy)
    traffic = healthy_traffic(kube)
    policy_runner = runner(as_controller(kube), traffic, policy=policy, store=state_store(kube))
    assert policy_runner.tick().decision is not None  # Start: 10/90
    kube.set_rules(  # someone narrows the Role mid-rollout
        [
            {"apiGroups": [""], "resources": ["services"], "resourceNames": [TGT, SRC], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["services"], "resourceNames": [TGT], "verbs": ["patch"]},
            *kube.state_rules(),
        ]
    )
    kube.wait_until_allowed("patch", policy.spec.source.service, allowed=False)
    traffic.error_ratio[GatewayRole.TARGET] = 0.5
    outcome = policy_runner.tick()
    assert outcome.error is not None and "403" in outcome.error
    assert kube.annotations(TGT)[WEIGHT] == "0"  # the ASM gateway gets no traffic: 0 against 90
    assert kube.state()["phase"] == "RolledBack"


def _v1_state(phase: str, target: int, source: int) -> str:
    """What gateway-canary 0.1 wrote into the target Service's annotation."""
    return json.dumps(
        {
            "v": 1,
            "policy": "shop",
            "fingerprint": "0123456789abcdef",
            "phase": phase,
            "reason": "written by 0.1",
            "target_weight": target,
            "source_weight": source,
            "changed_at": "2026-11-24T12:00:00+00:00",
            "step_started_at": "2026-11-24T12:00:00+00:00",
            "consecutive_failures": 0,
            "consecutive_inconclusive": 0,
            "stuck_reported": False,
        }
    )


def test_a_version_1_state_annotation_is_adopted_and_removed_with_the_next_weight_write(kube: Cluster) -> None:
    kube.add_gateways("10", "90")
    kube.edit(TGT, {STATE: _v1_state("Progressing", 10, 90)})
    policy = policy_in(kube, steps=[10, 50, 100])
    kube.grant(policy)
    policy_runner = runner(as_controller(kube), healthy_traffic(kube), policy=policy, store=state_store(kube))
    outcome = policy_runner.tick()
    # adopted (not a fresh start at 10), so the next step follows: 10 -> 50 (bake 0)
    assert outcome.decision is not None and outcome.decision.action.value == "Advance"
    assert STATE not in kube.annotations(TGT)
    removal = [p for p in kube.service_patches() if STATE in p]
    assert removal == [{WEIGHT: "50", STATE: None}]  # in the same patch as the weight, one reconcile
    assert kube.state()["target_weight"] == 50


def test_a_finished_version_1_rollout_has_its_annotation_removed_at_once(kube: Cluster) -> None:
    kube.add_gateways("0", "100")
    kube.edit(TGT, {STATE: _v1_state("RolledBack", 0, 100)})
    policy = policy_in(kube)
    kube.grant(policy)
    outcome = runner(as_controller(kube), healthy_traffic(kube), policy=policy, store=state_store(kube)).tick()
    assert outcome.decision is not None
    assert kube.state()["phase"] == "RolledBack"  # terminal stays terminal: no Start
    assert STATE not in kube.annotations(TGT)
    assert kube.service_patches() == [{STATE: None}]
    assert kube.annotations(TGT)[WEIGHT] == "0"


class FlakyCluster(InMemoryGatewayPair):
    """Unreachable, then 403 (an authorizer warming up), then fine: what a restarted API server does."""

    script: list = []

    def observe(self, policy: CanaryPolicy):
        if self.script:
            raise self.script.pop(0)
        return super().observe(policy)


@pytest.mark.parametrize(("grace", "paged"), [(30.0, False), (0.0, True)])
def test_a_403_right_after_the_api_server_was_unreachable_is_retried_before_it_pages(grace: float, paged: bool) -> None:
    from controller.errors import AccessDenied, ClusterUnavailable

    pair = FlakyCluster(target_weight=10, source_weight=90)
    pair.script = [ClusterUnavailable("unreachable"), AccessDenied("forbidden (403)"), AccessDenied("forbidden (403)")]
    recorder, dispatcher = RecordingNotifier(), AlertDispatcher()
    policy_runner = runner_for(
        POLICY, pair=pair, store=InMemoryStateStore(), metrics=SimulatedGateways(pair), receivers=[recorder],
        dispatcher=dispatcher, forbidden_grace_seconds=grace,
    )  # fmt: skip
    outcomes = [policy_runner.tick() for _ in range(4)]
    assert [o.error is not None for o in outcomes] == [True, True, True, False]
    dispatcher.close(timeout=5)
    refused = [a for a in recorder.alerts if a.kind.value == "PolicyRefused"]
    assert bool(refused) is paged
    assert not [e for e in pair.events if e.reason == "PolicyRefused"] or paged


def test_restarting_the_real_api_server_mid_rollout_pages_nobody(kube: Cluster) -> None:
    kube.add_gateways()
    policy = policy_in(kube, steps=[10, 50, 100])
    kube.grant(policy)
    recorder, dispatcher = RecordingNotifier(), AlertDispatcher()
    traffic = SimulatedGateways(InMemoryGatewayPair(target_weight=10, source_weight=90))
    policy_runner = runner_for(
        policy, pair=as_controller(kube), store=state_store(kube), metrics=traffic, receivers=[recorder],
        dispatcher=dispatcher, forbidden_grace_seconds=30.0,
    )  # fmt: skip
    assert policy_runner.tick().decision is not None  # Start: 10/90
    kube.plane.stop_apiserver()
    down = policy_runner.tick()
    assert down.error is not None and "unreachable" in down.error
    kube.plane.start_apiserver(wait=False)  # etcd kept; the controller ticks while it comes up
    outcomes = []

    def recovered() -> bool:
        outcomes.append(policy_runner.tick())
        return outcomes[-1].error is None

    wait_for(recovered, timeout=90, interval=0.2, what="the controller to work again after the restart")
    kube.plane._wait_ready()
    forbidden = sum(1 for o in outcomes if o.error and ("403" in o.error or "forbidden" in o.error))
    print(f"\nMEASURED API server restart: {len(outcomes)} ticks until recovered, {forbidden} answered 403")
    dispatcher.close(timeout=5)
    assert not [a for a in recorder.alerts if a.kind.value in ("PolicyRefused", "TickFailed")]
    assert not [e for e in kube.events if e["reason"] == "PolicyRefused"]
    assert int(kube.annotations(TGT)[WEIGHT]) >= 10  # and the rollout goes on from where it was


def test_trouble_that_returns_after_it_cleared_is_reported_again_and_blindness_pages() -> None:
    from controller.errors import AccessDenied

    pair = FlakyCluster(target_weight=10, source_weight=90)
    recorder, dispatcher = RecordingNotifier(), AlertDispatcher()
    policy_runner = runner_for(
        POLICY, pair=pair, store=InMemoryStateStore(), metrics=SimulatedGateways(pair), receivers=[recorder],
        dispatcher=dispatcher, forbidden_grace_seconds=0.0,
    )  # fmt: skip
    assert policy_runner.tick().error is None  # the rollout runs at 10: the ASM gateway carries traffic
    pair.script = [AccessDenied("read Service a/b: forbidden (403)")] * 2
    policy_runner.tick()
    policy_runner.tick()  # the same trouble twice in a row: once
    assert policy_runner.tick().error is None  # cleared
    pair.script = [AccessDenied("read Service a/b: forbidden (403)")]
    policy_runner.tick()  # and back: said again
    dispatcher.close(timeout=5)
    refused = [a for a in recorder.alerts if a.kind.value == "PolicyRefused"]
    assert len(refused) == 2 and len({a.id for a in refused}) == 2
    assert all(a.severity.value == "critical" and "protection is blind" in a.reason for a in refused)


def test_a_pass_like_the_last_is_logged_at_debug_anything_else_at_info() -> None:
    """Hundreds of policies passing every few seconds would flood the log: the first check, a change
    of verdict, every failure and one pass a minute are at info; the rest at debug (not shown)."""
    pair = InMemoryGatewayPair(target_weight=0, source_weight=100)
    gateways = SimulatedGateways(pair)
    baking = make_policy(
        schedule={"steps": [10, 100], "bakeTime": "1h"},
        analysis={"interval": "30s", "window": "1m", "minRequests": 50, "failureThreshold": 3},
    )
    checker = runner(pair, gateways, policy=baking)
    checker.tick()  # starts: the target at 10 carries traffic from now on
    assert pair.target_weight == 10
    with capture_logs() as logs:
        for error_ratio in (0.0, 0.0, 0.0, 0.5, 0.0, 0.0):
            gateways.error_ratio[GatewayRole.TARGET] = error_ratio
            checker.tick()
    assert [line["verdict"] for line in logs if line["event"] == "check" and line["log_level"] == "info"] == [
        "PASS",  # the first since the start (an INCONCLUSIVE one)
        "FAIL",
        "PASS",  # the first after the failure
    ]
    assert pair.target_weight == 10  # (all six were checks of the same bake)
    checker._check_logged_at -= 60  # a minute since the last check at info
    with capture_logs() as logs:
        gateways.error_ratio[GatewayRole.TARGET] = 0.0
        checker.tick()
    assert [line["log_level"] for line in logs if line["event"] == "check"] == ["info"]
