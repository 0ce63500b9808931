"""The cloud's side of a weight write, read from the API server: Events, backends, Service facts.

The Alibaba Cloud controller (CCM) never answers the writer of a weight annotation; it only
leaves Events on the Service and spreads the weight over backends it counts from Nodes and
EndpointSlices. This adapter reads exactly those objects, with the controller's own identity,
and hands plain values (``controller.core.cloud``) to the pure rules that judge them.

What the CCM counts, read from kubernetes/cloud-provider-alibaba-cloud
(``pkg/controller/service/reconcile/backend/backend.go`` ``GetNodes``/``needExcludeFromLB``,
``pkg/controller/helper/node_utils.go`` ``IsNodeExcludeFromLoadBalancer``,
``pkg/controller/service/clbv1/vgroups.go`` ``build{Cluster,Local,ENI}Backends`` and
``setBackendsFromEndpointSlices``):

- candidate Nodes: only those matching every ``k=v`` of the Service's ``...-backend-label``
  annotation; never a ``node-role.kubernetes.io/master`` node, a node tainted
  ``ToBeDeletedByClusterAutoscaler``, an unschedulable node when the Service says
  ``...-remove-unscheduled-backend: "on"`` (otherwise an unschedulable node IS a backend), or a
  node without conditions or whose Ready condition is not True (virtual-kubelet nodes,
  label ``type=virtual-kubelet``, are kept whatever their conditions);
- of those, a node is no backend with label ``node.kubernetes.io/exclude-from-external-load-balancers``,
  ``alpha.service-controller.kubernetes.io/exclude-balancer``, ``service.alibabacloud.com/exclude-node``
  or ``service.beta.kubernetes.io/exclude-node``, or a providerID starting ``ack-hybrid://``;
- endpoints: IPv4 EndpointSlices labelled ``kubernetes.io/service-name``, each address once,
  terminating ones skipped, ready ones taken;
- Cluster: every backend node, plus each ready pod on a virtual-kubelet node (an ECI backend);
  Local: ready pods grouped by their (backend) node, an ECI pod counted as a node of one pod;
  ENI: every ready pod.

Not visible from here, so not counted (the share is then an estimate, said in the logs):
not-ready pods that the CCM still adds because their readiness gate for the Service is pending
(it reads the Pods), pods whose ENI is invalid or whose IP is outside the VPC (it asks the cloud),
and the cluster-wide default backend type (``ServiceBackendType`` in the CCM's cloud config, or
``SERVICE_FORCE_BACKEND_ENI``): without the ``service.beta.kubernetes.io/backend-type``
annotation a Service is taken as ECS (Cluster or Local).

Permissions: ``list``/``watch`` Events and ``list`` EndpointSlices in each gateway namespace,
``list`` Nodes cluster-wide. ``backends`` answers None when one is missing (logged once), so the
caller reports "effective share unknown" instead of failing the check.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

import structlog
from kubernetes import client

from controller.adapters.kube_api import json_call
from controller.adapters.kube_rest import CoreV1, DiscoveryV1
from controller.core.cloud import BackendMode, Backends, CloudEvent, ServiceFacts
from controller.core.policy import ServiceRef
from controller.errors import AccessDenied

__all__ = [
    "BACKEND_LABEL_ANNOTATION",
    "BACKEND_TYPE_ANNOTATION",
    "OWN_COMPONENT",
    "REMOVE_UNSCHEDULED_ANNOTATION",
    "KubernetesCloudInspector",
    "workload_of_pod",
]

_PREFIX = "service.beta.kubernetes.io/alibaba-cloud-loadbalancer-"
#: Not under the loadbalancer prefix (pkg/controller/helper/service_utils.go ``BackendType``).
BACKEND_TYPE_ANNOTATION = "service.beta.kubernetes.io/backend-type"
BACKEND_LABEL_ANNOTATION = _PREFIX + "backend-label"
REMOVE_UNSCHEDULED_ANNOTATION = _PREFIX + "remove-unscheduled-backend"
#: The component our own Events carry (controller.adapters.kubernetes): they are not the cloud's.
OWN_COMPONENT = "gateway-canary"

_SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_MASTER_LABEL = "node-role.kubernetes.io/master"
_VIRTUAL_KUBELET = "virtual-kubelet"
_TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"
_EXCLUDE_LABELS = (
    "node.kubernetes.io/exclude-from-external-load-balancers",
    "alpha.service-controller.kubernetes.io/exclude-balancer",
    "service.alibabacloud.com/exclude-node",
    "service.beta.kubernetes.io/exclude-node",
)
_HYBRID_PROVIDER = "ack-hybrid://"

#: Page sizes: a Service has few (aggregated) Events; a cluster may have thousands of Nodes.
_EVENT_PAGE = 100
_EVENT_PAGES = 5
_SLICE_PAGE = 100
_NODE_PAGE = 500

#: pod-template-hash and generateName suffixes use only these characters (k8s.io/apimachinery
#: util/rand ``SafeEncodeString``/``String``): "foo-7d9f8c6b5-x2k9p" is Deployment "foo".
_SAFE = "bcdfghjklmnpqrstvwxz2456789"
_REPLICASET_POD = re.compile(rf"^(?P<workload>.+)-[{_SAFE}]{{1,10}}-[{_SAFE}]{{5}}$")

_log = structlog.get_logger("controller.cloud")


def workload_of_pod(pod: str) -> str:
    """The Deployment a pod belongs to, from its name alone; other pods keep their own name.

    A Deployment's pod is ``<deployment>-<pod-template-hash>-<5 random>``; the hash and the suffix
    come from a 27-character alphabet without vowels, so a gateway's own name is not mistaken for
    them. (A Deployment name so long that the API server truncated the ReplicaSet name is not
    recognised; those names are over 50 characters.)
    """
    match = _REPLICASET_POD.match(pod)
    return match.group("workload") if match else pod


@dataclass(frozen=True, slots=True)
class _Endpoint:
    address: str
    node: str | None
    ready: bool
    pod: str | None


class KubernetesCloudInspector:
    """Reads what the cloud controller did and what it counts, for one identity.

    ``api_client`` is the official client's ``ApiClient`` (``kube_api.build_api_client``). Every
    read is a raw-JSON call through ``kube_api.json_call``: client errors become ours.
    """

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        backends_cache_seconds: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._core = CoreV1(api_client)
        self._discovery = DiscoveryV1(api_client)
        self._denied_logged: set[str] = set()
        #: Backends change with Nodes and endpoints, not with every tick: read at most this often
        #: per Service (0: every call). Each tick asks for both gateways', and each answer lists
        #: every Node: with hundreds of policies that was most of the controller's API requests.
        self._backends_ttl = backends_cache_seconds
        self._clock = clock
        self._cache_lock = threading.Lock()
        self._backends_cache: dict[ServiceRef, tuple[float, Backends | None]] = {}
        self._nodes_cache: tuple[float, list[dict[str, Any]]] | None = None  # every Service's

    # -- Events ----------------------------------------------------------------------------------

    def events(
        self, ref: ServiceRef, uid: str | None = None, *, since: datetime | None = None
    ) -> tuple[CloudEvent, ...]:
        """The Events on Service ``ref`` not written by gateway-canary, oldest ``last_seen`` first.

        The field selector names the Service (and its ``uid`` when given, so an earlier Service
        of the same name does not answer for this one): a namespace's Events are not read. With
        ``since``, only Events last seen in or after that second (an aggregated Event counts by
        its newest occurrence). Our own Events are dropped: a confirmation must come from the cloud.
        """
        selector = f"involvedObject.kind=Service,involvedObject.name={ref.name}"
        if uid:
            selector += f",involvedObject.uid={uid}"
        cutoff = since.replace(microsecond=0) if since is not None else None
        found: list[CloudEvent] = []
        pages = self._pages(
            f"list Events of Service {ref}",
            partial(self._core.list_namespaced_event, ref.namespace, field_selector=selector),
            _EVENT_PAGE,
            max_pages=_EVENT_PAGES,
        )
        for item in pages:
            event = _cloud_event(item)
            if event is None or _is_own(item):
                continue
            if cutoff is not None and event.last_seen < cutoff:
                continue
            found.append(event)
        return tuple(sorted(found, key=lambda e: e.last_seen))

    # -- backends --------------------------------------------------------------------------------

    def backends(self, ref: ServiceRef) -> Backends | None:
        """How many CLB backends the CCM gives Service ``ref``, and in which mode.

        None when the identity may not list what it takes (Nodes, EndpointSlices), or when the
        CCM itself could not build the backends (a malformed backend-label annotation, an
        endpoint without a node in Local mode): the effective share is then unknown. An answer
        is reused for ``backends_cache_seconds``; a failed read is never kept.
        """
        if self._backends_ttl <= 0:
            return self._read_backends(ref)
        now = self._clock()
        with self._cache_lock:
            cached = self._backends_cache.get(ref)
        if cached is not None and now - cached[0] < self._backends_ttl:
            return cached[1]
        found = self._read_backends(ref)
        with self._cache_lock:
            self._backends_cache[ref] = (now, found)
        return found

    def _read_backends(self, ref: ServiceRef) -> Backends | None:
        service = self._service(ref)
        annotations = _annotations(service)
        spec = service.get("spec") or {}
        try:
            if annotations.get(BACKEND_TYPE_ANNOTATION) == "eni":  # compared exactly, as the CCM does
                return Backends(BackendMode.ENI, pods=len([e for e in self._endpoints(ref) if e.ready]))
            nodes = self._candidate_nodes(annotations)
            if nodes is None:
                _log.warning(
                    "effective share unknown: the cloud controller cannot parse the backend-label annotation",
                    service=str(ref),
                    annotation=BACKEND_LABEL_ANNOTATION,
                    value=annotations.get(BACKEND_LABEL_ANNOTATION, "")[:100],
                )
                return None
            if spec.get("externalTrafficPolicy") == "Local":
                return self._local(ref, nodes)
            return self._cluster(ref, nodes)
        except AccessDenied as exc:
            self._log_denied(ref, exc)
            return None

    def _cluster(self, ref: ServiceRef, nodes: dict[str, dict[str, Any]]) -> Backends:
        """Every backend node; pods on virtual-kubelet nodes are backends of their own (ECI)."""
        count = len([node for node in nodes.values() if not _excluded(node)])
        virtual = {name for name, node in nodes.items() if _is_virtual(node)}
        if virtual:  # only then do the endpoints matter (and need their permission)
            count += len([e for e in self._endpoints(ref) if e.ready and e.node in virtual])
        return Backends(BackendMode.CLUSTER, nodes=count)

    def _local(self, ref: ServiceRef, nodes: dict[str, dict[str, Any]]) -> Backends | None:
        """Ready pods per backend node; an ECI pod (virtual-kubelet node) is a backend of one pod."""
        per_node: dict[str, int] = {}
        eci = 0
        for endpoint in self._endpoints(ref):
            if not endpoint.ready:
                continue
            if endpoint.node is None:  # the CCM fails the whole sync on this ("NodeName is nil")
                _log.warning(
                    "effective share unknown: an endpoint has no node, the cloud controller fails its sync",
                    service=str(ref),
                    address=endpoint.address,
                )
                return None
            node = nodes.get(endpoint.node)
            if node is None:  # not a candidate: master, not ready, filtered by label
                continue
            if _is_virtual(node):
                eci += 1
            elif not _excluded(node):
                per_node[endpoint.node] = per_node.get(endpoint.node, 0) + 1
        pods = tuple(per_node[name] for name in sorted(per_node)) + (1,) * eci
        return Backends(BackendMode.LOCAL, pods_per_node=pods)

    def _candidate_nodes(self, annotations: dict[str, str]) -> dict[str, dict[str, Any]] | None:
        """The Nodes the CCM considers at all (``GetNodes``), by name; None for a bad label filter."""
        wanted: list[tuple[str, str]] = []
        raw = annotations.get(BACKEND_LABEL_ANNOTATION, "")
        if raw:
            for part in raw.split(","):
                key, sep, value = part.partition("=")
                if not sep:
                    return None
                wanted.append((key, value.split("=", 1)[0]))
        remove_unschedulable = annotations.get(REMOVE_UNSCHEDULED_ANNOTATION, "") == "on"
        nodes: dict[str, dict[str, Any]] = {}
        for node in self._nodes():
            metadata = node.get("metadata") or {}
            labels = metadata.get("labels") or {}
            if any(labels.get(key) != value for key, value in wanted):
                continue
            if _considered(node, labels, remove_unschedulable=remove_unschedulable):
                nodes[str(metadata.get("name", ""))] = node
        return nodes

    def _nodes(self) -> list[dict[str, Any]]:
        """Every Node, read once for all the Services while the cache lasts."""
        now = self._clock()
        with self._cache_lock:
            cached = self._nodes_cache
        if self._backends_ttl > 0 and cached is not None and now - cached[0] < self._backends_ttl:
            return cached[1]
        nodes = list(self._pages("list Nodes", self._core.list_node, _NODE_PAGE))
        with self._cache_lock:
            self._nodes_cache = (now, nodes)
        return nodes

    def _endpoints(self, ref: ServiceRef) -> list[_Endpoint]:
        """The Service's IPv4 endpoints, each address once, terminating ones left out."""
        seen: dict[str, _Endpoint] = {}
        slices = self._pages(
            f"list EndpointSlices of Service {ref}",
            partial(
                self._discovery.list_namespaced_endpoint_slice,
                ref.namespace,
                label_selector=f"{_SERVICE_NAME_LABEL}={ref.name}",
            ),
            _SLICE_PAGE,
        )
        for item in slices:
            if item.get("addressType") != "IPv4":
                continue
            for endpoint in item.get("endpoints") or []:
                conditions = endpoint.get("conditions") or {}
                if conditions.get("terminating") is True:
                    continue
                target = endpoint.get("targetRef") or {}
                pod = str(target["name"]) if target.get("kind") == "Pod" and target.get("name") else None
                node = endpoint.get("nodeName")
                for address in endpoint.get("addresses") or []:
                    known = seen.get(address)
                    if known is not None and known.ready:
                        continue
                    seen[address] = _Endpoint(address, node, conditions.get("ready") is True, pod)
        return list(seen.values())

    def _log_denied(self, ref: ServiceRef, exc: AccessDenied) -> None:
        """Say once per missing permission why the effective share is unknown."""
        key = str(exc).split(":", 1)[0]
        if key in self._denied_logged:
            return
        self._denied_logged.add(key)
        _log.warning(
            "effective share unknown: the controller may not read the backends",
            service=str(ref),
            reason=str(exc),
            fix="grant what `gateway-canary rbac` prints (list nodes, list endpointslices)",
        )

    # -- facts -----------------------------------------------------------------------------------

    def facts(self, ref: ServiceRef) -> ServiceFacts:
        """Annotations, ports and the workloads whose pods back Service ``ref``.

        The workloads come from the EndpointSlices' pod names (``workload_of_pod``), ready or not,
        so an ASM gateway canary upgrade (a ``<gateway>-canary`` Deployment behind the same
        Service) shows while its pod is still starting. Without the permission to list
        EndpointSlices this raises AccessDenied: "no canary Deployment" must not be guessed.
        """
        service = self._service(ref)
        ports = tuple(int(port["port"]) for port in (service.get("spec") or {}).get("ports") or [] if "port" in port)
        pods = {endpoint.pod for endpoint in self._endpoints(ref) if endpoint.pod}
        workloads = tuple(sorted({workload_of_pod(pod) for pod in pods}))
        return ServiceFacts(name=str(ref), annotations=_annotations(service), ports=ports, workloads=workloads)

    # -- plumbing --------------------------------------------------------------------------------

    def _service(self, ref: ServiceRef) -> dict[str, Any]:
        return json_call(f"read Service {ref}", self._core.read_namespaced_service, ref.name, ref.namespace)

    def _pages(
        self, what: str, call: Callable[..., Any], limit: int, *, max_pages: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """The items of a list call, page by page (``limit``/``continue``)."""
        token: str | None = None
        pages = 0
        while True:
            page_call = partial(call, limit=limit, _continue=token) if token else partial(call, limit=limit)
            body = json_call(what, page_call)
            for item in body.get("items") or []:
                if isinstance(item, dict):
                    yield item
            pages += 1
            token = (body.get("metadata") or {}).get("continue") or None
            if token is None:
                return
            if max_pages is not None and pages >= max_pages:
                _log.warning("stopped reading a long list", what=what, pages=pages, page_size=limit)
                return


def _annotations(body: dict[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in ((body.get("metadata") or {}).get("annotations") or {}).items()}


def _is_own(event: dict[str, Any]) -> bool:
    source = (event.get("source") or {}).get("component")
    return OWN_COMPONENT in (source, event.get("reportingComponent"))


def _cloud_event(event: dict[str, Any]) -> CloudEvent | None:
    """One core/v1 Event as a CloudEvent; None when it carries no usable time.

    Its newest occurrence: ``lastTimestamp`` (core/v1 recorders, the CCM's), else the series'
    ``lastObservedTime`` (events.k8s.io/v1 recorders count repeats there; their ``eventTime`` is
    the first one), else ``eventTime``, ``firstTimestamp``, the object's creation.
    """
    series = event.get("series") or {}
    candidates = (
        event.get("lastTimestamp"),
        series.get("lastObservedTime"),
        event.get("eventTime"),
        event.get("firstTimestamp"),
        (event.get("metadata") or {}).get("creationTimestamp"),
    )
    last_seen = next((moment for moment in map(_parse_time, candidates) if moment is not None), None)
    if last_seen is None:
        return None
    count = event.get("count") or series.get("count") or 1
    version = str((event.get("metadata") or {}).get("resourceVersion") or "")
    return CloudEvent(
        reason=str(event.get("reason") or ""),
        message=str(event.get("message") or ""),
        last_seen=last_seen,
        warning=event.get("type") == "Warning",
        count=int(count),
        # whole-second times tie; the API server's write order breaks the tie (0: unknown)
        order=int(version) if version.isdigit() else 0,
    )


def _parse_time(raw: Any) -> datetime | None:
    if not isinstance(raw, str) or not raw:
        return None
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def _considered(node: dict[str, Any], labels: dict[str, Any], *, remove_unschedulable: bool) -> bool:
    """Whether the CCM considers this node at all (``needExcludeFromLB``, in its order)."""
    spec = node.get("spec") or {}
    if _MASTER_LABEL in labels:
        return False
    if any((taint or {}).get("key") == _TO_BE_DELETED_TAINT for taint in spec.get("taints") or []):
        return False
    if spec.get("unschedulable") and remove_unschedulable:
        return False
    if labels.get("type") == _VIRTUAL_KUBELET:
        return True
    conditions = (node.get("status") or {}).get("conditions") or []
    if not conditions:
        return False
    return all(c.get("status") == "True" for c in conditions if c.get("type") == "Ready")


def _is_virtual(node: dict[str, Any]) -> bool:
    return ((node.get("metadata") or {}).get("labels") or {}).get("type") == _VIRTUAL_KUBELET


def _excluded(node: dict[str, Any]) -> bool:
    """Whether a considered node is still no backend (``IsNodeExcludeFromLoadBalancer``)."""
    labels = (node.get("metadata") or {}).get("labels") or {}
    if any(label in labels for label in _EXCLUDE_LABELS):
        return True
    return str((node.get("spec") or {}).get("providerID") or "").startswith(_HYBRID_PROVIDER)
