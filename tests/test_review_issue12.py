"""Adversarial review of issue 12 (leader election and fenced writes): each test shows one way the
promise (a misbehaving ASM gateway goes to 0 and a human hears about it exactly once) or "two
replicas, one writer" broke. They failed on the code as reviewed (each docstring says what broke)
and pass since the fixes; where a fix changed what the test must look at (the standby's periodic
read, the old term's alerts left to the outbox), the test says so.

Pure where the elector's rounds can be driven by hand (a Lease in memory, one monotonic clock for
all replicas); one uses the real kube-apiserver (``kube``) for the Lease's creationTimestamp.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from controller.adapters.kube_api import build_api_client
from controller.adapters.kube_lease import KubernetesLeaseStore
from controller.adapters.kube_state import KubernetesStateStore
from controller.adapters.memory import InMemoryGatewayPair, InMemoryStateStore
from controller.core.decision import Observation, initial_state
from controller.core.enums import AlertKind
from controller.core.lease import FenceToken, LeaseRecord, LeaseTiming
from controller.core.policy import CanaryPolicy
from controller.errors import AccessDenied, ClusterUnavailable, NotificationError, NotLeader
from controller.notify.dispatcher import AlertDispatcher, DeliveryPolicy
from controller.ports import PairSnapshot
from controller.runtime.clock import SystemClock
from controller.runtime.leader import LeaderElector
from controller.runtime.service import ControllerService
from controller.settings import Settings
from tests.helpers import (
    FAIL,
    PASS,
    Connection,
    RecordingNotifier,
    Rollout,
    ScriptedChecks,
    Seconds,
    SharedLease,
    hand_elector,
    make_policy,
    runner_for,
)
from tests.kube_cluster import Cluster

TIMING = LeaseTiming(lease_duration=15.0, renew_deadline=10.0, retry_period=2.0)
#: the Lease this controller elects on was created long before ...
OLD_LINEAGE = datetime(2026, 1, 1, tzinfo=UTC)
#: ... one of another name (another release name or leaseName, later rolled back)
NEWER_LINEAGE = datetime(2026, 6, 1, tzinfo=UTC)


# -- 1. two leaders: a candidate dates its first sight of a renewal from before its read ----------


def test_a_slow_read_does_not_let_a_candidate_take_over_while_the_old_leader_still_writes() -> None:
    """``LeaderElector.round`` stamps a new observation with ``now``, taken BEFORE ``leases.get()``
    (client-go stamps ``observedTime`` after the Get returns). A read may take up to 8 s (the lease
    store's timeouts: 3 s connect + renew_deadline/2 = 5 s read). If the leader's last successful
    renewal lands while the candidate's read is in flight, the candidate counts the lease duration
    from up to 8 s before it saw that renewal, and takes the Lease while the old leader's fence
    (renewed_at + renew_deadline) still passes: two processes whose ``check()`` both pass. The 5 s
    margin (15 - 10) is eaten by a read slower than 5 s, which is when renewals fail too (an API
    server under load)."""
    seconds, lease = Seconds(), SharedLease()
    a_conn, b_conn = Connection(lease), Connection(lease)
    a, _ = hand_elector(a_conn, seconds, "replica-a")
    b, _ = hand_elector(b_conn, seconds, "replica-b")
    a.round()  # creates the Lease and leads
    b.round()  # the candidate's first look
    seconds.now = 1002.0
    a.round()  # renews

    def the_read_takes_seven_seconds() -> None:
        seconds.now = 1008.9
        a.round()  # the leader's renewal lands while the candidate's read is in flight
        seconds.now = 1009.0

    b_conn.during_read = the_read_takes_seven_seconds
    b.round()  # starts at 1002, returns at 1009 with the renewal of 1008.9
    a_conn.down = True  # from now on the leader's renewals fail (its node loses the API server)
    t = 1009.0
    while not b.leading:
        t += 0.5
        assert t < 1040, "replica-b never took over"
        seconds.now = t
        a.round()
        b.round()
        # the old leader renewed at 1008.9: its fence passes until 1018.9
        assert not (a.leading and b.leading), f"two leaders at {t}"
    assert t >= 1009.0 + TIMING.lease_duration  # counted from when the read came back with the renewal


# -- 2. a process that can never lead again: a token of a Lease of another name -------------------


def test_a_token_from_a_newer_lease_of_another_name_does_not_stop_protection_forever() -> None:
    """The fencing token does not name its Lease. A state object saved under a Lease of another name
    created later (a release renamed or ``leaderElection.leaseName`` changed, then ``helm rollback``;
    or a second controller run by hand with the binary's default ``gateway-canary`` while the chart
    uses ``<release>-gateway-canary``) carries a token of a "newer lineage" than any term of this
    controller's older Lease. Every term is then deposed by its first tick's load, the elector
    re-acquires at once (the Lease still names it), and so on every retry period: no check is ever
    judged, a failing ASM gateway at 10 % is never rolled back, and the other replica never gets the
    Lease either (it keeps moving). ``max(is_leader) == 0`` flaps, so NotChecking may not fire."""
    policy = make_policy()
    seconds, lease = Seconds(), SharedLease(created=OLD_LINEAGE)
    me, said = hand_elector(Connection(lease), seconds, "replica-a")
    store = InMemoryStateStore(fence=me)
    pair = InMemoryGatewayPair(target_weight=10, source_weight=90, fence=me)
    rollout = Rollout.fresh(policy)
    rollout.tick(PASS, 0)  # started: the ASM gateway at 10
    assert rollout.weights == (10, 90)
    store.texts[policy.name] = _encoded(rollout)
    store.versions[policy.name] = 1
    store.fences[policy.name] = FenceToken("other-release-pod", 0, NEWER_LINEAGE, "uid-other-lease")

    runners = []
    for _ in range(12):  # 12 retry periods
        seconds.now += TIMING.retry_period * 1.1
        me.round()
        if me.leading:
            runner = runner_for(policy, pair=pair, store=store, metrics=None, collector=ScriptedChecks(FAIL), fence=me)
            runners.append(runner)
            runner.tick()  # the ASM gateway fails every check
    assert runners, said  # it leads ...
    assert lease.record is not None and lease.record.transitions == 0  # ... in one term, never deposed
    assert pair.target_weight == 0, f"never rolled back: every term was deposed ({said[-2:]})"


def _encoded(rollout: Rollout) -> str:
    from controller.core.state import encode_state

    return encode_state(rollout.state)


def test_helm_rollback_of_the_lease_name_leaves_no_term_able_to_save(kube: Cluster, tmp_path: Path) -> None:
    """The same against the real API server: the chart names the Lease after the release. Release
    uses Lease L1; an upgrade renames it (L2, created later: its pods' tokens supersede L1's in every
    state object); ``helm rollback`` goes back to L1, which still exists (the controller created it,
    Helm does not delete it). Every term on L1 is refused by every state object, forever."""
    policy = kube.policy()
    admin = tmp_path / "admin.kubeconfig"
    admin.write_text(kube.admin_kubeconfig())
    api = build_api_client(admin)
    try:
        seconds = Seconds()
        state = initial_state(policy, Observation(0, 100), datetime.now(UTC))

        def campaign(lease_name: str, identity: str) -> tuple[LeaderElector, KubernetesStateStore]:
            leases = KubernetesLeaseStore(api, kube.ns, lease_name, timeout_seconds=5)
            made = LeaderElector(leases, identity, TIMING, clock=SystemClock(), monotonic=seconds)
            return made, KubernetesStateStore(api, kube.ns, fence=made)

        v1, v1_store = campaign("gateway-canary", "v1-pod")
        v1.round()
        v1_store.save(policy, state, v1_store.load(policy))
        v1.stop(release=True)  # the upgrade's rolling update: v1 hands over
        time.sleep(1.1)  # creationTimestamp has a resolution of one second
        v2, v2_store = campaign("gateway-canary-v2", "v2-pod")
        v2.round()
        v2_store.save(policy, state.evolve(reason="saved by v2"), v2_store.load(policy))
        v2.stop(release=True)  # helm rollback: back to v1's Lease name
        back, back_store = campaign("gateway-canary", "rolled-back-pod")
        saved = terms = 0
        for _ in range(6):
            seconds.now += TIMING.retry_period * 1.1
            back.round()
            if not back.leading:
                continue
            terms += 1
            try:
                back_store.save(policy, state.evolve(reason="rolled back controller"), back_store.load(policy))
                saved += 1
            except NotLeader:
                pass
        assert terms >= 3  # it was elected, term after term (each deposed by the state object)
        assert saved, "no term of the rolled-back controller could save its state: it never protects again"
    finally:
        api.close()  # type: ignore[no-untyped-call]


# -- 3. the 403 grace is lost with the term ---------------------------------------------------------


class ScriptedPair(InMemoryGatewayPair):
    """The in-memory pair whose next observe raises what the test puts in ``errors``."""

    errors: list[Exception]  # set per instance

    def observe(self, policy: CanaryPolicy) -> PairSnapshot:
        if self.errors:
            raise self.errors.pop(0)
        return super().observe(policy)


@dataclass
class HandElector:
    """What the service asks of its elector; the test starts and ends terms by hand."""

    term: FenceToken | None = None
    deposed_why: list[str] = field(default_factory=list)

    def token(self) -> FenceToken | None:
        return self.term

    def check(self) -> None:
        if self.term is None:
            raise NotLeader("test: no term")

    def deposed(self, why: str) -> None:
        self.deposed_why.append(why)

    def alive(self) -> bool:
        return True


POLICY_FILE = """\
metadata: {name: shop}
spec:
  source: {service: istio-system/istio-ingressgateway}
  target: {service: istio-system/istio-ingressgateway-asm}
  schedule: {steps: [10, 50, 100], bakeTime: 5m}
  analysis: {interval: 30s, window: 1m, minRequests: 50, failureThreshold: 2}
  gates: {errorRate: {max: 0.01}}
"""


def _service(
    tmp_path: Path, pair: InMemoryGatewayPair, receiver: RecordingNotifier
) -> tuple[ControllerService, HandElector]:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "shop.yaml").write_text(POLICY_FILE)
    elected = HandElector()
    service = ControllerService(
        Settings(policies_dir=policies, http_port=0, forbidden_grace_seconds=30),
        pair=pair,
        store=InMemoryStateStore(),
        metrics_for=lambda policy: None,  # type: ignore[arg-type,return-value]
        clock=SystemClock(),
        serve_http=False,
        extra_receivers=[receiver],
        elector=elected,  # type: ignore[arg-type]
    )
    return service, elected  # (its scheduler is not started: the test runs the ticks)


def _refusals(service: ControllerService, receiver: RecordingNotifier) -> list[str]:
    time.sleep(0.3)  # the dispatcher delivers in its own thread
    pending = [alert.kind for alert, _, _ in service._dispatcher.pending("shop")]
    return [str(kind) for kind in [*pending, *(a.kind for a in receiver.alerts)] if kind is AlertKind.POLICY_REFUSED]


def _unreachable_then_forbidden(tmp_path: Path, *, term_ends: bool) -> list[str]:
    pair, receiver = ScriptedPair(target_weight=10, source_weight=90), RecordingNotifier()
    pair.errors = []
    service, elected = _service(tmp_path, pair, receiver)
    try:
        elected.term = FenceToken("me", 1, OLD_LINEAGE, "uid")
        service._lead(elected.term)
        pair.errors = [ClusterUnavailable("read Service istio-system/istio-ingressgateway-asm: API server unreachable")]
        service.runners["shop"].tick()
        if term_ends:  # the API server stays away past the renew deadline: the term ends ...
            elected.term = None
            service._follow("not renewed for 10s (the renew deadline)")
            # ... it answers again: the Lease still names this process, a new term at once
            elected.term = FenceToken("me", 2, OLD_LINEAGE, "uid")
            service._lead(elected.term)
        # what a restarted API server answers while its RBAC authorizer warms up
        pair.errors = [AccessDenied("read Service istio-system/istio-ingressgateway-asm: forbidden (403)")]
        service.runners["shop"].tick()
        return _refusals(service, receiver)
    finally:
        service._dispatcher.close(timeout=1)
        service._collector.close()


def test_control_within_one_term_a_403_right_after_an_outage_is_not_reported(tmp_path: Path) -> None:
    """(Passes: the behaviour FORBIDDEN_GRACE_SECONDS gives a process that keeps its runner.)"""
    assert _unreachable_then_forbidden(tmp_path, term_ends=False) == []


def test_a_403_right_after_an_outage_that_ended_the_term_is_not_reported(tmp_path: Path) -> None:
    """An API server outage longer than the renew deadline ends the term; the service drops its
    runners (``_follow``) and the next term builds fresh ones, whose ``_unreachable_at`` is None.
    The 403s a restarted API server answers while its authorizer warms up (the reason for
    FORBIDDEN_GRACE_SECONDS, measured in test_runner.py) are then reported at once: a PolicyRefused
    alert and Event for nothing. Without election the same outage kept the runner and its grace."""
    assert _unreachable_then_forbidden(tmp_path, term_ends=True) == []


# -- 4. the rollback page twice: the old term's dispatcher and the new term's outbox --------------


class FlakyReceiver(RecordingNotifier):
    """A chat receiver (Slack, DingTalk, Feishu, WeCom: no idempotency key honoured) that fails
    until ``up``; every delivery is a message a human reads."""

    def __init__(self) -> None:
        super().__init__("slack")
        self.up = False

    def send(self, alert: Any, *, timeout: float) -> None:
        if not self.up:
            raise NotificationError("test: receiver answered 503")
        super().send(alert, timeout=timeout)


@dataclass
class Term:
    token: FenceToken
    ended: bool = False
    deposed_why: list[str] = field(default_factory=list)

    def check(self) -> None:
        if self.ended:
            raise NotLeader("test: the term ended")

    def deposed(self, why: str) -> None:
        self.deposed_why.append(why)


def _fence(term: Term) -> Any:
    class _Fence:
        def token(self) -> FenceToken:
            return term.token

        def check(self) -> None:
            term.check()

        def deposed(self, why: str) -> None:
            term.deposed(why)

    return _Fence()


def test_a_rollback_alert_is_delivered_once_across_a_takeover() -> None:
    """Replica A rolls back a failing ASM gateway; the page cannot be delivered yet (the receiver
    is down), so it is pending in A's dispatcher and in the state object's outbox. A's term ends
    (a partition from the API server, a rolling update's SIGTERM): ``_follow`` retires the runners
    but leaves A's dispatcher retrying (for up to 6 h for a critical alert; ``stop()`` releases
    the Lease and only then gives every queued alert one last attempt). Replica B's first tick
    restores the outbox into B's dispatcher. When the receiver answers again both deliver: the
    human gets the rollback page twice (same id; only webhook and Alertmanager receivers de-duplicate)."""
    policy = make_policy()
    a_term = Term(FenceToken("replica-a", 1, OLD_LINEAGE, "uid"))
    b_term = Term(FenceToken("replica-b", 2, OLD_LINEAGE, "uid"))
    store_a = InMemoryStateStore(fence=_fence(a_term))
    store_b = dataclasses.replace(store_a, fence=_fence(b_term))  # the same object, seen by B
    assert store_b.texts is store_a.texts and store_b.outboxes is store_a.outboxes
    pair = InMemoryGatewayPair(target_weight=10, source_weight=90)
    rollout = Rollout.fresh(policy)
    rollout.tick(PASS, 0)
    store_a.texts[policy.name] = _encoded(rollout)
    store_a.versions[policy.name] = 1
    receiver = FlakyReceiver()
    quick = DeliveryPolicy(backoff_seconds=0.05, backoff_max_seconds=0.1)
    dispatcher_a, dispatcher_b = AlertDispatcher(quick), AlertDispatcher(quick)
    try:
        a = runner_for(
            policy, pair=pair, store=store_a, metrics=None, collector=ScriptedChecks(FAIL), receivers=[receiver],
            dispatcher=dispatcher_a, fence=_fence(a_term),
        )  # fmt: skip
        a.tick()
        a.tick()  # the second FAIL: rolled back, and the page queued
        assert pair.target_weight == 0
        rolled = [alert for alert, _, _ in dispatcher_a.pending(policy.name) if alert.kind is AlertKind.ROLLED_BACK]
        assert len(rolled) == 1
        a_term.ended = True  # A's term ends; A's process goes on (a standby now, or flushing on SIGTERM)
        a.retire()
        dispatcher_a.abandon(a.persisted)  # what the service's _follow (and stop) does with a retired term's

        b = runner_for(
            policy, pair=pair, store=store_b, metrics=None, collector=ScriptedChecks(FAIL), receivers=[receiver],
            dispatcher=dispatcher_b, fence=_fence(b_term),
        )  # fmt: skip
        b.tick()  # B's first tick: the outbox is restored
        receiver.up = True
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and (dispatcher_a.pending(policy.name) or dispatcher_b.pending(policy.name)):
            time.sleep(0.05)
        pages = [alert for alert in receiver.alerts if alert.id == rolled[0].id]
        assert len(pages) == 1, f"the rollback was paged {len(pages)} times"
    finally:
        dispatcher_a.close(timeout=1)
        dispatcher_b.close(timeout=1)


def test_lease_duration_is_never_written_shorter_than_it_is() -> None:
    """``_spec`` writes ``max(1, round(duration))``: 2.5 s becomes 2 (banker's rounding), 1.4 s
    becomes 1. A candidate honours the holder's written duration as a floor; written short, a
    candidate with a shorter setting may take over inside the holder's renew deadline (the binary
    accepts fractional settings; the chart's schema allows integers only)."""
    from controller.adapters.kube_lease import _spec

    for seconds in (1.4, 2.5, 15.0):
        written = _spec(LeaseRecord("me", 0, seconds, None, None))["leaseDurationSeconds"]
        assert written >= seconds, f"{seconds} s written as {written}"


# -- 5. a takeover drops the last good version of a policy file that turned invalid ---------------


def _replica(
    policies: Path, pair: InMemoryGatewayPair, store: InMemoryStateStore
) -> tuple[ControllerService, HandElector]:
    elected = HandElector()
    service = ControllerService(
        Settings(policies_dir=policies, http_port=0),
        pair=pair,
        store=store,
        metrics_for=lambda policy: None,  # type: ignore[arg-type,return-value]
        clock=SystemClock(),
        serve_http=False,
        extra_receivers=[RecordingNotifier()],
        elector=elected,  # type: ignore[arg-type]
    )
    return service, elected


def test_a_takeover_keeps_protecting_a_live_policy_whose_file_turned_invalid(tmp_path: Path) -> None:
    """R3: "a policy file that turned invalid: the policy keeps observing and rolls a failing target
    back" (PolicyCatalog keeps the last good version). That memory is the leader's: a standby never
    reads the directory (``reload`` returns while not leading), so when it takes over (a rolling
    update, a drain, a crash) the invalid file gives it no policy at all: the live rollout (here at
    10 %) has no runner, no check and no rollback. Nothing says so: the PolicyInvalid alert repeats
    what people were told while protection still ran, and NotChecking looks only at the phase
    series of policies a runner records (none now). Before election a restart lost it too; now
    every takeover does, and the standby that could have kept it warm does not."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "shop.yaml").write_text(POLICY_FILE)
    pair, store = InMemoryGatewayPair(target_weight=10, source_weight=90), InMemoryStateStore()
    a, a_elected = _replica(policies, pair, store)
    b, b_elected = _replica(policies, pair, store)
    try:
        a_elected.term = FenceToken("replica-a", 1, OLD_LINEAGE, "uid")
        a._lead(a_elected.term)
        assert "shop" in a.runners
        b._watch()  # the standby's periodic read of the directory (its __watch__ job)
        (policies / "shop.yaml").write_text(POLICY_FILE.replace("steps: [10, 50, 100]", "steps: [50, 10]"))
        a.reload()
        b._watch()
        assert "shop" in a.runners and a.runners["shop"].file_problem  # the last good version keeps running
        a_elected.term = None
        a._follow("the Lease names replica-b now")
        b_elected.term = FenceToken("replica-b", 2, OLD_LINEAGE, "uid")
        b._lead(b_elected.term)
        assert "shop" in b.runners, "after the takeover the live policy is not watched at all"
    finally:
        for service in (a, b):
            service._dispatcher.close(timeout=1)
            service._collector.close()


# -- 6. the real API server: a replace drops what the create set ------------------------------------


def test_renewing_the_lease_keeps_its_labels(kube: Cluster, tmp_path: Path) -> None:
    """``KubernetesLeaseStore.update`` is a PUT whose metadata has only name, namespace and
    resourceVersion: the API server replaces the labels ``create`` set, so the first renewal strips
    ``app.kubernetes.io/managed-by``/``name`` from the Lease (cosmetic; anyone selecting the
    controller's objects by label no longer finds it)."""
    admin = tmp_path / "admin.kubeconfig"
    admin.write_text(kube.admin_kubeconfig())
    api = build_api_client(admin)
    try:
        seconds = Seconds()
        leases = KubernetesLeaseStore(api, kube.ns, "gateway-canary", timeout_seconds=5)
        me = LeaderElector(leases, "replica-a", TIMING, clock=SystemClock(), monotonic=seconds)
        me.round()  # create
        path = f"/apis/coordination.k8s.io/v1/namespaces/{kube.ns}/leases/gateway-canary"
        assert kube.plane.call("GET", path)["metadata"].get("labels")
        seconds.now += TIMING.retry_period
        me.round()  # renew
        assert me.leading
        labels = kube.plane.call("GET", path)["metadata"].get("labels")
        assert labels, "the renewal removed the Lease's labels"
    finally:
        api.close()  # type: ignore[no-untyped-call]
