"""Leader election and fencing against the real kube-apiserver, in process.

Two electors campaign for one real Lease; the state store refuses a deposed term's save. The
processes' version (SIGKILL, SIGSTOP, a rolling restart, with the audit log as witness) is in
tests/faults/test_two_replicas.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from controller.adapters.kube_api import build_api_client
from controller.adapters.kube_lease import KubernetesLeaseStore
from controller.adapters.kube_state import KubernetesStateStore
from controller.core.decision import Observation, initial_state
from controller.core.lease import FenceToken, LeaseTiming
from controller.errors import NotLeader
from controller.runtime.clock import SystemClock
from controller.runtime.leader import LeaderElector
from tests.helpers import at
from tests.kube_cluster import Cluster
from tests.servers import wait_for

FAST = LeaseTiming(lease_duration=2.0, renew_deadline=1.5, retry_period=0.2)


@dataclass
class Campaign:
    """One elector and what its callbacks saw."""

    elector: LeaderElector
    started: list[tuple[float, int]] = field(default_factory=list)
    stopped: list[tuple[float, str]] = field(default_factory=list)

    def start(self) -> None:
        self.elector.start(
            on_started=lambda token: self.started.append((time.monotonic(), token.term)),
            on_stopped=lambda why: self.stopped.append((time.monotonic(), why)),
        )


@contextmanager
def campaigns(kube: Cluster, tmp_path: Path, *names: str, skew: list[float] | None = None) -> Iterator[list[Campaign]]:
    """Electors named ``names`` for one Lease, as the controller's ServiceAccount (lease RBAC only)."""
    kube.grant()
    made: list[Campaign] = []
    clients = []
    try:
        for index, name in enumerate(names):
            api = build_api_client(kube.write_kubeconfig(tmp_path / f"{name}.kubeconfig"))
            clients.append(api)
            leases = KubernetesLeaseStore(api, kube.ns, "gateway-canary", timeout_seconds=FAST.renew_deadline / 2)
            offset = skew if skew is not None and index == 0 else None
            monotonic = (lambda o=offset: time.monotonic() + o[0]) if offset is not None else time.monotonic
            made.append(Campaign(LeaderElector(leases, name, FAST, clock=SystemClock(), monotonic=monotonic)))
        yield made
    finally:
        for campaign in made:
            campaign.elector.stop(release=False, timeout=5)
        for api in clients:
            api.close()


def lease(kube: Cluster) -> dict[str, object]:
    return kube.plane.call("GET", f"/apis/coordination.k8s.io/v1/namespaces/{kube.ns}/leases/gateway-canary")


def test_one_leads_the_other_waits_and_a_release_hands_over_at_once(kube: Cluster, tmp_path: Path) -> None:
    with campaigns(kube, tmp_path, "replica-a", "replica-b") as (a, b):
        a.start()
        wait_for(lambda: a.elector.leading, timeout=10, what="replica-a leads")
        b.start()
        # b looks while a renews: a's renewals move the Lease, so b never sees it silent long enough
        versions: set[str] = set()

        def renewed_thrice() -> bool:
            versions.add(lease(kube)["metadata"]["resourceVersion"])  # type: ignore[index]
            return len(versions) >= 4

        wait_for(renewed_thrice, timeout=10, what="three renewals by replica-a")
        assert lease(kube)["spec"]["holderIdentity"] == "replica-a"  # type: ignore[index]
        assert not b.elector.leading and b.started == []
        with pytest.raises(NotLeader):
            b.elector.check()
        term = a.elector.token()
        assert term is not None and term.holder == "replica-a"

        released_at = time.monotonic()
        a.elector.stop(release=True)
        wait_for(lambda: b.elector.leading, timeout=10, what="replica-b takes the released Lease")
        handover = b.started[0][0] - released_at
        assert handover < FAST.lease_duration  # released: no waiting for the lease to run out
        with pytest.raises(NotLeader):
            a.elector.check()
        b_term = b.elector.token()
        assert b_term is not None and b_term.supersedes(term)
        spec = lease(kube)["spec"]
        assert spec["holderIdentity"] == "replica-b" and spec["leaseTransitions"] == b_term.term  # type: ignore[index]


def test_a_silent_leader_is_replaced_after_the_lease_duration_and_fences_itself_first(
    kube: Cluster, tmp_path: Path
) -> None:
    """replica-a's clock jumps past its renew deadline (as after a pause): it refuses writes at once,
    before its elector thread has even run; replica-b, which cannot tell, waits the lease duration."""
    skew = [0.0]
    with campaigns(kube, tmp_path, "replica-a", "replica-b", skew=skew) as (a, _b):
        a.start()
        wait_for(lambda: a.elector.leading, timeout=10, what="replica-a leads")
        a.elector.check()
        skew[0] = FAST.renew_deadline  # its last renewal is now a renew deadline ago
        with pytest.raises(NotLeader, match="has not renewed"):
            a.elector.check()
        wait_for(lambda: a.stopped, timeout=5, what="replica-a ends its term")
        assert "renew deadline" in a.stopped[0][1]


def test_killed_leader_is_replaced_within_the_lease_duration(kube: Cluster, tmp_path: Path) -> None:
    with campaigns(kube, tmp_path, "replica-a", "replica-b") as (a, b):
        a.start()
        wait_for(lambda: a.elector.leading, timeout=10, what="replica-a leads")
        b.start()
        wait_for(lambda: b.elector._seen is not None, timeout=5, what="replica-b saw the Lease")
        a.elector._stop.set()
        a.elector._wake.set()
        a.elector._thread.join(5)  # type: ignore[union-attr]
        silent_from = time.monotonic()
        wait_for(lambda: b.elector.leading, timeout=10, what="replica-b takes over")
        takeover = b.started[0][0] - silent_from
        # b has to see the Lease unchanged for the whole lease duration, counted from its last look
        assert FAST.lease_duration - FAST.retry_period * 2 <= takeover <= FAST.lease_duration + FAST.retry_period * 3


@dataclass
class StaticFence:
    """A Fence with a fixed term (the store under test is the real one)."""

    term: FenceToken | None
    allowed: bool = True
    deposed_why: list[str] = field(default_factory=list)

    def token(self) -> FenceToken | None:
        return self.term

    def check(self) -> None:
        if not self.allowed:
            raise NotLeader("test: not leading")

    def deposed(self, why: str) -> None:
        self.deposed_why.append(why)


def test_the_state_store_refuses_a_deposed_terms_save(kube: Cluster, tmp_path: Path) -> None:
    policy = kube.policy()
    kube.grant(policy)
    api = build_api_client(kube.write_kubeconfig())
    try:
        old_fence = StaticFence(FenceToken("replica-a", 3, at(0), "uid-1"))
        new_fence = StaticFence(FenceToken("replica-b", 4, at(0), "uid-1"))
        old_store = KubernetesStateStore(api, kube.ns, fence=old_fence)
        new_store = KubernetesStateStore(api, kube.ns, fence=new_fence)
        state = initial_state(policy, Observation(0, 100), at(0))

        first = old_store.save(policy, state, old_store.load(policy))
        assert first.fence == old_fence.term
        read_by_old = old_store.load(policy)
        assert read_by_old.fence == old_fence.term
        claimed = new_store.save(policy, state.evolve(reason="claimed"), new_store.load(policy))
        assert claimed.fence == new_fence.term
        assert '"term": 4' in kube.configmap("gateway-canary-shop")["data"]["leader"]

        # the old term, with what it read before the new term's save: refused (and told it was deposed)
        with pytest.raises(NotLeader):
            old_store.save(policy, state.evolve(reason="stale"), read_by_old)
        # ... and with a fresh read too: a newer token in the object is never overwritten
        with pytest.raises(NotLeader):
            old_store.save(policy, state.evolve(reason="stale"), old_store.load(policy))
        assert old_fence.deposed_why and "term 4 of replica-b" in old_fence.deposed_why[-1]
        assert old_store.load(policy).state.reason == "claimed"  # type: ignore[union-attr]

        # a term that may not write now (its Lease not renewed) writes nothing, whatever the token says
        new_fence.allowed = False
        with pytest.raises(NotLeader):
            new_store.save(policy, state.evolve(reason="late"), new_store.load(policy))
        assert old_store.load(policy).state.reason == "claimed"  # type: ignore[union-attr]
    finally:
        api.close()


def test_the_gateway_adapter_asks_the_fence_before_every_write(kube: Cluster, tmp_path: Path) -> None:
    """A term that may not write sends no Service patch and no Event: the audit log has none."""
    from controller.adapters.kubernetes import KubernetesGatewayPair
    from controller.core.schedule import Weights

    kube.add_gateways()
    policy = kube.policy()
    kube.grant(policy)
    api = build_api_client(kube.write_kubeconfig())
    try:
        fence = StaticFence(FenceToken("replica-a", 1, at(0), "uid-1"))
        pair = KubernetesGatewayPair(api, state_namespace=kube.ns, fence=fence)
        seen = pair.observe(policy)
        fence.allowed = False
        for write in (
            lambda: pair.write_weights(policy, seen, Weights(10, 90)),
            lambda: pair.write_weights(policy, seen, Weights(0, 100), force=True),  # a rollback too
            lambda: pair.record_event(policy, "Test", "must not be recorded", warning=False),
        ):
            with pytest.raises(NotLeader):
                write()
        assert kube.controller_writes() == []
        fence.allowed = True
        pair.write_weights(policy, seen, Weights(10, 90))
        assert [w.resource for w in kube.controller_writes()] == ["services", "services"]
    finally:
        api.close()
