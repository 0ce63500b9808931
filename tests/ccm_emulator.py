"""EMULATOR of the Alibaba Cloud controller manager (CCM), not the CCM: for the tests only.

The real CCM (kubernetes/cloud-provider-alibaba-cloud) needs an Alibaba Cloud account and a CLB, so
it cannot run here. This stands in for it against the REAL kube-apiserver of the tests, behaving
as ``shared/reference/alibaba-cloud-facts.md`` records from its source:

- any change of a Service's annotation map (``clbv1/event_handler.go`` ``needUpdate``) posts a
  Normal ``AnnotationChanged`` "The service will be updated because the annotations has been
  changed." and queues a reconcile, run after ``lag`` seconds with the Service as it is then (the
  work queue holds one entry per Service);
- the reconcile, per Service ``Mode``: SUCCEED posts Normal ``EnsuredLoadBalancer`` "Ensured load
  balancer [lb-…]" (``clbv1/service_controller.go``) and the CLB takes the annotation's weight;
  FAIL posts Warning ``SyncLoadBalancerFailed`` "Error syncing load balancer [lb-…]: <message>";
  SKIP posts Warning ``SkipSyncBackends`` "Skip delete and update backends to vgroup … due to
  invalid backends: …" (``clbv1/vgroups.go``) and nothing else, the hole where an invalid backend
  makes the reconcile fail with neither a success nor a failure Event; SILENT posts nothing. Only
  SUCCEED changes the CLB's weight;
- even in SUCCEED the weight is taken only with a loadbalancer-id and a vgroup-port
  (``buildVGroupForServicePort``), not with ``ignore-weight-update: "on"``, and a value outside
  the integers [0,100] fails the whole sync ("weight must be integer in range [0,100] , got [x]");
- a failed reconcile (FAIL, SKIP, a bad weight) is retried after ``retry_after`` seconds, doubling
  up to ``max_retry_after`` (the CCM's 5 s..300 s); a new annotation change queues it at once;
- identical Events on one object are aggregated as client-go's recorder does: the existing Event
  gets ``count`` + 1 and a new ``lastTimestamp`` (whole seconds), not a second object.

It polls the Services of one namespace every ``poll`` seconds as an admin, with a ``requests``
session of its own (the harness's ``ControlPlane.call`` session is not shared across threads). Two
changes within one poll are seen as one (the CCM's informer would see both), so a test must not
count AnnotationChanged Events for writes closer together than ``poll``. Spec changes (the CCM's
``ServiceSpecChanged``) and Node or endpoint changes do not trigger a reconcile here.

The CLB side is a model: ``applied_weight`` is the weight the CLB really has for a Service (None:
the per-backend default of 100), ``set_backends`` the backends the CCM counts for it, and
``clb_target_share`` the share the CLB sends by the CCM's arithmetic (``effective_share`` over the
APPLIED weights). ``add_nodes``/``add_endpoints``/``provision`` create the Nodes (Ready) and
EndpointSlices that make ``KubernetesCloudInspector.backends()`` count what the model says. Nodes
are cluster-wide: the emulator refuses to add any while Nodes it did not create exist, and
deletes its own on exit.
"""

from __future__ import annotations

import enum
import itertools
import re
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import requests

from controller.core.cloud import BackendMode, Backends, backend_weights, effective_share
from tests.kube_cluster import SOURCE, TARGET, ControlPlane
from tests.servers import LB_ID, VGROUP, WEIGHT

__all__ = ["COMPONENT", "OWNER_LABEL", "CcmEmulator", "Mode"]

#: The CCM's event source (clbv1/service_controller.go ``GetEventRecorderFor("service-controller")``).
COMPONENT = "service-controller"
#: Marks the Nodes an emulator created (they are cluster-wide: deleted on exit).
OWNER_LABEL = "gateway-canary.test/ccm-emulator"
IGNORE_WEIGHT = "service.beta.kubernetes.io/alibaba-cloud-loadbalancer-ignore-weight-update"
BACKEND_TYPE = "service.beta.kubernetes.io/backend-type"

ANNOTATION_CHANGED = "The service will be updated because the annotations has been changed."
_SAFE = "bcdfghjklmnpqrstvwxz2456789"  # the alphabet of pod-template-hashes and pod suffixes
_ATOI = re.compile(r"^[+-]?[0-9]+$")  # what Go's strconv.Atoi accepts


class Mode(enum.StrEnum):
    """What the emulated CCM's reconcile of one Service does."""

    SUCCEED = "Succeed"  # EnsuredLoadBalancer; the CLB takes the weight
    FAIL = "Fail"  # SyncLoadBalancerFailed; weight not applied; retried
    SKIP = "Skip"  # SkipSyncBackends only (invalid backend); weight not applied; retried
    SILENT = "Silent"  # nothing at all after AnnotationChanged; weight not applied


@dataclass
class _Service:
    uid: str
    resource_version: str
    annotations: dict[str, str]
    applied: int | None = None
    due: float | None = None  # monotonic time of the queued reconcile
    failures: int = 0
    changes: int = 0
    reconciles: int = 0


@dataclass
class _Node:
    name: str
    plain: bool  # Ready, schedulable, no labels or taints of note: a backend of every Service


@dataclass
class _Behaviour:
    mode: Mode = Mode.SUCCEED
    message: str = ""


@dataclass
class _Admin:
    """Admin REST on the control plane with a session of its own (one per thread)."""

    plane: ControlPlane
    session: requests.Session = field(default_factory=requests.Session)

    def __post_init__(self) -> None:
        self.session.headers["Authorization"] = f"Bearer {self.plane.admin_token}"

    def call(self, method: str, path: str, body: Any = None, *, ok: Iterable[int] = (200, 201)) -> dict[str, Any]:
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
        response = self.session.request(
            method, f"{self.plane.url}{path}", json=body, headers=headers, timeout=10, verify=str(self.plane.ca_file)
        )
        if response.status_code not in ok:
            raise AssertionError(f"{method} {path}: {response.status_code} {response.text[:500]}")
        return dict(response.json()) if response.content else {}

    def close(self) -> None:
        self.session.close()


def _stamp(moment: datetime | None = None) -> str:
    """A metav1.Time: RFC 3339 in whole seconds, as Events' timestamps are stored."""
    return (moment or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


class CcmEmulator:
    """The emulated CCM for the Services of ``namespace``; use it as a context manager.

    ``lag``: seconds from an annotation change to its reconcile's answer. ``retry_after``: the
    first retry of a failed reconcile (None: never retried). ``strict``: re-raise, on exit, an
    error the background thread met (an emulator that silently stopped would fake a SILENT CCM).
    """

    def __init__(
        self,
        plane: ControlPlane,
        namespace: str,
        *,
        lag: float = 0.2,
        poll: float = 0.05,
        retry_after: float | None = 5.0,
        max_retry_after: float = 300.0,
        strict: bool = True,
    ) -> None:
        self.plane = plane
        self.ns = namespace
        self.lag = lag
        self.poll = poll
        self.retry_after = retry_after
        self.max_retry_after = max_retry_after
        self.strict = strict
        self.errors: list[BaseException] = []
        self._id = f"{namespace[:40]}-{secrets.token_hex(3)}"
        self._lock = threading.Lock()
        self._services: dict[str, _Service] = {}
        self._behaviour: dict[str, _Behaviour] = {}
        self._models: dict[str, Backends] = {}
        self._aggregated: dict[tuple[str, str, str, str], tuple[str, int]] = {}
        self._nodes: list[_Node] = []
        self._counter = itertools.count(1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._admin = _Admin(plane)  # the test's thread
        self._loop_admin = _Admin(plane)  # the emulator's thread

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> CcmEmulator:
        # The CLB is in step with the Services that already exist: their weights are applied.
        for item in self._list_services(self._admin):
            meta = item["metadata"]
            annotations = dict(meta.get("annotations") or {})
            self._services[meta["name"]] = _Service(
                uid=meta["uid"],
                resource_version=meta["resourceVersion"],
                annotations=annotations,
                applied=_weight_taken(annotations)[0],
            )
        self._thread = threading.Thread(target=self._run, name=f"ccm-emulator-{self.ns}", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            if self._thread.is_alive():
                self.errors.append(AssertionError("the CCM emulator's thread did not stop within 10 s"))
        try:
            for node in self._nodes:
                self._admin.call("DELETE", f"/api/v1/nodes/{node.name}", ok=(200, 404))
            self._nodes.clear()
        finally:
            self._admin.close()
            self._loop_admin.close()
        if self.strict and exc_type is None and self.errors:
            raise AssertionError(f"the CCM emulator failed: {self.errors[0]!r}") from self.errors[0]

    # -- behaviour ---------------------------------------------------------------------------------

    def set_mode(self, service: str, mode: Mode, message: str = "") -> None:
        """How the reconciles of ``service`` end from now on (a queued retry follows it too).

        ``message``: FAIL's error (default: a throttled OpenAPI call), SKIP's invalid backends.
        """
        with self._lock:
            self._behaviour[service] = _Behaviour(mode, message)

    def applied_weight(self, service: str) -> int | None:
        """The weight the CLB really has for ``service`` (None: no weight, 100 per backend)."""
        with self._lock:
            known = self._services.get(service)
            return None if known is None else known.applied

    def changes(self, service: str) -> int:
        """How many annotation changes of ``service`` the emulator has seen (each one Event)."""
        with self._lock:
            known = self._services.get(service)
            return 0 if known is None else known.changes

    def reconciles(self, service: str) -> int:
        """How many reconciles of ``service`` have finished (whatever they answered)."""
        with self._lock:
            known = self._services.get(service)
            return 0 if known is None else known.reconciles

    # -- the CLB's arithmetic ----------------------------------------------------------------------

    def set_backends(self, service: str, backends: Backends) -> None:
        """The backends the CCM counts for ``service`` (no objects created: see ``provision``)."""
        with self._lock:
            self._models[service] = backends

    def backends(self, service: str) -> Backends:
        with self._lock:
            if service not in self._models:
                raise KeyError(f"no backend model for {service}: call set_backends or provision first")
            return self._models[service]

    def clb_target_share(self, target: str = TARGET, source: str = SOURCE) -> float:
        """The share of new connections the CLB sends ``target`` at the APPLIED weights.

        ``effective_share`` (controller.core.cloud) over the weights the CLB has, not the ones the
        annotations ask for; 0.0 when neither has a weighted backend (nothing is sent at all).
        """
        with self._lock:
            target_weight = self._services[target].applied if target in self._services else None
            source_weight = self._services[source].applied if source in self._services else None
            models = (self._models.get(target), self._models.get(source))
        if models[0] is None or models[1] is None:
            raise KeyError(f"no backend model for {target} or {source}: call set_backends or provision first")
        if target_weight is not None:
            share = effective_share(target_weight, source_weight, models[0], models[1])
            return 0.0 if share is None else share
        # no weight on the target: 100 per backend (effective_share takes an int for the target)
        on_target = sum(backend_weights(None, models[0]))
        total = on_target + sum(backend_weights(source_weight, models[1]))
        return 0.0 if total <= 0 else on_target / total

    # -- objects the inspector reads ----------------------------------------------------------------

    def add_nodes(
        self,
        count: int,
        *,
        labels: dict[str, str] | None = None,
        ready: bool = True,
        unschedulable: bool = False,
        taints: Sequence[dict[str, str]] = (),
    ) -> list[str]:
        """``count`` Nodes (cluster-scoped), Ready unless told; their names."""
        foreign = [
            item["metadata"]["name"]
            for item in self._admin.call("GET", "/api/v1/nodes")["items"]
            if (item["metadata"].get("labels") or {}).get(OWNER_LABEL) != self._id
        ]
        if foreign:
            raise AssertionError(
                f"Nodes not created by this emulator exist ({', '.join(sorted(foreign)[:5])}): Nodes are cluster-wide, "
                "a test leaked them and the backend counts would be wrong"
            )
        names: list[str] = []
        now = _stamp()
        for _ in range(count):
            name = f"node-{self._id}-{next(self._counter)}"
            body = {
                "metadata": {"name": name, "labels": {OWNER_LABEL: self._id, **(labels or {})}},
                "spec": {"providerID": f"cn-test.i-{name}", "unschedulable": unschedulable, "taints": list(taints)},
            }
            self._admin.call("POST", "/api/v1/nodes", body)
            condition = {
                "type": "Ready",
                "status": "True" if ready else "False",
                "reason": "KubeletReady" if ready else "KubeletNotReady",
                "message": "emulated",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }
            self._admin.call("PATCH", f"/api/v1/nodes/{name}/status", {"status": {"conditions": [condition]}})
            self._nodes.append(_Node(name, plain=ready and not labels and not unschedulable and not taints))
            names.append(name)
        return names

    def node_names(self, *, plain_only: bool = True) -> list[str]:
        """The Nodes this emulator created, oldest first; ``plain_only``: Ready ones with no labels,
        taints or cordon, the ones every Service counts (``provision`` uses only those)."""
        return [node.name for node in self._nodes if node.plain or not plain_only]

    def add_endpoints(
        self,
        service: str,
        nodes: Sequence[str | None],
        *,
        workload: str | None = None,
        ready: bool = True,
        terminating: bool = False,
    ) -> list[str]:
        """An EndpointSlice for ``service``: one pod per entry of ``nodes`` (on that node); the pods' names.

        Pods are named as a Deployment's (``<workload>-<hash>-<suffix>``, ``workload`` defaulting
        to the Service's name), so ``facts()`` derives the Deployment from them.
        """
        base = workload or service
        template_hash = "".join(secrets.choice(_SAFE) for _ in range(9))
        endpoints: list[dict[str, Any]] = []
        pods: list[str] = []
        for node in nodes:
            pod = f"{base}-{template_hash}-{''.join(secrets.choice(_SAFE) for _ in range(5))}"
            n = next(self._counter)
            endpoint: dict[str, Any] = {
                "addresses": [f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"],
                "conditions": {"ready": ready, "serving": ready, "terminating": terminating},
                "targetRef": {"kind": "Pod", "name": pod, "namespace": self.ns},
            }
            if node is not None:
                endpoint["nodeName"] = node
            endpoints.append(endpoint)
            pods.append(pod)
        body = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{service}-{next(self._counter)}",
                "labels": {
                    "kubernetes.io/service-name": service,
                    "endpointslice.kubernetes.io/managed-by": "ccm-emulator.gateway-canary.test",
                },
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": "http2", "port": 8080, "protocol": "TCP"}],
        }
        self._admin.call("POST", f"/apis/discovery.k8s.io/v1/namespaces/{self.ns}/endpointslices", body)
        return pods

    def provision(self, service: str, backends: Backends, *, workload: str | None = None) -> None:
        """Make the cluster show ``backends`` for ``service``, and take it as the CLB's model.

        CLUSTER: exactly ``nodes`` plain Nodes (created as needed; one pod on the first);
        LOCAL: ``pods_per_node[i]`` pods on the i-th plain Node, the Service set to
        ``externalTrafficPolicy: Local``; ENI: ``pods`` pods and the backend-type annotation
        (an annotation change: the emulator reconciles it like any other). Cluster-mode models
        must agree with the Node count, so a Local or ENI provision that adds Nodes under them fails.
        """
        if len(self.node_names(plain_only=False)) != len(self.node_names()):
            raise ValueError("provision counts on plain Nodes only; this emulator created others (add_nodes)")
        eligible = self.node_names()
        if backends.mode is BackendMode.CLUSTER:
            if len(eligible) > backends.nodes:
                raise ValueError(f"{len(eligible)} Nodes exist already, more than {backends.nodes}")
            self.add_nodes(backends.nodes - len(eligible))
            self.add_endpoints(service, self.node_names()[:1], workload=workload)
        elif backends.mode is BackendMode.LOCAL:
            needed = len(backends.pods_per_node)
            if len(eligible) < needed:
                self.add_nodes(needed - len(eligible))
            chosen = self.node_names()[:needed]
            spread = [node for node, pods in zip(chosen, backends.pods_per_node, strict=True) for _ in range(pods)]
            self.add_endpoints(service, spread, workload=workload)
            self._admin.call(
                "PATCH",
                f"/api/v1/namespaces/{self.ns}/services/{service}",
                {"spec": {"externalTrafficPolicy": "Local"}},
            )
        else:
            hosts: list[str | None] = [*self.node_names()] or [None]
            self.add_endpoints(service, [hosts[i % len(hosts)] for i in range(backends.pods)], workload=workload)
            self._admin.call(
                "PATCH",
                f"/api/v1/namespaces/{self.ns}/services/{service}",
                {"metadata": {"annotations": {BACKEND_TYPE: "eni"}}},
            )
        with self._lock:
            self._models[service] = backends
            total = len(self.node_names())
            wrong = [
                name
                for name, model in self._models.items()
                if model.mode is BackendMode.CLUSTER and model.nodes != total
            ]
        if wrong:
            raise ValueError(f"Cluster-mode models of {', '.join(wrong)} no longer match the {total} Nodes")

    # -- the emulated controller ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self._tick()
            except Exception as exc:  # kept for __exit__; the loop goes on, as a controller does
                self.errors.append(exc)

    def _list_services(self, admin: _Admin) -> list[dict[str, Any]]:
        return list(admin.call("GET", f"/api/v1/namespaces/{self.ns}/services")["items"])

    def _tick(self) -> None:
        now = time.monotonic()
        seen: set[str] = set()
        for item in self._list_services(self._loop_admin):
            meta = item["metadata"]
            name = meta["name"]
            seen.add(name)
            annotations = dict(meta.get("annotations") or {})
            with self._lock:
                known = self._services.get(name)
                if known is None or known.uid != meta["uid"]:  # created: reconciled, no AnnotationChanged
                    self._services[name] = _Service(meta["uid"], meta["resourceVersion"], annotations, due=now)
                    continue
                known.resource_version = meta["resourceVersion"]
                if annotations == known.annotations:
                    continue
                known.annotations = annotations
                known.changes += 1
                # a work queue, as the CCM's: a change while one is queued joins it (and is read
                # when it runs), it does not push it back; a stream of edits cannot starve it
                if known.due is None:
                    known.due = now + self.lag
            self._event(name, "Normal", "AnnotationChanged", ANNOTATION_CHANGED)
        with self._lock:
            for gone in set(self._services) - seen:
                del self._services[gone]
            due = [name for name, svc in self._services.items() if svc.due is not None and svc.due <= now]
        for name in due:
            self._reconcile(name)

    def _reconcile(self, name: str) -> None:
        with self._lock:
            svc = self._services[name]
            svc.due = None
            behaviour = self._behaviour.get(name, _Behaviour())
            annotations = dict(svc.annotations)
        lb = annotations.get(LB_ID) or "lb-emulated"
        failed = True
        if behaviour.mode is Mode.SILENT:
            failed = False  # a reconcile that never answers: nothing to retry either
        elif behaviour.mode is Mode.FAIL:
            message = behaviour.message or "Throttling.User: Request was denied due to user flow control."
            self._event(name, "Warning", "SyncLoadBalancerFailed", f"Error syncing load balancer [{lb}]: {message}")
        elif behaviour.mode is Mode.SKIP:
            vgroup = (annotations.get(VGROUP) or "rsp-emulated:80").split(":", 1)[0]
            invalid = behaviour.message or "10.254.0.7"
            self._event(
                name,
                "Warning",
                "SkipSyncBackends",
                f"Skip delete and update backends to vgroup {vgroup} due to invalid backends: {invalid}",
            )
        else:
            weight, problem = _weight_taken(annotations)
            if problem is not None:
                self._event(name, "Warning", "SyncLoadBalancerFailed", f"Error syncing load balancer [{lb}]: {problem}")
            else:
                with self._lock:
                    if annotations.get(IGNORE_WEIGHT, "").lower() != "on":
                        svc.applied = weight
                self._event(name, "Normal", "EnsuredLoadBalancer", f"Ensured load balancer [{lb}]")
                failed = False
        with self._lock:
            svc.reconciles += 1
            if not failed:
                svc.failures = 0
            else:
                svc.failures += 1
                if self.retry_after is not None and svc.due is None:
                    delay = min(self.retry_after * 2 ** (svc.failures - 1), self.max_retry_after)
                    svc.due = time.monotonic() + delay

    def _event(self, service: str, kind: str, reason: str, message: str) -> None:
        """Post an Event on ``service``, or bump the identical one (count, lastTimestamp)."""
        with self._lock:
            svc = self._services[service]
            key = (svc.uid, kind, reason, message)
            known = self._aggregated.get(key)
        now = _stamp()
        base = f"/api/v1/namespaces/{self.ns}/events"
        if known is not None:
            event_name, count = known
            self._loop_admin.call("PATCH", f"{base}/{event_name}", {"count": count + 1, "lastTimestamp": now})
            with self._lock:
                self._aggregated[key] = (event_name, count + 1)
            return
        event_name = f"{service}.{time.time_ns():x}"  # client-go's "<object>.<hex nanoseconds>"
        body = {
            "metadata": {"name": event_name, "namespace": self.ns},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Service",
                "name": service,
                "namespace": self.ns,
                "uid": svc.uid,
                "resourceVersion": svc.resource_version,
            },
            "reason": reason,
            "message": message,
            "type": kind,
            "source": {"component": COMPONENT},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self._loop_admin.call("POST", base, body)
        with self._lock:
            self._aggregated[key] = (event_name, 1)


def _weight_taken(annotations: dict[str, str]) -> tuple[int | None, str | None]:
    """(the weight the CCM gives the CLB, the sync error it raises instead) for these annotations.

    The weight is read only with a loadbalancer-id and a vgroup-port; strconv.Atoi, then [0,100].
    """
    raw = annotations.get(WEIGHT)
    if not annotations.get(LB_ID) or not annotations.get(VGROUP) or raw is None or raw == "":
        return None, None
    if not _ATOI.match(raw) or not 0 <= int(raw) <= 100:
        return None, f"weight must be integer in range [0,100] , got [{raw}]"
    return int(raw), None
