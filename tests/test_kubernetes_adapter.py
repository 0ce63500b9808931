"""The Kubernetes adapter through the real ``kubernetes`` client, against the loopback stand-in.

(The stand-in is replaced by a real kube-apiserver in the control-plane issue.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.adapters.kubernetes import KubernetesGatewayPair, build_api_client
from controller.core.decision import Observation, initial_state
from controller.core.schedule import Weights
from controller.core.state import decode_state
from controller.errors import AccessDenied, ClusterUnavailable, ServiceNotFound, WeightChangedExternally
from tests.helpers import T0, make_policy
from tests.servers import LB_ID, STATE, VGROUP, WEIGHT, KubeStandIn, free_port

POLICY = make_policy()
NS, SRC, TGT = "istio-system", "istio-ingressgateway", "istio-ingressgateway-asm"
CLB = {LB_ID: "lb-123", VGROUP: "rsp-abc:80"}


def pair_for(kube: KubeStandIn, tmp_path: Path) -> KubernetesGatewayPair:
    config = tmp_path / "kubeconfig"
    config.write_text(kube.kubeconfig())
    return KubernetesGatewayPair(build_api_client(config))


def seed(kube: KubeStandIn, target_weight: str | None = "0", source_weight: str | None = "100", **extra) -> None:
    target = {**CLB, **({WEIGHT: target_weight} if target_weight is not None else {})}
    source = {**CLB, **({WEIGHT: source_weight} if source_weight is not None else {})}
    kube.add_service(NS, TGT, target, **extra)
    kube.add_service(NS, SRC, source)


def test_observe_reads_weights_and_accepts_a_clb_pair(kube: KubeStandIn, tmp_path: Path) -> None:
    seed(kube)
    seen = pair_for(kube, tmp_path).observe(POLICY)
    assert (seen.target_weight, seen.source_weight, seen.refusal, seen.state) == (0, 100, None, None)


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
    kube: KubeStandIn, tmp_path: Path, annotations: dict[str, str], needle: str
) -> None:
    kube.add_service(NS, TGT, annotations)
    kube.add_service(NS, SRC, {**CLB, WEIGHT: "100"})
    seen = pair_for(kube, tmp_path).observe(POLICY)
    assert seen.refusal is not None and needle in seen.refusal


def test_apply_patches_only_weight_and_state_annotations(kube: KubeStandIn, tmp_path: Path) -> None:
    seed(kube, labels={"app": "gw"}, finalizers=["keep.me/finalizer"])
    kube.edit(NS, TGT, {"team.example.com/owner": "platform"})
    pair = pair_for(kube, tmp_path)
    seen = pair.observe(POLICY)
    state = initial_state(POLICY, Observation(0, 100), T0).evolve(target_weight=10, source_weight=90)
    pair.apply(POLICY, seen, Weights(10, 90), state)
    target = kube.services[(NS, TGT)]["metadata"]
    assert target["annotations"][WEIGHT] == "10"
    assert decode_state(target["annotations"][STATE]) == state
    assert target["annotations"]["team.example.com/owner"] == "platform"
    assert target["labels"] == {"app": "gw"} and target["finalizers"] == ["keep.me/finalizer"]
    assert kube.annotations(NS, SRC)[WEIGHT] == "90"
    for _, patch in kube.patches:
        assert set(patch) == {"metadata"}
        assert set(patch["metadata"]) == {"resourceVersion", "annotations"}
        assert set(patch["metadata"]["annotations"]) <= {WEIGHT, STATE}
    # unchanged state and weights: no write at all
    count = len(kube.patches)
    pair.apply(POLICY, pair.observe(POLICY), Weights(10, 90), state)
    assert len(kube.patches) == count


def test_conflict_from_an_unrelated_change_is_retried(kube: KubeStandIn, tmp_path: Path) -> None:
    seed(kube)
    pair = pair_for(kube, tmp_path)
    seen = pair.observe(POLICY)
    kube.edit(NS, TGT, {"someone.else/annotation": "x"})  # makes the version stale
    state = initial_state(POLICY, Observation(0, 100), T0).evolve(target_weight=10, source_weight=90)
    pair.apply(POLICY, seen, Weights(10, 90), state)
    assert kube.annotations(NS, TGT)[WEIGHT] == "10"
    assert kube.annotations(NS, TGT)["someone.else/annotation"] == "x"


def test_conflict_from_a_weight_change_is_reported_not_overwritten(kube: KubeStandIn, tmp_path: Path) -> None:
    seed(kube)
    pair = pair_for(kube, tmp_path)
    seen = pair.observe(POLICY)
    kube.edit(NS, TGT, {WEIGHT: "30"})  # a human
    state = initial_state(POLICY, Observation(0, 100), T0).evolve(target_weight=10, source_weight=90)
    with pytest.raises(WeightChangedExternally, match="from 0 to 30"):
        pair.apply(POLICY, seen, Weights(10, 90), state)
    assert kube.annotations(NS, TGT)[WEIGHT] == "30"
    assert kube.annotations(NS, SRC)[WEIGHT] == "100"  # nothing half-written
    # a rollback wins regardless
    pair.apply(POLICY, seen, Weights(0, 100), state.evolve(target_weight=0, source_weight=100), force=True)
    assert kube.annotations(NS, TGT)[WEIGHT] == "0"


def test_events_are_recorded_on_the_target(kube: KubeStandIn, tmp_path: Path) -> None:
    seed(kube)
    pair = pair_for(kube, tmp_path)
    pair.observe(POLICY)
    pair.record_event(POLICY, "RolledBack", "rolled back", warning=True)
    event = kube.events[-1]
    assert event["involvedObject"]["name"] == TGT and event["involvedObject"]["uid"]
    assert (event["type"], event["reason"], event["source"]["component"]) == ("Warning", "RolledBack", "gateway-canary")


def test_errors_are_translated(kube: KubeStandIn, tmp_path: Path) -> None:
    pair = pair_for(kube, tmp_path)
    with pytest.raises(ServiceNotFound):
        pair.observe(POLICY)
    seed(kube)
    kube.fail_next.append(403)
    with pytest.raises(AccessDenied, match="forbidden"):
        pair.observe(POLICY)
    kube.fail_next.append(500)
    with pytest.raises(ClusterUnavailable, match="500"):
        pair.observe(POLICY)
    config = tmp_path / "dead"
    config.write_text(kube.kubeconfig().replace(kube.url, f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(ClusterUnavailable, match="unreachable"):
        KubernetesGatewayPair(build_api_client(config)).observe(POLICY)
