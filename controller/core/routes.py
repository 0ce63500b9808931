"""Route parity: every host:port the old gateway serves must be served by the ASM gateway first.

The runbook's step 2 ("migrate configurations") is where migrations break: a host bound to the
self-managed gateway's Istio ``Gateway`` (``spec.selector: {istio: ingressgateway}``) but to no
``Gateway`` selecting the ASM gateway (``{istio: ingressgateway-asm}``, configured on the ASM
control plane) fails for every request the CLB sends to the ASM gateway, from the first weight
step on. This module compares what both gateways serve and says what the target lacks, and
writes the ASM-side ``Gateway`` manifests that would add it (``gateway-canary migrate-config``).

Pure: the Istio ``Gateway`` objects come in as the plain dicts the API returns
(``controller.adapters.istio_routes`` reads them); no I/O, no client library.

Semantics, and where they simplify Istio's:

- a route is (host, port number, protocol, TLS mode) of one ``spec.servers[]`` entry and one of
  its ``hosts``; hosts are compared by their DNS part (``ns/host``, ``*/host`` and ``./host`` all
  compare as ``host``), the namespace part is kept in the manifests as written;
- a target host covers a source host when it is equal, ``*``, or a ``*.suffix`` wildcard the
  source host (itself perhaps a narrower wildcard) ends in;
- a Gateway selects a gateway when its ``spec.selector`` is a subset of the policy's
  ``routing_selector()`` (Istio matches the Gateway's labels against the gateway *pods'* labels,
  which we know only through that selector); an empty selector selects every gateway;
- protocols compare by family (HTTP, HTTP2, GRPC and GRPC-WEB are all HTTP to a gateway), TLS
  modes exactly, and a source route that terminates TLS with a credential is not covered by a
  target route that has none.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from controller.core.policy import CanaryPolicy

__all__ = [
    "MIGRATED_FROM_ANNOTATION",
    "MigrationManifest",
    "MissingRoute",
    "Route",
    "RouteParity",
    "ServedRoute",
    "ServedRoutes",
    "format_selector",
    "host_covers",
    "migration_plan",
    "policy_parity",
    "route_parity",
    "selects",
    "served_routes",
    "split_host",
]

#: On every manifest migrate-config writes: which source Gateway it was copied from.
MIGRATED_FROM_ANNOTATION = "gateway-canary.io/migrated-from"
#: How many missing routes a refusal names before it says "and N more" (it goes into Events, alerts).
MAX_NAMED = 10
_HTTP_FAMILY = frozenset({"HTTP", "HTTP2", "GRPC", "GRPC-WEB"})
#: Protocols whose servers carry TLS settings; elsewhere a ``tls:`` block only redirects to HTTPS.
_TLS_PROTOCOLS = frozenset({"HTTPS", "TLS"})
#: TLS modes in which the gateway terminates TLS itself, and so needs a certificate.
_TERMINATING = frozenset({"SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL"})
_MAX_NAME = 253
#: Metadata that belongs to the object in its own cluster: copying it would be rejected
#: (``resourceVersion`` on create), meaningless (``uid``) or harmful (``ownerReferences`` to a uid the
#: ASM control plane does not have makes its garbage collector delete the copy; a ``finalizers``
#: entry nobody there removes blocks its deletion forever).
_CLUSTER_METADATA = (
    "uid",
    "resourceVersion",
    "generation",
    "managedFields",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
    "ownerReferences",
    "finalizers",
    "generateName",
)
_LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


# --- routes -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class Route:
    """What one host of one ``Gateway`` server makes the gateway answer for.

    ``host`` is the DNS part, lower-cased (``*`` and ``*.example.com`` included); ``tls_mode`` is
    empty for a server without TLS.
    """

    host: str
    port: int
    protocol: str
    tls_mode: str = ""

    @property
    def family(self) -> str:
        """The protocol as a gateway listener sees it: HTTP2 and gRPC are HTTP."""
        return "HTTP" if self.protocol in _HTTP_FAMILY else self.protocol

    def __str__(self) -> str:
        return f"{self.host}:{self.port} ({self.protocol}, {self.tls_mode or 'no TLS'})"


@dataclass(frozen=True, slots=True)
class ServedRoute:
    """A route and where it is written: Gateway ``namespace/name``, server index, host as written."""

    route: Route
    gateway: str
    server: int
    host_entry: str
    credential: str | None = None


@dataclass(frozen=True, slots=True)
class ServedRoutes:
    """Every route of the Gateways that select one gateway, and what could not be read."""

    routes: tuple[ServedRoute, ...]
    gateways: tuple[str, ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class MissingRoute:
    """A source route the target does not serve (or serves differently), and why.

    ``conflicting_gateway`` names the target Gateway that serves the host:port in another way
    (TLS mode, protocol, no credential): adding the source's server beside it is not enough.
    """

    route: Route
    gateway: str
    server: int
    host_entry: str
    reason: str = "not served"
    conflicting_gateway: str | None = None

    def __str__(self) -> str:
        return f"{self.route} from Gateway {self.gateway}: {self.reason}"


def _pairs(selector: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(key), str(value)) for key, value in selector.items()))


def format_selector(selector: Mapping[str, str] | Iterable[tuple[str, str]]) -> str:
    """``{istio: ingressgateway}``: a selector as it is written in a Gateway's YAML."""
    pairs = _pairs(selector) if isinstance(selector, Mapping) else tuple(selector)
    return "{" + ", ".join(f"{key}: {value}" for key, value in pairs) + "}"


@dataclass(frozen=True, slots=True)
class RouteParity:
    """What the target gateway lacks of what the source serves: a value, judged without I/O.

    ``ignored`` are missing routes that ``spec.routes.ignoreHosts`` excuses (kept to be shown);
    ``blocked`` says why parity could not be checked at all (no Gateway API on a side), which
    refuses like a missing route does; ``notes`` are what an operator should see but need not act on
    (unreadable server entries, a source selector that selects nothing).
    """

    source_selector: tuple[tuple[str, str], ...]
    target_selector: tuple[tuple[str, str], ...]
    missing: tuple[MissingRoute, ...] = ()
    ignored: tuple[MissingRoute, ...] = ()
    source_gateways: tuple[str, ...] = ()
    target_gateways: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    blocked: str | None = None

    @classmethod
    def cannot_check(
        cls, reason: str, source_selector: Mapping[str, str], target_selector: Mapping[str, str]
    ) -> RouteParity:
        """Parity that could not be judged (``reason``): refuses until it can."""
        return cls(_pairs(source_selector), _pairs(target_selector), blocked=reason)

    @classmethod
    def not_checked(
        cls, note: str, source_selector: Mapping[str, str], target_selector: Mapping[str, str]
    ) -> RouteParity:
        """Parity deliberately not judged (``spec.routes.check: false``): nothing missing, ``note`` says so."""
        return cls(_pairs(source_selector), _pairs(target_selector), notes=(note,))

    @property
    def ok(self) -> bool:
        """Every required source route is served by the target as the source serves it."""
        return self.blocked is None and not self.missing

    def refusal(self, policy_file: str = "<policy file>") -> str | None:
        """One line saying which host:port the target lacks and how to fix it; None when none is.

        ``policy_file`` goes into the fix (``gateway-canary migrate-config <policy file>``).
        """
        if self.blocked is not None:
            return f"route parity cannot be checked: {self.blocked}"
        if not self.missing:
            return None
        named = "; ".join(str(item) for item in self.missing[:MAX_NAMED])
        more = len(self.missing) - MAX_NAMED
        if more > 0:
            named += f"; and {more} more"
        # The fix comes before the list: stored reasons are cut to a bounded length at the end.
        return (
            f"route parity: the target gateway {format_selector(self.target_selector)} does not serve "
            f"{len(self.missing)} host:port(s) the source gateway {format_selector(self.source_selector)} "
            "serves, so requests the CLB sends it for them would fail; fix: review and apply on the ASM "
            f"control plane what `gateway-canary migrate-config {policy_file}` prints (or list the hosts in "
            f"spec.routes.ignoreHosts); missing: {named}"
        )


# --- reading Gateways -------------------------------------------------------------------------------


def _gateway_id(gateway: Mapping[str, Any]) -> str:
    metadata = gateway.get("metadata") or {}
    return f"{metadata.get('namespace') or 'default'}/{metadata.get('name') or '?'}"


def _selector_of(gateway: Mapping[str, Any]) -> dict[str, str]:
    spec = gateway.get("spec") or {}
    selector = spec.get("selector") if isinstance(spec, Mapping) else None
    return {str(k): str(v) for k, v in selector.items()} if isinstance(selector, Mapping) else {}


def selects(gateway: Mapping[str, Any], selector: Mapping[str, str]) -> bool:
    """Whether this Istio Gateway applies to the gateway whose pods ``selector`` describes.

    Istio applies a Gateway to pods carrying all of its ``spec.selector`` labels; the pods' labels
    are known here only as the policy's selector, so: the Gateway's selector is a subset of it.
    """
    return all(selector.get(key) == value for key, value in _selector_of(gateway).items())


def split_host(entry: str) -> tuple[str, str]:
    """``("ns", "host")`` of a Gateway host entry; a bare host is ``*/host`` (any namespace)."""
    namespace, sep, host = entry.partition("/")
    if not sep:
        return "*", entry.strip().lower().rstrip(".")
    return namespace.strip(), host.strip().lower().rstrip(".")


def host_covers(pattern: str, host: str) -> bool:
    """Whether a gateway serving ``pattern`` answers every name ``host`` stands for.

    ``*`` covers everything; ``*.example.com`` covers ``a.example.com``, ``a.b.example.com`` and
    ``*.a.example.com`` (Istio matches wildcards by suffix), but not ``example.com``.
    """
    pattern, host = pattern.lower(), host.lower()
    if pattern == host:
        return True
    if pattern.startswith("*"):
        return host.endswith(pattern[1:])
    return False


def _tls_of(server: Mapping[str, Any], protocol: str) -> tuple[str, str | None]:
    """(TLS mode, credential) of a server: Istio's default mode is PASSTHROUGH when ``tls`` is set."""
    tls = server.get("tls")
    if not isinstance(tls, Mapping) or protocol not in _TLS_PROTOCOLS:
        return "", None
    mode = str(tls.get("mode") or "PASSTHROUGH").upper()
    names = tls.get("credentialNames")
    credential = tls.get("credentialName") or (", ".join(map(str, names)) if isinstance(names, list) else None)
    if not credential and tls.get("serverCertificate"):
        credential = f"file {tls['serverCertificate']}"
    return mode, str(credential) if credential else None


def _server_routes(gateway: Mapping[str, Any], gateway_id: str) -> tuple[list[ServedRoute], list[str]]:
    spec = gateway.get("spec") or {}
    servers = spec.get("servers") if isinstance(spec, Mapping) else None
    if not isinstance(servers, list):
        return [], [f"Gateway {gateway_id}: no spec.servers list"]
    routes: list[ServedRoute] = []
    notes: list[str] = []
    for index, server in enumerate(servers):
        where = f"Gateway {gateway_id} servers[{index}]"
        if not isinstance(server, Mapping):
            notes.append(f"{where}: not a mapping; skipped")
            continue
        port = server.get("port")
        number = port.get("number") if isinstance(port, Mapping) else None
        if isinstance(number, bool) or not isinstance(number, int):
            notes.append(f"{where}: no port number; skipped")
            continue
        protocol = str(port.get("protocol") or "HTTP").upper() if isinstance(port, Mapping) else "HTTP"
        hosts = server.get("hosts")
        if not isinstance(hosts, list) or not hosts:
            notes.append(f"{where}: no hosts; skipped")
            continue
        mode, credential = _tls_of(server, protocol)
        for entry in hosts:
            if not isinstance(entry, str) or not split_host(entry)[1]:
                notes.append(f"{where}: host {str(entry)[:80]!r} is not a host; skipped")
                continue
            route = Route(host=split_host(entry)[1], port=number, protocol=protocol, tls_mode=mode)
            routes.append(ServedRoute(route, gateway_id, index, entry, credential))
    return routes, notes


def served_routes(gateways: Iterable[Mapping[str, Any]], selector: Mapping[str, str]) -> ServedRoutes:
    """The routes of every Gateway in ``gateways`` that selects the gateway described by ``selector``."""
    routes: list[ServedRoute] = []
    names: list[str] = []
    notes: list[str] = []
    for gateway in gateways:
        if not isinstance(gateway, Mapping) or not selects(gateway, selector):
            continue
        gateway_id = _gateway_id(gateway)
        names.append(gateway_id)
        found, problems = _server_routes(gateway, gateway_id)
        routes.extend(found)
        notes.extend(problems)
    return ServedRoutes(tuple(routes), tuple(names), tuple(notes))


# --- comparing ----------------------------------------------------------------------------------------


def _ignores(entry: str, route: Route) -> bool:
    """Whether an ``ignoreHosts`` entry (``host`` or ``host:port``, wildcards allowed) excuses ``route``."""
    text = entry.strip()
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        host, port = text, ""
    host = split_host(host)[1]
    return host_covers(host, route.host) and (not port or int(port) == route.port)


def _shortfall(wanted: ServedRoute, offered: Sequence[ServedRoute]) -> MissingRoute | None:
    """Why no target route serves ``wanted`` as the source does, or None when one does."""
    route = wanted.route
    same_name = [item for item in offered if item.route.port == route.port and host_covers(item.route.host, route.host)]
    for item in same_name:
        if item.route.family != route.family or item.route.tls_mode != route.tls_mode:
            continue
        if route.tls_mode in _TERMINATING and wanted.credential and not item.credential:
            continue
        return None
    reason, conflict = "not served", None
    if same_name:
        # the closest: same protocol family (the TLS mode or credential differs) before another protocol
        other = min(same_name, key=lambda item: item.route.family != route.family)
        conflict = other.gateway
        if other.route.family != route.family:
            reason = f"served as {other.route.protocol} by Gateway {other.gateway}"
        elif other.route.tls_mode != route.tls_mode:
            reason = f"served with TLS mode {other.route.tls_mode or 'none'} by Gateway {other.gateway}"
        else:
            reason = f"served without a TLS credential (credentialName) by Gateway {other.gateway}"
    return MissingRoute(route, wanted.gateway, wanted.server, wanted.host_entry, reason, conflict)


def route_parity(
    source_gateways: Iterable[Mapping[str, Any]],
    target_gateways: Iterable[Mapping[str, Any]],
    *,
    source_selector: Mapping[str, str],
    target_selector: Mapping[str, str],
    ignore_hosts: Sequence[str] = (),
) -> RouteParity:
    """What the target lacks: each source route with no covering target route, minus ``ignore_hosts``.

    The lists may be the same (both gateways configured on one control plane): each side keeps
    only the Gateways that select it.
    """
    source = served_routes(source_gateways, source_selector)
    target = served_routes(target_gateways, target_selector)
    missing: list[MissingRoute] = []
    ignored: list[MissingRoute] = []
    seen: set[tuple[Route, str]] = set()
    for wanted in source.routes:
        # One route written in two source Gateways (for the same namespaces' VirtualServices) is
        # missing once: copying both would give the target the same host:port twice, a conflict.
        namespace = split_host(wanted.host_entry)[0]
        key = (wanted.route, wanted.gateway.partition("/")[0] if namespace == "." else namespace)
        if key in seen:
            continue
        seen.add(key)
        lack = _shortfall(wanted, target.routes)
        if lack is None:
            continue
        (ignored if any(_ignores(entry, wanted.route) for entry in ignore_hosts) else missing).append(lack)
    notes = [*source.notes, *target.notes]
    if not source.gateways:
        notes.insert(
            0,
            f"no Istio Gateway selects the source gateway {format_selector(source_selector)}: nothing to compare "
            "(check spec.source.gatewaySelector)",
        )
    return RouteParity(
        source_selector=_pairs(source_selector),
        target_selector=_pairs(target_selector),
        missing=tuple(missing),
        ignored=tuple(ignored),
        source_gateways=source.gateways,
        target_gateways=target.gateways,
        notes=tuple(notes),
    )


def policy_parity(
    policy: CanaryPolicy,
    source_gateways: Iterable[Mapping[str, Any]],
    target_gateways: Iterable[Mapping[str, Any]],
) -> RouteParity:
    """``route_parity`` with the selectors and ``ignoreHosts`` of ``policy``."""
    return route_parity(
        source_gateways,
        target_gateways,
        source_selector=policy.spec.source.routing_selector(),
        target_selector=policy.spec.target.routing_selector(),
        ignore_hosts=policy.spec.routes.ignore_hosts,
    )


# --- migration manifests ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MigrationManifest:
    """One ASM-side Gateway to apply, and the missing routes it adds."""

    manifest: dict[str, Any]
    adds: tuple[MissingRoute, ...]
    source_gateway: str = ""
    conflicts: tuple[str, ...] = field(default=())


def _free_name(name: str, namespace: str, taken: set[tuple[str, str]]) -> str:
    """``<name>-asm``, else ``<name>-asm-2``, ...: never the name of a Gateway already there."""
    for attempt in range(1, 1000):
        suffix = "-asm" if attempt == 1 else f"-asm-{attempt}"
        candidate = name[: _MAX_NAME - len(suffix)].rstrip("-.") + suffix
        if (namespace, candidate) not in taken:
            return candidate
    raise ValueError(f"no free name for a copy of Gateway {namespace}/{name}")  # pragma: no cover


def _clean_metadata(metadata: Mapping[str, Any], name: str, namespace: str, source_id: str) -> dict[str, Any]:
    cleaned = {key: copy.deepcopy(value) for key, value in metadata.items() if key not in _CLUSTER_METADATA}
    cleaned["name"] = name
    cleaned["namespace"] = namespace
    annotations = {k: v for k, v in dict(cleaned.get("annotations") or {}).items() if k != _LAST_APPLIED}
    annotations[MIGRATED_FROM_ANNOTATION] = source_id
    cleaned["annotations"] = annotations
    return cleaned


def migration_plan(
    source_gateways: Iterable[Mapping[str, Any]],
    missing: Iterable[MissingRoute],
    target_selector: Mapping[str, str],
    target_namespace_map: Mapping[str, str] | None = None,
    *,
    existing: Collection[tuple[str, str]] = (),
    api_version: str | None = None,
) -> list[MigrationManifest]:
    """The ASM-side Gateways that add ``missing``, one per source Gateway that has missing routes.

    Each is the source Gateway copied with ``spec.selector`` set to ``target_selector``, its name
    suffixed ``-asm`` (``-asm-2``... when ``existing``, the ``(namespace, name)`` of the Gateways
    already on the ASM side, or another source Gateway holds that name: applying over an existing
    Gateway would replace its servers), its metadata freed of what belongs to its own cluster, its
    namespace mapped by ``target_namespace_map`` (unmapped: kept), and only the servers with
    missing routes, each with only its missing hosts (a host:port in two Gateways of one gateway
    is a conflict Istio reports). Servers, TLS settings, ``credentialName`` and the hosts'
    namespace parts are kept as written. ``api_version`` replaces the copy's apiVersion (the one the
    ASM control plane serves).
    """
    wanted: dict[str, dict[int, set[str]]] = {}
    adds: dict[str, list[MissingRoute]] = {}
    for item in missing:
        wanted.setdefault(item.gateway, {}).setdefault(item.server, set()).add(item.host_entry)
        adds.setdefault(item.gateway, []).append(item)
    namespaces = dict(target_namespace_map or {})
    gateways = [gateway for gateway in source_gateways if isinstance(gateway, Mapping)]
    taken = set(existing)
    for gateway in gateways:
        metadata = gateway.get("metadata") or {}
        namespace = str(metadata.get("namespace") or "default")
        taken.add((namespaces.get(namespace, namespace), str(metadata.get("name") or "")))
    plan: list[MigrationManifest] = []
    done: set[str] = set()
    for gateway in gateways:
        gateway_id = _gateway_id(gateway)
        if gateway_id not in wanted or gateway_id in done:
            continue
        done.add(gateway_id)
        metadata = gateway.get("metadata") or {}
        namespace = str(metadata.get("namespace") or "default")
        target_namespace = namespaces.get(namespace, namespace)
        name = _free_name(str(metadata.get("name") or "gateway"), target_namespace, taken)
        taken.add((target_namespace, name))
        spec = copy.deepcopy(dict(gateway.get("spec") or {}))
        servers: list[Any] = []
        for index, server in enumerate(spec.get("servers") or []):
            hosts = wanted[gateway_id].get(index)
            if not hosts or not isinstance(server, Mapping):
                continue
            kept = dict(server)
            kept["hosts"] = [entry for entry in server.get("hosts") or [] if entry in hosts]
            servers.append(kept)
        spec["selector"] = dict(target_selector)
        spec["servers"] = servers
        manifest = {
            "apiVersion": api_version or str(gateway.get("apiVersion") or "networking.istio.io/v1"),
            "kind": "Gateway",
            "metadata": _clean_metadata(metadata, name, target_namespace, gateway_id),
            "spec": spec,
        }
        items = tuple(adds[gateway_id])
        conflicts = tuple(sorted({item.conflicting_gateway for item in items if item.conflicting_gateway}))
        plan.append(MigrationManifest(manifest, items, gateway_id, conflicts))
    return plan
