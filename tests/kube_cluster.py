"""A real Kubernetes control plane for the tests: etcd and kube-apiserver on loopback, RBAC on.

What the Go world calls envtest. ``scripts/test-deps.sh`` builds the pinned binaries into
``.cache/bin`` (versions in ``tests/controlplane/versions.env``). ``ControlPlane`` starts them on
free ports with a temporary data dir and its own certificates (openssl): a CA, a serving
certificate for 127.0.0.1, a service-account signing key pair (so TokenRequest can mint tokens for
limited identities), and a static admin token in ``system:masters`` for the harness itself.

An audit log (level Request, writes to Services and Events only) records every write with its
identity, body and status code: it is how tests count the controller's writes and read its patch
bodies without any proxy between the controller and the API server.

``Cluster`` is one test's view: a fresh namespace, the gateway Services created in it, and the
controller's identity, a ServiceAccount bound ONLY to the Role ``gateway-canary rbac`` documents
(via ``controller.rbac.controller_rbac``).
"""

from __future__ import annotations

import base64
import itertools
import json
import secrets
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from controller.core.policy import CanaryPolicy, ServiceRef
from controller.rbac import ROLE_NAME, controller_rbac, state_object_name
from tests.helpers import make_policy
from tests.servers import LB_ID, VGROUP, WEIGHT, ManagedProcess, free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
VERSIONS_FILE = ROOT / "tests" / "controlplane" / "versions.env"
CONTROLLER_ACCOUNT = "gateway-canary"
SOURCE, TARGET = "istio-ingressgateway", "istio-ingressgateway-asm"
CLB = {LB_ID: "lb-test", VGROUP: "rsp-test:80"}
#: the CLB annotations as the migration runbook wants them on both Services (preflight passes)
CLB_READY = {
    **CLB,
    "service.beta.kubernetes.io/alibaba-cloud-loadbalancer-force-override-listeners": "false",
    "service.beta.kubernetes.io/alibaba-cloud-loadbalancer-scheduler": "wrr",
}
_MERGE_PATCH = {"Content-Type": "application/merge-patch+json"}


def pinned_versions() -> dict[str, str]:
    """KUBERNETES_VERSION, ETCD_VERSION and HELM_VERSION from versions.env."""
    pairs = (line.split("=", 1) for line in VERSIONS_FILE.read_text().splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs if not key.lstrip().startswith("#")}


def binary_paths(bin_dir: Path) -> dict[str, Path]:
    """Where test-deps.sh puts each binary: one file per pinned version."""
    versions = pinned_versions()
    return {
        "kube-apiserver": bin_dir / f"kube-apiserver-{versions['KUBERNETES_VERSION']}",
        "kubectl": bin_dir / f"kubectl-{versions['KUBERNETES_VERSION']}",
        "etcd": bin_dir / f"etcd-{versions['ETCD_VERSION']}",
        "helm": bin_dir / f"helm-{versions['HELM_VERSION']}",
    }


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_certificates(directory: Path) -> None:
    """A throw-away CA, a serving certificate for 127.0.0.1 signed by it, a service-account key pair."""
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=gateway-canary-test-ca",
        "-keyout", "ca.key", "-out", "ca.crt", cwd=directory,
    )  # fmt: skip
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=kube-apiserver",
        "-keyout", "serving.key", "-out", "serving.csr", cwd=directory,
    )  # fmt: skip
    (directory / "serving.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
        "basicConstraints=CA:FALSE\nauthorityKeyIdentifier=keyid\n"
    )
    _openssl(
        "x509", "-req", "-in", "serving.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-extfile", "serving.ext", "-out", "serving.crt", cwd=directory,
    )  # fmt: skip
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=directory)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=directory)


_AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Request
    verbs: [create, patch, update, delete]
    resources:
      - {group: "", resources: [services, events, configmaps]}
      - {group: istio.alibabacloud.com, resources: [istiogateways]}
      - {group: coordination.k8s.io, resources: [leases]}
  - level: None
"""


@dataclass(frozen=True)
class AuditedWrite:
    """One write the API server answered, from its audit log."""

    user: str
    verb: str
    resource: str
    namespace: str
    name: str
    code: int
    body: dict[str, Any]
    #: the client's User-Agent (the controller names its replica there) and when the write was made
    user_agent: str = ""
    at: str = ""


class ControlPlane:
    """etcd + kube-apiserver for as long as ``running()`` lasts; the admin client is plain ``requests``."""

    def __init__(self, workdir: Path, binaries: dict[str, Path]) -> None:
        self.workdir = workdir
        self.binaries = binaries
        self.admin_token = secrets.token_hex(16)
        self.ca_file = workdir / "ca.crt"
        self.audit_log = workdir / "audit.log"
        self.url = ""
        self.startup_seconds = 0.0
        self.admin = requests.Session()
        self.admin.headers["Authorization"] = f"Bearer {self.admin_token}"
        self._names = itertools.count(1)

    @contextmanager
    def running(self) -> Iterator[ControlPlane]:
        started = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        _make_certificates(self.workdir)
        (self.workdir / "tokens.csv").write_text(f"{self.admin_token},test-admin,test-admin,system:masters\n")
        (self.workdir / "audit-policy.yaml").write_text(_AUDIT_POLICY)
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        with ExitStack() as stack:
            stack.callback(self.admin.close)
            etcd = ManagedProcess(
                [
                    str(self.binaries["etcd"]),
                    f"--data-dir={self.workdir / 'etcd'}",
                    f"--listen-client-urls={etcd_url}",
                    f"--advertise-client-urls={etcd_url}",
                    f"--listen-peer-urls={peer_url}",
                    f"--initial-advertise-peer-urls={peer_url}",
                    f"--initial-cluster=default={peer_url}",
                    "--unsafe-no-fsync",  # a throw-away store: durability buys nothing, fsyncs cost time
                    "--log-level=warn",
                ],
                self.workdir / "etcd.log",
            )
            stack.callback(etcd.stop)
            self._apiserver_args = [
                str(self.binaries["kube-apiserver"]),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--tls-cert-file={self.workdir / 'serving.crt'}",
                f"--tls-private-key-file={self.workdir / 'serving.key'}",
                f"--client-ca-file={self.ca_file}",
                f"--token-auth-file={self.workdir / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={self.workdir / 'sa.pub'}",
                f"--service-account-signing-key-file={self.workdir / 'sa.key'}",
                "--service-cluster-ip-range=10.0.0.0/16",
                # the default reconciler writes the kubernetes Endpoints for a real node address
                "--endpoint-reconciler-type=none",
                f"--audit-policy-file={self.workdir / 'audit-policy.yaml'}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-mode=blocking",  # the entry is written before the client gets its answer
                f"--cert-dir={self.workdir / 'certs'}",
            ]
            self._etcd = etcd
            self._apiserver = ManagedProcess(self._apiserver_args, self.workdir / "kube-apiserver.log")
            stack.callback(self.stop_apiserver)  # whichever process runs then (restarts replace it)
            self.url = f"https://127.0.0.1:{api_port}"
            self._wait_ready()
            self.startup_seconds = time.monotonic() - started
            yield self

    def _wait_ready(self) -> None:
        wait_for(
            lambda: self._ready(self._apiserver, self._etcd),
            timeout=90,
            interval=0.1,
            what=f"kube-apiserver /readyz (logs in {self.workdir})",
        )

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver (etcd keeps running, with everything in it)."""
        self._apiserver.stop()

    def start_apiserver(self, *, wait: bool = True) -> None:
        """Start kube-apiserver again on the same port, certificates and etcd."""
        self._apiserver = ManagedProcess(self._apiserver_args, self.workdir / "kube-apiserver.log")
        if wait:
            self._wait_ready()

    def _ready(self, *processes: ManagedProcess) -> bool:
        for process in processes:
            if process.proc.poll() is not None:
                raise AssertionError(f"{process.log.name} exited with {process.proc.returncode}: see {process.log}")
        try:
            return self.admin.get(f"{self.url}/readyz", timeout=2, verify=str(self.ca_file)).text == "ok"
        except requests.RequestException:
            return False

    # -- REST as the admin ---------------------------------------------------------------------

    def call(self, method: str, path: str, body: Any = None, *, ok: Iterable[int] = (200, 201)) -> dict[str, Any]:
        headers = _MERGE_PATCH if method == "PATCH" else {}
        # verify per request: a session-level CA loses to REQUESTS_CA_BUNDLE from the environment
        response = self.admin.request(
            method, f"{self.url}{path}", json=body, headers=headers, timeout=10, verify=str(self.ca_file)
        )
        if response.status_code not in ok:
            raise AssertionError(f"{method} {path}: {response.status_code} {response.text[:500]}")
        return dict(response.json()) if response.content else {}

    def create_namespace(self, prefix: str) -> str:
        name = f"{prefix[:40].rstrip('-')}-{next(self._names)}"
        self.call("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
        return name

    def token_for(self, namespace: str, account: str, seconds: int = 3600) -> str:
        """A ServiceAccount (created if new) and a token for it, minted by TokenRequest."""
        self.call(
            "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts", {"metadata": {"name": account}}, ok=(201, 409)
        )
        answer = self.call(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": seconds}},
        )
        return str(answer["status"]["token"])

    def kubeconfig(self, token: str, user: str) -> str:
        ca = base64.b64encode(self.ca_file.read_bytes()).decode()
        return json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "test", "cluster": {"server": self.url, "certificate-authority-data": ca}}],
                "users": [{"name": user, "user": {"token": token}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
                "current-context": "test",
            }
        )

    def audited_writes(self, namespace: str) -> list[AuditedWrite]:
        """Every audited write in ``namespace``, oldest first."""
        writes: list[AuditedWrite] = []
        if not self.audit_log.exists():
            return writes
        with self.audit_log.open() as lines:
            for line in lines:
                entry = json.loads(line)
                ref = entry.get("objectRef") or {}
                if ref.get("namespace") != namespace or entry.get("stage") != "ResponseComplete":
                    continue
                writes.append(
                    AuditedWrite(
                        user=entry["user"]["username"],
                        verb=entry["verb"],
                        resource=ref.get("resource", ""),
                        namespace=namespace,
                        name=ref.get("name", ""),
                        code=int(entry.get("responseStatus", {}).get("code", 0)),
                        body=entry.get("requestObject") or {},
                        user_agent=str(entry.get("userAgent", "")),
                        at=str(entry.get("requestReceivedTimestamp", "")),
                    )
                )
        return writes


class Cluster:
    """One test's namespace on the shared control plane, with the controller's identity in it."""

    def __init__(self, plane: ControlPlane, namespace: str, workdir: Path) -> None:
        self.plane = plane
        self.ns = namespace
        self.workdir = workdir
        self.controller_user = f"system:serviceaccount:{namespace}:{CONTROLLER_ACCOUNT}"
        self._token: str | None = None

    # -- Services ----------------------------------------------------------------------------------

    def add_service(
        self,
        name: str,
        annotations: dict[str, str],
        *,
        labels: dict[str, str] | None = None,
        finalizers: list[str] | None = None,
    ) -> dict[str, Any]:
        """A LoadBalancer Service as the gateways have (no cloud controller here: it stays pending)."""
        metadata: dict[str, Any] = {"name": name, "annotations": annotations}
        if labels:
            metadata["labels"] = labels
        if finalizers:
            metadata["finalizers"] = finalizers
        body = {
            "metadata": metadata,
            "spec": {"type": "LoadBalancer", "ports": [{"name": "http2", "port": 80, "targetPort": 8080}]},
        }
        return self.plane.call("POST", f"/api/v1/namespaces/{self.ns}/services", body)

    def add_gateways(self, target_weight: str = "0", source_weight: str = "100", **target_metadata: Any) -> None:
        """The two gateway Services on one CLB, as the migration starts: ASM at 0, the old one at 100."""
        self.add_service(TARGET, {**CLB_READY, WEIGHT: target_weight}, **target_metadata)
        self.add_service(SOURCE, {**CLB_READY, WEIGHT: source_weight})

    def policy(self, source: str = SOURCE, target: str = TARGET, name: str = "shop", **spec: Any) -> CanaryPolicy:
        """A valid policy for Services in this namespace (``tests.helpers.make_policy`` otherwise)."""
        return make_policy(
            name, source={"service": f"{self.ns}/{source}"}, target={"service": f"{self.ns}/{target}"}, **spec
        )

    def target_share(self) -> float:
        """The ASM gateway's share of the CLB's traffic at the Services' current weights."""
        target = int(self.annotations(TARGET).get(WEIGHT, "100"))
        source = int(self.annotations(SOURCE).get(WEIGHT, "100"))
        return 0.0 if target + source == 0 else target / (target + source)

    def service(self, name: str) -> dict[str, Any]:
        return self.plane.call("GET", f"/api/v1/namespaces/{self.ns}/services/{name}")

    def annotations(self, name: str) -> dict[str, str]:
        return dict(self.service(name)["metadata"].get("annotations") or {})

    def edit(self, name: str, annotations: dict[str, str | None]) -> dict[str, Any]:
        """Another writer (a human with kubectl) merge-patches annotations, with no precondition."""
        return self.plane.call(
            "PATCH", f"/api/v1/namespaces/{self.ns}/services/{name}", {"metadata": {"annotations": annotations}}
        )

    @property
    def events(self) -> list[dict[str, Any]]:
        """gateway-canary's Events in the namespace, read back through the API, oldest first.

        The API server records Events of its own here too (its ClusterIP repair loop does).
        """
        items = self.plane.call("GET", f"/api/v1/namespaces/{self.ns}/events")["items"]
        ours = [event for event in items if (event.get("source") or {}).get("component") == "gateway-canary"]
        return sorted(ours, key=lambda event: int(event["metadata"]["resourceVersion"]))

    # -- what the controller did, from the audit log -------------------------------------------------

    def controller_writes(self) -> list[AuditedWrite]:
        return [write for write in self.plane.audited_writes(self.ns) if write.user == self.controller_user]

    @property
    def patches(self) -> list[tuple[str, dict[str, Any]]]:
        """(Service name, merge-patch body) of every Service patch the controller got accepted."""
        return [
            (write.name, write.body)
            for write in self.controller_writes()
            if write.resource == "services" and write.verb == "patch" and write.code == 200
        ]

    def weight_writes(self, service: str, annotation: str) -> list[str]:
        return [
            body["metadata"]["annotations"][annotation]
            for name, body in self.patches
            if name == service and annotation in body.get("metadata", {}).get("annotations", {})
        ]

    def state(self, policy: str = "shop") -> dict[str, Any] | None:
        """The policy's state object as stored (decoded JSON), None when there is none."""
        answer = self.plane.call(
            "GET", f"/api/v1/namespaces/{self.ns}/configmaps/{state_object_name(policy)}", ok=(200, 404)
        )
        if answer.get("kind") != "ConfigMap":
            return None
        return dict(json.loads(answer["data"]["state"]))

    def configmap(self, name: str) -> dict[str, Any]:
        """A ConfigMap of the test's namespace, as stored."""
        return dict(self.plane.call("GET", f"/api/v1/namespaces/{self.ns}/configmaps/{name}"))

    def service_patches(self) -> list[dict[str, Any]]:
        """The annotation maps of every Service patch the controller got accepted."""
        return [dict(body.get("metadata", {}).get("annotations", {})) for _, body in self.patches]

    # -- the controller's identity -------------------------------------------------------------------

    def grant(self, *policies: CanaryPolicy) -> None:
        """Bind the controller's ServiceAccount to exactly what ``gateway-canary rbac`` prints for these."""
        account = ServiceRef(namespace=self.ns, name=CONTROLLER_ACCOUNT)
        for obj in controller_rbac(policies, account):
            kind = {"Role": "roles", "RoleBinding": "rolebindings"}.get(obj["kind"])
            if kind is None:  # ClusterRole, ClusterRoleBinding (named after this test's namespace)
                self._upsert(f"/apis/rbac.authorization.k8s.io/v1/{obj['kind'].lower()}s", obj)
                continue
            namespace = obj["metadata"]["namespace"]
            self._upsert(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/{kind}", obj)
        for policy in policies:  # RBAC reads its objects through a watch: wait until it has seen them
            for ref in (policy.spec.target.service, policy.spec.source.service):
                written = not (ref == policy.spec.target.service and policy.spec.target.istio_gateway)
                self.wait_until_allowed("patch" if written else "get", ref, allowed=True)

    def state_rules(self, *policies: str) -> list[dict[str, Any]]:
        """The Role rules for the policies' state objects (for narrowed Roles that keep them)."""
        names = sorted(state_object_name(policy) for policy in policies or ("shop",))
        return [
            {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": names, "verbs": ["get", "patch"]},
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
        ]

    def set_rules(self, rules: list[dict[str, Any]]) -> None:
        """Replace the controller's Role with these rules (for identities narrower than documented)."""
        base = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{self.ns}"
        self._upsert(f"{base}/roles", {"metadata": {"name": ROLE_NAME}, "rules": rules})
        binding = {
            "metadata": {"name": ROLE_NAME},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": ROLE_NAME},
            "subjects": [{"kind": "ServiceAccount", "name": CONTROLLER_ACCOUNT, "namespace": self.ns}],
        }
        self._upsert(f"{base}/rolebindings", binding)

    def _upsert(self, collection: str, obj: dict[str, Any]) -> None:
        """Create ``obj`` in ``collection``, or replace the one already there under its name."""
        if self.plane.call("POST", collection, obj, ok=(201, 409)).get("reason") == "AlreadyExists":
            self.plane.call("PUT", f"{collection}/{obj['metadata']['name']}", obj)

    def revoke(self, policy: CanaryPolicy) -> None:
        """Take the controller's Role away (the binding stays, pointing at nothing)."""
        base = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{self.ns}/roles"
        self.plane.call("DELETE", f"{base}/{ROLE_NAME}", ok=(200, 404))
        self.wait_until_allowed("patch", policy.spec.target.service, allowed=False)

    def allowed(
        self, verb: str, resource: str, *, namespace: str | None = None, name: str = "", group: str = ""
    ) -> bool:
        """Whether RBAC lets the controller's identity do it (``namespace=""``: cluster-scoped)."""
        attributes = {"verb": verb, "resource": resource, "group": group, "name": name}
        where = self.ns if namespace is None else namespace
        if where:
            attributes["namespace"] = where
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": self.controller_user,
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{self.ns}", "system:authenticated"],
                "resourceAttributes": attributes,
            },
        }
        answer = self.plane.call("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", review)
        return bool(answer["status"].get("allowed"))

    def wait_until(self, verb: str, resource: str, *, allowed: bool = True, **where: str) -> None:
        """Until RBAC (which reads its objects through a watch) answers ``allowed``."""
        wait_for(
            lambda: self.allowed(verb, resource, **where) is allowed,
            timeout=10,
            what=f"RBAC to {'allow' if allowed else 'deny'} {verb} {resource} {where}",
        )

    def wait_until_allowed(self, verb: str, ref: ServiceRef, *, allowed: bool) -> None:
        self.wait_until(verb, "services", allowed=allowed, namespace=ref.namespace, name=ref.name)

    def kubeconfig(self) -> str:
        """The controller's kubeconfig: its ServiceAccount's token, nothing more."""
        if self._token is None:
            self._token = self.plane.token_for(self.ns, CONTROLLER_ACCOUNT)
        return self.plane.kubeconfig(self._token, CONTROLLER_ACCOUNT)

    def write_kubeconfig(self, path: Path | None = None) -> Path:
        path = path or self.workdir / "kubeconfig"
        path.write_text(self.kubeconfig())
        return path

    def admin_kubeconfig(self) -> str:
        return self.plane.kubeconfig(self.plane.admin_token, "test-admin")
