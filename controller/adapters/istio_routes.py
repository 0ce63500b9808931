"""Istio ``Gateway`` objects from both control planes, for route parity and ``migrate-config``.

The self-managed gateway's Gateways live in the data-plane cluster; the ASM gateway's live on the
ASM control plane, a different API server (the same one when ``GATEWAY_CANARY_ASM_KUBECONFIG`` is
unset). Both are listed in all namespaces through ``CustomObjectsApi``, trying the API versions
Istio has served from newest to oldest (``v1``, ``v1beta1``, ``v1alpha3``) and remembering the one
that answered; the comparison itself is pure (``controller.core.routes``).

Permission: ``list`` on ``gateways.networking.istio.io`` cluster-wide, on each side (a ClusterRole:
the Gateways that bind hosts to a gateway can be in any namespace). A side where no version is
served (Istio's CRDs not installed, or the kubeconfig points at the wrong cluster) makes
``parity`` a refusal that says so, and ``migration``/``manifests`` raise ``GatewayApiMissing``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import structlog
from kubernetes import client

from controller.adapters.kube_api import json_call
from controller.adapters.kube_rest import CustomObjects
from controller.core.policy import CanaryPolicy
from controller.core.routes import MigrationManifest, RouteParity, migration_plan, policy_parity
from controller.errors import ClusterError, ClusterUnavailable, ServiceNotFound

__all__ = ["GROUP", "PLURAL", "VERSIONS", "GatewayApiMissing", "KubernetesIstioRoutes"]

GROUP = "networking.istio.io"
PLURAL = "gateways"
#: Newest first: v1 since Istio 1.22, v1beta1 since 1.5, v1alpha3 before (and still served by many).
VERSIONS = ("v1", "v1beta1", "v1alpha3")
#: Gateways per list page: a mesh with thousands of them is read in bounded answers.
_PAGE = 500
_MAX_PAGES = 200
_log = structlog.get_logger("controller.istio_routes")


class GatewayApiMissing(ClusterError):
    """A side serves no version of ``gateways.networking.istio.io``: Istio's CRDs are not there."""


@dataclass
class _Side:
    """One API server's Gateways: its client, what to call it in messages, the version that answered."""

    api: CustomObjects
    name: str
    hint: str
    version: str | None = None


class KubernetesIstioRoutes:
    """Reads both sides' Istio Gateways and compares or copies them (``controller.core.routes``).

    ``asm_client`` is the ASM control plane's; None (or the same client) means the ASM gateway's
    Gateways are on the data-plane cluster too, and the Gateways are listed once.
    """

    def __init__(self, data_plane_client: client.ApiClient, asm_client: client.ApiClient | None = None) -> None:
        self._data = _Side(
            CustomObjects(data_plane_client),
            "data-plane cluster",
            "is the self-managed Istio installed there (GATEWAY_CANARY_KUBECONFIG / GATEWAY_CANARY_KUBE_CONTEXT)?",
        )
        self._same = asm_client is None or asm_client is data_plane_client
        self._asm = (
            self._data
            if asm_client is None or self._same
            else _Side(
                CustomObjects(asm_client),
                "ASM control plane",
                "point GATEWAY_CANARY_ASM_KUBECONFIG (and GATEWAY_CANARY_ASM_CONTEXT) at the ASM instance's "
                "control-plane kubeconfig",
            )
        )

    # -- reading ---------------------------------------------------------------------------------

    def _list(self, side: _Side, version: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        token: str | None = None
        for _page in range(_MAX_PAGES):
            paging: dict[str, Any] = {"limit": _PAGE}
            if token:
                paging["_continue"] = token
            call = functools.partial(side.api.list_cluster_custom_object, **paging)
            what = f"list Istio Gateways ({GROUP}/{version}) on the {side.name}"
            body = json_call(what, call, GROUP, version, PLURAL)
            items.extend(item for item in body.get("items") or [] if isinstance(item, dict))
            token = (body.get("metadata") or {}).get("continue") or None
            if token is None:
                return items
        raise ClusterUnavailable(f"list Istio Gateways on the {side.name}: more than {_PAGE * _MAX_PAGES} of them")

    def _gateways(self, side: _Side) -> list[dict[str, Any]]:
        """Every Gateway on ``side``, in all namespaces. Raises GatewayApiMissing, ClusterError."""
        order = [side.version, *(v for v in VERSIONS if v != side.version)] if side.version else list(VERSIONS)
        for version in order:
            try:
                items = self._list(side, version)
            except ServiceNotFound:
                continue  # this version is not served: the next one may be
            if side.version != version:
                _log.info("Istio Gateway API found", side=side.name, version=f"{GROUP}/{version}")
                side.version = version
            return items
        side.version = None
        raise GatewayApiMissing(
            f"the {side.name} serves no {PLURAL}.{GROUP} (tried {', '.join(VERSIONS)}): Istio's CRDs are not "
            f"installed there; {side.hint}"
        )

    def _both(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        source = self._gateways(self._data)
        return source, source if self._same else self._gateways(self._asm)

    # -- judging ---------------------------------------------------------------------------------

    def parity(self, policy: CanaryPolicy) -> RouteParity:
        """What the target gateway lacks of the source's routes (``policy.spec.routes``).

        A side without the Gateway API is a refusal in the result (``blocked``), not an error: the
        policy waits, and the reason says what to fix. Raises ClusterError when a side cannot be
        read (unreachable, forbidden).
        """
        source_selector = policy.spec.source.routing_selector()
        target_selector = policy.spec.target.routing_selector()
        if not policy.spec.routes.check:
            return RouteParity.not_checked(
                "route parity not checked (spec.routes.check: false)", source_selector, target_selector
            )
        try:
            source, target = self._both()
        except GatewayApiMissing as exc:
            return RouteParity.cannot_check(str(exc), source_selector, target_selector)
        parity = policy_parity(policy, source, target)
        _log.debug(
            "route parity",
            policy=policy.name,
            missing=[str(item) for item in parity.missing],
            ignored=len(parity.ignored),
            source_gateways=len(parity.source_gateways),
            target_gateways=len(parity.target_gateways),
        )
        return parity

    def route_refusal(self, policy: CanaryPolicy) -> str | None:
        """The ``RouteInspector`` port: why a raise must wait for route parity (None: nothing missing)."""
        return self.parity(policy).refusal()

    def migration(self, policy: CanaryPolicy) -> tuple[RouteParity, list[MigrationManifest]]:
        """The parity (whatever ``spec.routes.check`` says: this is asked for) and the Gateways to add.

        The copies never take the name of a Gateway already on the ASM side (applying them would
        replace its servers), and use the API version the ASM side serves. Raises GatewayApiMissing,
        ClusterError.
        """
        source, target = self._both()
        parity = policy_parity(policy, source, target)
        existing = {
            (str(meta.get("namespace") or "default"), str(meta.get("name") or ""))
            for meta in (item.get("metadata") or {} for item in target)
        }
        version = self._asm.version
        plan = migration_plan(
            source,
            parity.missing,
            policy.spec.target.routing_selector(),
            existing=existing,
            api_version=f"{GROUP}/{version}" if version else None,
        )
        return parity, plan

    def manifests(self, policy: CanaryPolicy) -> list[dict[str, Any]]:
        """The ASM-side Gateway manifests that add what the target lacks (``migration``)."""
        return [item.manifest for item in self.migration(policy)[1]]
