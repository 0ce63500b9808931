"""Route parity and ``migrate-config``: the pure comparison, then the real kube-apiserver.

The pure part (``controller.core.routes``) is tested on Gateway dicts shaped as the API returns
them. The adapter and the command run against the session's real kube-apiserver with a minimal
Gateway CRD (``tests/fixtures/istio-gateway-crd.yaml``, installed once) and, for a cluster that
has no Gateway API at all, against an emulator that answers 404 (a real API server with the CRD
cannot be made to lack it without breaking the other tests).

Identity: the adapter tests read as the admin, except ``test_the_controller_needs_list_on_gateways``,
which uses the controller's ServiceAccount and grants it, with the admin client, a ClusterRole of
``list`` on ``gateways.networking.istio.io`` (what ``controller/rbac.py`` is to print).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from controller.adapters.istio_routes import GatewayApiMissing, KubernetesIstioRoutes
from controller.adapters.kube_api import build_api_client
from controller.core.policy import CanaryPolicy
from controller.core.routes import (
    MIGRATED_FROM_ANNOTATION,
    Route,
    RouteParity,
    host_covers,
    migration_plan,
    policy_parity,
    route_parity,
    selects,
    split_host,
)
from controller.core.text import bounded
from controller.errors import AccessDenied
from controller.migrate import migrate_config_main
from tests.helpers import make_policy
from tests.kube_cluster import Cluster, ControlPlane
from tests.servers import _Quiet, _Server, free_port, wait_for

OLD = {"istio": "ingressgateway"}
ASM = {"istio": "ingressgateway-asm"}


# --- builders -----------------------------------------------------------------------------------------


def server(port: int, hosts: list[str], protocol: str = "HTTP", **tls: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"port": {"number": port, "name": f"{protocol.lower()}-{port}", "protocol": protocol}}
    entry["hosts"] = hosts
    if tls:
        entry["tls"] = tls
    return entry


def gateway(name: str, selector: dict[str, str], *servers: dict[str, Any], ns: str = "istio-system") -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": dict(selector), "servers": list(servers)},
    }


def parity(source: list[dict[str, Any]], target: list[dict[str, Any]], ignore: tuple[str, ...] = ()) -> RouteParity:
    return route_parity(source, target, source_selector=OLD, target_selector=ASM, ignore_hosts=ignore)


def migration_manifests(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """Just the manifests of ``migration_plan``."""
    return [item.manifest for item in migration_plan(*args, **kwargs)]


def missing_names(result: RouteParity) -> list[str]:
    return sorted(f"{item.route.host}:{item.route.port}" for item in result.missing)


# --- hosts and selectors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "host", "covered"),
    [
        ("a.example.com", "a.example.com", True),
        ("A.Example.com", "a.example.com", True),
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "*.b.example.com", True),
        ("*.example.com", "*.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "a.example.org", False),
        ("*.example.com", "*", False),
        ("*.b.example.com", "*.example.com", False),
        ("*", "anything.example.com", True),
        ("*", "*", True),
        ("a.example.com", "*.example.com", False),
        ("a.example.com", "b.example.com", False),
    ],
)
def test_host_coverage_follows_istio_wildcards(pattern: str, host: str, covered: bool) -> None:
    assert host_covers(pattern, host) is covered


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("shop/a.example.com", ("shop", "a.example.com")),
        ("*/a.example.com", ("*", "a.example.com")),
        ("./a.example.com", (".", "a.example.com")),
        ("A.Example.COM.", ("*", "a.example.com")),
    ],
)
def test_host_entries_split_into_namespace_and_host(entry: str, expected: tuple[str, str]) -> None:
    assert split_host(entry) == expected


def test_a_gateway_selects_when_its_selector_is_a_subset_of_the_policys() -> None:
    plain = gateway("g", {"istio": "ingressgateway"})
    narrower = gateway("g", {"istio": "ingressgateway", "rev": "canary"})
    assert selects(plain, {"istio": "ingressgateway", "app": "istio-ingressgateway"})
    assert selects(plain, OLD)
    assert not selects(plain, ASM)
    assert not selects(narrower, OLD)  # the pods would need rev=canary, which the policy does not promise
    assert selects(gateway("g", {}), ASM)  # no selector: every gateway


# --- what the target lacks ----------------------------------------------------------------------------


def test_a_host_only_the_source_serves_is_missing_and_named_in_the_refusal() -> None:
    source = [gateway("shop", OLD, server(80, ["a.example.com", "b.example.com"]))]
    target = [gateway("shop-asm", ASM, server(80, ["a.example.com"]))]
    result = parity(source, target)
    assert missing_names(result) == ["b.example.com:80"]
    assert result.source_gateways == ("istio-system/shop",)
    assert result.target_gateways == ("istio-system/shop-asm",)
    assert not result.ok
    refusal = result.refusal("policies/shop.yaml")
    assert refusal is not None
    assert "b.example.com:80 (HTTP, no TLS) from Gateway istio-system/shop: not served" in refusal
    assert "the target gateway {istio: ingressgateway-asm}" in refusal
    assert "the source gateway {istio: ingressgateway}" in refusal
    assert "`gateway-canary migrate-config policies/shop.yaml`" in refusal
    assert "a.example.com:80" not in refusal
    assert "\n" not in refusal


def test_full_parity_has_no_refusal() -> None:
    source = [gateway("shop", OLD, server(80, ["a.example.com"]), server(443, ["a.example.com"], "HTTPS"))]
    target = [gateway("shop-asm", ASM, server(80, ["a.example.com"]), server(443, ["a.example.com"], "HTTPS"))]
    result = parity(source, target)
    assert result.ok
    assert result.missing == ()
    assert result.refusal() is None


def test_wildcards_on_the_target_cover_source_hosts() -> None:
    source = [gateway("shop", OLD, server(80, ["a.example.com", "x.y.example.com", "*.api.example.com", "other.org"]))]
    target = [gateway("wild", ASM, server(80, ["*.example.com"]))]
    assert missing_names(parity(source, target)) == ["other.org:80"]
    assert parity(source, [gateway("all", ASM, server(80, ["*"]))]).ok


def test_a_source_wildcard_needs_an_equal_or_wider_target_wildcard() -> None:
    source = [gateway("shop", OLD, server(80, ["*.example.com"]))]
    narrower = [gateway("t", ASM, server(80, ["a.example.com", "*.a.example.com"]))]
    assert missing_names(parity(source, narrower)) == ["*.example.com:80"]
    assert parity(source, [gateway("t", ASM, server(80, ["*.example.com"]))]).ok


def test_namespace_forms_compare_by_host() -> None:
    source = [gateway("shop", OLD, server(80, ["shop/a.example.com", "./b.example.com", "c.example.com"]))]
    target = [gateway("t", ASM, server(80, ["*/a.example.com", "b.example.com", "other/c.example.com"]))]
    assert parity(source, target).ok


def test_a_different_port_does_not_cover() -> None:
    source = [gateway("shop", OLD, server(443, ["a.example.com"], "HTTPS", mode="SIMPLE", credentialName="c"))]
    target = [gateway("t", ASM, server(8443, ["a.example.com"], "HTTPS", mode="SIMPLE", credentialName="c"))]
    result = parity(source, target)
    assert missing_names(result) == ["a.example.com:443"]
    assert result.missing[0].reason == "not served"
    assert result.missing[0].conflicting_gateway is None


def test_tls_mode_mismatch_is_missing_and_names_the_conflicting_gateway() -> None:
    source = [gateway("shop", OLD, server(443, ["a.example.com"], "HTTPS", mode="SIMPLE", credentialName="a-cert"))]
    target = [gateway("pass", ASM, server(443, ["a.example.com"], "HTTPS", mode="PASSTHROUGH"), ns="asm")]
    result = parity(source, target)
    assert [str(item.route) for item in result.missing] == ["a.example.com:443 (HTTPS, SIMPLE)"]
    assert result.missing[0].reason == "served with TLS mode PASSTHROUGH by Gateway asm/pass"
    assert result.missing[0].conflicting_gateway == "asm/pass"
    refusal = result.refusal()
    assert refusal is not None
    assert "TLS mode PASSTHROUGH" in refusal


@pytest.mark.parametrize(
    ("source_tls", "target_tls"),
    [
        ({"mode": "PASSTHROUGH"}, {"mode": "SIMPLE", "credentialName": "c"}),
        ({"mode": "SIMPLE", "credentialName": "c"}, {"mode": "MUTUAL", "credentialName": "c"}),
    ],
)
def test_every_tls_mode_difference_is_a_mismatch(source_tls: dict[str, str], target_tls: dict[str, str]) -> None:
    source = [gateway("shop", OLD, server(443, ["a.example.com"], "HTTPS", **source_tls))]
    target = [gateway("t", ASM, server(443, ["a.example.com"], "HTTPS", **target_tls))]
    result = parity(source, target)
    assert missing_names(result) == ["a.example.com:443"]
    assert result.missing[0].reason == f"served with TLS mode {target_tls['mode']} by Gateway istio-system/t"


def test_tls_without_a_mode_is_istios_default_passthrough() -> None:
    source = [gateway("shop", OLD, server(443, ["a.example.com"], "TLS", credentialName="ignored"))]
    target = [gateway("t", ASM, server(443, ["a.example.com"], "TLS", mode="PASSTHROUGH"))]
    assert parity(source, target).ok


def test_a_target_without_the_tls_credential_does_not_cover() -> None:
    source = [gateway("shop", OLD, server(443, ["a.example.com"], "HTTPS", mode="SIMPLE", credentialName="a-cert"))]
    bare = [gateway("t", ASM, server(443, ["a.example.com"], "HTTPS", mode="SIMPLE"))]
    result = parity(source, bare)
    assert missing_names(result) == ["a.example.com:443"]
    assert "without a TLS credential" in result.missing[0].reason
    # another Secret name is the ASM side's business (its own namespace, its own copy): covered
    own_secret = [gateway("t", ASM, server(443, ["a.example.com"], "HTTPS", mode="SIMPLE", credentialName="asm-a"))]
    assert parity(source, own_secret).ok


def test_protocols_compare_by_family() -> None:
    source = [gateway("shop", OLD, server(80, ["a.example.com"], "HTTP2"), server(9000, ["b.example.com"], "HTTP"))]
    target = [gateway("t", ASM, server(80, ["a.example.com"], "HTTP"), server(9000, ["b.example.com"], "TCP"))]
    result = parity(source, target)
    assert missing_names(result) == ["b.example.com:9000"]
    assert result.missing[0].reason == "served as TCP by Gateway istio-system/t"


def test_ignore_hosts_by_host_by_host_and_port_and_by_wildcard() -> None:
    source = [
        gateway(
            "shop",
            OLD,
            server(80, ["a.example.com", "b.example.com", "x.internal.example.com"]),
            server(443, ["a.example.com", "b.example.com"], "HTTPS", mode="SIMPLE", credentialName="c"),
        )
    ]
    assert len(parity(source, []).missing) == 5
    result = parity(source, [], ignore=("b.example.com", "a.example.com:443", "*.internal.example.com"))
    assert missing_names(result) == ["a.example.com:80"]
    assert sorted(f"{i.route.host}:{i.route.port}" for i in result.ignored) == [
        "a.example.com:443",
        "b.example.com:443",
        "b.example.com:80",
        "x.internal.example.com:80",
    ]
    assert missing_names(parity(source, [], ignore=("a.example.com:8080",))) == [
        "a.example.com:443",
        "a.example.com:80",
        "b.example.com:443",
        "b.example.com:80",
        "x.internal.example.com:80",
    ]


def test_many_gateways_on_both_sides_and_unrelated_ones_left_out() -> None:
    source = [
        gateway("shop", OLD, server(80, ["shop.example.com"]), ns="shop"),
        gateway("api", OLD, server(443, ["api.example.com"], "HTTPS", mode="SIMPLE", credentialName="api")),
        gateway("internal", {"istio": "internal-gateway"}, server(80, ["internal.example.com"])),
    ]
    target = [
        gateway("shop-asm", ASM, server(80, ["shop.example.com"]), ns="shop"),
        # serves api.example.com, but on a Gateway that selects the OLD gateway: no help to the target
        gateway("api-old", OLD, server(443, ["api.example.com"], "HTTPS", mode="SIMPLE", credentialName="api")),
    ]
    result = parity(source + target, source + target)  # one control plane for both
    assert missing_names(result) == ["api.example.com:443"]  # once, though two source Gateways serve it
    assert result.missing[0].gateway == "istio-system/api"
    assert set(result.source_gateways) == {"shop/shop", "istio-system/api", "istio-system/api-old"}
    assert result.target_gateways == ("shop/shop-asm",)


def test_a_source_that_no_gateway_selects_is_noted() -> None:
    result = parity([gateway("x", {"istio": "other"}, server(80, ["a.example.com"]))], [])
    assert result.ok
    assert result.notes and "no Istio Gateway selects the source gateway {istio: ingressgateway}" in result.notes[0]


def test_malformed_servers_are_skipped_with_a_note() -> None:
    broken = gateway("b", OLD, {"port": {"protocol": "HTTP"}, "hosts": ["a.example.com"]}, server(80, []))
    result = parity([broken], [])
    assert result.ok
    assert any("servers[0]: no port number" in note for note in result.notes)
    assert any("servers[1]: no hosts" in note for note in result.notes)


def test_the_refusal_names_ten_and_counts_the_rest() -> None:
    source = [gateway("many", OLD, server(80, [f"h{i}.example.com" for i in range(13)]))]
    refusal = parity(source, []).refusal()
    assert refusal is not None
    assert "h9.example.com:80" in refusal
    assert "h10.example.com:80" not in refusal
    assert "and 3 more" in refusal
    assert "13 host:port(s)" in refusal
    assert "gateway-canary migrate-config <policy file>" in bounded(refusal)  # the fix survives a cut reason


def test_policy_parity_uses_the_policys_selectors_and_ignore_hosts() -> None:
    policy = make_policy(routes={"ignoreHosts": ["b.example.com"]})
    source = [gateway("shop", OLD, server(80, ["a.example.com", "b.example.com", "c.example.com"]))]
    target = [gateway("shop-asm", ASM, server(80, ["a.example.com"]))]
    result = policy_parity(policy, source, target)
    assert missing_names(result) == ["c.example.com:80"]
    assert [item.route.host for item in result.ignored] == ["b.example.com"]


# --- manifests ----------------------------------------------------------------------------------------


def _live(gw: dict[str, Any]) -> dict[str, Any]:
    """``gw`` as the API server returns it: server-set metadata, status, kubectl's annotation."""
    live = json.loads(json.dumps(gw))
    live["metadata"].update(
        uid="1f0c-uid",
        resourceVersion="4711",
        generation=3,
        creationTimestamp="2026-01-01T00:00:00Z",
        managedFields=[{"manager": "kubectl"}],
        ownerReferences=[{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": "abc"}],
        labels={"team": "shop"},
        annotations={"kubectl.kubernetes.io/last-applied-configuration": "{...}", "team.example.com/owner": "shop"},
    )
    live["status"] = {"conditions": []}
    return live


def test_manifests_copy_only_missing_servers_and_hosts_with_a_clean_identity() -> None:
    source = [
        _live(
            gateway(
                "shop",
                OLD,
                server(80, ["shop/a.example.com", "./b.example.com"]),
                server(443, ["shop/a.example.com"], "HTTPS", mode="SIMPLE", credentialName="a-cert"),
                server(8080, ["c.example.com"]),
                ns="shop",
            )
        ),
        _live(gateway("complete", OLD, server(80, ["d.example.com"]), ns="shop")),
    ]
    target = [gateway("t", ASM, server(80, ["a.example.com", "c.example.com"]), server(8080, ["c.example.com"]))]
    result = parity(source, target)
    assert missing_names(result) == ["a.example.com:443", "b.example.com:80", "d.example.com:80"]
    manifests = migration_manifests(source, result.missing, ASM)
    assert [m["metadata"]["name"] for m in manifests] == ["shop-asm", "complete-asm"]
    shop = manifests[0]
    assert shop["apiVersion"] == "networking.istio.io/v1"
    assert shop["kind"] == "Gateway"
    assert shop["spec"]["selector"] == ASM
    assert shop["spec"]["servers"] == [
        server(80, ["./b.example.com"]),
        server(443, ["shop/a.example.com"], "HTTPS", mode="SIMPLE", credentialName="a-cert"),
    ]
    assert shop["metadata"] == {
        "name": "shop-asm",
        "namespace": "shop",
        "labels": {"team": "shop"},
        "annotations": {"team.example.com/owner": "shop", MIGRATED_FROM_ANNOTATION: "shop/shop"},
    }
    assert "status" not in shop
    assert source[0]["spec"]["selector"] == OLD  # the source objects are not changed
    assert len(source[0]["spec"]["servers"][0]["hosts"]) == 2


def test_manifest_names_never_clash_and_namespaces_can_be_mapped() -> None:
    source = [
        gateway("shop", OLD, server(80, ["a.example.com"]), ns="shop"),
        gateway("shop-asm", OLD, server(80, ["b.example.com"]), ns="shop"),
    ]
    result = parity(source, [])
    names = [m["metadata"]["name"] for m in migration_manifests(source, result.missing, ASM)]
    assert names == ["shop-asm-2", "shop-asm-asm"]  # "shop-asm" is a source Gateway's name
    existing = {("shop", "shop-asm"), ("shop", "shop-asm-2")}  # already on the ASM side
    taken = [m["metadata"]["name"] for m in migration_manifests(source[:1], result.missing, ASM, existing=existing)]
    assert taken == ["shop-asm-3"]
    mapped = migration_manifests(source[:1], result.missing, ASM, {"shop": "asm-shop"})
    assert mapped[0]["metadata"]["namespace"] == "asm-shop"
    assert mapped[0]["metadata"]["name"] == "shop-asm"  # no clash in the other namespace


def test_the_plan_says_what_each_manifest_adds_and_what_it_conflicts_with() -> None:
    source = [gateway("shop", OLD, server(443, ["a.example.com"], "HTTPS", mode="SIMPLE", credentialName="c"))]
    target = [gateway("pass", ASM, server(443, ["a.example.com"], "HTTPS", mode="PASSTHROUGH"))]
    result = parity(source, target)
    plan = migration_plan(source, result.missing, ASM, api_version="networking.istio.io/v1beta1")
    assert len(plan) == 1
    assert [str(item.route) for item in plan[0].adds] == ["a.example.com:443 (HTTPS, SIMPLE)"]
    assert plan[0].conflicts == ("istio-system/pass",)
    assert plan[0].manifest["apiVersion"] == "networking.istio.io/v1beta1"


def test_nothing_missing_means_no_manifests() -> None:
    source = [gateway("shop", OLD, server(80, ["a.example.com"]))]
    assert migration_manifests(source, parity(source, [gateway("t", ASM, server(80, ["*"]))]).missing, ASM) == []


def test_route_text() -> None:
    assert str(Route("a.example.com", 443, "HTTPS", "SIMPLE")) == "a.example.com:443 (HTTPS, SIMPLE)"
    assert str(Route("a.example.com", 80, "HTTP")) == "a.example.com:80 (HTTP, no TLS)"


# --- the real kube-apiserver --------------------------------------------------------------------------


def selectors(kube: Cluster) -> tuple[dict[str, str], dict[str, str]]:
    """Selectors unique to this test: every test's Gateways share one API server and are listed cluster-wide."""
    tag = {"gateway-canary-test": kube.ns}
    return {**OLD, **tag}, {**ASM, **tag}


def policy_spec(kube: Cluster) -> dict[str, Any]:
    old, asm = selectors(kube)
    return {
        "source": {"service": f"{kube.ns}/istio-ingressgateway", "gatewaySelector": old},
        "target": {"service": f"{kube.ns}/istio-ingressgateway-asm", "gatewaySelector": asm},
        "schedule": {"steps": [10, 50, 100], "bakeTime": "5m"},
        "gates": {"errorRate": {"max": 0.01}},
    }


def routes_policy(kube: Cluster) -> CanaryPolicy:
    return CanaryPolicy.model_validate({"metadata": {"name": "shop"}, "spec": policy_spec(kube)})


def create_gateway(kube: Cluster, body: dict[str, Any], version: str = "v1") -> dict[str, Any]:
    namespace = body["metadata"].get("namespace") or kube.ns
    path = f"/apis/networking.istio.io/{version}/namespaces/{namespace}/gateways"
    return kube.plane.call("POST", path, {**body, "apiVersion": f"networking.istio.io/{version}"})


def admin_routes(kube: Cluster) -> KubernetesIstioRoutes:
    path = kube.workdir / "admin-kubeconfig"
    path.write_text(kube.admin_kubeconfig())
    return KubernetesIstioRoutes(build_api_client(path), build_api_client(path))


def two_host_source(kube: Cluster) -> None:
    """The old gateway serves a and b on 80, and a over TLS on 443; the ASM gateway only a on 80."""
    old, asm = selectors(kube)
    tls = {"mode": "SIMPLE", "credentialName": "a-cert"}
    source = gateway(
        "shop",
        old,
        server(80, [f"{kube.ns}/a.example.com", "./b.example.com"]),
        server(443, ["./a.example.com"], "HTTPS", **tls),
        ns=kube.ns,
    )
    create_gateway(kube, source)
    create_gateway(kube, gateway("shop-asm", asm, server(80, ["*/a.example.com"]), ns=kube.ns), version="v1beta1")


def test_parity_against_the_api_server_names_the_missing_host_port(
    istio_gateway_api: ControlPlane, kube: Cluster
) -> None:
    two_host_source(kube)
    result = admin_routes(kube).parity(routes_policy(kube))
    assert sorted(str(item.route) for item in result.missing) == [
        "a.example.com:443 (HTTPS, SIMPLE)",
        "b.example.com:80 (HTTP, no TLS)",
    ]
    assert {item.gateway for item in result.missing} == {f"{kube.ns}/shop"}
    assert result.target_gateways == (f"{kube.ns}/shop-asm",)
    refusal = result.refusal("shop.yaml")
    assert refusal is not None
    assert "b.example.com:80" in refusal
    assert "a.example.com:443" in refusal
    assert "gateway-canary migrate-config shop.yaml" in refusal


def test_parity_is_not_read_when_the_policy_turns_it_off(istio_gateway_api: ControlPlane, kube: Cluster) -> None:
    two_host_source(kube)
    spec = policy_spec(kube) | {"routes": {"check": False}}
    policy = CanaryPolicy.model_validate({"metadata": {"name": "shop"}, "spec": spec})
    result = admin_routes(kube).parity(policy)
    assert result.ok
    assert result.notes == ("route parity not checked (spec.routes.check: false)",)


@pytest.fixture
def clean_settings(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("GATEWAY_CANARY_KUBE_CONTEXT", "GATEWAY_CANARY_ASM_KUBECONFIG", "GATEWAY_CANARY_ASM_CONTEXT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def write_policy(kube: Cluster) -> Path:
    path = kube.workdir / "shop.yaml"
    document = {"apiVersion": "gateway-canary.io/v1alpha1", "kind": "CanaryPolicy", "metadata": {"name": "shop"}}
    path.write_text(yaml.safe_dump({**document, "spec": policy_spec(kube)}, sort_keys=False))
    return path


def run_migrate(*paths: Path | str) -> tuple[int, str, str]:
    """The command's exit code, output and errors; the logging it configured is undone afterwards."""
    out, err = io.StringIO(), io.StringIO()
    try:
        code = migrate_config_main([str(path) for path in paths], output=out, errors=err)
    finally:
        structlog.reset_defaults()
        root = logging.getLogger()
        for handler in [h for h in root.handlers if h.get_name() == "gateway-canary"]:
            root.removeHandler(handler)
    return code, out.getvalue(), err.getvalue()


def test_migrate_config_output_applied_closes_the_gap(
    istio_gateway_api: ControlPlane, kube: Cluster, clean_settings: pytest.MonkeyPatch
) -> None:
    kube.add_gateways()
    two_host_source(kube)
    admin = kube.workdir / "admin-kubeconfig"
    admin.write_text(kube.admin_kubeconfig())
    clean_settings.setenv("GATEWAY_CANARY_KUBECONFIG", str(admin))
    policy_file = write_policy(kube)

    code, out, err = run_migrate(policy_file)
    assert (code, err) == (0, "")
    documents = [doc for doc in yaml.safe_load_all(out) if doc is not None]
    assert len(documents) == 1
    manifest = documents[0]
    _, asm = selectors(kube)
    assert manifest["metadata"]["name"] == "shop-asm-2"  # shop-asm exists on the ASM side: never overwritten
    assert manifest["metadata"]["namespace"] == kube.ns
    assert manifest["metadata"]["annotations"] == {MIGRATED_FROM_ANNOTATION: f"{kube.ns}/shop"}
    assert set(manifest["metadata"]) == {"name", "namespace", "annotations"}
    assert manifest["spec"]["selector"] == asm
    assert manifest["spec"]["servers"] == [
        server(80, ["./b.example.com"]),
        server(443, ["./a.example.com"], "HTTPS", mode="SIMPLE", credentialName="a-cert"),
    ]
    assert f"# adds b.example.com:80 (HTTP, no TLS) from Gateway {kube.ns}/shop\n" in out
    assert f"# adds a.example.com:443 (HTTPS, SIMPLE) from Gateway {kube.ns}/shop\n" in out
    assert out.index("# adds b.example.com:80") < out.index("apiVersion: networking.istio.io/")

    for document in documents:
        create_gateway(kube, document, version=document["apiVersion"].rsplit("/", 1)[1])
    routes = admin_routes(kube)

    def closed() -> RouteParity | None:
        found = routes.parity(routes_policy(kube))
        return found if found.ok else None

    after = wait_for(closed, timeout=10, what="parity after applying the manifests")
    assert after.refusal() is None
    assert set(after.target_gateways) == {f"{kube.ns}/shop-asm", f"{kube.ns}/shop-asm-2"}

    code, out, err = run_migrate(policy_file)
    assert (code, err) == (0, "")
    expected = (
        f"# nothing to migrate: every host:port of {{gateway-canary-test: {kube.ns}, istio: ingressgateway}} "
        f"is served by {{gateway-canary-test: {kube.ns}, istio: ingressgateway-asm}}"
    )
    assert expected in out.splitlines()
    assert [doc for doc in yaml.safe_load_all(out) if doc is not None] == []


def test_the_controller_needs_list_on_gateways_and_gateway_canary_rbac_grants_it(
    istio_gateway_api: ControlPlane, kube: Cluster
) -> None:
    two_host_source(kube)
    routes = KubernetesIstioRoutes(build_api_client(kube.write_kubeconfig()))
    with pytest.raises(AccessDenied, match="forbidden"):
        routes.parity(routes_policy(kube))
    kube.grant(routes_policy(kube))  # what `gateway-canary rbac` prints: list gateways, cluster-wide
    kube.wait_until("list", "gateways", namespace="", group="networking.istio.io")

    def allowed() -> RouteParity | None:
        try:
            return routes.parity(routes_policy(kube))
        except AccessDenied:
            return None  # RBAC has not seen the binding yet

    result = wait_for(allowed, timeout=10, interval=0.1, what="list on gateways granted")
    assert sorted(f"{i.route.host}:{i.route.port}" for i in result.missing) == ["a.example.com:443", "b.example.com:80"]


# --- a cluster without the Gateway API: an emulator -------------------------------------------------


class NoIstioApiServer:
    """EMULATOR (not kube-apiserver): 404 for every Gateway list, as a cluster without Istio's CRDs.

    ``serve`` names one API version to answer with an empty list instead (a cluster with an older
    Istio). Records the paths asked, to check the order versions are tried in.
    """

    def __init__(self, serve: str | None = None) -> None:
        self.paths: list[str] = []
        emulator = self

        class Handler(_Quiet):
            def do_GET(self) -> None:
                emulator.paths.append(self.path)
                if serve and self.path.startswith(f"/apis/networking.istio.io/{serve}/gateways"):
                    self.reply(200, {"kind": "GatewayList", "apiVersion": f"networking.istio.io/{serve}", "items": []})
                    return
                self.reply(404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404})

        self.server = _Server(Handler)

    def kubeconfig(self, directory: Path) -> Path:
        path = directory / f"emulator-{self.server.port}.kubeconfig"
        path.write_text(kubeconfig_for(self.server.url))
        return path

    def close(self) -> None:
        self.server.close()


def kubeconfig_for(url: str) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": url}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "c",
        }
    )


@pytest.fixture
def no_istio() -> Iterator[NoIstioApiServer]:
    emulator = NoIstioApiServer()
    yield emulator
    emulator.close()


def test_a_side_without_the_gateway_api_is_a_refusal_not_a_crash(no_istio: NoIstioApiServer, tmp_path: Path) -> None:
    routes = KubernetesIstioRoutes(build_api_client(no_istio.kubeconfig(tmp_path)))
    result = routes.parity(make_policy())
    assert not result.ok
    refusal = result.refusal()
    assert refusal is not None
    assert refusal.startswith(
        "route parity cannot be checked: the data-plane cluster serves no gateways.networking.istio.io"
    )
    assert "(tried v1, v1beta1, v1alpha3)" in refusal
    assert [path.split("?")[0] for path in no_istio.paths] == [
        "/apis/networking.istio.io/v1/gateways",
        "/apis/networking.istio.io/v1beta1/gateways",
        "/apis/networking.istio.io/v1alpha3/gateways",
    ]
    with pytest.raises(GatewayApiMissing, match="Istio's CRDs are not installed"):
        routes.manifests(make_policy())


def test_an_older_api_version_is_found_and_remembered(tmp_path: Path) -> None:
    emulator = NoIstioApiServer(serve="v1alpha3")
    try:
        routes = KubernetesIstioRoutes(build_api_client(emulator.kubeconfig(tmp_path)))
        assert routes.parity(make_policy()).ok
        assert routes.parity(make_policy()).ok
        asked = [path.split("?")[0].split("/")[3] for path in emulator.paths]
        assert asked == ["v1", "v1beta1", "v1alpha3", "v1alpha3"]
    finally:
        emulator.close()


def test_migrate_config_refuses_an_asm_side_without_the_gateway_api(
    istio_gateway_api: ControlPlane, kube: Cluster, no_istio: NoIstioApiServer, clean_settings: pytest.MonkeyPatch
) -> None:
    admin = kube.workdir / "admin-kubeconfig"
    admin.write_text(kube.admin_kubeconfig())
    clean_settings.setenv("GATEWAY_CANARY_KUBECONFIG", str(admin))
    clean_settings.setenv("GATEWAY_CANARY_ASM_KUBECONFIG", str(no_istio.kubeconfig(kube.workdir)))
    code, out, err = run_migrate(write_policy(kube))
    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1
    assert "policy shop" in err
    assert "the ASM control plane serves no gateways.networking.istio.io" in err
    assert "GATEWAY_CANARY_ASM_KUBECONFIG" in err


# --- migrate-config's failures ------------------------------------------------------------------------

POLICY_TEXT = """\
apiVersion: gateway-canary.io/v1alpha1
kind: CanaryPolicy
metadata: {name: shop}
spec:
  source: {service: istio-system/istio-ingressgateway}
  target: {service: istio-system/istio-ingressgateway-asm}
  schedule: {steps: [10, 50, 100]}
  gates: {errorRate: {max: 0.01}}
"""


def test_migrate_config_on_an_unreachable_api_server_is_one_line(
    tmp_path: Path, clean_settings: pytest.MonkeyPatch
) -> None:
    kubeconfig = tmp_path / "nowhere.kubeconfig"
    kubeconfig.write_text(kubeconfig_for(f"http://127.0.0.1:{free_port()}"))
    clean_settings.setenv("GATEWAY_CANARY_KUBECONFIG", str(kubeconfig))
    policy = tmp_path / "shop.yaml"
    policy.write_text(POLICY_TEXT)
    code, out, err = run_migrate(policy)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert "API server unreachable" in err
    assert "Traceback" not in err


def test_migrate_config_on_a_bad_policy_prints_nothing_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("metadata: {name: shop}\nspec:\n  source: {service: nowhere}\n")
    code, out, err = run_migrate(bad, tmp_path / "missing.yaml")
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert any(line.startswith(f"{bad}:") for line in lines)
    assert any(line.startswith(f"{tmp_path / 'missing.yaml'}:1: no such file") for line in lines)
    assert all("Traceback" not in line for line in lines)
