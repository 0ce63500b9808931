"""The ASM gateway declared as an IstioGateway: where its weight lives, and the whole path.

The first half is the pure rule (``controller.core.istio_gateway``): which value reaches the
data-plane cluster and where a write must go. The second half runs the real adapter, and the
PolicyRunner, as the controller's ServiceAccount against the real kube-apiserver, with the
IstioGateway CRD installed from ``tests/fixtures/istiogateway-crd.yaml`` (written from ASM's Go
types: no public CRD exists) and ASM's reconciler stood in for by ``tests.asm_emulator`` (ASM
cannot run here): the controller patches the IstioGateway, the emulator copies the annotations
onto the Service the CLB follows, and the simulated traffic follows that Service.

The audit log of the test control plane records writes to Services, Events and ConfigMaps only,
so writes to the IstioGateway are seen in the object itself (its spec and resourceVersion) and in
what the emulator copied from it.
"""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controller.adapters.cloud import KubernetesCloudInspector
from controller.adapters.kube_api import build_api_client
from controller.adapters.kube_state import KubernetesStateStore
from controller.adapters.kubernetes import KubernetesGatewayPair
from controller.core.cloud import BackendMode, Backends
from controller.core.enums import AlertKind, GatewayRole, Phase
from controller.core.istio_gateway import (
    ISTIO_GATEWAY_GROUP,
    IstioGatewayWeight,
    annotations_path,
    effective_weight,
)
from controller.core.policy import CanaryPolicy
from controller.core.schedule import Weights
from controller.demo import SimulatedGateways
from controller.errors import AccessDenied, ClusterError, ServiceNotFound, WeightChangedExternally
from controller.runtime.cloud_watch import CloudWatch
from tests.asm_emulator import AsmEmulator
from tests.ccm_emulator import CcmEmulator
from tests.helpers import RecordingNotifier, make_policy, runner_for
from tests.kube_cluster import CLB, CLB_READY, Cluster
from tests.kube_cluster import SOURCE as SRC
from tests.kube_cluster import TARGET as TGT
from tests.servers import WEIGHT, wait_for

GATEWAY = "ingressgateway-asm"  # ASM names its Service istio-<gateway>: TGT
HERE, ELSEWHERE = "c-dataplane", "c-other"


def istio_gateway(spec: dict[str, Any], status: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": f"{ISTIO_GATEWAY_GROUP}/v1beta1",
        "kind": "IstioGateway",
        "metadata": {"namespace": "istio-system", "name": GATEWAY},
        "spec": spec,
    }
    if status is not None:
        body["status"] = status
    return body


def weighted(weight: str, **more: str) -> dict[str, Any]:
    return {"serviceAnnotations": {WEIGHT: weight, **more}}


# -- the pure rule ---------------------------------------------------------------------------------


def test_the_top_level_value_without_overrides() -> None:
    found = effective_weight(istio_gateway({**weighted("10"), "serviceType": "LoadBalancer"}))
    assert (found.weight, found.locations, found.conflict, found.error_message) == (10, (None,), None, None)
    assert found.patch(25, "42") == {
        "metadata": {"resourceVersion": "42"},
        "spec": {"serviceAnnotations": {WEIGHT: "25"}},
    }
    assert found.where == f'spec.serviceAnnotations["{WEIGHT}"]'


def test_the_clusters_override_wins_when_it_has_the_key() -> None:
    found = effective_weight(
        istio_gateway({**weighted("100"), "overrides": {HERE: weighted("5"), ELSEWHERE: weighted("70")}}), HERE
    )
    assert (found.weight, found.locations, found.conflict) == (5, (HERE,), None)
    assert found.patch(10) == {"spec": {"overrides": {HERE: {"serviceAnnotations": {WEIGHT: "10"}}}}}
    assert HERE in found.where and "overrides" in found.where


def test_an_override_without_the_key_leaves_the_top_level_value_in_force() -> None:
    spec = {**weighted("20"), "overrides": {HERE: {"serviceAnnotations": {"team.example.com/x": "y"}}}}
    found = effective_weight(istio_gateway(spec), HERE)
    assert (found.weight, found.locations, found.conflict) == (20, (None,), None)


def test_overrides_for_other_clusters_only_and_no_top_level_value_is_a_conflict() -> None:
    found = effective_weight(istio_gateway({"overrides": {ELSEWHERE: weighted("0")}}), HERE)
    assert found.weight is None and found.conflict is not None
    assert f"IstioGateway istio-system/{GATEWAY}" in found.conflict  # the object
    assert f"spec.serviceAnnotations has no {WEIGHT}" in found.conflict and ELSEWHERE in found.conflict  # the paths
    assert "target.istioGateway.clusterId" in found.conflict and 'to "0"' in found.conflict  # the fixes


def test_disagreeing_overrides_without_a_cluster_id_are_a_conflict() -> None:
    spec = {**weighted("0"), "overrides": {HERE: weighted("10"), ELSEWHERE: weighted("30")}}
    found = effective_weight(istio_gateway(spec))
    assert found.weight is None and found.conflict is not None
    assert f"IstioGateway istio-system/{GATEWAY}" in found.conflict
    assert annotations_path(HERE) in found.conflict and annotations_path(ELSEWHERE) in found.conflict
    assert WEIGHT in found.conflict and "set target.istioGateway.clusterId" in found.conflict
    assert len(found.conflict) < 600  # stored bounded: a longer one would not compare equal, and re-alert
    # were a rollback to come, it would cut every place that could reach the cluster
    assert found.locations == (None, HERE, ELSEWHERE)  # sorted: c-dataplane, c-other


def test_overrides_equal_to_the_top_level_value_are_written_with_it() -> None:
    spec = {**weighted("10"), "overrides": {HERE: weighted(" 10"), ELSEWHERE: {"replicaCount": 3}}}
    found = effective_weight(istio_gateway(spec))
    assert (found.weight, found.conflict, found.locations) == (10, None, (None, HERE))
    assert found.patch(25)["spec"] == {
        "serviceAnnotations": {WEIGHT: "25"},
        "overrides": {HERE: {"serviceAnnotations": {WEIGHT: "25"}}},
    }


def test_the_only_declared_cluster_is_the_data_planes() -> None:
    spec = {**weighted("100"), "clusterIds": [HERE], "overrides": {HERE: weighted("5")}}
    found = effective_weight(istio_gateway(spec))
    assert (found.weight, found.locations, found.conflict) == (5, (HERE,), None)


def test_a_cluster_id_the_gateway_is_not_deployed_to_is_a_conflict() -> None:
    found = effective_weight(istio_gateway({**weighted("0"), "clusterIds": [ELSEWHERE]}), HERE)
    assert found.conflict is not None and "not in spec.clusterIds" in found.conflict and HERE in found.conflict


def test_a_weight_the_cloud_controller_rejects_is_a_conflict_naming_its_path() -> None:
    found = effective_weight(istio_gateway({"overrides": {HERE: weighted("12.5")}}), HERE)
    assert found.weight is None and found.conflict is not None
    assert annotations_path(HERE) in found.conflict and "not an integer in [0,100]" in found.conflict


def test_no_weight_anywhere_is_no_weight_not_a_conflict() -> None:
    found = effective_weight(istio_gateway({"serviceType": "LoadBalancer", "overrides": {HERE: {}}}), HERE)
    assert (found.weight, found.conflict, found.locations) == (None, None, (HERE,))


def test_asms_error_message_is_reported() -> None:
    status = {"Status": "Failed", "ErrorMessage": "listener port 80 not in vgroup"}
    found = effective_weight(istio_gateway(weighted("0"), status))
    assert found.error_message == "listener port 80 not in vgroup"
    assert (
        effective_weight(istio_gateway(weighted("0"), {"Status": "Running", "ErrorMessage": ""})).error_message is None
    )


def test_the_value_is_frozen() -> None:
    found = effective_weight(istio_gateway(weighted("0")))
    assert isinstance(found, IstioGatewayWeight)
    with pytest.raises(AttributeError):
        found.weight = 5  # type: ignore[misc]


# -- against the real API server ---------------------------------------------------------------------


def gateway_path(kube: Cluster, version: str = "v1beta1") -> str:
    return f"/apis/{ISTIO_GATEWAY_GROUP}/{version}/namespaces/{kube.ns}/istiogateways/{GATEWAY}"


def add_istio_gateway(kube: Cluster, spec: dict[str, Any]) -> dict[str, Any]:
    body = istio_gateway({"gatewayType": "ingress", "serviceType": "LoadBalancer", **spec})
    body["metadata"]["namespace"] = kube.ns
    return kube.plane.call("POST", gateway_path(kube).rsplit("/", 1)[0], body)


def read_istio_gateway(kube: Cluster) -> dict[str, Any]:
    return kube.plane.call("GET", gateway_path(kube))


def top_weight(kube: Cluster) -> str | None:
    return (read_istio_gateway(kube)["spec"].get("serviceAnnotations") or {}).get(WEIGHT)


def asm_policy(kube: Cluster, cluster_id: str | None = None, steps: list[int] | None = None) -> CanaryPolicy:
    reference: dict[str, Any] = {"namespace": kube.ns, "name": GATEWAY}
    if cluster_id is not None:
        reference["clusterId"] = cluster_id
    return make_policy(
        "shop",
        source={"service": f"{kube.ns}/{SRC}"},
        target={"service": f"{kube.ns}/{TGT}", "istioGateway": reference},
        schedule={"steps": steps or [10, 100], "bakeTime": 0},
        analysis={"failureThreshold": 1},
    )


def grant(kube: Cluster, policy: CanaryPolicy) -> None:
    """Exactly what ``gateway-canary rbac`` prints for the policy (the test plane is also the ASM one)."""
    kube.grant(policy)
    wait_until_gateway_allowed(kube, "patch", allowed=True)


def wait_until_gateway_allowed(kube: Cluster, verb: str, *, allowed: bool) -> None:
    kube.wait_until(verb, "istiogateways", allowed=allowed, name=GATEWAY, group=ISTIO_GATEWAY_GROUP)


def as_controller(kube: Cluster) -> KubernetesGatewayPair:
    """The adapter as the controller's ServiceAccount, with a client of its own for the ASM plane."""
    config = kube.write_kubeconfig()
    return KubernetesGatewayPair(build_api_client(config), asm_client=build_api_client(config), state_namespace=kube.ns)


def set_up(
    kube: Cluster, spec: dict[str, Any], *, cluster_id: str | None = None, steps: list[int] | None = None
) -> CanaryPolicy:
    """The IstioGateway, the data-plane Service it generates (in sync), the old gateway's Service, the grant."""
    add_istio_gateway(kube, spec)
    kube.add_service(TGT, {**CLB, **_effective(spec, cluster_id)})
    kube.add_service(SRC, {**CLB, WEIGHT: "100"})
    policy = asm_policy(kube, cluster_id, steps)
    grant(kube, policy)
    return policy


def _effective(spec: dict[str, Any], cluster_id: str | None) -> dict[str, str]:
    annotations = dict(spec.get("serviceAnnotations") or {})
    annotations.update(((spec.get("overrides") or {}).get(cluster_id) or {}).get("serviceAnnotations") or {})
    return annotations


class TrafficFollowsTheServices:
    """The simulated gateways' split follows the Services' weights, as the CLB does: not the IstioGateway."""

    def __init__(self, kube: Cluster) -> None:
        self.kube = kube

    @property
    def target_weight(self) -> int:
        return int(self.kube.annotations(TGT).get(WEIGHT, "100"))

    @property
    def source_weight(self) -> int:
        return int(self.kube.annotations(SRC).get(WEIGHT, "100"))


def runner(kube: Cluster, policy: CanaryPolicy, traffic: SimulatedGateways) -> Any:
    store = KubernetesStateStore(build_api_client(kube.write_kubeconfig()), kube.ns)
    return runner_for(policy, pair=as_controller(kube), store=store, metrics=traffic)


def healthy(kube: Cluster) -> SimulatedGateways:
    return SimulatedGateways(TrafficFollowsTheServices(kube))  # type: ignore[arg-type]


def service_writes(kube: Cluster) -> list[Any]:
    return [w for w in kube.controller_writes() if w.resource == "services"]


def test_the_controller_raises_the_weight_in_the_istio_gateway_and_asm_copies_it_onto_the_service(
    kube: Cluster, istio_gateway_crd: None
) -> None:
    policy = set_up(kube, weighted("0"))
    with AsmEmulator(kube.plane, kube.ns, lag=0.2) as asm:
        policy_runner = runner(kube, policy, healthy(kube))
        phases = []
        for _ in range(6):
            outcome = policy_runner.tick()
            assert outcome.error is None, outcome.error
            assert outcome.decision is not None
            phases.append(outcome.decision.state.phase)
            asm.wait_synced()  # ASM's lag: the CLB (and so the traffic) follows the Service, not the object
            if phases[-1] is Phase.PROMOTED:
                break
        seen = as_controller(kube).observe(policy)
    assert not asm.running  # stopped and joined on exit: no thread outlives the test
    assert phases[-1] is Phase.PROMOTED
    assert top_weight(kube) == "100" and kube.annotations(TGT)[WEIGHT] == "100"
    # the IstioGateway's values, as ASM copied them onto the Service, step by step
    assert [patch[WEIGHT] for _, service, patch in asm.applied if service == TGT] == ["10", "100"]
    # the controller never wrote the data-plane Service; the old gateway's Service it did
    assert [name for name, _ in kube.patches] == [SRC, SRC]
    assert kube.weight_writes(SRC, WEIGHT) == ["90", "0"]
    assert (seen.target_kind, seen.target_weight, seen.target_service_weight, seen.asm_error) == (
        "IstioGateway",
        100,
        100,
        None,
    )
    assert seen.versions[0] == read_istio_gateway(kube)["metadata"]["resourceVersion"]
    assert next(e["reason"] for e in kube.events) == "Started"  # Events stay on the data-plane Service
    assert {e["involvedObject"]["name"] for e in kube.events} == {TGT}


def test_asm_overwrites_a_direct_edit_of_the_services_weight(kube: Cluster, istio_gateway_crd: None) -> None:
    policy = set_up(kube, weighted("10", **{"team.example.com/owner": "edge"}))
    pair = as_controller(kube)
    with AsmEmulator(kube.plane, kube.ns) as asm:
        asm.wait_synced()
        with asm.stopped():  # an ASM that has not reconciled yet: the edit shows, the object is unchanged
            kube.edit(TGT, {WEIGHT: "50"})
            seen = pair.observe(policy)
            assert (seen.target_weight, seen.target_service_weight) == (10, 50)
        wait_for(lambda: kube.annotations(TGT)[WEIGHT] == "10", timeout=10, what="ASM to overwrite the edit")
        assert pair.observe(policy).target_service_weight == 10
    assert (TGT, {WEIGHT: "10"}) in [(service, patch) for _, service, patch in asm.applied]
    assert kube.annotations(TGT)["team.example.com/owner"] == "edge"
    assert service_writes(kube) == []


def test_an_override_for_the_cluster_is_patched_where_it_shadows_the_top_level_value(
    kube: Cluster, istio_gateway_crd: None
) -> None:
    overrides = {
        HERE: {"replicaCount": 2, **weighted("0", **{"team.example.com/x": "kept"})},
        ELSEWHERE: weighted("100"),
    }
    policy = set_up(kube, {**weighted("100"), "overrides": overrides}, cluster_id=HERE)
    assert kube.annotations(TGT)[WEIGHT] == "0"  # the override is what reaches this cluster
    with AsmEmulator(kube.plane, kube.ns, cluster_id=HERE) as asm:
        outcome = runner(kube, policy, healthy(kube)).tick()
        assert outcome.error is None and outcome.decision is not None and outcome.decision.weights is not None
        asm.wait_synced()
    spec = read_istio_gateway(kube)["spec"]
    assert spec["overrides"][HERE]["serviceAnnotations"] == {WEIGHT: "10", "team.example.com/x": "kept"}
    assert spec["overrides"][HERE]["replicaCount"] == 2
    assert spec["overrides"][ELSEWHERE] == weighted("100")  # another cluster's gateway is not touched
    assert spec["serviceAnnotations"] == {WEIGHT: "100"}
    assert kube.annotations(TGT)[WEIGHT] == "10" and kube.annotations(SRC)[WEIGHT] == "90"


def test_an_unresolvable_location_refuses_with_its_reason_and_writes_nothing(
    kube: Cluster, istio_gateway_crd: None
) -> None:
    policy = set_up(kube, {"overrides": {ELSEWHERE: weighted("0")}}, cluster_id=HERE)
    kube.edit(TGT, {WEIGHT: "0"})  # whatever the Service shows, the controller cannot tell where to write
    with AsmEmulator(kube.plane, kube.ns, cluster_id=HERE) as asm:
        asm.wait_synced()  # its status written: from here on only the controller could change the object
        before = read_istio_gateway(kube)
        policy_runner = runner(kube, policy, healthy(kube))
        outcomes = [policy_runner.tick() for _ in range(3)]
    for outcome in outcomes:
        assert outcome.decision is not None and outcome.decision.weights is None
    refusal = outcomes[-1].decision.state.refusal if outcomes[-1].decision else None
    assert refusal is not None
    assert f"IstioGateway {kube.ns}/{GATEWAY}" in refusal and f"spec.serviceAnnotations has no {WEIGHT}" in refusal
    assert "target.istioGateway.clusterId" in refusal
    refused = [e for e in kube.events if e["reason"] == "PolicyRefused"]
    assert len(refused) == 1 and ELSEWHERE in refused[0]["message"]
    assert service_writes(kube) == []  # from the audit log: no Service write at all
    after = read_istio_gateway(kube)
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"] and after == before
    assert asm.applied == []


def test_a_rollback_patches_the_istio_gateway_to_zero(kube: Cluster, istio_gateway_crd: None) -> None:
    policy = set_up(kube, weighted("0"), steps=[10, 50, 100])
    traffic = healthy(kube)
    with AsmEmulator(kube.plane, kube.ns, lag=0.2) as asm:
        policy_runner = runner(kube, policy, traffic)
        assert policy_runner.tick().decision is not None  # Start: 10/90
        asm.wait_synced()
        assert (top_weight(kube), kube.annotations(TGT)[WEIGHT]) == ("10", "10")
        traffic.error_ratio[GatewayRole.TARGET] = 0.5
        outcome = policy_runner.tick()
        assert outcome.decision is not None and outcome.decision.state.phase is Phase.ROLLED_BACK
        assert top_weight(kube) == "0"  # written at once; ASM follows
        asm.wait_synced()
    assert (kube.annotations(TGT)[WEIGHT], kube.annotations(SRC)[WEIGHT]) == ("0", "100")
    assert [patch[WEIGHT] for _, service, patch in asm.applied if service == TGT] == ["10", "0"]
    assert kube.state() is not None and kube.state()["phase"] == "RolledBack"  # type: ignore[index]
    assert TGT not in [name for name, _ in kube.patches]


def test_asm_reporting_an_error_holds_the_raise(kube: Cluster, istio_gateway_crd: None) -> None:
    policy = set_up(kube, weighted("0"))
    with AsmEmulator(kube.plane, kube.ns) as asm:
        asm.fail_with("port 80 is not in the vServer group")
        wait_for(
            lambda: (read_istio_gateway(kube).get("status") or {}).get("ErrorMessage"),
            timeout=10,
            what="the emulated ASM to report its error",
        )
        seen = as_controller(kube).observe(policy)
        assert seen.asm_error == "port 80 is not in the vServer group"
        assert seen.refusal is not None and "status.ErrorMessage" in seen.refusal
        outcome = runner(kube, policy, healthy(kube)).tick()
        assert outcome.decision is not None and outcome.decision.weights is None
        asm.fail_with(None)
        wait_for(lambda: as_controller(kube).observe(policy).refusal is None, timeout=10, what="ASM to recover")
    assert top_weight(kube) == "0" and service_writes(kube) == []


def test_a_write_conflict_is_retried_unless_the_weight_itself_moved(kube: Cluster, istio_gateway_crd: None) -> None:
    policy = set_up(kube, weighted("0"))
    pair = as_controller(kube)
    seen = pair.observe(policy)
    kube.plane.call("PATCH", gateway_path(kube), {"spec": {"replicaCount": 3}})  # unrelated: the version is stale
    pair.write_weights(policy, seen, Weights(10, 90))
    gateway = read_istio_gateway(kube)
    assert gateway["spec"]["serviceAnnotations"][WEIGHT] == "10" and gateway["spec"]["replicaCount"] == 3

    seen = pair.observe(policy)
    kube.plane.call("PATCH", gateway_path(kube), {"spec": {"serviceAnnotations": {WEIGHT: "30"}}})  # a human
    with pytest.raises(WeightChangedExternally, match=f"IstioGateway {kube.ns}/{GATEWAY}"):
        pair.write_weights(policy, seen, Weights(50, 50))
    assert top_weight(kube) == "30" and kube.annotations(SRC)[WEIGHT] == "90"  # neither side written
    pair.write_weights(policy, seen, Weights(0, 100), force=True)  # a rollback always wins
    assert top_weight(kube) == "0" and kube.annotations(SRC)[WEIGHT] == "100"


def test_an_override_added_after_the_read_receives_the_write(kube: Cluster, istio_gateway_crd: None) -> None:
    policy = set_up(kube, weighted("0"), cluster_id=HERE)
    pair = as_controller(kube)
    seen = pair.observe(policy)
    overrides = {"overrides": {HERE: weighted("0")}}  # same value: not a weight change, but a new place
    kube.plane.call("PATCH", gateway_path(kube), {"spec": overrides})
    pair.write_weights(policy, seen, Weights(10, 90))
    spec = read_istio_gateway(kube)["spec"]
    assert spec["overrides"][HERE]["serviceAnnotations"][WEIGHT] == "10"  # where it now reaches the cluster
    assert spec["serviceAnnotations"][WEIGHT] == "0"


def test_a_plain_write_into_an_unresolvable_location_is_refused(kube: Cluster, istio_gateway_crd: None) -> None:
    disagreeing = {**weighted("0"), "overrides": {HERE: weighted("5"), ELSEWHERE: weighted("7")}}
    policy = set_up(kube, disagreeing)
    pair = as_controller(kube)
    seen = pair.observe(policy)
    assert seen.target_weight is None and seen.refusal is not None and "names no clusterId" in seen.refusal
    with pytest.raises(ClusterError, match=r"not written: .*names no clusterId") as raised:
        pair.write_weights(policy, seen, Weights(10, 90))
    assert type(raised.value) is ClusterError
    assert read_istio_gateway(kube)["spec"] == {"gatewayType": "ingress", "serviceType": "LoadBalancer", **disagreeing}
    assert kube.annotations(SRC)[WEIGHT] == "100"  # the target failed first: the source is not written either
    pair.write_weights(policy, seen, Weights(0, 100), force=True)  # a rollback: 0 wherever it could come from
    spec = read_istio_gateway(kube)["spec"]
    assert spec["serviceAnnotations"][WEIGHT] == "0"
    assert [spec["overrides"][c]["serviceAnnotations"][WEIGHT] for c in (HERE, ELSEWHERE)] == ["0", "0"]


def test_a_location_made_unresolvable_during_the_write_is_a_change_by_someone_else(
    kube: Cluster, istio_gateway_crd: None
) -> None:
    policy = set_up(kube, weighted("0"))
    pair = as_controller(kube)
    seen = pair.observe(policy)
    assert seen.refusal is None
    kube.plane.call(
        "PATCH", gateway_path(kube), {"spec": {"overrides": {HERE: weighted("5"), ELSEWHERE: weighted("7")}}}
    )
    with pytest.raises(WeightChangedExternally, match=r"not written: .*names no clusterId"):
        pair.write_weights(policy, seen, Weights(10, 90))
    assert top_weight(kube) == "0"


class OnlyV1:
    """The real CustomObjectsApi of an ASM plane that serves IstioGateways on v1 only (as the Go types)."""

    def __init__(self, inner: client.CustomObjectsApi) -> None:
        self.inner = inner
        self.asked: list[str] = []

    def __getattr__(self, name: str) -> Any:
        call = getattr(self.inner, name)

        def only_v1(group: str, version: str, *args: Any, **kwargs: Any) -> Any:
            self.asked.append(version)
            if version != "v1":
                raise ApiException(status=404, reason="Not Found")
            return call(group, version, *args, **kwargs)

        return only_v1


def test_an_asm_plane_serving_v1_only_is_read_and_patched_on_v1(kube: Cluster, istio_gateway_crd: None) -> None:
    policy = set_up(kube, weighted("0"))
    pair = as_controller(kube)
    only_v1 = OnlyV1(pair._custom)
    pair._custom = only_v1  # type: ignore[assignment]
    seen = pair.observe(policy)
    assert seen.target_weight == 0 and only_v1.asked == ["v1beta1", "v1"]
    pair.write_weights(policy, seen, Weights(10, 90))
    assert top_weight(kube) == "10" and only_v1.asked[2:] == ["v1"]  # remembered: no second try


def test_library_errors_become_ours(kube: Cluster, istio_gateway_crd: None) -> None:
    kube.add_service(TGT, {**CLB, WEIGHT: "0"})
    kube.add_service(SRC, {**CLB, WEIGHT: "100"})
    policy = asm_policy(kube)
    grant(kube, policy)
    with pytest.raises(ServiceNotFound, match=f"IstioGateway {kube.ns}/{GATEWAY}"):
        as_controller(kube).observe(policy)  # no such object
    add_istio_gateway(kube, weighted("0"))
    kube.set_rules(  # a Role from before the IstioGateway: the Services and the state only
        [{"apiGroups": [""], "resources": ["services"], "resourceNames": [TGT, SRC], "verbs": ["get"]}]
    )
    kube.plane.call(  # and no ASM Role
        "DELETE", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{kube.ns}/roles/gateway-canary-asm", ok=(200, 404)
    )
    wait_until_gateway_allowed(kube, "get", allowed=False)
    with pytest.raises(AccessDenied, match="403"):
        as_controller(kube).observe(policy)


def test_a_policy_without_an_istio_gateway_keeps_the_service_path(kube: Cluster) -> None:
    kube.add_gateways()
    policy = kube.policy()
    kube.grant(policy)
    pair = KubernetesGatewayPair(build_api_client(kube.write_kubeconfig()), state_namespace=kube.ns)
    seen = pair.observe(policy)
    assert (seen.target_kind, seen.target_weight, seen.target_service_weight, seen.asm_error) == (
        "Service",
        0,
        None,
        None,
    )
    pair.write_weights(policy, seen, Weights(10, 90))
    assert kube.weight_writes(TGT, WEIGHT) == ["10"]


# -- with the cloud's confirmation (R8): ASM must copy the weight, then the CCM must apply it --------------


def test_an_istio_gateway_write_counts_only_once_asm_copied_it_and_the_cloud_confirmed(
    kube: Cluster, istio_gateway_crd: None
) -> None:
    """ASM stalls: the write to the IstioGateway is not applied, the step holds, and after
    ``cloud.confirmTimeout`` an alert says ASM has not copied it; once ASM and the CCM (EMULATED,
    tests/ccm_emulator.py) apply it, the rollout goes on."""
    ready = dict(CLB_READY)
    add_istio_gateway(kube, weighted("0", **ready))
    kube.add_service(TGT, {**ready, WEIGHT: "0"})
    kube.add_service(SRC, {**ready, WEIGHT: "100"})
    reference = {"namespace": kube.ns, "name": GATEWAY}
    policy = make_policy(
        "shop",
        source={"service": f"{kube.ns}/{SRC}"},
        target={"service": f"{kube.ns}/{TGT}", "istioGateway": reference},
        schedule={"steps": [10, 50, 100], "bakeTime": 0},
        cloud={"confirmTimeout": "2s"},
        routes={"check": False},
    )
    grant(kube, policy)
    notifier = RecordingNotifier()
    api = build_api_client(kube.write_kubeconfig())
    with (
        CcmEmulator(kube.plane, kube.ns, lag=0.1) as ccm,
        AsmEmulator(kube.plane, kube.ns, lag=0.1) as asm,
    ):
        for name in (TGT, SRC):
            ccm.provision(name, Backends(BackendMode.CLUSTER, nodes=20))
        asm.wait_synced()
        policy_runner = runner_for(
            policy,
            pair=as_controller(kube),
            store=KubernetesStateStore(api, kube.ns),
            metrics=healthy(kube),  # the split the Services' weights make over 20 nodes
            receivers=[notifier],
            cloud=CloudWatch(KubernetesCloudInspector(api)),
        )
        with asm.stopped():
            assert policy_runner.tick().decision.state.target_weight == 10  # written to the IstioGateway
            assert top_weight(kube) == "10" and kube.annotations(TGT)[WEIGHT] == "0"

            def refused() -> list[Any]:
                policy_runner.tick()
                return [a for a in notifier.alerts if a.kind is AlertKind.CLOUD_NOT_APPLIED]

            (alert,) = wait_for(refused, timeout=15, interval=0.25, what="the unconfirmed write to be said")
            assert f"IstioGateway {kube.ns}/{GATEWAY}: ASM has not applied the weight" in alert.reason
            assert "shows 0, not 10" in alert.reason
            assert top_weight(kube) == "10"  # held: nothing higher was written
        asm.wait_synced()

        def raised() -> bool:
            policy_runner.tick()
            return top_weight(kube) == "50"

        wait_for(raised, timeout=20, interval=0.25, what="the raise once ASM and the cloud applied 10")
        assert policy_runner._memory.cloud_refusal is None
        assert ccm.reconciles(TGT) >= 1 and kube.annotations(TGT)[WEIGHT] in ("10", "50")
        wait_for(lambda: ccm.applied_weight(TGT) == 50, timeout=10, what="the CLB to get 50 through ASM and the CCM")
