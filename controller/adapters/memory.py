"""In-memory adapters: the demo's simulated Services and state store, and fast fakes for tests.

They keep the contracts of the Kubernetes adapters (target written before source, a weight changed
behind their back is detected on write, a state saved against a stale version is a Conflict), so
decisions tested against them mean the same.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from controller.core import cloud
from controller.core.alerts import OutboxEntry
from controller.core.cloud import BackendMode, Backends
from controller.core.commands import answered, read_command
from controller.core.enums import GatewayRole
from controller.core.lease import FenceToken
from controller.core.policy import CanaryPolicy, ServiceRef
from controller.core.schedule import Weights, source_first
from controller.core.state import RolloutState, StateUnreadable, decode_state, encode_state
from controller.errors import CommandWithdrawn, Conflict, NotLeader, WeightChangedExternally
from controller.ports import Clock, Fence, PairSnapshot, SoleWriter, StoredState

__all__ = ["InMemoryCloud", "InMemoryGatewayPair", "InMemoryStateStore", "RecordedEvent"]


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """An Event as the demo shows it."""

    reason: str
    message: str
    warning: bool


@dataclass
class InMemoryGatewayPair:
    """Two simulated Services' weight annotations."""

    target_weight: int | None = 0
    source_weight: int | None = 100
    refusal: str | None = None
    legacy_state: str | None = None
    events: list[RecordedEvent] = field(default_factory=list)
    writes: int = 0
    #: asked before every write, as the Kubernetes adapter does (leader election)
    fence: Fence = field(default_factory=SoleWriter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def observe(self, policy: CanaryPolicy) -> PairSnapshot:
        """The current simulated annotations."""
        with self._lock:
            return PairSnapshot(
                self.target_weight, self.source_weight, refusal=self.refusal, legacy_state=self.legacy_state
            )

    def write_weights(
        self,
        policy: CanaryPolicy,
        seen: PairSnapshot,
        weights: Weights,
        *,
        force: bool = False,
        drop_legacy_state: bool = False,
    ) -> None:
        """Write like the real adapter: refuse if a weight moved since ``seen`` (unless forced)."""
        first_source = source_first(weights, seen.source_weight)
        for role in (
            (GatewayRole.SOURCE, GatewayRole.TARGET) if first_source else (GatewayRole.TARGET, GatewayRole.SOURCE)
        ):
            self.write_one(role, seen, weights, force=force, drop_legacy_state=drop_legacy_state)

    def write_one(
        self, role: GatewayRole, seen: PairSnapshot, weights: Weights, *, force: bool, drop_legacy_state: bool = False
    ) -> None:
        """One Service's patch, as the real adapter makes it (a test can fail between the two)."""
        self.fence.check()
        with self._lock:
            if role is GatewayRole.TARGET and (force or weights.target != self.target_weight):
                if not force and self.target_weight != seen.target_weight:
                    raise WeightChangedExternally("simulated target weight changed since it was read")
                self.target_weight = weights.target
                self.writes += 1
                if drop_legacy_state:
                    self.legacy_state = None
            if (
                role is GatewayRole.SOURCE
                and weights.source is not None
                and (force or weights.source != self.source_weight)
            ):
                if not force and self.source_weight != seen.source_weight:
                    raise WeightChangedExternally("simulated source weight changed since it was read")
                self.source_weight = weights.source
                self.writes += 1

    def drop_legacy_state(self, policy: CanaryPolicy, seen: PairSnapshot) -> None:
        """Remove the version-1 state annotation."""
        self.fence.check()
        with self._lock:
            self.legacy_state = None

    def record_event(self, policy: CanaryPolicy, reason: str, message: str, *, warning: bool) -> None:
        """Keep the Event for inspection."""
        self.fence.check()
        with self._lock:
            self.events.append(RecordedEvent(reason, message, warning))


@dataclass
class InMemoryStateStore:
    """Encoded states by policy name, with a version counter as the real store's resourceVersion."""

    texts: dict[str, str] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    outboxes: dict[str, tuple[OutboxEntry, ...]] = field(default_factory=dict)
    statuses: dict[str, str] = field(default_factory=dict)
    #: commands waiting, as the annotation's value (the demo and tests give them like the CLI does)
    pending_commands: dict[str, str] = field(default_factory=dict)
    #: the leader's token each state object was last saved with (leader election)
    fences: dict[str, FenceToken] = field(default_factory=dict)
    #: asked before every save, and its token written, as the Kubernetes store does
    fence: Fence = field(default_factory=SoleWriter)
    saves: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def load(self, policy: CanaryPolicy) -> StoredState:
        """Decode what is stored, reporting garbage as an error like the real store."""
        with self._lock:
            raw = self.texts.get(policy.name)
            version = str(self.versions.get(policy.name, ""))
            outbox = self.outboxes.get(policy.name, ())
            command_text = self.pending_commands.get(policy.name)
            fence = self.fences.get(policy.name)
        command, command_error = read_command(command_text, version)
        stored = StoredState(
            state=None,
            version=version,
            outbox=outbox,
            command=command,
            command_error=command_error,
            command_text=command_text,
            fence=fence,
        )
        if raw is None:
            return stored
        try:
            return replace(stored, state=decode_state(raw))
        except StateUnreadable as exc:
            return replace(stored, error=str(exc), raw=raw)

    def stamp(self, policy: str, token: FenceToken) -> None:
        """Another leader's save of the object, as far as fencing goes: its token, a new version."""
        with self._lock:
            self.fences[policy] = token
            self.versions[policy] = self.versions.get(policy, 0) + 1

    def give(self, policy: str, command: str) -> None:
        """An operator's command, as the CLI writes it (a new version, like an annotation write)."""
        with self._lock:
            self.pending_commands[policy] = command
            self.versions[policy] = self.versions.get(policy, 0) + 1

    def save(
        self,
        policy: CanaryPolicy,
        state: RolloutState,
        previous: StoredState,
        outbox: tuple[OutboxEntry, ...] = (),
        status: str | None = None,
    ) -> StoredState:
        """Store ``state`` if nothing changed since ``previous`` was read, and this writer's term is
        not older than the one that saved it last."""
        token = self.fence.token()
        with self._lock:
            held = self.fences.get(policy.name)
            for newer in (previous.fence, held):
                if token is not None and newer is not None and newer.supersedes(token):
                    self.fence.deposed(f"term {newer.term} of {newer.holder} saved {policy.name}")
                    raise NotLeader(f"not saved: a newer term saved {policy.name}")
            self.fence.check()
            current = str(self.versions.get(policy.name, ""))
            stored = self.texts.get(policy.name)
            read = encode_state(previous.state) if previous.state is not None else previous.raw
            if current != previous.version and (
                stored != read or self.outboxes.get(policy.name, ()) != previous.outbox or held != previous.fence
            ):
                raise Conflict(f"state of {policy.name} changed since it was read")  # (only metadata may move)
            answers = answered(state, previous.command)
            if answers and self.pending_commands.get(policy.name) != previous.command_text:
                raise CommandWithdrawn(f"the command answering {policy.name} was taken back")
            self.texts[policy.name] = encode_state(state)
            self.outboxes[policy.name] = outbox
            if token is not None:
                self.fences[policy.name] = token
            if status is not None:
                self.statuses[policy.name] = status
            if previous.command_error is not None or answers:
                self.pending_commands.pop(policy.name, None)
            self.versions[policy.name] = self.versions.get(policy.name, 0) + 1
            self.saves += 1
            return StoredState(
                state=state, version=str(self.versions[policy.name]), outbox=outbox, fence=self.fences.get(policy.name)
            )

    def commands(self, policies: Iterable[CanaryPolicy]) -> dict[str, str]:
        """Policy name -> id of the waiting command."""
        names = {policy.name for policy in policies}
        with self._lock:
            waiting = {name: text for name, text in self.pending_commands.items() if name in names}
            versions = dict(self.versions)
        found = {name: read_command(text, str(versions.get(name, ""))) for name, text in waiting.items()}
        return {name: command.id for name, (command, _) in found.items() if command is not None}

    def state_of(self, name: str) -> RolloutState | None:
        """The decoded state of a policy (tests, the demo)."""
        raw = self.texts.get(name)
        return None if raw is None else decode_state(raw)


class InMemoryCloud:
    """The demo's cloud: a CLB set up as the runbook says, whose controller confirms every write at once.

    ``backends`` gives each Service's backends by name (default: ``default_backends``), so the
    demo shows the cloud controller's spread of a weight (requested vs effective share).
    """

    def __init__(
        self,
        clock: Clock,
        *,
        default_backends: Backends | None = None,
        backends: dict[str, Backends] | None = None,
        annotations: dict[str, str] | None = None,
    ) -> None:
        self._clock = clock
        self._default = default_backends or Backends(BackendMode.CLUSTER, nodes=20)
        self._backends = dict(backends or {})
        self._annotations = annotations or {
            cloud.LB_ID: "lb-demo",
            cloud.VGROUP_PORT: "rsp-demo:80",
            cloud.FORCE_OVERRIDE: "false",
            cloud.SCHEDULER: "wrr",
            cloud.WEIGHT: "0",
        }

    def events(self, ref: ServiceRef, uid: str | None = None) -> tuple[cloud.CloudEvent, ...]:
        """An EnsuredLoadBalancer just now: this cloud applies everything at once."""
        return (cloud.CloudEvent(cloud.SUCCESS_REASON, "Ensured load balancer [lb-demo]", self._clock.now()),)

    def backends(self, ref: ServiceRef) -> Backends | None:
        """The Service's backends (by name), or the default."""
        return self._backends.get(ref.name, self._default)

    def facts(self, ref: ServiceRef) -> cloud.ServiceFacts:
        """Annotations as the runbook wants them, one port, the Service's own workload."""
        return cloud.ServiceFacts(str(ref), dict(self._annotations), ports=(80,), workloads=(ref.name,))
