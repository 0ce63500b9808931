"""The Kubernetes adapter through the real ``kubernetes`` client against a real kube-apiserver.

The controller's side always runs as its own ServiceAccount, bound only to the Role that
``gateway-canary rbac`` prints for the policy; the harness edits Services as an admin, standing in
for the humans and tools that share these Services.
"""

from __future__ import annotations

import json

import pytest

from controller.adapters.kube_api import build_api_client
from controller.adapters.kube_state import UNREADABLE_KEY, KubernetesStateStore
from controller.adapters.kubernetes import KubernetesGatewayPair
from controller.core.decision import Observation, initial_state
from controller.core.policy import CanaryPolicy
from controller.core.schedule import Weights
from controller.core.state import Intent, RolloutState
from controller.errors import AccessDenied, ClusterUnavailable, Conflict, ServiceNotFound, WeightChangedExternally
from controller.ports import StoredState
from tests.helpers import T0
from tests.kube_cluster import CLB, Cluster
from tests.kube_cluster import SOURCE as SRC
from tests.kube_cluster import TARGET as TGT
from tests.servers import LB_ID, STATE, VGROUP, WEIGHT, free_port


def pair_for(kube: Cluster, *policies: CanaryPolicy) -> KubernetesGatewayPair:
    """The adapter as the controller's ServiceAccount, granted exactly what the policies need."""
    kube.grant(*(policies or (kube.policy(),)))
    return KubernetesGatewayPair(build_api_client(kube.write_kubeconfig()), state_namespace=kube.ns)


def store_for(kube: Cluster) -> KubernetesStateStore:
    return KubernetesStateStore(build_api_client(kube.write_kubeconfig()), kube.ns)


def first_step(policy: CanaryPolicy) -> RolloutState:
    return initial_state(policy, Observation(0, 100), T0).evolve(
        target_weight=10, source_weight=90, pending=Intent(10, 90, 0, 100)
    )


def test_observe_reads_weights_and_accepts_a_clb_pair(kube: Cluster) -> None:
    kube.add_gateways()
    seen = pair_for(kube).observe(kube.policy())
    assert (seen.target_weight, seen.source_weight, seen.refusal, seen.legacy_state) == (0, 100, None, None)
    assert all(v.isdigit() for v in seen.versions)


@pytest.mark.parametrize(
    ("annotations", "needle"),
    [
        ({VGROUP: "rsp-abc:80"}, "lacks service.beta.kubernetes.io/alibaba-cloud-loadbalancer-id"),
        ({LB_ID: "lb-1", VGROUP: " "}, "lacks service.beta.kubernetes.io/alibaba-cloud-loadbalancer-vgroup-port"),
        ({**CLB, "service.beta.kubernetes.io/alibaba-cloud-loadbalancer-ignore-weight-update": "on"}, "switched off"),
        ({**CLB, WEIGHT: "12.5"}, "not an integer in [0,100]"),
        (CLB, 'gives it 100 per backend, already a large share; set it to "0"'),
    ],
)
def test_refuses_services_the_cloud_controller_would_not_weight(
    kube: Cluster, annotations: dict[str, str], needle: str
) -> None:
    kube.add_service(TGT, annotations)
    kube.add_service(SRC, {**CLB, WEIGHT: "100"})
    seen = pair_for(kube).observe(kube.policy())
    assert seen.refusal is not None and needle in seen.refusal


def test_merge_patch_touches_only_the_weight(kube: Cluster) -> None:
    kube.add_gateways(labels={"app": "gw", "team": "edge"}, finalizers=["keep.me/finalizer"])
    kube.edit(TGT, {"team.example.com/owner": "platform"})
    before = kube.service(TGT)
    policy = kube.policy()
    pair = pair_for(kube, policy)
    pair.write_weights(policy, pair.observe(policy), Weights(10, 90))

    after = kube.service(TGT)
    assert after["metadata"]["annotations"][WEIGHT] == "10"
    assert STATE not in after["metadata"]["annotations"]
    # everything written by others survives: annotations, labels, finalizers, the spec
    assert after["metadata"]["annotations"]["team.example.com/owner"] == "platform"
    assert after["metadata"]["annotations"][LB_ID] == "lb-test"
    assert after["metadata"]["labels"] == {"app": "gw", "team": "edge"}
    assert after["metadata"]["finalizers"] == ["keep.me/finalizer"]
    assert after["spec"] == before["spec"]
    assert kube.annotations(SRC)[WEIGHT] == "90"
    # what went over the wire, from the API server's audit log
    patches = kube.patches
    assert [name for name, _ in patches] == [TGT, SRC]
    for _, patch in patches:
        assert set(patch) == {"metadata"}
        assert set(patch["metadata"]) == {"resourceVersion", "annotations"}
        assert set(patch["metadata"]["annotations"]) == {WEIGHT}
    # unchanged weights: no write at all
    pair.write_weights(policy, pair.observe(policy), Weights(10, 90))
    assert len(kube.patches) == len(patches)


def test_conflict_from_an_unrelated_change_is_retried(kube: Cluster) -> None:
    kube.add_gateways()
    policy = kube.policy()
    pair = pair_for(kube, policy)
    seen = pair.observe(policy)
    kube.edit(TGT, {"someone.else/annotation": "x"})  # makes the version the controller read stale
    pair.write_weights(policy, seen, Weights(10, 90))
    assert kube.annotations(TGT)[WEIGHT] == "10"
    assert kube.annotations(TGT)["someone.else/annotation"] == "x"
    codes = [w.code for w in kube.controller_writes() if w.name == TGT and w.verb == "patch"]
    assert codes == [409, 200]  # the real API server refused the stale version once


def test_conflict_from_a_weight_change_is_reported_not_overwritten(kube: Cluster) -> None:
    kube.add_gateways()
    policy = kube.policy()
    pair = pair_for(kube, policy)
    seen = pair.observe(policy)
    kube.edit(TGT, {WEIGHT: "30"})  # a human
    with pytest.raises(WeightChangedExternally, match="from 0 to 30"):
        pair.write_weights(policy, seen, Weights(10, 90))
    assert kube.annotations(TGT)[WEIGHT] == "30"
    assert kube.annotations(SRC)[WEIGHT] == "100"  # nothing half-written
    # a rollback wins regardless
    pair.write_weights(policy, seen, Weights(0, 100), force=True)
    assert kube.annotations(TGT)[WEIGHT] == "0"


def test_events_are_recorded_on_the_target_and_read_back(kube: Cluster) -> None:
    kube.add_gateways()
    policy = kube.policy()
    pair = pair_for(kube, policy)
    pair.observe(policy)
    pair.record_event(policy, "RolledBack", "rolled back", warning=True)
    event = kube.events[-1]
    assert event["involvedObject"]["name"] == TGT
    assert event["involvedObject"]["uid"] == kube.service(TGT)["metadata"]["uid"]
    assert (event["type"], event["reason"], event["source"]["component"]) == ("Warning", "RolledBack", "gateway-canary")


def test_errors_are_translated(kube: Cluster) -> None:
    policy = kube.policy()
    pair = pair_for(kube, policy)
    with pytest.raises(ServiceNotFound):  # granted by name, not created yet
        pair.observe(policy)
    kube.add_gateways()
    kube.revoke(policy)
    with pytest.raises(AccessDenied, match=r"forbidden.*grant what `gateway-canary rbac` prints"):
        pair.observe(policy)
    dead = kube.workdir / "dead"
    dead.write_text(kube.kubeconfig().replace(kube.plane.url, f"https://127.0.0.1:{free_port()}"))
    with pytest.raises(ClusterUnavailable, match="unreachable"):
        KubernetesGatewayPair(build_api_client(dead)).observe(policy)
    wrong = kube.workdir / "wrong-token"
    wrong.write_text(kube.plane.kubeconfig("not-a-valid-token", "nobody"))
    with pytest.raises(AccessDenied, match="401"):
        KubernetesGatewayPair(build_api_client(wrong)).observe(policy)


def test_a_service_outside_the_grant_is_refused_before_any_write(kube: Cluster) -> None:
    kube.add_gateways()
    kube.add_service("other-gw", {**CLB, WEIGHT: "100"})
    granted = kube.policy()
    pair = pair_for(kube, granted)
    outside = kube.policy(source="other-gw")
    with pytest.raises(AccessDenied, match=f'services "other-gw" is forbidden.*{kube.ns}'):
        pair.observe(outside)
    assert kube.patches == []


def test_read_but_not_patch_is_refused_naming_what_is_missing(kube: Cluster) -> None:
    """A Role that may read both Services but patch only one would fail halfway: refused up front."""
    kube.add_gateways()
    policy = kube.policy()
    kube.set_rules(
        [
            {"apiGroups": [""], "resources": ["services"], "resourceNames": [TGT, SRC], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["services"], "resourceNames": [TGT], "verbs": ["patch"]},
        ]
    )
    pair = KubernetesGatewayPair(build_api_client(kube.write_kubeconfig()), state_namespace=kube.ns)
    seen = pair.observe(policy)
    assert seen.refusal is not None
    assert f"may not patch services/{SRC} in namespace {kube.ns}" in seen.refusal
    assert "nothing was written" in seen.refusal and "gateway-canary rbac" in seen.refusal
    # the dry run needs reading only
    assert (
        KubernetesGatewayPair(
            build_api_client(kube.write_kubeconfig()), state_namespace=kube.ns, check_write_access=False
        )
        .observe(policy)
        .refusal
        is None
    )


def test_the_access_review_covers_the_state_object(kube: Cluster) -> None:
    """A Role from before the state moved (Services only) refuses the first raise, naming the ConfigMap."""
    kube.add_gateways()
    policy = kube.policy()
    kube.set_rules(
        [{"apiGroups": [""], "resources": ["services"], "resourceNames": [TGT, SRC], "verbs": ["get", "patch"]}]
    )
    seen = KubernetesGatewayPair(build_api_client(kube.write_kubeconfig()), state_namespace=kube.ns).observe(policy)
    assert seen.refusal is not None
    assert seen.refusal.startswith("the controller's identity may not ")
    assert f"get configmaps/gateway-canary-shop in namespace {kube.ns}" in seen.refusal
    assert f"create configmaps in namespace {kube.ns}" in seen.refusal
    # and what the cloud checks read (0.2 had none of it): the CCM's Events, the Istio Gateways
    assert f"list events in namespace {kube.ns}" in seen.refusal
    assert "list gateways.networking.istio.io cluster-wide" in seen.refusal


def test_state_store_round_trip_versions_and_labels(kube: Cluster) -> None:
    policy = kube.policy()
    kube.grant(policy)
    store = store_for(kube)
    assert store.load(policy) == StoredState(state=None)
    state = first_step(policy)
    saved = store.save(policy, state, store.load(policy))
    loaded = store.load(policy)
    assert loaded.state == state and loaded.version == saved.version and loaded.error is None
    body = kube.plane.call("GET", f"/api/v1/namespaces/{kube.ns}/configmaps/gateway-canary-shop")
    assert body["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "gateway-canary"
    assert body["metadata"]["labels"]["gateway-canary.io/policy"] == "shop"
    # a save against a version that moved is a Conflict, and nothing is overwritten
    store.save(policy, state.evolve(reason="newer"), loaded)
    with pytest.raises(Conflict):
        store.save(policy, state.evolve(reason="stale"), loaded)
    assert kube.state()["reason"] == "newer"
    # creating what exists is a Conflict too (two controllers starting the same policy)
    with pytest.raises(Conflict):
        store.save(policy, state, StoredState(state=None))
    assert {w.verb for w in kube.controller_writes() if w.resource == "configmaps"} == {"create", "patch"}


def test_state_store_reports_garbage_and_keeps_it_for_an_operator(kube: Cluster) -> None:
    policy = kube.policy()
    kube.grant(policy)
    garbage = '{"v": 2, "policy": "shop", "target_weight": Infinity}'
    kube.plane.call(
        "POST",
        f"/api/v1/namespaces/{kube.ns}/configmaps",
        {"metadata": {"name": "gateway-canary-shop"}, "data": {"state": garbage}},
    )
    store = store_for(kube)
    loaded = store.load(policy)
    assert loaded.state is None and loaded.error is not None and "Infinity" in loaded.error
    store.save(policy, first_step(policy), loaded)
    body = kube.plane.call("GET", f"/api/v1/namespaces/{kube.ns}/configmaps/gateway-canary-shop")
    assert body["data"][UNREADABLE_KEY] == garbage
    assert json.loads(body["data"]["state"])["target_weight"] == 10


def test_the_adapters_load_no_generated_api_class_nor_model() -> None:
    """Every adapter, built as ``gateway-canary run`` builds them, in a fresh interpreter: not one of
    the client's generated API classes nor its models is imported (``kube_rest`` sends the requests;
    ``CoreV1Api`` alone would load some 270 pydantic models: +21 MiB resident, +0.3 s at start)."""
    import subprocess
    import sys

    program = """
import sys
from kubernetes.client import ApiClient, Configuration
from controller.adapters.cloud import KubernetesCloudInspector
from controller.adapters.istio_routes import KubernetesIstioRoutes
from controller.adapters.kube_lease import KubernetesLeaseStore
from controller.adapters.kube_state import KubernetesStateStore
from controller.adapters.kubernetes import KubernetesGatewayPair
from controller.adapters.operator import KubernetesOperator
api = ApiClient(Configuration(host="https://127.0.0.1:1"))
KubernetesGatewayPair(api), KubernetesStateStore(api, "ns"), KubernetesCloudInspector(api)
KubernetesIstioRoutes(api, ApiClient(Configuration(host="https://127.0.0.1:2"))), KubernetesOperator(api, "ns")
KubernetesLeaseStore(api, "ns", "lease", timeout_seconds=1.0)
print([name for name in sys.modules if name.startswith(("kubernetes.client.api.", "kubernetes.client.models."))])
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
