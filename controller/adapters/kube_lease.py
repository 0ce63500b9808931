"""The leader-election Lease (``coordination.k8s.io/v1``) through the official client.

One Lease, by name, in the controller's namespace: ``get``, ``create`` and ``update`` (a replace
guarded by ``resourceVersion``, so two candidates that read the same version cannot both take
it: the second gets a Conflict). A slow API server (one under API priority and fairness queueing)
is waited for up to the renew deadline, as client-go does (writes never depend on it: the fence
reads the clock, not the elector thread).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from kubernetes import client

from controller.adapters.kube_api import json_call, resource_version
from controller.adapters.kube_rest import CoordinationV1
from controller.core.lease import LeaseRecord
from controller.errors import ServiceNotFound

__all__ = ["KubernetesLeaseStore"]

_LABELS = {"app.kubernetes.io/managed-by": "gateway-canary", "app.kubernetes.io/name": "gateway-canary"}


class KubernetesLeaseStore:
    """LeaseStore over one named Lease."""

    def __init__(self, api_client: client.ApiClient, namespace: str, name: str, *, timeout_seconds: float) -> None:
        self._api = CoordinationV1(api_client)
        self.namespace = namespace
        self.name = name
        read = max(0.2, timeout_seconds)
        self._timeout = (min(3.0, read), read)

    def get(self) -> LeaseRecord | None:
        """The Lease, None when there is none."""
        try:
            body = json_call(
                f"read Lease {self.namespace}/{self.name}",
                self._api.read_namespaced_lease,
                self.name,
                self.namespace,
                request_timeout=self._timeout,
            )
        except ServiceNotFound:  # (404: the adapters' "not found")
            return None
        return _record(body)

    def create(self, record: LeaseRecord) -> LeaseRecord:
        """Create it; Conflict when another candidate was first."""
        answer = json_call(
            f"create Lease {self.namespace}/{self.name}",
            self._api.create_namespaced_lease,
            self.namespace,
            self._body(record),
            request_timeout=self._timeout,
        )
        return _record(answer)

    def update(self, record: LeaseRecord) -> LeaseRecord:
        """Replace it, guarded by the version it was read at."""
        answer = json_call(
            f"update Lease {self.namespace}/{self.name}",
            self._api.replace_namespaced_lease,
            self.name,
            self.namespace,
            self._body(record, version=record.version),
            request_timeout=self._timeout,
        )
        return _record(answer)

    def _body(self, record: LeaseRecord, *, version: str | None = None) -> dict[str, Any]:
        """The whole object (an update is a replace: what it leaves out, labels included, is removed)."""
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace, "labels": _LABELS}
        if version is not None:
            metadata["resourceVersion"] = version
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": _spec(record)}


def _micro_time(when: datetime | None) -> str | None:
    """A MicroTime as the API server wants it: UTC, microseconds, ``Z``."""
    if when is None:
        return None
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _spec(record: LeaseRecord) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "holderIdentity": record.holder,
        "leaseTransitions": record.transitions,
        "acquireTime": _micro_time(record.acquired),
        "renewTime": _micro_time(record.renewed),
    }
    if record.duration_seconds is not None:
        spec["leaseDurationSeconds"] = max(1, math.ceil(record.duration_seconds))  # never shorter than it is
    return spec


def _time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _record(body: dict[str, Any]) -> LeaseRecord:
    """The Lease JSON as a record; fields it lacks (or has wrong) read as empty, never as an error."""
    spec = body.get("spec") or {}
    metadata = body.get("metadata") or {}
    holder = spec.get("holderIdentity")
    transitions = spec.get("leaseTransitions")
    duration = spec.get("leaseDurationSeconds")
    return LeaseRecord(
        holder=holder if isinstance(holder, str) else "",
        transitions=transitions if isinstance(transitions, int) and transitions >= 0 else 0,
        duration_seconds=float(duration) if isinstance(duration, int | float) and duration > 0 else None,
        acquired=_time(spec.get("acquireTime")),
        renewed=_time(spec.get("renewTime")),
        created=_time(metadata.get("creationTimestamp")),
        uid=str(metadata.get("uid", "")),
        version=resource_version(body),
    )
