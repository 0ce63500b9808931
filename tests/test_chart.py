"""The Helm chart, tested like code: real helm (lint, template, install, upgrade, uninstall) against
the real kube-apiserver, the chart's RBAC compared with ``gateway-canary rbac``, its identity probed."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.core.loader import parse_policy_text
from controller.core.policy import CanaryPolicy, ServiceRef
from controller.rbac import controller_rbac
from tests.conftest import TEST_BIN
from tests.helpers import runner_for
from tests.kube_cluster import CLB, Cluster, binary_paths
from tests.kube_cluster import SOURCE as SRC
from tests.kube_cluster import TARGET as TGT
from tests.servers import WEIGHT, wait_for

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "gateway-canary"
RELEASE = "rel"
FULLNAME = "rel-gateway-canary"


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    binary = binary_paths(TEST_BIN)["helm"]
    if not binary.exists():
        pytest.fail(f"{binary} is missing (scripts/test-deps.sh builds it)")
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }

    def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(binary), *args], capture_output=True, text=True, env=env, timeout=120)
        if ok:
            assert result.returncode == 0, result.stderr
        return result

    yield run


def shipped_policies() -> dict[str, Any]:
    return {path.name: yaml.safe_load(path.read_text()) for path in sorted((ROOT / "policies").glob("*.yaml"))}


def render(helm: Any, tmp_path: Path, values: dict[str, Any], *, ok: bool = True) -> Any:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    result = helm(
        "template", RELEASE, str(CHART), "--namespace", "canary", "--kube-version", "1.37.0", "-f", str(path), ok=ok
    )
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc] if ok else result


def find(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in documents if doc["kind"] == kind]


# --- lint and template ----------------------------------------------------------------------------------

OPTIONS = {
    "policies": shipped_policies(),
    "secretEnv": ["gateway-canary-secrets"],
    "settings": {"PROMETHEUS_URL": "http://prometheus.monitoring:9090", "LOG_LEVEL": "DEBUG"},
    "imagePullSecrets": ["registry"],
    "podAnnotations": {"team": "edge"},
    "serviceAccount": {"annotations": {"owner": "platform"}},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "prometheusRule": {"enabled": True},
    "dashboard": {"enabled": True},
    "asmKubeconfig": {"secretName": "asm-control-plane", "context": "asm"},
}
#: Prometheus Operator kinds: their CRDs are not in Kubernetes' own schemas
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}


@pytest.mark.parametrize("values", [{}, OPTIONS], ids=["defaults", "options"])
def test_helm_lint_strict_is_clean(helm: Any, tmp_path: Path, values: dict[str, Any]) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    result = helm("lint", "--strict", str(CHART), "-f", str(path))
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def test_the_deployment_is_locked_down_and_not_rolled_by_a_policy_change(helm: Any, tmp_path: Path) -> None:
    documents = render(helm, tmp_path, OPTIONS)
    deployment = find(documents, "Deployment")[0]
    spec = deployment["spec"]
    assert spec["replicas"] == 2 and spec["strategy"]["type"] == "RollingUpdate"  # leader election: see below
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["terminationGracePeriodSeconds"] >= 30
    container = pod["containers"][0]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {item["name"]: item for item in container["env"]}
    assert env["GATEWAY_CANARY_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["GATEWAY_CANARY_LOG_LEVEL"]["value"] == "DEBUG"
    # the ASM control plane's kubeconfig: a Secret mounted read-only, the file named to the controller
    assert env["GATEWAY_CANARY_ASM_KUBECONFIG"]["value"] == "/etc/gateway-canary/asm/kubeconfig"
    assert env["GATEWAY_CANARY_ASM_CONTEXT"]["value"] == "asm"
    asm = {v["name"]: v for v in pod["volumes"]}["asm-kubeconfig"]["secret"]
    assert asm["secretName"] == "asm-control-plane" and asm["defaultMode"] == 0o440
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["asm-kubeconfig"]["readOnly"] is True
    assert container["envFrom"] == [{"secretRef": {"name": "gateway-canary-secrets"}}]
    # the policies are mounted from their ConfigMap, and no checksum of it rolls the pod
    annotations = spec["template"]["metadata"].get("annotations", {})
    assert annotations == {"team": "edge"}
    policies = find(documents, "ConfigMap")[0]
    assert sorted(policies["data"]) == ["api-ingress-arms.yaml", "shop-ingress.yaml"]
    mounted = {v["name"]: v for v in pod["volumes"]}["policies"]["configMap"]["name"]
    assert mounted == policies["metadata"]["name"]
    for file, text in policies["data"].items():  # what the controller will read is valid
        assert parse_policy_text(text, file).errors == ()
    assert not find(documents, "Secret")  # secrets are referenced, never rendered


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"imgae": {"tag": "x"}}, "additional properties 'imgae' not allowed"),
        ({"replicaCount": "one"}, "replicaCount"),
        ({"leaderElection": {"leaseName": "Shop_Lease"}}, "/leaderElection/leaseName"),
        ({"leaderElection": {"leaseDuration": 0}}, "/leaderElection/leaseDuration"),
        ({"settings": {"LEASE_NAME": "x"}}, "settings.LEASE_NAME: set it with the leaderElection values"),
        ({"settings": {"LEADER_ELECTION": False}}, "settings.LEADER_ELECTION: set it with the leaderElection values"),
        ({"settings": {"IDENTITY": "me"}}, "settings.IDENTITY: every replica would claim the Lease"),
        ({"settings": {"PROMETHEUS_TOKEN": "abc"}}, "'not' failed"),
        ({"settings": {"PROMETHEUS_URL": "http://user:pw@prom:9090"}}, "PROMETHEUS_URL"),
        (
            {
                "policies": {
                    "p.yaml": {
                        "metadata": {"name": "p"},
                        "spec": {
                            "source": {"service": "a/b"},
                            "target": {"service": "a/c"},
                            "alerts": [{"type": "slack", "url": "https://hooks.slack.com/services/T/B/X"}],
                        },
                    }
                }
            },
            "url is a secret",
        ),
    ],
)
def test_the_chart_refuses_mistakes_and_secret_literals(
    helm: Any, tmp_path: Path, values: dict[str, Any], needle: str
) -> None:
    result = render(helm, tmp_path, values, ok=False)
    assert result.returncode != 0 and needle in result.stderr, result.stderr


# --- leader election: replicas on standby, one writer ------------------------------------------------

LEASE = "coordination.k8s.io"
ELECTION_ENV = (
    "GATEWAY_CANARY_LEADER_ELECTION",
    "GATEWAY_CANARY_LEASE_NAME",
    "GATEWAY_CANARY_LEASE_DURATION_SECONDS",
    "GATEWAY_CANARY_RENEW_DEADLINE_SECONDS",
    "GATEWAY_CANARY_RETRY_PERIOD_SECONDS",
)


def _env(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


def _lease_rules(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rule for role in find(documents, "Role") for rule in role["rules"] if rule["resources"] == ["leases"]]


def test_by_default_two_replicas_elect_a_leader_and_roll_one_at_a_time(helm: Any, tmp_path: Path) -> None:
    documents = render(helm, tmp_path, {})
    (deployment,) = find(documents, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    env = {name: item.get("value") for name, item in _env(deployment).items()}
    assert {name: env.get(name) for name in ELECTION_ENV} == {
        "GATEWAY_CANARY_LEADER_ELECTION": "true",
        "GATEWAY_CANARY_LEASE_NAME": FULLNAME,  # the release's: two releases never share a leader
        "GATEWAY_CANARY_LEASE_DURATION_SECONDS": "15",
        "GATEWAY_CANARY_RENEW_DEADLINE_SECONDS": "10",
        "GATEWAY_CANARY_RETRY_PERIOD_SECONDS": "2",
    }
    assert "GATEWAY_CANARY_IDENTITY" not in env  # each process names itself after its pod
    # the replicas prefer different nodes; preferred, so that a one-node cluster still runs both
    anti = spec["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert list(anti) == ["preferredDuringSchedulingIgnoredDuringExecution"]
    (term,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    (budget,) = find(documents, "PodDisruptionBudget")
    assert budget["apiVersion"] == "policy/v1" and budget["metadata"]["namespace"] == "canary"
    assert budget["spec"]["maxUnavailable"] == 1 and "minAvailable" not in budget["spec"]
    assert budget["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]
    # the Lease lives in the release's namespace: even with no policy yet, a Role (and binding) there grants it
    (role,) = find(documents, "Role")
    assert role["metadata"]["namespace"] == "canary"
    assert _lease_rules(documents) == [
        {"apiGroups": [LEASE], "resources": ["leases"], "resourceNames": [FULLNAME], "verbs": ["get", "update"]},
        {"apiGroups": [LEASE], "resources": ["leases"], "verbs": ["create"]},
    ]
    (binding,) = find(documents, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


def test_values_without_a_leader_election_block_render_its_defaults(helm: Any, tmp_path: Path) -> None:
    """``helm upgrade --reuse-values`` from a chart without leader election reuses that chart's values,
    which have no ``leaderElection``: the templates fill in the defaults, the same as values.yaml's."""
    assert render(helm, tmp_path, {"leaderElection": None}) == render(helm, tmp_path, {})  # null drops the block
    reused = render(helm, tmp_path, {"leaderElection": None, "replicaCount": 1})  # the old default
    assert find(reused, "Deployment")[0]["spec"]["strategy"]["type"] == "RollingUpdate"
    assert _lease_rules(reused) and not find(reused, "PodDisruptionBudget")


@pytest.mark.parametrize(("replicas", "budgets"), [(0, 0), (1, 0), (2, 1), (3, 1)])
def test_a_disruption_budget_only_with_more_than_one_replica(
    helm: Any, tmp_path: Path, replicas: int, budgets: int
) -> None:
    documents = render(helm, tmp_path, {"replicaCount": replicas})
    assert len(find(documents, "PodDisruptionBudget")) == budgets  # with one, a budget blocks every drain
    assert find(documents, "Deployment")[0]["spec"]["replicas"] == replicas


def test_affinity_in_the_values_replaces_the_anti_affinity(helm: Any, tmp_path: Path) -> None:
    mine = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["ops"]}]}]
            }
        }
    }
    documents = render(helm, tmp_path, {"affinity": mine})
    assert find(documents, "Deployment")[0]["spec"]["template"]["spec"]["affinity"] == mine


def test_without_leader_election_one_replica_is_recreated_with_no_budget_and_no_lease(
    helm: Any, tmp_path: Path
) -> None:
    policies = shipped_policies()
    values = {"leaderElection": {"enabled": False}, "replicaCount": 1, "policies": policies}
    documents = render(helm, tmp_path, values)
    (deployment,) = find(documents, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    env = {name: item.get("value") for name, item in _env(deployment).items()}
    assert env["GATEWAY_CANARY_LEADER_ELECTION"] == "false"
    assert not set(ELECTION_ENV[1:]) & set(env)
    assert find(documents, "PodDisruptionBudget") == []
    assert _lease_rules(documents) == []
    models = [CanaryPolicy.model_validate(policy) for policy in policies.values()]
    expected = controller_rbac(models, ServiceRef(namespace="canary", name=FULLNAME), lease_name=None)
    assert _rules(documents) == _rules(expected)


def test_two_replicas_without_leader_election_are_refused_naming_both_values(helm: Any, tmp_path: Path) -> None:
    result = render(helm, tmp_path, {"leaderElection": {"enabled": False}}, ok=False)  # replicaCount: 2 by default
    assert result.returncode != 0
    # either fix is enough: one replica, or leader election back on
    assert "at '/replicaCount': maximum: got 2, want 1" in result.stderr, result.stderr
    assert "at '/leaderElection/enabled': value must be true" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("timing", "needle"),
    [
        (
            {"renewDeadline": 15},
            "leaderElection.renewDeadline (15) must be less than leaderElection.leaseDuration (15)",
        ),
        ({"leaseDuration": 8}, "leaderElection.renewDeadline (10) must be less than leaderElection.leaseDuration (8)"),
        ({"retryPeriod": 10}, "leaderElection.retryPeriod (10) must be less than leaderElection.renewDeadline (10)"),
        (
            {"retryPeriod": 12, "renewDeadline": 10, "leaseDuration": 30},
            "leaderElection.retryPeriod (12) must be less than leaderElection.renewDeadline (10)",
        ),
    ],
)
def test_election_timings_out_of_order_fail_the_render_naming_the_values(
    helm: Any, tmp_path: Path, timing: dict[str, int], needle: str
) -> None:
    result = render(helm, tmp_path, {"leaderElection": timing}, ok=False)
    assert result.returncode != 0 and needle in result.stderr, result.stderr


def test_timings_given_with_set_are_compared_as_numbers(helm: Any) -> None:
    """``--set`` makes integers where a values file makes floats; the check compares numbers, not text."""
    template = ("template", RELEASE, str(CHART), "--namespace", "canary", "--kube-version", "1.37.0")
    refused = helm(*template, "--set", "leaderElection.renewDeadline=20", ok=False)
    assert "leaderElection.renewDeadline (20) must be less than leaderElection.leaseDuration (15)" in refused.stderr
    # 100 > 20 > 3 as numbers (as text "20" > "100")
    timing = "leaderElection.leaseDuration=100,leaderElection.renewDeadline=20,leaderElection.retryPeriod=3"
    rendered = helm(*template, "--set", timing)
    (deployment,) = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc and doc["kind"] == "Deployment"]
    env = {name: item.get("value") for name, item in _env(deployment).items()}
    assert env["GATEWAY_CANARY_LEASE_DURATION_SECONDS"] == "100"
    assert env["GATEWAY_CANARY_RENEW_DEADLINE_SECONDS"] == "20"


SETTINGS_CASES: dict[str, tuple[dict[str, Any], tuple[bool, str, float, float, float]]] = {
    # values -> (leader_election, lease_name, lease duration, renew deadline, retry period) the controller reads
    "defaults": ({}, (True, FULLNAME, 15, 10, 2)),
    "options": (OPTIONS, (True, FULLNAME, 15, 10, 2)),
    "own-lease": (
        {"leaderElection": {"leaseName": "edge.canary", "leaseDuration": 60, "renewDeadline": 40, "retryPeriod": 5}},
        (True, "edge.canary", 60, 40, 5),
    ),
    "no-election": ({"leaderElection": {"enabled": False}, "replicaCount": 1}, (False, "gateway-canary", 15, 10, 2)),
}


@pytest.mark.parametrize("name", sorted(SETTINGS_CASES))
def test_the_rendered_environment_is_valid_controller_settings(
    helm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    from controller.settings import Settings

    values, expected = SETTINGS_CASES[name]
    (deployment,) = find(render(helm, tmp_path, values), "Deployment")
    for key in list(os.environ):
        if key.startswith("GATEWAY_CANARY_"):
            monkeypatch.delenv(key)
    for item in _env(deployment).values():
        if "valueFrom" in item:  # the pod's namespace, as the kubelet fills it in
            assert item["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
            monkeypatch.setenv(item["name"], "canary")
        else:
            monkeypatch.setenv(item["name"], item["value"])
    settings = Settings()  # raises on any variable the controller would refuse to start with
    assert settings.namespace == "canary"
    got = (
        settings.leader_election,
        settings.lease_name,
        settings.lease_duration_seconds,
        settings.renew_deadline_seconds,
        settings.retry_period_seconds,
    )
    assert got == expected


# --- RBAC: the same rules as `gateway-canary rbac` -----------------------------------------------------


def _rules(
    objects: list[dict[str, Any]],
) -> dict[tuple[str, bool], set[tuple[str, str, tuple[str, ...], tuple[str, ...]]]]:
    """Each Role's rules, by (namespace, whether it is for the ASM control plane)."""
    rules: dict[tuple[str, bool], set[tuple[str, str, tuple[str, ...], tuple[str, ...]]]] = {}
    for role in (o for o in objects if o["kind"] == "Role"):
        rules[(role["metadata"]["namespace"], role["metadata"]["name"].endswith("-asm"))] = {
            (
                rule["apiGroups"][0],
                rule["resources"][0],
                tuple(sorted(rule["verbs"])),
                tuple(sorted(rule.get("resourceNames", []))),
            )
            for rule in role["rules"]
        }
    return rules


def test_the_charts_rbac_is_what_gateway_canary_rbac_prints(helm: Any, tmp_path: Path) -> None:
    policies = shipped_policies()
    documents = render(helm, tmp_path, {"policies": policies})
    models = [CanaryPolicy.model_validate(policy) for policy in policies.values()]
    expected = controller_rbac(models, ServiceRef(namespace="canary", name=FULLNAME), lease_name=FULLNAME)
    assert _rules(documents) == _rules(expected)
    assert ("coordination.k8s.io", "leases", ("get", "update"), (FULLNAME,)) in _rules(documents)[("canary", False)]
    assert ("coordination.k8s.io", "leases", ("create",), ()) in _rules(documents)[("canary", False)]
    bindings = find(documents, "RoleBinding")
    assert {b["metadata"]["namespace"] for b in bindings} == {ns for ns, _ in _rules(expected)}
    assert all(b["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": "canary"}] for b in bindings)
    assert _cluster_rules(documents) == _cluster_rules(expected)
    (binding,) = find(documents, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": "canary"}]


def test_the_charts_rbac_for_an_istio_gateway_target_and_no_route_parity(helm: Any, tmp_path: Path) -> None:
    policy = yaml.safe_load((ROOT / "policies" / "shop-ingress.yaml").read_text())
    policy["spec"]["target"]["istioGateway"] = {"namespace": "istio-system", "name": "ingressgateway-asm"}
    policy["spec"]["routes"] = {"check": False}
    documents = render(helm, tmp_path, {"policies": {"shop.yaml": policy}})
    expected = controller_rbac(
        [CanaryPolicy.model_validate(policy)], ServiceRef(namespace="canary", name=FULLNAME), lease_name=FULLNAME
    )
    assert _rules(documents) == _rules(expected)
    assert _cluster_rules(documents) == _cluster_rules(expected) == {(False, "nodes", ("list",))}
    asm = [d for d in find(documents, "Role") if d["metadata"]["name"].endswith("-asm")]
    assert [r["metadata"]["namespace"] for r in asm] == ["istio-system"]
    assert "ASM control plane" in asm[0]["metadata"]["annotations"]["gateway-canary.io/apply-to"]


def test_the_charts_rbac_with_an_istio_gateway_and_route_parity_covers_both_planes(helm: Any, tmp_path: Path) -> None:
    policy = yaml.safe_load((ROOT / "policies" / "shop-ingress.yaml").read_text())
    policy["spec"]["target"]["istioGateway"] = {"namespace": "istio-system", "name": "ingressgateway-asm"}
    documents = render(helm, tmp_path, {"policies": {"shop.yaml": policy}})
    expected = controller_rbac(
        [CanaryPolicy.model_validate(policy)], ServiceRef(namespace="canary", name=FULLNAME), lease_name=FULLNAME
    )
    assert _rules(documents) == _rules(expected)
    assert _cluster_rules(documents) == _cluster_rules(expected)
    assert (True, "gateways", ("list",)) in _cluster_rules(documents)


def _cluster_rules(objects: list[dict[str, Any]]) -> set[tuple[bool, str, tuple[str, ...]]]:
    return {
        ("-asm-" in role["metadata"]["name"], rule["resources"][0], tuple(sorted(rule["verbs"])))
        for role in objects
        if role["kind"] == "ClusterRole"
        for rule in role["rules"]
    }


def test_an_existing_configmap_names_its_services_for_rbac(helm: Any, tmp_path: Path) -> None:
    values = {
        "existingConfigMap": "my-policies",
        "rbac": {"services": ["mesh/asm-gw", "legacy/old-gw"], "targets": ["mesh/asm-gw"], "policyNames": ["shop"]},
    }
    documents = render(helm, tmp_path, values)
    assert not [d for d in find(documents, "ConfigMap") if d["metadata"]["name"].endswith("-policies")]
    spec = {
        "source": {"service": "legacy/old-gw"},
        "target": {"service": "mesh/asm-gw"},
        "schedule": {"steps": [10]},
        "gates": {"errorRate": {"max": 0.01}},
    }
    policy = CanaryPolicy.model_validate({"metadata": {"name": "shop"}, "spec": spec})
    account = ServiceRef(namespace="canary", name=FULLNAME)
    assert _rules(documents) == _rules(controller_rbac([policy], account, lease_name=FULLNAME))


# --- installed into the real API server ----------------------------------------------------------------


def can(kube: Cluster, user: str, verb: str, resource: str, namespace: str, name: str = "", group: str = "") -> bool:
    attributes = {"namespace": namespace, "verb": verb, "resource": resource, "name": name, "group": group}
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": user,
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{kube.ns}", "system:authenticated"],
            "resourceAttributes": attributes,
        },
    }
    return bool(
        kube.plane.call("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", review)["status"].get("allowed")
    )


def test_install_probe_the_identity_run_a_step_upgrade_and_uninstall(helm: Any, kube: Cluster, tmp_path: Path) -> None:
    from controller.adapters.kube_api import build_api_client
    from controller.adapters.kube_state import KubernetesStateStore
    from controller.adapters.kubernetes import KubernetesGatewayPair
    from controller.adapters.memory import InMemoryGatewayPair
    from controller.demo import SimulatedGateways

    kube.add_gateways()
    kube.add_service("bystander", {**CLB, WEIGHT: "100"})
    admin = tmp_path / "admin-kubeconfig"
    admin.write_text(kube.admin_kubeconfig())
    policy = {
        "apiVersion": "gateway-canary.io/v1alpha1",
        "kind": "CanaryPolicy",
        "metadata": {"name": "shop"},
        "spec": {
            "source": {"service": f"{kube.ns}/{SRC}"},
            "target": {"service": f"{kube.ns}/{TGT}"},
            "schedule": {"steps": [10, 100], "bakeTime": "0s"},
            "analysis": {"failureThreshold": 1},
            "gates": {"errorRate": {"max": 0.01}},
        },
    }
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"policies": {"shop.yaml": policy}}))
    common = ["--kubeconfig", str(admin), "--namespace", kube.ns]
    helm("install", RELEASE, str(CHART), *common, "-f", str(values), "--wait=false")

    user = f"system:serviceaccount:{kube.ns}:{FULLNAME}"
    wait_for(lambda: can(kube, user, "patch", "services", kube.ns, TGT), timeout=10, what="the chart's Role")
    for name in (TGT, SRC):
        assert can(kube, user, "get", "services", kube.ns, name) and can(kube, user, "patch", "services", kube.ns, name)
    assert not can(kube, user, "patch", "services", kube.ns, "bystander")
    assert not can(kube, user, "get", "secrets", kube.ns)
    assert not can(kube, user, "list", "services", kube.ns)
    assert not can(kube, user, "get", "services", "kube-system", TGT)
    assert can(kube, user, "create", "configmaps", kube.ns) and can(
        kube, user, "patch", "configmaps", kube.ns, "gateway-canary-shop"
    )
    # leader election: its one Lease by name, and create (which RBAC cannot restrict by name)
    lease = "coordination.k8s.io"
    assert can(kube, user, "get", "leases", kube.ns, FULLNAME, lease)
    assert can(kube, user, "update", "leases", kube.ns, FULLNAME, lease)
    assert can(kube, user, "create", "leases", kube.ns, group=lease)
    assert not can(kube, user, "update", "leases", kube.ns, "another-controller", lease)
    assert not can(kube, user, "delete", "leases", kube.ns, FULLNAME, lease)
    assert not can(kube, user, "update", "leases", "kube-system", FULLNAME, lease)
    (budget,) = [
        item
        for item in kube.plane.call("GET", f"/apis/policy/v1/namespaces/{kube.ns}/poddisruptionbudgets")["items"]
        if item["metadata"]["name"] == FULLNAME
    ]
    assert budget["spec"]["maxUnavailable"] == 1  # the API server took it as rendered

    # the controller, as that identity, with the policy the chart installed
    installed = kube.plane.call("GET", f"/api/v1/namespaces/{kube.ns}/configmaps/{FULLNAME}-policies")
    loaded = parse_policy_text(installed["data"]["shop.yaml"], "shop.yaml")
    assert loaded.errors == () and len(loaded.policies) == 1
    identity = tmp_path / "sa-kubeconfig"
    identity.write_text(kube.plane.kubeconfig(kube.plane.token_for(kube.ns, FULLNAME), FULLNAME))
    api = build_api_client(identity)
    runner = runner_for(
        loaded.policies[0].policy,
        pair=KubernetesGatewayPair(api, state_namespace=kube.ns),
        store=KubernetesStateStore(api, kube.ns),
        metrics=SimulatedGateways(InMemoryGatewayPair(target_weight=0, source_weight=100)),
    )
    outcome = runner.tick()
    assert outcome.error is None and kube.annotations(TGT)[WEIGHT] == "10"
    assert kube.state("shop")["target_weight"] == 10

    # an upgrade with a changed threshold reaches the ConfigMap (the controller re-reads it)
    policy["spec"]["gates"]["errorRate"]["max"] = 0.02
    values.write_text(yaml.safe_dump({"policies": {"shop.yaml": policy}}))
    helm("upgrade", RELEASE, str(CHART), *common, "-f", str(values), "--wait=false")
    upgraded = kube.plane.call("GET", f"/api/v1/namespaces/{kube.ns}/configmaps/{FULLNAME}-policies")
    assert "max: 0.02" in upgraded["data"]["shop.yaml"]

    helm("uninstall", RELEASE, *common, "--wait=false")
    left = kube.plane.call("GET", f"/api/v1/namespaces/{kube.ns}/configmaps")["items"]
    names = sorted(item["metadata"]["name"] for item in left if item["metadata"]["name"] != "kube-root-ca.crt")
    assert names == ["gateway-canary-shop"]  # the documented orphan: the rollout's state, kept on purpose
    for path in ("serviceaccounts", "services"):
        items = kube.plane.call("GET", f"/api/v1/namespaces/{kube.ns}/{path}")["items"]
        assert not [i for i in items if i["metadata"]["name"].startswith(FULLNAME)]
    roles = kube.plane.call("GET", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{kube.ns}/roles")["items"]
    assert not [r for r in roles if r["metadata"]["name"] == FULLNAME]
    budgets = kube.plane.call("GET", f"/apis/policy/v1/namespaces/{kube.ns}/poddisruptionbudgets")["items"]
    assert not [b for b in budgets if b["metadata"]["name"] == FULLNAME]


# --- strict validation against the Kubernetes schemas of the oldest and newest supported release -------

VALUE_SETS = {
    "defaults": {},
    "options": OPTIONS,
    "existing-configmap": {
        "existingConfigMap": "my-policies",
        "rbac": {"services": ["mesh/asm-gw", "legacy/old-gw"], "targets": ["mesh/asm-gw"], "policyNames": ["shop"]},
        "serviceAccount": {"create": False, "name": "canary"},
    },
    "no-rbac": {"rbac": {"create": False}, "policies": shipped_policies()},
    "pinned": {"image": {"repository": "registry.example/gc", "digest": "sha256:" + "0123456789abcdef" * 4}},
    "metrics-from": {"networkPolicy": {"metricsFrom": [{"namespaceSelector": {"matchLabels": {"team": "obs"}}}]}},
    "no-election": {"leaderElection": {"enabled": False}, "replicaCount": 1, "policies": shipped_policies()},
}


@pytest.mark.parametrize("kubernetes", ["1.27.0", "1.37.0"])
@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_rendered_object_is_valid_kubernetes(helm: Any, tmp_path: Path, name: str, kubernetes: str) -> None:
    import kubernetes_validate

    documents = render(helm, tmp_path, VALUE_SETS[name])
    assert documents
    for document in documents:
        if document["kind"] in OPERATOR_KINDS:
            assert document["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        kubernetes_validate.validate(document, kubernetes, strict=True)  # raises on any unknown or wrong field


# --- checkov: Kubernetes security checks on every rendering; each deliberate finding is justified ---------

CHECKOV = ROOT / ".cache" / "checkov" / "bin" / "checkov"


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_checkov_finds_nothing_unjustified(helm: Any, tmp_path: Path, name: str) -> None:
    import json

    if not CHECKOV.exists():
        pytest.fail(f"{CHECKOV} is missing (scripts/test-deps.sh installs it)")
    documents = render(helm, tmp_path, VALUE_SETS[name])
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all(documents))
    result = subprocess.run(
        [str(CHECKOV), "-f", str(manifest), "--framework", "kubernetes", "--skip-download", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    report = json.loads(result.stdout)
    assert report["summary"]["parsing_errors"] == 0
    results = report["results"]
    scanned = {c["resource"] for key in ("passed_checks", "failed_checks", "skipped_checks") for c in results[key]}
    assert report["summary"]["resource_count"] >= len(documents)  # every object was read (plus derived Pods)
    assert f"Deployment.canary.{FULLNAME}" in scanned
    failed = [(c["check_id"], c["check_name"], c["resource"]) for c in results["failed_checks"]]
    assert failed == []
    skipped = {c["check_id"]: c["check_result"]["suppress_comment"] for c in results["skipped_checks"]}
    assert all(len(reason) > 20 for reason in skipped.values()), skipped
    # a pinned image leaves nothing to excuse about digests; an unpinned one says how to pin
    assert ("CKV_K8S_43" in skipped) == (name != "pinned")
    deployment = find(documents, "Deployment")[0]
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert ("@sha256:" in image) == (name == "pinned")
    policies = find(documents, "NetworkPolicy")
    assert [p["spec"]["ingress"][0]["ports"] for p in policies] == [[{"port": "http", "protocol": "TCP"}]]


# --- the PrometheusRule fires on series shaped as the controller exports them -------------------------


def _scraped_series(tmp_path: Path) -> dict[str, list[dict[str, str]]]:
    """Label sets of the controller's own metrics, from a real /metrics of a running service."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    from controller.adapters.memory import InMemoryGatewayPair, InMemoryStateStore
    from controller.demo import SimulatedGateways
    from controller.runtime.clock import SystemClock
    from controller.runtime.service import ControllerService
    from controller.settings import Settings
    from tests.test_malformed_inputs import Exploding

    policies = tmp_path / "policies"
    policies.mkdir()
    for name, source in (("good", "a/b"), ("buggy", "c/d")):
        (policies / f"{name}.yaml").write_text(
            f"metadata: {{name: {name}}}\nspec:\n  source: {{service: {source}}}\n  target: {{service: {source}-asm}}\n"
            "  schedule: {steps: [10, 100], bakeTime: 1h}\n  analysis: {interval: 1s}\n"
            "  gates: {errorRate: {max: 0.05}}\n"
        )
    pair = InMemoryGatewayPair(target_weight=0, source_weight=100)
    exploding = Exploding()
    service = ControllerService(
        Settings(policies_dir=policies, http_host="127.0.0.1", http_port=0),
        pair=pair,
        store=InMemoryStateStore(),
        metrics_for=lambda policy: exploding if policy.name == "buggy" else SimulatedGateways(pair),
        clock=SystemClock(),
    )
    service.start()
    try:
        assert service.http is not None
        url = f"http://127.0.0.1:{service.http.port}/metrics"

        def scraped() -> str | None:
            text = requests.get(url, timeout=2).text
            return text if 'kind="crash"' in text and "verdict=" in text else None

        text = wait_for(scraped, timeout=20, what="a scrape with checks and a crash in it")
    finally:
        service.stop()
    series: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, []).append(dict(sample.labels))
    return series


def _selector(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def test_each_alert_fires_on_the_exported_series_and_stays_silent_when_healthy(helm: Any, tmp_path: Path) -> None:
    series = _scraped_series(tmp_path)
    good = {"policy": "good"}
    for name in ("gateway_canary_checks_total", "gateway_canary_phase", "gateway_canary_policy_refused"):
        assert any(labels.get("policy") == "good" for labels in series[name]), name
    crash = next(labels for labels in series["gateway_canary_errors_total"] if labels.get("kind") == "crash")
    assert set(crash) == {"policy", "kind"} and "gateway_canary_oldest_undelivered_alert_seconds" in series
    assert series["gateway_canary_is_leader"] == [{}] and series["gateway_canary_cluster_reachable"] == [{}]
    checks = {
        labels["verdict"]: labels for labels in series["gateway_canary_checks_total"] if labels["policy"] == "good"
    }
    inconclusive = {**good, "verdict": "INCONCLUSIVE"}
    passing = checks.get("PASS", {**good, "verdict": "PASS"})
    assert set(passing) == {"policy", "verdict"}
    progressing = {**good, "phase": "Progressing"}

    def case(alert: str, series_values: dict[str, str], at: str, fires: dict[str, str] | None) -> dict[str, Any]:
        return {
            "interval": "1m",
            "input_series": [{"series": key, "values": value} for key, value in series_values.items()],
            "alert_rule_test": [
                {"eval_time": at, "alertname": alert, "exp_alerts": [] if fires is None else [{"exp_labels": fires}]}
            ],
        }

    policies_up = {"gateway_canary_policies": "1x30"}
    tests = [
        case("GatewayCanaryRolledBack", {_selector("gateway_canary_rollbacks_total", good): "0 0 1 1 1"}, "4m",
             {**good, "severity": "critical"}),
        case("GatewayCanaryRolledBack", {_selector("gateway_canary_rollbacks_total", good): "1x10"}, "8m", None),
        case("GatewayCanaryPolicyRefused", {_selector("gateway_canary_policy_refused", good): "1x20"}, "15m",
             {**good, "severity": "warning"}),
        case("GatewayCanaryPolicyRefused", {_selector("gateway_canary_policy_refused", good): "0x20"}, "15m", None),
        case("GatewayCanaryStuck", {_selector("gateway_canary_checks_total", inconclusive): "0+2x30",
             _selector("gateway_canary_checks_total", passing): "7x30"}, "20m", {**good, "severity": "warning"}),
        case("GatewayCanaryStuck", {_selector("gateway_canary_checks_total", inconclusive): "0+2x30",
             _selector("gateway_canary_checks_total", passing): "0+1x30"}, "20m", None),
        case("GatewayCanaryTicksFailing", {_selector("gateway_canary_errors_total", crash): "0+1x10"}, "6m",
             {"policy": crash["policy"], "severity": "warning"}),
        case("GatewayCanaryTicksFailing", {_selector("gateway_canary_errors_total", crash): "3x10"}, "6m", None),
        case("GatewayCanaryNotChecking", {**policies_up, _selector("gateway_canary_phase", progressing): "1x30",
             _selector("gateway_canary_checks_total", passing): "9x30"}, "15m", {**good, "severity": "critical"}),
        case("GatewayCanaryNotChecking", {**policies_up, _selector("gateway_canary_phase", progressing): "1x30",
             _selector("gateway_canary_checks_total", passing): "0+2x30"}, "15m", None),
        case("GatewayCanaryNotChecking", {**policies_up, "gateway_canary_is_leader": "0x30"}, "15m",
             {"severity": "critical"}),  # no replica leads: both stand by
        case("GatewayCanaryNotChecking", {**policies_up, "gateway_canary_is_leader": "1x30"}, "15m", None),
        case("GatewayCanaryClusterUnreachable", {"gateway_canary_cluster_reachable": "1 0 0 0 0"}, "4m",
             {"severity": "critical"}),
        case("GatewayCanaryClusterUnreachable", {"gateway_canary_cluster_reachable": "1 0 1 0 1"}, "4m", None),
        case("GatewayCanaryAlertingBroken", {"gateway_canary_oldest_undelivered_alert_seconds": "0+60x20"}, "12m",
             {"severity": "critical"}),
        case("GatewayCanaryAlertingBroken", {"gateway_canary_oldest_undelivered_alert_seconds": "0x20"}, "12m", None),
    ]  # fmt: skip
    rendered = render(helm, tmp_path, {"prometheusRule": {"enabled": True}})
    rule = find(rendered, "PrometheusRule")[0]
    annotations = {r["alert"]: r["annotations"] for g in rule["spec"]["groups"] for r in g["rules"]}
    for test in tests:  # promtool compares annotations too: what each alert says, its policy filled in
        check = test["alert_rule_test"][0]
        for expected in check["exp_alerts"]:
            policy = expected["exp_labels"].get("policy", "")
            expected["exp_annotations"] = {
                key: value.replace("{{ $labels.policy }}", policy)
                for key, value in annotations[check["alertname"]].items()
            }
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    (tmp_path / "tests.yml").write_text(yaml.safe_dump({"rule_files": ["rules.yml"], "tests": tests}))
    result = subprocess.run(
        ["promtool", "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert alerts == {t["alert_rule_test"][0]["alertname"] for t in tests}  # every alert is tested
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    # a section's anchors are `<a id="...">` lines before its heading (stable whatever its title)
    anchors = set(re.findall(r'^<a id="([^"]+)"></a>$', runbook, re.MULTILINE))
    for group in rule["spec"]["groups"]:
        for item in group["rules"]:
            anchor = item["annotations"]["runbook_url"].rsplit("#", 1)[1]
            assert anchor in anchors, f"{item['alert']}: no section #{anchor} in docs/runbook.md"


# --- the chart's README ----------------------------------------------------------------------------------


def test_every_value_is_documented_and_the_readme_table_is_current() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("chart_values_table", ROOT / "scripts" / "chart_values_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    documented = {key for key, _, _ in module.rows()}
    assert set(values) <= documented  # every top-level key has a `# --` comment

    def leaves(node: Any, prefix: str) -> list[str]:
        maps = ("resources", "settings")  # and label maps: their keys are data, not options
        if isinstance(node, dict) and node and prefix not in maps and not prefix.endswith("labels"):
            return [leaf for key, value in node.items() for leaf in leaves(value, f"{prefix}.{key}" if prefix else key)]
        return [prefix]

    assert set(leaves(values, "")) <= documented  # and every key under them
    readme = (CHART / "README.md").read_text()
    assert module.table() in readme  # `scripts/chart_values_table.py --write` refreshes it
    for walkthrough in ("## Install", "## Upgrade", "## Change a policy", "## A rollback happened", "## Uninstall"):
        assert walkthrough in readme


def test_policies_can_be_given_as_files(helm: Any, tmp_path: Path) -> None:
    text = (ROOT / "policies" / "shop-ingress.yaml").read_text()
    documents = render(helm, tmp_path, {"policies": {"shop.yaml": text}})
    assert find(documents, "ConfigMap")[0]["data"]["shop.yaml"].strip() == text.strip()
    expected = controller_rbac(
        [CanaryPolicy.model_validate(yaml.safe_load(text))],
        ServiceRef(namespace="canary", name=FULLNAME),
        lease_name=FULLNAME,
    )
    assert _rules(documents) == _rules(expected)


def test_a_changed_policy_reaches_the_running_controller_without_a_restart(helm: Any, tmp_path: Path) -> None:
    """The chart's ConfigMap, laid out as the kubelet mounts it where the chart mounts it; an upgrade
    is a ``..data`` swap, and the running service takes the new policy in (no pod restart)."""
    from controller.adapters.memory import InMemoryGatewayPair, InMemoryStateStore
    from controller.demo import SimulatedGateways
    from controller.runtime.clock import SystemClock
    from controller.runtime.service import ControllerService
    from controller.settings import Settings
    from tests.test_policy_catalog import mount

    policy = yaml.safe_load((ROOT / "policies" / "shop-ingress.yaml").read_text())
    policy["spec"]["analysis"]["interval"] = "1s"
    policy["spec"].pop("alerts")
    before = render(helm, tmp_path, {"policies": {"shop.yaml": policy}})
    deployment = find(before, "Deployment")[0]["spec"]["template"]
    assert "annotations" not in deployment["metadata"]  # nothing in the pod changes with the policy
    mount_path = deployment["spec"]["containers"][0]["volumeMounts"][0]["mountPath"]
    env = {e["name"]: e.get("value") for e in deployment["spec"]["containers"][0]["env"]}
    assert env["GATEWAY_CANARY_POLICIES_DIR"] == mount_path
    root = tmp_path / mount_path.strip("/")
    root.mkdir(parents=True)
    mount(root, "v1", find(before, "ConfigMap")[0]["data"])
    pair = InMemoryGatewayPair(target_weight=0, source_weight=100)
    service = ControllerService(
        Settings(policies_dir=root, reload_interval_seconds=0.1),
        pair=pair,
        store=InMemoryStateStore(),
        metrics_for=lambda p: SimulatedGateways(pair),
        clock=SystemClock(),
        serve_http=False,
    )
    service.start()
    try:
        first = wait_for(lambda: service.runners.get("shop-ingress"), timeout=10, what="the policy to load")
        policy["spec"]["gates"]["errorRate"]["max"] = 0.02  # helm upgrade with a changed threshold
        after = render(helm, tmp_path, {"policies": {"shop.yaml": policy}})
        assert find(after, "Deployment")[0]["spec"]["template"] == deployment  # the pod is not rolled
        mount(root, "v2", find(after, "ConfigMap")[0]["data"])
        replaced = wait_for(
            lambda: (r := service.runners.get("shop-ingress")) is not first and r, timeout=10, what="the new policy"
        )
        assert replaced.policy.spec.gates.error_rate.max == 0.02 and not service.stopping.is_set()
    finally:
        service.stop()


# --- the Grafana dashboard: every query answers, with data, against a Prometheus scraping a controller ----


def test_every_dashboard_query_returns_data_from_a_running_controller(helm: Any, tmp_path: Path) -> None:
    import json

    import requests

    from controller.adapters.memory import InMemoryGatewayPair, InMemoryStateStore
    from controller.demo import SimulatedGateways
    from controller.runtime.clock import SystemClock
    from controller.runtime.service import ControllerService
    from controller.settings import Settings
    from tests.conftest import PROMETHEUS, _need, _serving
    from tests.servers import free_port

    documents = render(helm, tmp_path, {"dashboard": {"enabled": True}})
    configmap = next(d for d in find(documents, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard"))
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"  # what Grafana's sidecar looks for
    dashboard = json.loads(configmap["data"]["gateway-canary.json"])
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(expressions) >= 12

    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "shop.yaml").write_text(
        "metadata: {name: shop}\nspec:\n  source: {service: a/gw}\n  target: {service: a/gw-asm}\n"
        "  schedule: {steps: [10, 100], bakeTime: 1h}\n  analysis: {interval: 1s, minRequests: 10}\n"
        "  gates:\n    errorRate: {max: 0.05, maxIncrease: 0.02}\n    latency: {p99Ms: {max: 500}, maxRatio: 2}\n"
    )
    pair = InMemoryGatewayPair(target_weight=0, source_weight=100)
    service = ControllerService(
        Settings(policies_dir=policies, http_host="127.0.0.1", http_port=0),
        pair=pair,
        store=InMemoryStateStore(),
        metrics_for=lambda policy: SimulatedGateways(pair),
        clock=SystemClock(),
    )
    _need(PROMETHEUS)
    service.start()
    try:
        assert service.http is not None
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s}\nscrape_configs:\n"
            f"  - job_name: gateway-canary\n    static_configs: [{{targets: ['127.0.0.1:{service.http.port}']}}]\n"
        )
        url = f"http://127.0.0.1:{port}"
        args = [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip

        def query(expr: str) -> list[Any]:
            answer = requests.get(f"{url}/api/v1/query", params={"query": expr}, timeout=5).json()
            assert answer["status"] == "success", (expr, answer)
            return list(answer["data"]["result"])

        def answers() -> bool:
            try:
                return bool(query('gateway_canary_phase{policy="shop"} == 1'))
            except requests.RequestException:
                return False

        with _serving(args, tmp_path / "prometheus.log", answers, "Prometheus scraping the controller"):
            for expr in expressions:
                concrete = expr.replace("$policy", "shop").replace("$__rate_interval", "1m")
                wait_for(lambda e=concrete: query(e), timeout=30, interval=0.5, what=f"data for {concrete}")
    finally:
        service.stop()


def test_an_upgrade_from_an_unelected_release_recreates_once_then_rolls(
    helm: Any, kube: Cluster, tmp_path: Path
) -> None:
    """The pods of a release without leader election cannot be fenced: the upgrade that turns it on
    replaces them (Recreate) instead of running elected pods beside them; the next upgrade rolls."""
    admin = tmp_path / "admin-kubeconfig"
    admin.write_text(kube.admin_kubeconfig())
    common = ["--kubeconfig", str(admin), "--namespace", kube.ns, "--wait=false"]

    def strategy() -> str:
        path = f"/apis/apps/v1/namespaces/{kube.ns}/deployments/{FULLNAME}"
        return str(kube.plane.call("GET", path)["spec"]["strategy"]["type"])

    helm("install", RELEASE, str(CHART), *common, "--set", "leaderElection.enabled=false", "--set", "replicaCount=1")
    assert strategy() == "Recreate"
    helm("upgrade", RELEASE, str(CHART), *common, "--reset-values")  # the defaults: two replicas, elected
    assert strategy() == "Recreate"
    helm("upgrade", RELEASE, str(CHART), *common, "--reset-values")
    assert strategy() == "RollingUpdate"
    helm("uninstall", RELEASE, "--kubeconfig", str(admin), "--namespace", kube.ns, "--wait=false")
