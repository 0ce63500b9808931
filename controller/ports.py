"""The small interfaces the orchestration depends on, one per outside system.

Adapters implement them (``controller.adapters``, ``controller.notify``); tests and the demo
plug in in-memory ones. Nothing here knows a client library.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from controller.core.alerts import Alert
from controller.core.policy import CanaryPolicy
from controller.core.results import RenderedQuery
from controller.core.schedule import Weights
from controller.core.state import RolloutState

__all__ = ["Clock", "GatewayPair", "MetricsSource", "Notifier", "PairSnapshot"]


class Clock(Protocol):
    """Where 'now' comes from: the wall clock, a compressed demo clock, or a test's hand."""

    def now(self) -> datetime:
        """The current time, timezone-aware."""
        ...


class MetricsSource(Protocol):
    """Turns one query into one number."""

    def query(self, query: RenderedQuery) -> float | None:
        """The scalar answer, or None for an empty result. Raises MetricsUnavailable."""
        ...


@dataclass(frozen=True, slots=True)
class PairSnapshot:
    """Both gateways' Services as read at the start of a tick.

    ``refusal`` says why the policy must not act on them (missing CLB annotations, weight
    updates disabled, unparsable weight); ``state_error`` why a stored state was unreadable.
    ``versions`` is opaque to the caller: the adapter's optimistic-concurrency token.
    """

    target_weight: int | None
    source_weight: int | None
    state: RolloutState | None
    refusal: str | None = None
    state_error: str | None = None
    versions: tuple[str, str] = ("", "")


class GatewayPair(Protocol):
    """The weight actuator and state store for one policy's two Services.

    The state is written in the same write as the target weight, so the two never disagree.
    """

    def observe(self, policy: CanaryPolicy) -> PairSnapshot:
        """Read both Services. Raises ClusterError."""
        ...

    def apply(
        self,
        policy: CanaryPolicy,
        seen: PairSnapshot,
        weights: Weights | None,
        state: RolloutState,
        *,
        force: bool = False,
    ) -> None:
        """Write the weights (if any) and the state; skip what is unchanged.

        Raises WeightChangedExternally when a weight moved since ``seen`` (unless ``force``, used
        by rollbacks, which always win), or another ClusterError.
        """
        ...

    def record_event(self, policy: CanaryPolicy, reason: str, message: str, *, warning: bool) -> None:
        """Emit a Kubernetes Event on the target (or log it where there is no cluster)."""
        ...


class Notifier(Protocol):
    """One alert receiver."""

    @property
    def name(self) -> str:
        """A name for logs and metrics; never the secret URL."""
        ...

    def send(self, alert: Alert) -> None:
        """Deliver once. Raises NotificationError; retries are the dispatcher's job."""
        ...
