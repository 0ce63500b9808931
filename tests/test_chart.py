"""The Helm chart, tested like code: real helm (lint, template, install, upgrade, uninstall) against
the real kube-apiserver, the chart's RBAC compared with ``gateway-canary rbac``, its identity probed."""

from __future__ import annotations

import os
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
}


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
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
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
        ({"replicaCount": 2}, "maximum: got 2, want 1"),
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


# --- RBAC: the same rules as `gateway-canary rbac` -----------------------------------------------------


def _rules(objects: list[dict[str, Any]]) -> dict[str, set[tuple[str, tuple[str, ...], tuple[str, ...]]]]:
    rules: dict[str, set[tuple[str, tuple[str, ...], tuple[str, ...]]]] = {}
    for role in (o for o in objects if o["kind"] == "Role"):
        rules[role["metadata"]["namespace"]] = {
            (rule["resources"][0], tuple(sorted(rule["verbs"])), tuple(sorted(rule.get("resourceNames", []))))
            for rule in role["rules"]
        }
    return rules


def test_the_charts_rbac_is_what_gateway_canary_rbac_prints(helm: Any, tmp_path: Path) -> None:
    policies = shipped_policies()
    documents = render(helm, tmp_path, {"policies": policies})
    models = [CanaryPolicy.model_validate(policy) for policy in policies.values()]
    expected = controller_rbac(models, ServiceRef(namespace="canary", name=FULLNAME))
    assert _rules(documents) == _rules(expected)
    bindings = find(documents, "RoleBinding")
    assert {b["metadata"]["namespace"] for b in bindings} == set(_rules(expected))
    assert all(b["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": "canary"}] for b in bindings)
    assert not find(documents, "ClusterRole") and not find(documents, "ClusterRoleBinding")


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
    assert _rules(documents) == _rules(controller_rbac([policy], ServiceRef(namespace="canary", name=FULLNAME)))


# --- installed into the real API server ----------------------------------------------------------------


def can(kube: Cluster, user: str, verb: str, resource: str, namespace: str, name: str = "") -> bool:
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": user,
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{kube.ns}", "system:authenticated"],
            "resourceAttributes": {"namespace": namespace, "verb": verb, "resource": resource, "name": name},
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
        kube, user, "update", "configmaps", kube.ns, "gateway-canary-shop"
    )

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
