"""The least privilege the controller needs, as Kubernetes RBAC objects derived from the policies.

The controller reads and patches exactly the Services its policies name (``resourceNames``),
records Events beside the target Services, and keeps one state object per policy (a ConfigMap
``gateway-canary-<policy>``) in its own namespace: ``get``/``update`` on exactly those names, and
``create`` (which RBAC cannot restrict by name) on ConfigMaps in that one namespace. It never
lists, watches or deletes. ``gateway-canary rbac`` prints these objects, the tests apply them to a
real kube-apiserver and run the controller under them, and the adapter checks the same permissions
before its first write (see ``access_needed``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from controller.core.policy import CanaryPolicy, ServiceRef

__all__ = ["ROLE_NAME", "AccessCheck", "access_needed", "controller_rbac", "state_object_name"]

ROLE_NAME = "gateway-canary"
_STATE_PREFIX = "gateway-canary-"


def state_object_name(policy: str) -> str:
    """The ConfigMap that holds one policy's rollout state."""
    return _STATE_PREFIX + policy


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


def access_needed(policy: CanaryPolicy, state_namespace: str) -> tuple[AccessCheck, ...]:
    """What one policy needs: both Services, Events next to the target, its state object."""
    checks: list[AccessCheck] = []
    for ref in (policy.spec.target.service, policy.spec.source.service):
        checks.append(AccessCheck("get", "services", ref.namespace, ref.name))
        checks.append(AccessCheck("patch", "services", ref.namespace, ref.name))
    checks.append(AccessCheck("create", "events", policy.spec.target.service.namespace, required=False))
    state = state_object_name(policy.name)
    checks.append(AccessCheck("get", "configmaps", state_namespace, state))
    checks.append(AccessCheck("update", "configmaps", state_namespace, state))
    checks.append(AccessCheck("create", "configmaps", state_namespace))
    return tuple(checks)


def controller_rbac(
    policies: Iterable[CanaryPolicy],
    service_account: ServiceRef,
    *,
    state_namespace: str | None = None,
    role_name: str = ROLE_NAME,
) -> list[dict[str, Any]]:
    """A Role and RoleBinding per namespace the policies touch, for the controller's ServiceAccount.

    The state objects live in ``state_namespace`` (default: the ServiceAccount's namespace).
    """
    home = state_namespace or service_account.namespace
    named: dict[tuple[str, str, tuple[str, ...]], set[str]] = {}
    unnamed: dict[str, set[tuple[str, str]]] = {}
    for policy in policies:
        for check in access_needed(policy, home):
            if check.name:
                verbs = ("get", "patch") if check.resource == "services" else ("get", "update")
                named.setdefault((check.namespace, check.resource, verbs), set()).add(check.name)
            else:
                unnamed.setdefault(check.namespace, set()).add((check.resource, check.verb))
    namespaces = sorted({ns for ns, _, _ in named} | set(unnamed))
    objects: list[dict[str, Any]] = []
    for namespace in namespaces:
        rules: list[dict[str, Any]] = [
            {"apiGroups": [""], "resources": [resource], "resourceNames": sorted(names), "verbs": list(verbs)}
            for (ns, resource, verbs), names in sorted(named.items())
            if ns == namespace
        ]
        for resource, verb in sorted(unnamed.get(namespace, ())):
            rules.append({"apiGroups": [""], "resources": [resource], "verbs": [verb]})
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
