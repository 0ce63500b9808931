"""``controller.rbac`` and ``gateway-canary rbac``: least privilege derived from the policies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from controller.cli import main
from controller.core.policy import ServiceRef
from controller.rbac import access_needed, controller_rbac
from tests.helpers import make_policy

ROOT = Path(__file__).resolve().parents[1]
ACCOUNT = ServiceRef(namespace="ops", name="canary")
LEASE_BY_NAME = {
    "apiGroups": ["coordination.k8s.io"],
    "resources": ["leases"],
    "resourceNames": ["gateway-canary"],
    "verbs": ["get", "update"],
}
LEASE_CREATE = {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]}


def test_one_role_per_namespace_with_only_the_named_services_and_state_objects() -> None:
    across = make_policy("across", source={"service": "legacy/old-gw"}, target={"service": "mesh/asm-gw"})
    local = make_policy("local", source={"service": "mesh/gw-a"}, target={"service": "mesh/gw-b"})
    objects = controller_rbac([across, local], ACCOUNT)
    roles = {o["metadata"]["namespace"]: o for o in objects if o["kind"] == "Role"}
    assert sorted(roles) == ["legacy", "mesh", "ops"]
    assert roles["mesh"]["rules"][0]["resourceNames"] == ["asm-gw", "gw-a", "gw-b"]
    assert roles["mesh"]["rules"][0]["verbs"] == ["get", "patch"]
    reads = [
        {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]},  # the cloud's confirmations
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list"]},  # the backends
    ]
    assert roles["legacy"]["rules"] == [
        {"apiGroups": [""], "resources": ["services"], "resourceNames": ["old-gw"], "verbs": ["get", "patch"]},
        *reads,
    ]  # our own Events go beside the target only
    assert {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "list"]} in roles["mesh"]["rules"]
    # the state objects: one ConfigMap per policy in the controller's own namespace, by name; and there
    # the leader-election Lease, by name
    assert roles["ops"]["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["gateway-canary-across", "gateway-canary-local"],
            "verbs": ["get", "patch"],
        },
        LEASE_BY_NAME,
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},  # RBAC cannot name a create
        LEASE_CREATE,
    ]
    bindings = [o for o in objects if o["kind"] == "RoleBinding"]
    assert len(bindings) == 3
    assert all(b["subjects"] == [{"kind": "ServiceAccount", "name": "canary", "namespace": "ops"}] for b in bindings)
    verbs = {verb for role in roles.values() for rule in role["rules"] for verb in rule["verbs"]}
    assert verbs == {"get", "patch", "create", "list", "update"}  # never watch or delete
    updated = [rule for role in roles.values() for rule in role["rules"] if "update" in rule["verbs"]]
    assert updated == [LEASE_BY_NAME]  # update: only the one Lease (renewed with its resourceVersion)
    for role in roles.values():  # what is listed is never a Service, a ConfigMap or a Secret
        listed = {r for rule in role["rules"] if "list" in rule["verbs"] for r in rule["resources"]}
        assert listed <= {"events", "endpointslices"}
    services = {
        r for role in roles.values() for rule in role["rules"] if "services" in rule["resources"] for r in rule["verbs"]
    }
    assert services == {"get", "patch"}  # the Services are never updated, only merge-patched
    # cluster-wide only what is cluster-wide by nature: Nodes (the backends) and Istio Gateways (route parity)
    (cluster_role,) = [o for o in objects if o["kind"] == "ClusterRole"]
    assert cluster_role["rules"] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]},
        {"apiGroups": ["networking.istio.io"], "resources": ["gateways"], "verbs": ["list"]},
    ]
    (cluster_binding,) = [o for o in objects if o["kind"] == "ClusterRoleBinding"]
    assert cluster_binding["metadata"]["name"] == cluster_role["metadata"]["name"] == "gateway-canary-ops"


def test_an_istio_gateway_target_is_patched_there_and_its_service_only_read() -> None:
    policy = make_policy(
        "asm",
        source={"service": "legacy/old-gw"},
        target={"service": "mesh/asm-gw", "istioGateway": "istio-system/ingressgateway-asm"},
        routes={"check": False},
    )
    objects = controller_rbac([policy], ACCOUNT)
    data = {
        o["metadata"]["namespace"]: o
        for o in objects
        if o["kind"] == "Role" and o["metadata"]["name"] == "gateway-canary"
    }
    assert {"apiGroups": [""], "resources": ["services"], "resourceNames": ["asm-gw"], "verbs": ["get"]} in data[
        "mesh"
    ]["rules"]
    assert "annotations" not in data["mesh"]["metadata"]  # the data plane's Roles are applied as they are
    # the IstioGateway lives on the ASM control plane: a Role of its own there, saying so
    (asm,) = [o for o in objects if o["kind"] == "Role" and o["metadata"]["name"] == "gateway-canary-asm"]
    assert asm["metadata"]["namespace"] == "istio-system"
    assert asm["rules"] == [
        {
            "apiGroups": ["istio.alibabacloud.com"],
            "resources": ["istiogateways"],
            "resourceNames": ["ingressgateway-asm"],
            "verbs": ["get", "patch"],
        }
    ]
    assert "ASM control plane" in asm["metadata"]["annotations"]["gateway-canary.io/apply-to"]
    (cluster_role,) = [o for o in objects if o["kind"] == "ClusterRole"]
    assert cluster_role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]}]


def test_route_parity_with_an_istio_gateway_lists_gateways_on_both_planes() -> None:
    policy = make_policy(
        "asm",
        source={"service": "legacy/old-gw"},
        target={"service": "mesh/asm-gw", "istioGateway": "istio-system/ingressgateway-asm"},
    )
    cluster_roles = {o["metadata"]["name"]: o for o in controller_rbac([policy], ACCOUNT) if o["kind"] == "ClusterRole"}
    gateways = {"apiGroups": ["networking.istio.io"], "resources": ["gateways"], "verbs": ["list"]}
    assert gateways in cluster_roles["gateway-canary-ops"]["rules"]
    assert cluster_roles["gateway-canary-asm-ops"]["rules"] == [gateways]  # nodes are the data plane's only


def test_the_state_namespace_can_differ_from_the_accounts() -> None:
    objects = controller_rbac([make_policy()], ACCOUNT, state_namespace="canary-state")
    roles = {o["metadata"]["namespace"]: o for o in objects if o["kind"] == "Role"}
    assert sorted(roles) == ["canary-state", "istio-system"]
    assert roles["canary-state"]["rules"][0]["resourceNames"] == ["gateway-canary-shop"]
    # the Lease lives beside the state objects (GATEWAY_CANARY_NAMESPACE), not in the account's namespace
    assert LEASE_BY_NAME in roles["canary-state"]["rules"] and LEASE_CREATE in roles["canary-state"]["rules"]


def _lease_rules(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (o["metadata"]["namespace"], rule)
        for o in objects
        if o["kind"] == "Role"
        for rule in o["rules"]
        if rule["resources"] == ["leases"]
    ]


def test_the_lease_is_named_or_left_out_and_never_part_of_a_policys_access() -> None:
    policy = make_policy()
    named = controller_rbac([policy], ACCOUNT, lease_name="edge-canary")
    assert _lease_rules(named) == [
        ("ops", {**LEASE_BY_NAME, "resourceNames": ["edge-canary"]}),
        ("ops", LEASE_CREATE),
    ]
    without = controller_rbac([policy], ACCOUNT, lease_name=None)  # a controller run without leader election
    assert _lease_rules(without) == []
    assert [o for o in without if o["kind"] != "Role"] == [o for o in named if o["kind"] != "Role"]
    # the pre-write access review of a policy asks for that policy's objects only
    assert not [check for check in access_needed(policy, "ops") if check.resource == "leases"]


def test_rbac_command_prints_applyable_yaml_and_refuses_bad_input(tmp_path: Path, capsys) -> None:
    assert main(["rbac", str(ROOT / "policies"), "--service-account", "ops/canary"]) == 0
    documents = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert {d["kind"] for d in documents} == {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}

    assert main(["rbac", str(ROOT / "policies"), "--service-account", "no-slash"]) == 2
    assert "expected NAMESPACE/NAME" in capsys.readouterr().err

    assert main(["rbac", str(ROOT / "policies"), "--lease-name", "edge.canary"]) == 0
    documents = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    names = [r.get("resourceNames") for d in documents if d["kind"] == "Role" for r in d["rules"]]
    assert ["edge.canary"] in names
    assert main(["rbac", str(ROOT / "policies"), "--lease-name", "Edge_Canary"]) == 2
    assert "--lease-name 'Edge_Canary': expected a DNS subdomain name" in capsys.readouterr().err

    bad = tmp_path / "bad.yaml"
    bad.write_text("metadata: {name: x}\nspec:\n  schedule: {steps: [50, 10]}\n")
    assert main(["rbac", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.yaml:" in err and "no RBAC printed" in err
