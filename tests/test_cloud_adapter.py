"""The cloud's side read from the real kube-apiserver, with the cloud controller EMULATED.

``KubernetesCloudInspector`` runs as the controller's ServiceAccount against the real API server;
the Alibaba Cloud controller cannot run here, so ``tests/ccm_emulator.py`` plays it (Events,
applied weights, backends) as its source does. The pure rules (``confirmation``,
``effective_share``, ``preflight``) judge what the adapter reads, as the controller will.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from structlog.testing import capture_logs

from controller.adapters.cloud import (
    BACKEND_LABEL_ANNOTATION,
    REMOVE_UNSCHEDULED_ANNOTATION,
    KubernetesCloudInspector,
    workload_of_pod,
)
from controller.adapters.kube_api import build_api_client
from controller.adapters.kubernetes import KubernetesGatewayPair
from controller.core.cloud import (
    BackendMode,
    Backends,
    CloudEvent,
    Confirmation,
    ConfirmationState,
    confirmation,
    preflight,
    split,
)
from controller.core.policy import ServiceRef
from tests.ccm_emulator import COMPONENT, CcmEmulator, Mode
from tests.kube_cluster import SOURCE, TARGET, Cluster
from tests.servers import WEIGHT, LaggedShare, TrafficExporter, wait_for

#: What the inspector reads: the Role and ClusterRole ``gateway-canary rbac`` prints must grant it.
CLOUD_READS = (
    ("list", "events", {}),
    ("list", "endpointslices", {"group": "discovery.k8s.io"}),
    ("list", "nodes", {"namespace": ""}),  # cluster-scoped
)


@pytest.fixture
def grant_cloud_reads(kube: Cluster) -> None:
    """``kube.grant``: exactly what ``gateway-canary rbac`` prints, which covers every cloud read."""
    kube.grant(kube.policy())
    for verb, resource, where in CLOUD_READS:
        kube.wait_until(verb, resource, **where)


@pytest.fixture
def inspector(kube: Cluster, grant_cloud_reads: None) -> KubernetesCloudInspector:
    """The adapter as the controller's ServiceAccount."""
    return KubernetesCloudInspector(build_api_client(kube.write_kubeconfig()))


def ref(kube: Cluster, name: str = TARGET) -> ServiceRef:
    return ServiceRef(namespace=kube.ns, name=name)


def now() -> datetime:
    return datetime.now(UTC)


def next_second() -> datetime:
    """Wait (polling) until the wall clock enters a new second: Event times have whole seconds."""
    start = now().replace(microsecond=0)
    wait_for(lambda: now().replace(microsecond=0) > start, timeout=2, interval=0.01, what="the next second")
    return now()


def judged(
    inspector: KubernetesCloudInspector, kube: Cluster, written: datetime, timeout: timedelta
) -> ConfirmationState:
    """The controller's judgement of the target's Events now, for a write at ``written``."""
    return confirmation(inspector.events(ref(kube)), written, now(), timeout, service=TARGET)


def answer(
    inspector: KubernetesCloudInspector, kube: Cluster, written: datetime, timeout: timedelta
) -> ConfirmationState:
    """Poll until the judgement is no longer WAITING (an answer, or the deadline passed)."""

    def settled() -> ConfirmationState | None:
        state = judged(inspector, kube, written, timeout)
        return None if state.status is Confirmation.WAITING else state

    found: ConfirmationState = wait_for(settled, timeout=timeout.total_seconds() + 8, what="the cloud's answer")
    return found


#: The CCM's reasons (the API server's ClusterIP repair loop leaves Events on Services too).
CCM_REASONS = frozenset({"AnnotationChanged", "EnsuredLoadBalancer", "SyncLoadBalancerFailed", "SkipSyncBackends"})


def reasons(events: tuple[CloudEvent, ...]) -> list[str]:
    """The reasons of the cloud controller's Events, in order."""
    return [event.reason for event in events if event.reason in CCM_REASONS]


def emulator(kube: Cluster, **options: Any) -> CcmEmulator:
    options.setdefault("lag", 0.1)
    options.setdefault("retry_after", None)
    return CcmEmulator(kube.plane, kube.ns, **options)


# --- events() ------------------------------------------------------------------------------------


def test_events_are_this_services_and_the_clouds_only(
    kube: Cluster, grant_cloud_reads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    kube.add_gateways()
    api = build_api_client(kube.write_kubeconfig())
    urls: list[str] = []
    original = api.call_api

    def spy(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        urls.append(url)
        return original(method, url, *args, **kwargs)

    monkeypatch.setattr(api, "call_api", spy)
    inspector = KubernetesCloudInspector(api)
    with emulator(kube) as ccm:
        kube.edit(TARGET, {WEIGHT: "10"})
        kube.edit(SOURCE, {WEIGHT: "90"})
        wait_for(lambda: ccm.applied_weight(TARGET) == 10 and ccm.applied_weight(SOURCE) == 90, timeout=10)
    policy = kube.policy()
    pair = KubernetesGatewayPair(build_api_client(kube.write_kubeconfig()), state_namespace=kube.ns)
    pair.observe(policy)  # learns the target's uid for its Event
    pair.record_event(policy, "EnsuredLoadBalancer", "gateway-canary's own, not the cloud's", warning=False)

    every = kube.plane.call("GET", f"/api/v1/namespaces/{kube.ns}/events")["items"]
    names = {(e["involvedObject"]["name"], (e.get("source") or {}).get("component")) for e in every}
    assert {(SOURCE, COMPONENT), (TARGET, COMPONENT), (TARGET, "gateway-canary")} <= names  # all there to exclude

    urls.clear()
    seen = inspector.events(ref(kube))
    assert reasons(seen) == ["AnnotationChanged", "EnsuredLoadBalancer"]
    assert all("own" not in event.message for event in seen)
    assert seen[1].message == "Ensured load balancer [lb-test]" and not seen[1].warning
    (url,) = [u for u in urls if "/events" in u]  # one page, filtered by the API server
    assert f"fieldSelector=involvedObject.kind%3DService%2CinvolvedObject.name%3D{TARGET}" in url
    assert "limit=100" in url
    uid = kube.service(TARGET)["metadata"]["uid"]
    assert inspector.events(ref(kube), uid) == seen
    assert inspector.events(ref(kube), "00000000-0000-0000-0000-000000000000") == ()  # an earlier namesake
    assert reasons(inspector.events(ref(kube, SOURCE))) == ["AnnotationChanged", "EnsuredLoadBalancer"]


def test_aggregated_events_count_by_their_newest_occurrence(kube: Cluster, inspector: KubernetesCloudInspector) -> None:
    kube.add_gateways()
    timeout = timedelta(seconds=5)
    with emulator(kube) as ccm:
        kube.edit(TARGET, {WEIGHT: "5"})
        wait_for(lambda: ccm.applied_weight(TARGET) == 5, timeout=10, what="the first weight applied")
        ccm.set_mode(TARGET, Mode.FAIL, "OperationFailed.Throttled")
        failures = []
        for weight in ("10", "20"):  # the same failure twice: one Event, count 2
            written = next_second()
            kube.edit(TARGET, {WEIGHT: weight})
            assert answer(inspector, kube, written, timeout).status is Confirmation.FAILED, weight
            failures.append(written)

        since_second = inspector.events(ref(kube), since=failures[1])
        by_reason = {event.reason: event for event in since_second if event.reason in CCM_REASONS}
        assert sorted(by_reason) == ["AnnotationChanged", "SyncLoadBalancerFailed"]  # not the older success
        assert by_reason["SyncLoadBalancerFailed"].count == 2 and by_reason["AnnotationChanged"].count == 3
        assert by_reason["SyncLoadBalancerFailed"].last_seen >= failures[1].replace(microsecond=0)
        assert by_reason["SyncLoadBalancerFailed"].warning
        failed = by_reason["SyncLoadBalancerFailed"]
        assert failed.message == "Error syncing load balancer [lb-test]: OperationFailed.Throttled"
        everything = inspector.events(ref(kube))
        assert sorted(reasons(everything)) == ["AnnotationChanged", "EnsuredLoadBalancer", "SyncLoadBalancerFailed"]
        stored = kube.plane.call("GET", f"/api/v1/namespaces/{kube.ns}/events")["items"]
        assert len([e for e in stored if e["reason"] == "SyncLoadBalancerFailed"]) == 1  # aggregated, not two

        ccm.set_mode(TARGET, Mode.SUCCEED)
        written = next_second()
        kube.edit(TARGET, {WEIGHT: "30"})
        assert answer(inspector, kube, written, timeout).status is Confirmation.CONFIRMED
        assert ccm.applied_weight(TARGET) == 30
        # the older success, seen again now, answers the new write; the failures before it do not
        ensured = [e for e in inspector.events(ref(kube), since=written) if e.reason == "EnsuredLoadBalancer"]
        assert len(ensured) == 1 and ensured[0].count == 2


@pytest.mark.parametrize(
    ("mode", "expected", "applied"),
    [
        (Mode.SUCCEED, Confirmation.CONFIRMED, 10),
        (Mode.FAIL, Confirmation.FAILED, 0),
        (Mode.SKIP, Confirmation.FAILED, 0),
        (Mode.SILENT, Confirmation.UNCONFIRMED, 0),
    ],
)
def test_confirmation_of_what_the_cloud_answered(
    kube: Cluster, inspector: KubernetesCloudInspector, mode: Mode, expected: Confirmation, applied: int
) -> None:
    kube.add_gateways()
    timeout = timedelta(seconds=2)
    with emulator(kube, lag=0.5) as ccm:  # long enough to see WAITING first
        ccm.set_mode(TARGET, mode)
        written = now()
        kube.edit(TARGET, {WEIGHT: "10"})
        first = judged(inspector, kube, written, timeout)
        assert first.status is Confirmation.WAITING  # the cloud answers after its lag
        final = answer(inspector, kube, written, timeout)
        assert final.status is expected, final.reason
        assert ccm.applied_weight(TARGET) == applied
        assert ccm.changes(TARGET) == 1
        seen = reasons(inspector.events(ref(kube)))
    assert seen[0] == "AnnotationChanged"
    if mode is Mode.SKIP:  # the hole: neither a success nor a failure of the sync
        assert seen == ["AnnotationChanged", "SkipSyncBackends"]
        assert "due to invalid backends" in final.detail
    if mode is Mode.SILENT:
        assert seen == ["AnnotationChanged"]
        assert "no EnsuredLoadBalancer" in final.reason


def test_a_failed_sync_is_retried_and_applies_the_weight_once_the_cloud_recovers(
    kube: Cluster, inspector: KubernetesCloudInspector
) -> None:
    kube.add_gateways()
    # Retries more than a second apart (the CCM's start at 5 s): Event times have whole seconds,
    # and at a tie confirmation() takes the failure.
    with emulator(kube, retry_after=1.1, max_retry_after=1.1) as ccm:
        ccm.set_mode(TARGET, Mode.FAIL)
        written = now()
        kube.edit(TARGET, {WEIGHT: "10"})
        wait_for(lambda: ccm.reconciles(TARGET) >= 2, timeout=10, what="a failed attempt and its retry")
        assert ccm.applied_weight(TARGET) == 0
        failed = [e for e in inspector.events(ref(kube)) if e.reason == "SyncLoadBalancerFailed"]
        assert len(failed) == 1 and failed[0].count >= 2  # a retry repeats the same Event
        ccm.set_mode(TARGET, Mode.SUCCEED)  # no new write: the retry succeeds
        wait_for(
            lambda: judged(inspector, kube, written, timedelta(seconds=30)).applied,
            timeout=10,
            what="the retry's EnsuredLoadBalancer",
        )
        assert ccm.applied_weight(TARGET) == 10  # the CLB changes before the Event says so
        assert ccm.changes(TARGET) == 1


def test_an_invalid_weight_fails_the_whole_sync(kube: Cluster, inspector: KubernetesCloudInspector) -> None:
    kube.add_gateways()
    with emulator(kube) as ccm:
        written = now()
        kube.edit(TARGET, {WEIGHT: "150"})
        state = answer(inspector, kube, written, timedelta(seconds=5))
        assert state.status is Confirmation.FAILED
        assert "weight must be integer in range [0,100] , got [150]" in state.detail
        assert ccm.applied_weight(TARGET) == 0


# --- backends() -----------------------------------------------------------------------------------


def test_cluster_backends_are_the_ready_nodes_the_cloud_does_not_exclude(
    kube: Cluster, inspector: KubernetesCloudInspector
) -> None:
    kube.add_gateways()
    with emulator(kube) as ccm:
        ccm.add_nodes(5)
        for labels in (
            {"node.kubernetes.io/exclude-from-external-load-balancers": ""},
            {"alpha.service-controller.kubernetes.io/exclude-balancer": "true"},
            {"service.alibabacloud.com/exclude-node": "true"},
            {"service.beta.kubernetes.io/exclude-node": "true"},
            {"node-role.kubernetes.io/master": ""},
        ):
            ccm.add_nodes(1, labels=labels)
        ccm.add_nodes(1, ready=False)
        ccm.add_nodes(1, taints=[{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}])
        ccm.add_nodes(1, unschedulable=True)  # a backend unless the Service asks otherwise
        ccm.add_nodes(2, labels={"pool": "gateways"})
        assert inspector.backends(ref(kube)) == Backends(BackendMode.CLUSTER, nodes=8)

        kube.edit(TARGET, {REMOVE_UNSCHEDULED_ANNOTATION: "on"})
        assert inspector.backends(ref(kube)) == Backends(BackendMode.CLUSTER, nodes=7)
        kube.edit(TARGET, {BACKEND_LABEL_ANNOTATION: "pool=gateways"})
        assert inspector.backends(ref(kube)) == Backends(BackendMode.CLUSTER, nodes=2)
        kube.edit(TARGET, {BACKEND_LABEL_ANNOTATION: "pool"})  # the CCM cannot parse it: its sync fails
        assert inspector.backends(ref(kube)) is None
        assert inspector.backends(ref(kube, SOURCE)) == Backends(BackendMode.CLUSTER, nodes=8)


def test_backends_are_read_again_only_once_the_cache_has_expired(kube: Cluster, grant_cloud_reads: None) -> None:
    """The running controller reuses backends and the Node list for a while (cli.BACKENDS_CACHE_SECONDS);
    a change shows once that has passed, and both gateways share one reading of the Nodes."""
    kube.add_gateways()
    seconds = [0.0]
    inspector = KubernetesCloudInspector(
        build_api_client(kube.write_kubeconfig()), backends_cache_seconds=10, clock=lambda: seconds[0]
    )
    with emulator(kube) as ccm:
        ccm.add_nodes(3)
        assert inspector.backends(ref(kube)) == Backends(BackendMode.CLUSTER, nodes=3)
        ccm.add_nodes(2)
        seconds[0] = 9.9
        assert inspector.backends(ref(kube)) == Backends(BackendMode.CLUSTER, nodes=3)  # cached
        assert inspector.backends(ref(kube, SOURCE)) == Backends(BackendMode.CLUSTER, nodes=3)  # the same Nodes
        seconds[0] = 10.0
        assert inspector.backends(ref(kube)) == Backends(BackendMode.CLUSTER, nodes=5)  # expired: read again
        kube.edit(TARGET, {BACKEND_LABEL_ANNOTATION: "pool"})
        assert inspector.backends(ref(kube)) == Backends(BackendMode.CLUSTER, nodes=5)
        seconds[0] = 20.0
        assert inspector.backends(ref(kube)) is None  # a Service edited shows too, once expired


def test_local_backends_are_ready_pods_per_backend_node(kube: Cluster, inspector: KubernetesCloudInspector) -> None:
    kube.add_gateways()
    with emulator(kube) as ccm:
        ccm.provision(TARGET, Backends(BackendMode.LOCAL, pods_per_node=(2, 1)))
        (excluded,) = ccm.add_nodes(1, labels={"service.alibabacloud.com/exclude-node": "true"})
        first = ccm.node_names()[0]
        ccm.add_endpoints(TARGET, [first], ready=False)  # not ready: no backend
        ccm.add_endpoints(TARGET, [first], terminating=True)  # on its way out
        ccm.add_endpoints(TARGET, [excluded])  # on a node the CCM leaves out
        seen = inspector.backends(ref(kube))
        assert seen is not None and seen.mode is BackendMode.LOCAL
        assert sorted(seen.pods_per_node) == [1, 2]
        assert kube.service(TARGET)["spec"]["externalTrafficPolicy"] == "Local"


def test_eni_backends_are_the_ready_pods(kube: Cluster, inspector: KubernetesCloudInspector) -> None:
    kube.add_gateways()
    with emulator(kube) as ccm:
        ccm.provision(TARGET, Backends(BackendMode.ENI, pods=3))
        ccm.add_endpoints(TARGET, [None], ready=False)
        ccm.add_endpoints(TARGET, [None], terminating=True)
        assert inspector.backends(ref(kube)) == Backends(BackendMode.ENI, pods=3) == ccm.backends(TARGET)
        wait_for(lambda: ccm.changes(TARGET) == 1, timeout=10, what="the backend-type annotation seen as a change")


def test_backends_are_unknown_without_the_permission_and_said_once(kube: Cluster) -> None:
    kube.add_gateways()
    kube.set_rules(
        [
            {"apiGroups": [""], "resources": ["services"], "verbs": ["get"]},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list"]},
        ]
    )
    kube.wait_until("list", "endpointslices", group="discovery.k8s.io")
    assert not kube.allowed("list", "nodes", namespace="")
    inspector = KubernetesCloudInspector(build_api_client(kube.write_kubeconfig()))
    with capture_logs() as logs:
        assert inspector.backends(ref(kube)) is None
        assert inspector.backends(ref(kube)) is None
    warnings = [line for line in logs if "effective share unknown" in line["event"]]
    assert len(warnings) == 1 and "list Nodes" in warnings[0]["reason"]
    assert split(10, 90, None, None).describe() == "requested 10.0%, effective unknown"


# --- facts() -------------------------------------------------------------------------------------


def test_facts_show_an_asm_gateway_canary_upgrade_behind_the_service(
    kube: Cluster, inspector: KubernetesCloudInspector
) -> None:
    kube.add_gateways()
    with emulator(kube) as ccm:
        ccm.add_endpoints(TARGET, [None, None])  # the ASM gateway's Deployment, two pods
        ccm.add_endpoints(SOURCE, [None])
        target = inspector.facts(ref(kube))
        assert target.workloads == (TARGET,) and target.ports == (80,) and target.name == f"{kube.ns}/{TARGET}"
        before = {
            item.check: item for item in preflight(target, inspector.facts(ref(kube, SOURCE)), target_workload=TARGET)
        }
        assert before["no ASM gateway canary upgrade"].ok

        ccm.add_endpoints(TARGET, [None], workload=f"{TARGET}-canary", ready=False)  # starting: counts already
        target = inspector.facts(ref(kube))
        assert target.workloads == (TARGET, f"{TARGET}-canary")
        assert target.annotations[WEIGHT] == "0"
        items = {
            item.check: item for item in preflight(target, inspector.facts(ref(kube, SOURCE)), target_workload=TARGET)
        }
        assert not items["no ASM gateway canary upgrade"].ok
        assert f"{TARGET}-canary" in items["no ASM gateway canary upgrade"].detail


@pytest.mark.parametrize(
    ("pod", "workload"),
    [
        ("istio-ingressgateway-7d9f8c6b5-x2k9p", "istio-ingressgateway"),
        ("istio-ingressgateway-asm-canary-5f7c9d8b6b-bq2zm", "istio-ingressgateway-asm-canary"),
        ("istio-ingressgateway-0", "istio-ingressgateway-0"),  # a StatefulSet's pod keeps its name
        ("node-exporter-x2k9p", "node-exporter-x2k9p"),  # a DaemonSet's: no ReplicaSet hash
    ],
)
def test_workload_of_pod(pod: str, workload: str) -> None:
    assert workload_of_pod(pod) == workload


# --- the CLB's split as the traffic sees it ---------------------------------------------------------


def test_lagged_share_returns_what_the_source_said_lag_seconds_ago() -> None:
    clock = [100.0]
    value = [0.0]
    lagged = LaggedShare(lambda: value[0], 2.0, clock=lambda: clock[0])
    value[0] = 0.2
    assert lagged() == 0.0  # sampled 0.2 now; nothing 2 s old yet: the initial value
    clock[0] = 101.5
    assert lagged() == 0.0
    clock[0] = 102.0
    value[0] = 0.5
    assert lagged() == 0.2  # what it said at 100.0
    clock[0] = 103.9
    assert lagged() == 0.2  # 101.5 said 0.2 as well
    clock[0] = 104.0
    assert lagged() == 0.5


@pytest.mark.integration
def test_traffic_follows_the_clbs_applied_weights_by_the_clouds_arithmetic(
    kube: Cluster,
    inspector: KubernetesCloudInspector,
    prometheus: str,
    traffic: TrafficExporter,
    gateways: tuple[str, str],
) -> None:
    """20 nodes, ASM 10 / Istio 90: per node 1 and 4, so the ASM gateway gets 20 %, not 10 %."""
    source_workload, target_workload = gateways
    kube.add_gateways()
    cluster = Backends(BackendMode.CLUSTER, nodes=20)
    with emulator(kube, lag=0.5) as ccm:
        ccm.provision(TARGET, cluster)
        ccm.provision(SOURCE, cluster)
        assert inspector.backends(ref(kube)) == inspector.backends(ref(kube, SOURCE)) == cluster
        lagged = LaggedShare(ccm.clb_target_share, 2.0)
        traffic.share = lagged
        kube.edit(TARGET, {WEIGHT: "10"})
        kube.edit(SOURCE, {WEIGHT: "90"})
        assert ccm.clb_target_share() == 0.0  # the annotations changed, the CLB not yet
        wait_for(lambda: (ccm.applied_weight(TARGET), ccm.applied_weight(SOURCE)) == (10, 90), timeout=10)
        assert ccm.clb_target_share() == pytest.approx(0.2)
        assert split(10, 90, cluster, cluster).effective == pytest.approx(0.2)

        def measured_near_20_percent() -> float | None:
            rate = 'sum(rate(istio_requests_total{{source_workload=~"{}"}}[3s]))'
            query = f"{rate.format(target_workload)} / {rate.format(f'{source_workload}|{target_workload}')}"
            body = requests.get(f"{prometheus}/api/v1/query", params={"query": query}, timeout=5).json()
            result = body["data"]["result"]
            share = float(result[0]["value"][1]) if result else None
            return share if share is not None and abs(share - 0.2) < 0.01 else None

        share = wait_for(
            measured_near_20_percent,
            timeout=30,
            interval=0.5,
            what="Prometheus to measure the CLB's 20 % on the ASM gateway",
        )
        assert share == pytest.approx(0.2, abs=0.01)  # not the 10 % the weights ask for
