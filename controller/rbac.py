"""The least privilege the controller needs, as Kubernetes RBAC objects derived from the policies.

The controller reads and patches exactly the Services its policies name (``resourceNames``) and
records Events beside the target Services. It never lists, watches or deletes, keeps its state in
the target Service's annotation (no Lease, no custom resource), so one namespaced Role per
namespace the policies touch is all it needs. ``gateway-canary rbac`` prints these objects, the
tests apply them to a real kube-apiserver and run the controller under them, and the adapter
checks the same permissions before its first write (see ``access_needed``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from controller.core.policy import CanaryPolicy, ServiceRef

__all__ = ["AccessCheck", "access_needed", "controller_rbac"]

ROLE_NAME = "gateway-canary"


@dataclass(frozen=True, slots=True)
class AccessCheck:
    """One permission, as a SelfSubjectAccessReview asks it and a Role grants it."""

    verb: str
    resource: str
    namespace: str
    name: str | None = None
    #: False for what only degrades the controller (Events): missing it warns, never refuses.
    required: bool = True

    def __str__(self) -> str:
        target = f"{self.resource}/{self.name}" if self.name else self.resource
        return f"{self.verb} {target} in namespace {self.namespace}"


def access_needed(policy: CanaryPolicy) -> tuple[AccessCheck, ...]:
    """What one policy needs: get and patch both Services, create Events next to the target."""
    checks: list[AccessCheck] = []
    for ref in (policy.spec.target.service, policy.spec.source.service):
        checks.append(AccessCheck("get", "services", ref.namespace, ref.name))
        checks.append(AccessCheck("patch", "services", ref.namespace, ref.name))
    checks.append(AccessCheck("create", "events", policy.spec.target.service.namespace, required=False))
    return tuple(checks)


def controller_rbac(
    policies: Iterable[CanaryPolicy], service_account: ServiceRef, *, role_name: str = ROLE_NAME
) -> list[dict[str, Any]]:
    """A Role and RoleBinding per namespace the policies touch, for the controller's ServiceAccount."""
    services: dict[str, set[str]] = {}
    event_namespaces: set[str] = set()
    for policy in policies:
        for check in access_needed(policy):
            if check.resource == "services" and check.name:
                services.setdefault(check.namespace, set()).add(check.name)
            elif check.resource == "events":
                event_namespaces.add(check.namespace)
    objects: list[dict[str, Any]] = []
    for namespace in sorted(services):
        rules: list[dict[str, Any]] = [
            {
                "apiGroups": [""],
                "resources": ["services"],
                "resourceNames": sorted(services[namespace]),
                "verbs": ["get", "patch"],
            }
        ]
        if namespace in event_namespaces:
            rules.append({"apiGroups": [""], "resources": ["events"], "verbs": ["create"]})
        metadata = {"name": role_name, "namespace": namespace, "labels": {"app.kubernetes.io/name": "gateway-canary"}}
        objects.append(
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": metadata, "rules": rules}
        )
        objects.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": dict(metadata),
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role_name},
                "subjects": [
                    {"kind": "ServiceAccount", "name": service_account.name, "namespace": service_account.namespace}
                ],
            }
        )
    return objects
