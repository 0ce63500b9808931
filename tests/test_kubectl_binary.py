"""The pinned kubectl that scripts/test-deps.sh builds: its version, and that it talks to the test cluster."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import kubectl_binary
from tests.kube_cluster import Cluster, pinned_versions


def kubectl(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(kubectl_binary()), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result


def test_kubectl_reports_the_pinned_kubernetes_version() -> None:
    client = json.loads(kubectl("version", "--client", "-o", "json").stdout)["clientVersion"]
    assert client["gitVersion"] == pinned_versions()["KUBERNETES_VERSION"]


def test_kubectl_lists_the_test_clusters_namespaces(kube: Cluster, tmp_path: Path) -> None:
    config = tmp_path / "admin-kubeconfig"
    config.write_text(kube.admin_kubeconfig())
    answer = json.loads(kubectl("--kubeconfig", str(config), "get", "namespaces", "-o", "json").stdout)
    names = {item["metadata"]["name"] for item in answer["items"]}
    assert {kube.ns, "default", "kube-system"} <= names
