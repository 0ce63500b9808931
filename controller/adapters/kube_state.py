"""The rollout state in a ConfigMap of its own, one per policy, in the controller's namespace.

Why a ConfigMap (and not an annotation on a gateway Service, a Lease or a custom resource): the
cloud controller reconciles the load balancer on every annotation change of a Service, so the
Services must receive weight changes only; a custom resource needs a cluster-scoped CRD installed
by a cluster admin before the first run (and Helm does not upgrade CRDs); a Lease is typed for
leader election and is what that feature will use. A ConfigMap needs nothing installed, is read
with ``kubectl get configmap gateway-canary-<policy> -o yaml``, and its ``resourceVersion`` gives
optimistic concurrency: a save against a version that changed since it was read is a Conflict.

Layout: ``data.state`` holds the JSON of ``controller.core.state``; ``data.unreadable-state`` keeps
what stood there before if it could not be read (for an operator; never read back). Labelled
``app.kubernetes.io/managed-by: gateway-canary`` and ``gateway-canary.io/policy: <name>``.
"""

from __future__ import annotations

from typing import Any

import structlog
from kubernetes import client

from controller.adapters.kube_api import json_call, resource_version
from controller.core.alerts import OutboxEntry, decode_outbox, encode_outbox
from controller.core.policy import CanaryPolicy
from controller.core.state import RolloutState, StateUnreadable, decode_state, encode_state
from controller.core.text import bounded
from controller.errors import ServiceNotFound
from controller.ports import StoredState
from controller.rbac import state_object_name

__all__ = ["OUTBOX_KEY", "STATE_KEY", "UNREADABLE_KEY", "KubernetesStateStore"]

STATE_KEY = "state"
OUTBOX_KEY = "outbox"
UNREADABLE_KEY = "unreadable-state"
_KEEP_UNREADABLE_CHARS = 16 * 1024
_log = structlog.get_logger("controller.state")


class KubernetesStateStore:
    """StateStore over ConfigMaps in one namespace."""

    def __init__(self, api_client: client.ApiClient, namespace: str) -> None:
        self._api = client.CoreV1Api(api_client)
        self.namespace = namespace

    def load(self, policy: CanaryPolicy) -> StoredState:
        """The stored state, None when there is no object yet; garbage is reported, not raised."""
        name = state_object_name(policy.name)
        try:
            body = json_call(
                f"read ConfigMap {self.namespace}/{name}", self._api.read_namespaced_config_map, name, self.namespace
            )
        except ServiceNotFound:  # (404: the adapter's "not found" is not about Services only)
            return StoredState(state=None)
        version = resource_version(body)
        data = body.get("data") or {}
        outbox = _outbox(data)
        raw = data.get(STATE_KEY) if isinstance(data, dict) else None
        if not isinstance(raw, str):
            error = "the state object has no state in it"
            return StoredState(state=None, version=version, error=error, raw=None, outbox=outbox)
        try:
            state = decode_state(raw)
        except StateUnreadable as exc:
            return StoredState(state=None, version=version, error=str(exc), raw=raw, outbox=outbox)
        if state.policy != policy.name:
            error = f"stored state belongs to policy {state.policy!r}"
            return StoredState(state=None, version=version, error=error, raw=raw, outbox=outbox)
        return StoredState(state=state, version=version, outbox=outbox)

    def save(
        self, policy: CanaryPolicy, state: RolloutState, previous: StoredState, outbox: tuple[OutboxEntry, ...] = ()
    ) -> StoredState:
        """Create or replace the object, guarded by the version read; Conflict if it moved."""
        name = state_object_name(policy.name)
        data = {STATE_KEY: encode_state(state)}
        if previous.error is not None and previous.raw is not None:
            data[UNREADABLE_KEY] = bounded(previous.raw, _KEEP_UNREADABLE_CHARS)
        if outbox:
            data[OUTBOX_KEY] = encode_outbox(outbox)
        metadata: dict[str, Any] = {
            "name": name,
            "namespace": self.namespace,
            "labels": {
                "app.kubernetes.io/managed-by": "gateway-canary",
                "app.kubernetes.io/name": "gateway-canary",
                "gateway-canary.io/policy": policy.name,
            },
        }
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}
        what = f"write ConfigMap {self.namespace}/{name}"
        if previous.version:
            metadata["resourceVersion"] = previous.version
            answer = json_call(what, self._api.replace_namespaced_config_map, name, self.namespace, body)
        else:
            answer = json_call(what, self._api.create_namespaced_config_map, self.namespace, body)
        return StoredState(state=state, version=resource_version(answer), outbox=outbox)


def _outbox(data: Any) -> tuple[OutboxEntry, ...]:
    """The undelivered alerts; an unreadable outbox is dropped (logged), never a reason to stop."""
    text = data.get(OUTBOX_KEY) if isinstance(data, dict) else None
    if not isinstance(text, str) or not text:
        return ()
    try:
        return decode_outbox(text)
    except ValueError as exc:
        _log.error("the stored outbox is unreadable; its alerts are lost", error=str(exc)[:300])
        return ()
