"""The test control plane itself: the pinned builds, RBAC really on, the audit log really written."""

from __future__ import annotations

import subprocess

import pytest
import requests

from tests.conftest import TEST_BIN, _need
from tests.kube_cluster import Cluster, ControlPlane, binary_paths, pinned_versions


def test_api_server_and_helm_report_the_pinned_versions(control_plane: ControlPlane) -> None:
    versions = pinned_versions()
    served = control_plane.call("GET", "/version")
    assert served["gitVersion"] == versions["KUBERNETES_VERSION"]  # stamped by test-deps.sh's -ldflags
    helm = binary_paths(TEST_BIN)["helm"]
    _need(str(helm))
    out = subprocess.run([str(helm), "version", "--short"], check=True, capture_output=True, text=True).stdout
    assert out.startswith(versions["HELM_VERSION"])


def test_rbac_is_enforced_and_tokens_are_verified(kube: Cluster) -> None:
    kube.add_service("gw", {})
    token = kube.plane.token_for(kube.ns, "nobody-granted-me-anything")
    url = f"{kube.plane.url}/api/v1/namespaces/{kube.ns}/services/gw"
    denied = requests.get(url, headers={"Authorization": f"Bearer {token}"}, verify=str(kube.plane.ca_file), timeout=5)
    assert denied.status_code == 403 and "cannot get resource" in denied.json()["message"]
    forged = requests.get(url, headers={"Authorization": "Bearer forged"}, verify=str(kube.plane.ca_file), timeout=5)
    assert forged.status_code == 401
    with pytest.raises(requests.exceptions.SSLError):  # the serving certificate is from our own CA only
        requests.get(url, verify=True, timeout=5)


def test_the_audit_log_records_who_wrote_what(kube: Cluster) -> None:
    kube.add_service("gw", {"a": "1"})
    kube.edit("gw", {"b": "2"})
    writes = [(w.user, w.verb, w.name, w.code) for w in kube.plane.audited_writes(kube.ns)]
    assert writes == [("test-admin", "create", "gw", 201), ("test-admin", "patch", "gw", 200)]
    assert kube.plane.audited_writes(kube.ns)[1].body == {"metadata": {"annotations": {"b": "2"}}}
