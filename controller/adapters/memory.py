"""An in-memory GatewayPair: the demo's simulated Services, and a fast fake for unit tests.

It keeps the same contract as the Kubernetes adapter (target written before source, a weight
changed behind its back is detected on write), so decisions tested against it mean the same.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from controller.core.policy import CanaryPolicy
from controller.core.schedule import Weights
from controller.core.state import RolloutState
from controller.errors import WeightChangedExternally
from controller.ports import PairSnapshot

__all__ = ["InMemoryGatewayPair", "RecordedEvent"]


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """An Event as the demo shows it."""

    reason: str
    message: str
    warning: bool


@dataclass
class InMemoryGatewayPair:
    """Two simulated Services' weight annotations and the state annotation."""

    target_weight: int | None = 0
    source_weight: int | None = 100
    state: RolloutState | None = None
    refusal: str | None = None
    events: list[RecordedEvent] = field(default_factory=list)
    writes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def observe(self, policy: CanaryPolicy) -> PairSnapshot:
        """The current simulated annotations."""
        with self._lock:
            return PairSnapshot(self.target_weight, self.source_weight, self.state, refusal=self.refusal)

    def apply(
        self,
        policy: CanaryPolicy,
        seen: PairSnapshot,
        weights: Weights | None,
        state: RolloutState,
        *,
        force: bool = False,
    ) -> None:
        """Write like the real adapter: refuse if a weight moved since ``seen`` (unless forced)."""
        with self._lock:
            moved = (self.target_weight, self.source_weight) != (seen.target_weight, seen.source_weight)
            if moved and not force:
                raise WeightChangedExternally("simulated weights changed since they were read")
            if weights is not None:
                self.target_weight = weights.target
                if weights.source is not None:
                    self.source_weight = weights.source
            if state != self.state:
                self.state = state
            self.writes += 1

    def record_event(self, policy: CanaryPolicy, reason: str, message: str, *, warning: bool) -> None:
        """Keep the Event for inspection."""
        with self._lock:
            self.events.append(RecordedEvent(reason, message, warning))
