"""The small interfaces the orchestration depends on, one per outside system.

Adapters implement them (``controller.adapters``, ``controller.notify``); tests and the demo
plug in in-memory ones. Nothing here knows a client library.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from controller.core.alerts import Alert, OutboxEntry
from controller.core.cloud import Backends, CloudEvent, ServiceFacts
from controller.core.commands import CommandRequest
from controller.core.lease import FenceToken, LeaseRecord
from controller.core.policy import CanaryPolicy, ServiceRef
from controller.core.results import RenderedQuery
from controller.core.schedule import Weights
from controller.core.state import RolloutState

__all__ = [
    "Clock",
    "CloudInspector",
    "Fence",
    "GatewayPair",
    "LeaseStore",
    "MetricsSource",
    "Notifier",
    "PairSnapshot",
    "RouteInspector",
    "SoleWriter",
    "StateStore",
    "StoredState",
]


class Clock(Protocol):
    """Where 'now' comes from: the wall clock, a compressed demo clock, or a test's hand."""

    def now(self) -> datetime:
        """The current time, timezone-aware."""
        ...


class MetricsSource(Protocol):
    """Turns one query into one number.

    A source whose ``answers_groups`` attribute is True answers a query grouped by labels as
    Prometheus does (``sum by (...)``): checks of many policies then share the built-in measures'
    queries (``controller.runtime.sharing``). A simulated source that answers by a query's meaning
    leaves it out.
    """

    def query(self, query: RenderedQuery) -> float | None:
        """The scalar answer, or None for an empty result. Raises MetricsUnavailable."""
        ...

    def query_vector(self, query: RenderedQuery) -> list[tuple[dict[str, str], float]]:
        """Every series of an instant vector with its labels (the breakdown of a failed gate).
        Raises MetricsUnavailable."""
        ...


@dataclass(frozen=True, slots=True)
class PairSnapshot:
    """Both gateways' Services as read at the start of a tick.

    ``refusal`` says why the policy must not raise weights on them (missing CLB annotations,
    weight updates disabled, unparsable weight, a permission missing). ``versions`` is opaque to
    the caller: the adapter's optimistic-concurrency token. ``legacy_state`` is version 1's state
    annotation on the target, if it is still there.

    ``target_kind`` is "IstioGateway" when the target's weight lives in an ASM IstioGateway (ASM
    copies it onto the Service): then ``target_weight`` is the IstioGateway's, the one written and
    compared, ``target_service_weight`` what the generated data-plane Service shows (behind it
    while ASM has not applied a write), ``target_service_version`` that Service's
    resourceVersion, and ``asm_error`` ASM's ``status.ErrorMessage``. For a Service target they
    keep their defaults.
    """

    target_weight: int | None
    source_weight: int | None
    refusal: str | None = None
    versions: tuple[str, str] = ("", "")
    legacy_state: str | None = None
    target_kind: str = "Service"
    target_service_weight: int | None = None
    target_service_version: str = ""
    asm_error: str | None = None


class GatewayPair(Protocol):
    """The weight actuator for one policy's two Services: weights and Events, nothing else."""

    def observe(self, policy: CanaryPolicy) -> PairSnapshot:
        """Read both Services. Raises ClusterError."""
        ...

    def write_weights(
        self,
        policy: CanaryPolicy,
        seen: PairSnapshot,
        weights: Weights,
        *,
        force: bool = False,
        drop_legacy_state: bool = False,
    ) -> None:
        """Write the target's weight, then the source's (None: leave it); skip what already shows it.

        Raises WeightChangedExternally when a weight moved since ``seen`` (unless ``force``, used
        by rollbacks, which always win), or another ClusterError. ``drop_legacy_state`` removes
        version 1's state annotation in the same patch as the target's weight.
        """
        ...

    def drop_legacy_state(self, policy: CanaryPolicy, seen: PairSnapshot) -> None:
        """Remove version 1's state annotation on its own (a finished rollout). Raises ClusterError."""
        ...

    def record_event(self, policy: CanaryPolicy, reason: str, message: str, *, warning: bool) -> None:
        """Emit a Kubernetes Event on the target (or log it where there is no cluster)."""
        ...


@dataclass(frozen=True, slots=True)
class StoredState:
    """A policy's state as read from its store.

    ``version`` is the store's concurrency token ("" when nothing is stored yet); ``error`` says
    why what is stored (kept in ``raw``) could not be read. ``outbox`` holds the alerts not yet
    delivered, so that a restarted controller delivers them (with the same ids).
    """

    state: RolloutState | None
    version: str = ""
    error: str | None = None
    raw: str | None = None
    outbox: tuple[OutboxEntry, ...] = ()
    #: an operator's command waiting on the object (answered when ``state.last_command`` has its id)
    command: CommandRequest | None = None
    #: why the command annotation could not be read (it is dropped by the next save)
    command_error: str | None = None
    #: the annotation's text as read (a bare word's id is the object's version, which moves)
    command_text: str | None = None
    #: the term of the leader that last saved it (None: saved without leader election)
    fence: FenceToken | None = None


class StateStore(Protocol):
    """Where a policy's RolloutState lives between ticks: one object per policy."""

    def load(self, policy: CanaryPolicy) -> StoredState:
        """Read the stored state (never raises for what is stored; raises ClusterError)."""
        ...

    def save(
        self,
        policy: CanaryPolicy,
        state: RolloutState,
        previous: StoredState,
        outbox: tuple[OutboxEntry, ...] = (),
        status: str | None = None,
    ) -> StoredState:
        """Replace ``previous`` with ``state``, ``outbox`` and ``status`` (JSON for ``gateway-canary
        status``). Raises Conflict if the state changed since, or ClusterError.

        An unreadable ``previous`` is kept beside the new state for an operator to look at; a command
        the state answers is removed, one that arrived since ``previous`` was read is kept.
        """
        ...

    def commands(self, policies: Iterable[CanaryPolicy]) -> dict[str, str]:
        """Policy name -> id of the command waiting on each of ``policies``' state objects (the service
        runs that policy's tick at once). Raises ClusterError."""
        ...


class Notifier(Protocol):
    """One alert receiver."""

    @property
    def name(self) -> str:
        """A name for logs and metrics; never the secret URL."""
        ...

    def send(self, alert: Alert, *, timeout: float) -> None:
        """Deliver once within ``timeout`` seconds. Raises NotificationError (NotificationTimeout
        when the answer did not come: it may have arrived); retries are the dispatcher's job."""
        ...


class CloudInspector(Protocol):
    """What the cloud controller did with the Services: its Events, the backends, the annotations."""

    def events(self, ref: ServiceRef, uid: str | None = None) -> tuple[CloudEvent, ...]:
        """The cloud controller's Events on one Service (never ours). Raises ClusterError."""
        ...

    def backends(self, ref: ServiceRef) -> Backends | None:
        """The Service's CLB backends as the cloud controller counts them; None when unknown."""
        ...

    def facts(self, ref: ServiceRef) -> ServiceFacts:
        """Annotations, ports and backing workloads, for preflight. Raises ClusterError."""
        ...


class RouteInspector(Protocol):
    """Route parity: which hosts each gateway serves (Istio Gateways on both control planes)."""

    def route_refusal(self, policy: CanaryPolicy) -> str | None:
        """Why the target does not serve everything the source does (None: it does). Raises ClusterError."""
        ...


class Fence(Protocol):
    """Whether this process may write now, and the token its writes carry (leader election).

    Every adapter that writes asks ``check()`` right before each write; the state store also
    writes ``token()`` into the state object and refuses to save over a newer one.
    """

    def token(self) -> FenceToken | None:
        """The current term's token; None when there is no election (this process is the only writer)."""
        ...

    def check(self) -> None:
        """Raise NotLeader unless this process holds the Lease now (renewed within the deadline)."""
        ...

    def deposed(self, why: str) -> None:
        """A newer term's token was found where this process writes: stop leading at once."""
        ...


class SoleWriter:
    """The Fence of a process that runs without leader election: it may always write, with no token."""

    def token(self) -> FenceToken | None:
        """No election, no token."""
        return None

    def check(self) -> None:
        """Always allowed."""

    def deposed(self, why: str) -> None:
        """Nobody can depose the only writer (a token in the state object comes from an elected
        controller that ran before: this one writes over it)."""


class LeaseStore(Protocol):
    """The one Lease the replicas elect a leader with."""

    def get(self) -> LeaseRecord | None:
        """The Lease, None when there is none. Raises ClusterError."""
        ...

    def create(self, record: LeaseRecord) -> LeaseRecord:
        """Create it as ``record``. Raises Conflict when someone created it first, or ClusterError."""
        ...

    def update(self, record: LeaseRecord) -> LeaseRecord:
        """Replace it with ``record``, guarded by ``record.version``. Raises Conflict, or ClusterError."""
        ...
