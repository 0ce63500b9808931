"""The least privilege the controller needs, as Kubernetes RBAC objects derived from the policies.

The controller reads and patches exactly the Services its policies name (``resourceNames``),
records Events beside the target Services, and keeps one state object per policy (a ConfigMap
``gateway-canary-<policy>``) in its own namespace: ``get``/``patch`` on exactly those names, and
``create`` (which RBAC cannot restrict by name) on ConfigMaps in that one namespace. For leader
election among replicas it reads and renews one ``coordination.k8s.io`` Lease there (``get``/``update``
by name) and may create it (``create`` on Leases in that namespace, again not restricted by name).

To verify that the cloud applied a weight (``docs/alibaba-cloud.md``) it also reads, in each
gateway namespace, the Events (the cloud controller's confirmations; read with a field selector
naming the Service) and the EndpointSlices (the backends the weight is spread over). Two things
are cluster-wide, because the objects are: listing Nodes (the backends in the default Cluster
mode) and listing Istio ``Gateway`` objects (route parity: which hosts each gateway serves; they
live in any namespace). With a target ``istioGateway`` it gets and patches exactly that
IstioGateway; on a separate ASM control plane (``GATEWAY_CANARY_ASM_KUBECONFIG``) that Role and
the ClusterRole are applied there (the objects say so in an annotation).

It never deletes. ``gateway-canary rbac`` prints these objects, the tests apply them to a real
kube-apiserver and run the controller under them, and the adapter checks the same permissions
before its first write (see ``access_needed``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from controller.core.istio_gateway import ISTIO_GATEWAY_GROUP
from controller.core.policy import CanaryPolicy, ServiceRef

__all__ = ["LEASE_NAME", "ROLE_NAME", "AccessCheck", "access_needed", "controller_rbac", "state_object_name"]

ROLE_NAME = "gateway-canary"
#: the Lease the replicas elect a leader with (GATEWAY_CANARY_LEASE_NAME's default)
LEASE_NAME = "gateway-canary"
_LEASE_GROUP = "coordination.k8s.io"
_STATE_PREFIX = "gateway-canary-"


def state_object_name(policy: str) -> str:
    """The ConfigMap that holds one policy's rollout state."""
    return _STATE_PREFIX + policy


@dataclass(frozen=True, slots=True)
class AccessCheck:
    """One permission, as a SelfSubjectAccessReview asks it and a Role grants it."""

    verb: str
    resource: str
    namespace: str  # "" for a cluster-scoped permission
    name: str | None = None
    #: False for what only degrades the controller (Events): missing it warns, never refuses.
    required: bool = True
    group: str = ""
    #: on the ASM control plane (an IstioGateway), not the data-plane cluster
    asm: bool = False

    def __str__(self) -> str:
        resource = f"{self.resource}.{self.group}" if self.group else self.resource
        target = f"{resource}/{self.name}" if self.name else resource
        where = f"in namespace {self.namespace}" if self.namespace else "cluster-wide"
        return f"{self.verb} {target} {where}"


ISTIO_NETWORKING_GROUP = "networking.istio.io"


def access_needed(policy: CanaryPolicy, state_namespace: str) -> tuple[AccessCheck, ...]:
    """What one policy needs: both Services, Events next to the target, its state object, and
    what the cloud checks read (Events, EndpointSlices, Nodes, Istio Gateways, the IstioGateway)."""
    checks: list[AccessCheck] = []
    refs = (policy.spec.target.service, policy.spec.source.service)
    istio_gateway = policy.spec.target.istio_gateway
    for ref in refs:
        checks.append(AccessCheck("get", "services", ref.namespace, ref.name))
        if not (istio_gateway is not None and ref == policy.spec.target.service):
            checks.append(AccessCheck("patch", "services", ref.namespace, ref.name))
    if istio_gateway is not None:
        for verb in ("get", "patch"):
            checks.append(
                AccessCheck(
                    verb,
                    "istiogateways",
                    istio_gateway.namespace,
                    istio_gateway.name,
                    group=ISTIO_GATEWAY_GROUP,
                    asm=True,
                )
            )
    checks.append(AccessCheck("create", "events", policy.spec.target.service.namespace, required=False))
    for namespace in sorted({ref.namespace for ref in refs}):
        # the cloud controller's confirmations: without them no write can be confirmed (a hold)
        checks.append(AccessCheck("list", "events", namespace))
        checks.append(AccessCheck("list", "endpointslices", namespace, required=False, group="discovery.k8s.io"))
    checks.append(AccessCheck("list", "nodes", "", required=False))
    if policy.spec.routes.check:
        checks.append(AccessCheck("list", "gateways", "", group=ISTIO_NETWORKING_GROUP))
        if istio_gateway is not None:  # the ASM gateway's own Istio Gateways live on the ASM control plane
            checks.append(AccessCheck("list", "gateways", "", group=ISTIO_NETWORKING_GROUP, asm=True))
    state = state_object_name(policy.name)
    checks.append(AccessCheck("get", "configmaps", state_namespace, state))
    checks.append(AccessCheck("patch", "configmaps", state_namespace, state))
    checks.append(AccessCheck("create", "configmaps", state_namespace))
    return tuple(checks)


def controller_rbac(
    policies: Iterable[CanaryPolicy],
    service_account: ServiceRef,
    *,
    state_namespace: str | None = None,
    role_name: str = ROLE_NAME,
    lease_name: str | None = LEASE_NAME,
) -> list[dict[str, Any]]:
    """For the controller's ServiceAccount: a Role and RoleBinding per namespace the policies touch
    and one ClusterRole (+ binding) for the cluster-scoped reads; and, for IstioGateway targets, the
    same for the ASM control plane (named ``...-asm``, annotated: applied there).

    The state objects and the leader-election Lease ``lease_name`` live in ``state_namespace``
    (default: the ServiceAccount's namespace); ``lease_name=None``: no Lease (a controller run
    without leader election).
    """
    home = state_namespace or service_account.namespace
    checks = [check for policy in policies for check in access_needed(policy, home)]
    if lease_name is not None:
        checks += _lease_checks(home, lease_name)
    subjects = [{"kind": "ServiceAccount", "name": service_account.name, "namespace": service_account.namespace}]
    objects = _plane([c for c in checks if not c.asm], role_name, service_account, subjects, None)
    asm = [c for c in checks if c.asm]
    if asm:
        objects += _plane(asm, f"{role_name}-asm", service_account, subjects, _ASM_NOTE)
    return objects


def _lease_checks(namespace: str, name: str) -> list[AccessCheck]:
    """Leader election: read and renew (or take over) the one Lease by name; create it, which RBAC
    cannot restrict by name, so on Leases in that namespace. Not in ``access_needed``: that is what
    one policy needs before its first write, and the Lease is the controller's, not a policy's."""
    return [
        AccessCheck("get", "leases", namespace, name, group=_LEASE_GROUP),
        AccessCheck("update", "leases", namespace, name, group=_LEASE_GROUP),
        AccessCheck("create", "leases", namespace, group=_LEASE_GROUP),
    ]


def _plane(
    checks: list[AccessCheck], role_name: str, account: ServiceRef, subjects: list[dict[str, str]], note: str | None
) -> list[dict[str, Any]]:
    """The Roles (per namespace) and the ClusterRole that grant ``checks`` on one API server."""
    named: dict[tuple[str, str, str, tuple[str, ...]], set[str]] = {}
    unnamed: dict[str, dict[tuple[str, str], set[str]]] = {}
    cluster: dict[tuple[str, str], set[str]] = {}
    verbs_of: dict[tuple[str, str, str, str], set[str]] = {}
    for check in checks:
        if not check.namespace:
            cluster.setdefault((check.group, check.resource), set()).add(check.verb)
        elif check.name:
            verbs_of.setdefault((check.namespace, check.group, check.resource, check.name), set()).add(check.verb)
        else:
            unnamed.setdefault(check.namespace, {}).setdefault((check.group, check.resource), set()).add(check.verb)
    for (namespace, group, resource, name), verbs in verbs_of.items():  # names with the same verbs share a rule
        named.setdefault((namespace, group, resource, tuple(sorted(verbs, key=_VERB_ORDER.index))), set()).add(name)
    objects: list[dict[str, Any]] = []
    for namespace in sorted({ns for ns, _, _, _ in named} | set(unnamed)):
        rules: list[dict[str, Any]] = [
            {"apiGroups": [group], "resources": [resource], "resourceNames": sorted(names), "verbs": list(verbs)}
            for (ns, group, resource, verbs), names in sorted(named.items())
            if ns == namespace
        ]
        for (group, resource), verbs in sorted(unnamed.get(namespace, {}).items()):
            rules.append({"apiGroups": [group], "resources": [resource], "verbs": sorted(verbs)})
        objects += _role_and_binding("Role", _metadata(role_name, namespace, note), rules, subjects)
    if cluster:
        # cluster-scoped names are shared by every install: the ServiceAccount's namespace keeps them apart
        rules = [
            {"apiGroups": [group], "resources": [resource], "verbs": sorted(verbs)}
            for (group, resource), verbs in sorted(cluster.items())
        ]
        metadata = _metadata(f"{role_name}-{account.namespace}", None, note or _CLUSTER_NOTE)
        objects += _role_and_binding("ClusterRole", metadata, rules, subjects)
    return objects


def _metadata(name: str, namespace: str | None, note: str | None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    metadata["labels"] = {"app.kubernetes.io/name": "gateway-canary"}
    if note is not None:
        metadata["annotations"] = {_WHERE: note}
    return metadata


def _role_and_binding(
    kind: str, metadata: dict[str, Any], rules: list[dict[str, Any]], subjects: list[dict[str, str]]
) -> list[dict[str, Any]]:
    api = "rbac.authorization.k8s.io/v1"
    role = {"apiVersion": api, "kind": kind, "metadata": metadata, "rules": rules}
    binding = {
        "apiVersion": api,
        "kind": f"{kind}Binding",
        "metadata": dict(metadata),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": metadata["name"]},
        "subjects": subjects,
    }
    return [role, binding]


_VERB_ORDER = ["get", "patch", "update"]
_WHERE = "gateway-canary.io/apply-to"
_ASM_NOTE = (
    "the ASM control plane (it holds the IstioGateway and the ASM gateway's Istio Gateways); when it is "
    "a separate API server (GATEWAY_CANARY_ASM_KUBECONFIG), bind it to that kubeconfig's identity there"
)
_CLUSTER_NOTE = "list nodes: the backends a weight is spread over; list Istio Gateways: route parity"
