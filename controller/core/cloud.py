"""What the Alibaba Cloud controller (CCM) does with a weight, as pure arithmetic and rules.

Writing ``"25"`` on the ASM gateway's Service does not by itself mean the ASM gateway gets a
quarter of the traffic (``docs/alibaba-cloud.md``, facts in ``shared/reference``):

- the CCM spreads a Service's weight over its backends, ``max(1, w // n)`` each, so the share the
  CLB actually sends is Σtarget / (Σtarget + Σsource) over backends (``effective_share``);
- it confirms a change with Events, and on an invalid backend skips the weight silently
  (``confirmation``);
- and the runbook's prerequisites (one CLB, vServer groups, WRR, both weights present, no ASM
  canary upgrade) decide whether weights steer traffic at all (``preflight``).

Pure: the adapters read Services, Events, Nodes and EndpointSlices and hand plain values in here.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

__all__ = [
    "ANNOTATION_PREFIX",
    "FAILURE_REASONS",
    "SUCCESS_REASON",
    "BackendMode",
    "Backends",
    "CloudEvent",
    "Confirmation",
    "ConfirmationState",
    "PreflightItem",
    "ServiceFacts",
    "Split",
    "Traffic",
    "backend_weights",
    "blocking",
    "combined",
    "confirmation",
    "effective_share",
    "preflight",
    "requested_share",
    "split",
    "traffic",
]

ANNOTATION_PREFIX = "service.beta.kubernetes.io/alibaba-cloud-loadbalancer-"
WEIGHT = ANNOTATION_PREFIX + "weight"
LB_ID = ANNOTATION_PREFIX + "id"
VGROUP_PORT = ANNOTATION_PREFIX + "vgroup-port"
FORCE_OVERRIDE = ANNOTATION_PREFIX + "force-override-listeners"
SCHEDULER = ANNOTATION_PREFIX + "scheduler"
IGNORE_WEIGHT = ANNOTATION_PREFIX + "ignore-weight-update"

#: The CCM's Event reasons (pkg/controller/helper/event.go).
SUCCESS_REASON = "EnsuredLoadBalancer"
FAILURE_REASONS = frozenset(
    {"SyncLoadBalancerFailed", "SkipSyncBackends", "UnAvailableLoadBalancer", "FailedAddFinalizer"}
)
#: Without the annotation the CCM gives each backend this weight.
DEFAULT_BACKEND_WEIGHT = 100


# --- the effective split --------------------------------------------------------------------------


class BackendMode(enum.StrEnum):
    """How the CCM turns a Service's pods into CLB backends."""

    CLUSTER = "Cluster"  # every node (externalTrafficPolicy: Cluster), weight spread per node
    LOCAL = "Local"  # nodes with a ready pod (externalTrafficPolicy: Local), spread by pods on each
    ENI = "ENI"  # pods' ENIs directly (backend-type: eni), weight spread per pod


@dataclass(frozen=True, slots=True)
class Backends:
    """A Service's CLB backends as the CCM counts them.

    ``pods_per_node`` lists the ready pods on each node that has any (Local; its length is the
    number of backends); ``nodes`` counts the nodes (Cluster); ``pods`` the ready pods (ENI).
    """

    mode: BackendMode
    nodes: int = 0
    pods: int = 0
    pods_per_node: tuple[int, ...] = ()

    @property
    def count(self) -> int:
        """How many backends the CLB has for this Service."""
        if self.mode is BackendMode.CLUSTER:
            return self.nodes
        if self.mode is BackendMode.ENI:
            return self.pods
        return len([pods for pods in self.pods_per_node if pods > 0])

    def describe(self) -> str:
        """For logs: '20 nodes', '3 pods', '2 nodes with 3 pods'."""
        if self.mode is BackendMode.CLUSTER:
            return f"{self.nodes} nodes (Cluster)"
        if self.mode is BackendMode.ENI:
            return f"{self.pods} pods (ENI)"
        return f"{self.count} nodes with {sum(self.pods_per_node)} pods (Local)"


def backend_weights(weight: int | None, backends: Backends) -> tuple[int, ...]:
    """Each backend's CLB weight for a Service weight.

    The CCM's ``podPercentAlgorithm``: Cluster ``max(1, w // nodes)``, ENI ``max(1, w // pods)``,
    Local ``max(1, w * podsOnNode // totalPods)``. A weight of 0 gives every backend 0. Without
    the annotation (None) every backend gets 100, except in Local mode (``podNumberAlgorithm``:
    each node weighs the number of its pods).
    """
    if weight is None and backends.mode is BackendMode.LOCAL:
        # no annotation in Local mode: podNumberAlgorithm, each node weighs its pods
        return tuple(pods for pods in backends.pods_per_node if pods > 0)
    if weight is None:
        return (DEFAULT_BACKEND_WEIGHT,) * backends.count
    if weight == 0:
        return (0,) * backends.count
    if backends.mode is BackendMode.LOCAL:
        on_nodes = [pods for pods in backends.pods_per_node if pods > 0]
        total = sum(on_nodes)
        return tuple(max(1, weight * pods // total) for pods in on_nodes)
    count = backends.count
    return (max(1, weight // count),) * count if count else ()


def requested_share(target_weight: int, source_weight: int | None) -> float | None:
    """The share the weights say, before the CCM spreads them (None: nothing would be sent)."""
    source = DEFAULT_BACKEND_WEIGHT if source_weight is None else source_weight
    total = target_weight + source
    return None if total <= 0 else target_weight / total


def effective_share(target_weight: int, source_weight: int | None, target: Backends, source: Backends) -> float | None:
    """The share of new connections the CLB sends the target: Σtarget / (Σtarget + Σsource).

    None when neither Service has a backend with weight (the CLB would send nothing at all).
    """
    on_target = sum(backend_weights(target_weight, target))
    on_source = sum(backend_weights(source_weight, source))
    total = on_target + on_source
    return None if total <= 0 else on_target / total


# --- the CCM's confirmation of a write ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CloudEvent:
    """One (aggregated) Event on a Service, as Kubernetes stores it.

    ``last_seen`` is its lastTimestamp (or eventTime): Events are aggregated, so a reason seen
    before the write can be seen again after it with a higher count; only the time tells.
    """

    reason: str
    message: str
    last_seen: datetime
    warning: bool = False
    count: int = 1
    #: the order the API server stored it in (its resourceVersion), to order Events of one second
    order: int = 0

    @property
    def is_answer(self) -> bool:
        """Whether the cloud controller answers a change with it: a success, or a failure to apply.

        ``SkipSyncBackends`` also comes as a Normal Event (pods outside the VPC's CIDRs, skipped
        without harm): only its Warning says the backends, weights included, were not updated.
        """
        if self.reason == SUCCESS_REASON:
            return True
        return self.reason in FAILURE_REASONS and (self.warning or self.reason == "UnAvailableLoadBalancer")


class Confirmation(enum.StrEnum):
    """Whether the cloud applied the last weight write."""

    CONFIRMED = "Confirmed"  # a success newer than the write (and no later failure)
    WAITING = "Waiting"  # nothing yet, still within the deadline
    FAILED = "Failed"  # the CCM (or ASM) said it did not apply it
    UNCONFIRMED = "Unconfirmed"  # no answer within the deadline


@dataclass(frozen=True, slots=True)
class ConfirmationState:
    """A confirmation with what it rests on, for status, logs and alerts."""

    status: Confirmation
    #: what happened, stable while it lasts (reported once)
    reason: str
    #: the cloud controller's own words (they change on every retry: request ids), for the alert
    detail: str = ""

    @property
    def applied(self) -> bool:
        """Whether the weights on the Services can be taken as what the CLB does."""
        return self.status is Confirmation.CONFIRMED


def confirmation(
    events: Sequence[CloudEvent], written_at: datetime, now: datetime, timeout: timedelta, *, service: str
) -> ConfirmationState:
    """Judge the CCM's Events on one Service after a write at ``written_at``.

    Event times have whole seconds, so anything from the write's second on counts. The newest
    answer wins (a retry may succeed after a failure); within one second the one the API server
    stored last, and when even that is unknown, a failure.
    """
    since = written_at.replace(microsecond=0)
    answers = [e for e in events if e.last_seen >= since and e.is_answer]
    if answers:
        newest = max(answers, key=lambda e: (e.last_seen, e.order, e.reason != SUCCESS_REASON))
        if newest.reason == SUCCESS_REASON:
            return ConfirmationState(Confirmation.CONFIRMED, f"{service}: {newest.reason} at {_hms(newest.last_seen)}")
        return ConfirmationState(
            Confirmation.FAILED, f"{service}: the cloud controller answered {newest.reason}", newest.message
        )
    if now - written_at > timeout:
        return ConfirmationState(
            Confirmation.UNCONFIRMED,
            f"{service}: no {SUCCESS_REASON} from the cloud controller since the weight write at "
            f"{_hms(written_at)} ({_seconds(timeout)} allowed); the CLB may not have the new weight",
        )
    return ConfirmationState(
        Confirmation.WAITING, f"{service}: waiting for the cloud controller since {_hms(written_at)}"
    )


def combined(states: Sequence[ConfirmationState]) -> ConfirmationState:
    """Several sides' confirmations as one: the worst decides (Failed, Unconfirmed, Waiting, Confirmed)."""
    order = [Confirmation.FAILED, Confirmation.UNCONFIRMED, Confirmation.WAITING, Confirmation.CONFIRMED]
    if not states:
        return ConfirmationState(Confirmation.CONFIRMED, "nothing written")
    worst = min(states, key=lambda s: order.index(s.status))
    same = [s for s in states if s.status is worst.status]
    return ConfirmationState(
        worst.status, "; ".join(s.reason for s in same), "; ".join(s.detail for s in same if s.detail)
    )


def _hms(moment: datetime) -> str:
    return moment.strftime("%H:%M:%S")


def _seconds(span: timedelta) -> str:
    return f"{int(span.total_seconds())} s"


# --- settling: does the traffic follow the weights yet? ----------------------------------------


#: A deficit must stand out of the counting noise by this many standard deviations (Poisson).
DEFICIT_SIGMAS = 4.0


@dataclass(frozen=True, slots=True)
class Traffic:
    """Does the traffic follow the weights? ``settling``: not yet (no bake, no raise);
    ``deficit``: the ASM gateway persistently gets fewer requests than the CLB sends it."""

    settling: str | None = None
    deficit: str | None = None


def traffic(
    *,
    target_requests: float | None,
    source_requests: float | None,
    expected: float | None,
    tolerance: float,
    max_deficit: float,
    confirmed: ConfirmationState | None,
    settled_for: timedelta | None,
    grace: timedelta,
) -> Traffic:
    """Judge the observed split of requests against the effective share (R8).

    Settling, until the cloud confirmed the last write and, unless the observed share is already
    within ``tolerance`` of the effective one, ``grace`` has passed since (the window still holds
    traffic from before the write, and clients on kept-alive connections move late). After that,
    a target that gets less than ``1 - max_deficit`` of what the CLB sends it, by more than the
    counting noise, has a traffic deficit, however small the step: requests that fail before HTTP
    never reach the metrics. Any other gap (more traffic than expected, or a small one) keeps the
    step settling: not the target's fault. ``settled_for`` None: nothing was written to wait for.
    """
    if confirmed is not None and not confirmed.applied:
        return Traffic(settling=f"settling: the weight write is not confirmed ({confirmed.reason})")
    if expected is None or target_requests is None or not source_requests:
        return Traffic()
    total = target_requests + source_requests
    observed = target_requests / total
    follows = abs(observed - expected) <= tolerance + 1e-9
    split = f"the ASM gateway gets {observed:.1%} of requests, the weights give it {expected:.1%}"
    if settled_for is not None and settled_for < grace:
        late = f"settling: {split} (traffic moves to new weights late: {settled_for.total_seconds():.0f}s of "
        return Traffic() if follows else Traffic(settling=f"{late}{grace.total_seconds():.0f}s)")
    wanted = expected * total
    missing = wanted - target_requests
    if target_requests < wanted * (1 - max_deficit) and missing > DEFICIT_SIGMAS * math.sqrt(wanted):
        unseen = " (no series at all: or Prometheus does not see the ASM gateway)" if target_requests == 0 else ""
        return Traffic(
            deficit=(
                f"traffic deficit: {split} ({target_requests:.0f} requests of {wanted:.0f} expected){unseen}: "
                "requests fail before HTTP: a TLS certificate (credentialName) missing on the ASM gateway, a "
                "listener port it does not open, no Gateway server for a host, or the CLB not applying the weight"
            )
        )
    if follows:
        return Traffic()
    return Traffic(settling=f"settling: {split} (tolerance {tolerance:.1%})")


# --- preflight: the runbook's prerequisites ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServiceFacts:
    """What preflight needs to know of one gateway Service."""

    name: str  # "namespace/name"
    annotations: Mapping[str, str]
    ports: tuple[int, ...] = ()
    #: workloads (Deployments) whose pods back the Service, by name
    workloads: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PreflightItem:
    """One line of the runbook's checklist: passed or not, why, and how to fix it."""

    check: str
    ok: bool
    detail: str
    fix: str = ""
    #: a failed item that only warns (the policy said so): it does not block a raise
    warn_only: bool = False

    @property
    def blocks(self) -> bool:
        """Whether this item refuses a raise."""
        return not self.ok and not self.warn_only

    def line(self) -> str:
        """'✓ check: detail' or '✗ check: detail; fix: ...' ('!' for a warning)."""
        mark = "✓" if self.ok else ("!" if self.warn_only else "✗")
        text = f"{mark} {self.check}: {self.detail}"
        return text if self.ok or not self.fix else f"{text}; fix: {self.fix}"


@dataclass(frozen=True, slots=True)
class _Vgroups:
    groups: tuple[tuple[str, int], ...] = ()
    problem: str | None = None


def _parse_vgroups(raw: str) -> _Vgroups:
    """``rsp-a:80,rsp-b:443``; the CCM does not trim spaces, so a space is an error, not a style."""
    if not raw:
        return _Vgroups(problem="is empty")
    if any(ch.isspace() for ch in raw):
        return _Vgroups(problem=f"{raw!r} contains spaces, which the cloud controller does not trim")
    groups: list[tuple[str, int]] = []
    for part in raw.split(","):
        group, sep, port = part.rpartition(":")
        if not sep or not group or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            return _Vgroups(problem=f"{part!r} is not vServerGroupId:port")
        groups.append((group, int(port)))
    return _Vgroups(groups=tuple(groups))


def preflight(
    target: ServiceFacts,
    source: ServiceFacts,
    *,
    require_wrr: bool = True,
    target_workload: str | None = None,
) -> tuple[PreflightItem, ...]:
    """The runbook's checklist over both Services, each item with its fix.

    ``target_workload`` is the ASM gateway's Deployment name: a Deployment ``<it>-canary`` behind
    the same Service is an ASM gateway canary upgrade in progress.
    """
    items: list[PreflightItem] = []
    both = (target, source)
    ids = {s.name: s.annotations.get(LB_ID, "").strip() for s in both}
    missing = [name for name, value in ids.items() if not value]
    if missing:
        items.append(
            PreflightItem(
                "same CLB",
                False,
                f"{', '.join(missing)} has no {LB_ID}",
                f"annotate both Services with the id of the CLB they share ({LB_ID}: lb-...)",
            )
        )
    elif len(set(ids.values())) > 1:
        items.append(
            PreflightItem(
                "same CLB",
                False,
                "the Services name different CLBs: " + ", ".join(f"{n}={v}" for n, v in ids.items()),
                "point both at the one reused CLB; weights only split traffic within one load balancer",
            )
        )
    else:
        items.append(PreflightItem("same CLB", True, f"both use {ids[target.name]}"))

    for facts in both:
        parsed = _parse_vgroups(facts.annotations.get(VGROUP_PORT, ""))
        if parsed.problem is not None:
            items.append(
                PreflightItem(
                    f"vServer groups of {facts.name}",
                    False,
                    f"{VGROUP_PORT} {parsed.problem}",
                    'write "rsp-<id>:<port>[,rsp-<id>:<port>]" with no spaces, one entry per listener port',
                )
            )
            continue
        unknown = sorted({port for _, port in parsed.groups if facts.ports and port not in facts.ports})
        if unknown:
            items.append(
                PreflightItem(
                    f"vServer groups of {facts.name}",
                    False,
                    f"{VGROUP_PORT} names port(s) {', '.join(map(str, unknown))} the Service does not expose "
                    f"(ports: {', '.join(map(str, facts.ports))})",
                    "each vServer group's port must be one of the Service's ports",
                )
            )
        else:
            items.append(
                PreflightItem(
                    f"vServer groups of {facts.name}",
                    True,
                    ", ".join(f"{group}:{port}" for group, port in parsed.groups),
                )
            )

    items.append(_shared_vgroups(target, source))

    for facts in both:
        value = facts.annotations.get(FORCE_OVERRIDE)
        ok = value is not None and value.strip().lower() == "false"
        items.append(
            PreflightItem(
                f"listeners kept on {facts.name}",
                ok,
                f"{FORCE_OVERRIDE} is {value!r}" if value is not None else f"{FORCE_OVERRIDE} is not set",
                f'set {FORCE_OVERRIDE}: "false" (the runbook requires it on a reused CLB)',
            )
        )

    for facts in both:
        scheduler = facts.annotations.get(SCHEDULER, "").strip().lower()
        ok = scheduler == "wrr"
        items.append(
            PreflightItem(
                f"weighted scheduler on {facts.name}",
                ok,
                f"{SCHEDULER} is {scheduler!r}" if scheduler else f"{SCHEDULER} is not set (the CLB default is rr)",
                f'set {SCHEDULER}: "wrr"; under rr the CLB ignores weights',
                warn_only=not require_wrr,
            )
        )

    for facts in both:
        weight = facts.annotations.get(WEIGHT)
        items.append(
            PreflightItem(
                f"weight present on {facts.name}",
                weight is not None,
                f"{WEIGHT} is {weight!r}"
                if weight is not None
                else f"no {WEIGHT}: the CCM gives each backend 100, swamping the other Service",
                f'set {WEIGHT} ("0" on the ASM gateway, "100" on the old one)',
            )
        )

    if target_workload is not None:
        canary = f"{target_workload}-canary"
        upgrading = canary in target.workloads
        items.append(
            PreflightItem(
                "no ASM gateway canary upgrade",
                not upgrading,
                f"Deployment {canary} backs {target.name}: an upgrade is in progress"
                if upgrading
                else f"only {', '.join(target.workloads) or 'no'} Deployment(s) back {target.name}",
                "finish or cancel the ASM gateway canary upgrade first (its pod changes the spread and "
                "is missed by the metrics selector)",
            )
        )
    return tuple(items)


def _shared_vgroups(target: ServiceFacts, source: ServiceFacts) -> PreflightItem:
    """Both gateways' backends in the same vServer group per port: the listener forwards to one group,
    and the weights split traffic only among that group's backends."""
    check = "same vServer groups"
    mine = _parse_vgroups(target.annotations.get(VGROUP_PORT, ""))
    theirs = _parse_vgroups(source.annotations.get(VGROUP_PORT, ""))
    if mine.problem is not None or theirs.problem is not None:
        return PreflightItem(
            check, False, "cannot be compared until both vgroup-port annotations are valid", "see above"
        )
    target_groups, source_groups = dict((p, g) for g, p in mine.groups), dict((p, g) for g, p in theirs.groups)
    differ = [
        f"port {port}: {target.name} uses {group}, {source.name} {source_groups.get(port, 'none')}"
        for port, group in sorted(target_groups.items())
        if source_groups.get(port) != group
    ]
    if differ:
        return PreflightItem(
            check,
            False,
            "; ".join(differ),
            "name the old gateway's vServer group on the ASM gateway for each port (the runbook's reuse)",
        )
    return PreflightItem(check, True, ", ".join(f"{g}:{p}" for p, g in sorted(target_groups.items())))


def blocking(items: Sequence[PreflightItem]) -> str | None:
    """The refusal the failed items make (None: all pass or only warn)."""
    failed = [item for item in items if item.blocks]
    if not failed:
        return None
    return "preflight: " + "; ".join(f"{item.check}: {item.detail} (fix: {item.fix})" for item in failed)


@dataclass(frozen=True, slots=True)
class Split:
    """Requested vs effective share at a pair of weights, for logs, status, metrics and preflight."""

    target_weight: int
    source_weight: int | None
    requested: float | None
    effective: float | None
    backends: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        """'requested 10.0 %, effective 20.0 % (20 nodes (Cluster) / 20 nodes (Cluster))'."""
        requested = "-" if self.requested is None else f"{self.requested:.1%}"
        effective = "unknown" if self.effective is None else f"{self.effective:.1%}"
        tail = f" ({self.backends})" if self.backends else ""
        return f"requested {requested}, effective {effective}{tail}"

    def off_by(self) -> float:
        """How far the CLB's split is from the requested one (0 when unknown)."""
        if self.requested is None or self.effective is None or math.isnan(self.effective):
            return 0.0
        return abs(self.effective - self.requested)


def split(target_weight: int, source_weight: int | None, target: Backends | None, source: Backends | None) -> Split:
    """Requested and (when the backends are known) effective share of a pair of weights."""
    effective = None
    backends = ""
    if target is not None and source is not None:
        effective = effective_share(target_weight, source_weight, target, source)
        backends = f"target {target.describe()}, source {source.describe()}"
    return Split(target_weight, source_weight, requested_share(target_weight, source_weight), effective, backends)
