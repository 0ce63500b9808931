"""Where an ASM ``IstioGateway`` keeps the ASM gateway's weight, and the patch that changes it there.

In ASM the ingress gateway's Service is generated from an ``IstioGateway`` (group
``istio.alibabacloud.com``, on the ASM control plane). ASM copies ``spec.serviceAnnotations`` onto
the Service and overwrites a direct edit of those keys, so a weight written on the Service is
undone: it must be written in the IstioGateway. A per-cluster ``spec.overrides[<clusterId>]``
carries the same basic configuration and its ``serviceAnnotations`` can shadow the top-level map.
The rule used here (documented by nothing public, so kept narrow): for one data-plane cluster the
override wins when it has the weight key, else the top-level value applies.

``effective_weight`` answers, for one IstioGateway and the data-plane cluster's id (if known):
which value reaches that cluster's Service, where a new value must be written so that it does,
and why that cannot be decided safely when it cannot (``conflict``: the adapter turns it into a
refusal, which holds back raises and never a rollback). A write where the value does not live
would change nothing, or change another cluster's gateway, while the controller believed it had
moved traffic.

Pure: the adapter reads the object and hands the decoded JSON in here; no I/O, no client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controller.core.cloud import WEIGHT

__all__ = [
    "ISTIO_GATEWAY_GROUP",
    "ISTIO_GATEWAY_PLURAL",
    "ISTIO_GATEWAY_VERSIONS",
    "IstioGatewayWeight",
    "annotation_path",
    "annotations_path",
    "effective_weight",
    "parse_weight",
]

ISTIO_GATEWAY_GROUP = "istio.alibabacloud.com"
ISTIO_GATEWAY_PLURAL = "istiogateways"
#: ASM's documentation names v1beta1; the published Go package registers v1. Tried in this order.
ISTIO_GATEWAY_VERSIONS = ("v1beta1", "v1")


def parse_weight(raw: str | None) -> int | None:
    """The annotation's integer, None when absent; ValueError for what the cloud controller rejects."""
    if raw is None:
        return None
    text = raw.strip()
    if not text.isdigit() or not 0 <= int(text) <= 100:
        raise ValueError(f"weight annotation {raw[:40]!r} is not an integer in [0,100]")
    return int(text)


def annotations_path(cluster_id: str | None) -> str:
    """The annotation map a weight can sit in: the top-level one (None) or one cluster's override."""
    return "spec.serviceAnnotations" if cluster_id is None else f'spec.overrides["{cluster_id}"].serviceAnnotations'


def annotation_path(cluster_id: str | None) -> str:
    """Where the weight sits in the object: the top-level map (None) or one cluster's override."""
    return f'{annotations_path(cluster_id)}["{WEIGHT}"]'


@dataclass(frozen=True, slots=True)
class IstioGatewayWeight:
    """One IstioGateway's weight as it reaches the data-plane cluster, and where to change it.

    ``locations`` are the places a write goes: None is ``spec.serviceAnnotations``, a string is
    ``spec.overrides[<that clusterId>].serviceAnnotations``. Usually one; several when overrides
    repeat the top-level value and no cluster was named (they are kept equal), or, with a
    ``conflict``, every place that could reach the cluster (only a rollback writes then: cutting
    the ASM gateway to 0 wherever its weight might come from is the safe direction). ``weight`` is
    None when the object has no weight for the cluster, and when a ``conflict`` makes it unknown.
    ``error_message`` is ASM's ``status.ErrorMessage``: ASM says it could not reconcile the gateway.
    """

    gateway: str
    weight: int | None
    locations: tuple[str | None, ...]
    error_message: str | None = None
    conflict: str | None = None

    @property
    def where(self) -> str:
        """The annotation path(s) a write goes to, for messages and logs."""
        return " and ".join(annotation_path(cluster) for cluster in self.locations)

    def patch(self, weight: int, resource_version: str = "") -> dict[str, Any]:
        """The JSON merge patch that sets ``weight`` at every location and touches nothing else.

        A merge patch merges nested maps key by key, so other annotations, other clusters'
        overrides and the rest of the spec are left as they are. ``resource_version`` makes the
        API server refuse the patch (409) if the object changed since it was read.
        """
        value = str(weight)
        spec: dict[str, Any] = {}
        for cluster in self.locations:
            if cluster is None:
                spec["serviceAnnotations"] = {WEIGHT: value}
            else:
                spec.setdefault("overrides", {})[cluster] = {"serviceAnnotations": {WEIGHT: value}}
        body: dict[str, Any] = {"spec": spec}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return body


def effective_weight(gateway: Mapping[str, Any], cluster_id: str | None = None) -> IstioGatewayWeight:
    """Which weight reaches the data-plane cluster ``cluster_id`` and where it lives; see the module doc.

    Without ``cluster_id`` the cluster is the only one in ``spec.clusterIds`` if there is exactly
    one; otherwise overrides that carry the weight must agree with the top-level value (then all
    of them are written, staying equal), or it is a conflict: which one reaches the Service is
    unknown.
    """
    metadata = _mapping(gateway.get("metadata"))
    label = f"IstioGateway {metadata.get('namespace', '')}/{metadata.get('name', '')}"
    spec = _mapping(gateway.get("spec"))
    error = str(_mapping(gateway.get("status")).get("ErrorMessage") or "").strip() or None
    top = _annotations(spec)
    overrides = {
        str(cluster): _annotations(_mapping(entry)) for cluster, entry in _mapping(spec.get("overrides")).items()
    }
    carrying = {cluster: annotations[WEIGHT] for cluster, annotations in overrides.items() if WEIGHT in annotations}
    declared = [str(cluster) for cluster in spec.get("clusterIds") or () if cluster]

    def value(locations: tuple[str | None, ...], raw: str | None, conflict: str | None = None) -> IstioGatewayWeight:
        if conflict is not None:
            return IstioGatewayWeight(label, None, locations, error, conflict)
        try:
            weight = parse_weight(raw)
        except ValueError as exc:
            conflict = (
                f"{label}: {annotations_path(locations[0])}: {exc}; ASM copies it onto the Service and the "
                "cloud controller rejects it: fix it in the IstioGateway by hand"
            )
            return IstioGatewayWeight(label, None, locations, error, conflict)
        return IstioGatewayWeight(label, weight, locations, error)

    named = cluster_id
    if named is None and len(declared) == 1:
        named = declared[0]  # the gateway runs in one cluster only: that is the data plane's
    if named is not None:
        location: str | None = named if named in carrying or (named in overrides and WEIGHT not in top) else None
        raw = carrying[named] if named in carrying else top.get(WEIGHT)
        conflict = None
        if cluster_id is not None and declared and cluster_id not in declared:
            conflict = (
                f"{label}: the policy's target.istioGateway.clusterId {cluster_id!r} is not in spec.clusterIds "
                f"({', '.join(declared)}), so ASM deploys this gateway's Service elsewhere: fix the policy's "
                "clusterId to the data-plane cluster's id"
            )
        elif WEIGHT not in top and overrides and named not in overrides:
            conflict = (
                f"{label}: spec.overrides has entries for {_some(sorted(overrides))} only, none for cluster "
                f"{named!r}, and spec.serviceAnnotations has no {WEIGHT}: no weight reaches this cluster's "
                'Service; check target.istioGateway.clusterId, or set the weight to "0" in '
                f"spec.serviceAnnotations or {annotations_path(named)} to start a migration"
            )
        return value((location,), raw, conflict)

    if not carrying:
        return value((None,), top.get(WEIGHT))
    differing = {cluster: raw for cluster, raw in carrying.items() if _normal(raw) != _normal(top.get(WEIGHT))}
    everywhere: tuple[str | None, ...] = (None, *sorted(carrying))
    if not differing:
        return value(everywhere, top.get(WEIGHT))
    shown = _some([f"{annotations_path(cluster)} = {raw!r}" for cluster, raw in sorted(differing.items())])
    conflict = (
        f"{label}: {WEIGHT} in {shown} differs from spec.serviceAnnotations = {top.get(WEIGHT)!r} and the policy "
        "names no clusterId, so which value reaches the data-plane Service is unknown: set "
        "target.istioGateway.clusterId to the data-plane cluster's id"
    )
    return value(everywhere, None, conflict)


def _some(items: list[str], shown: int = 2) -> str:
    """A short list for a message: a refusal is stored and compared bounded, so it must stay short."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _annotations(config: Mapping[str, Any]) -> dict[str, str]:
    """One basic configuration's ``serviceAnnotations`` (values as strings; a null map is empty)."""
    return {str(key): str(raw) for key, raw in _mapping(config.get("serviceAnnotations")).items() if raw is not None}


def _normal(raw: str | None) -> int | str | None:
    """A value for comparing two annotations: the weight when it parses, else the stripped text."""
    try:
        return parse_weight(raw)
    except ValueError:
        return (raw or "").strip()
