"""Dry run: read the real Services and state, write nothing, and log every write that would happen.

The intended writes are kept in memory and laid over what is read, so a dry-run rollout
progresses exactly as a real one would (against real metrics) without touching the cluster.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import structlog

from controller.core.alerts import OutboxEntry
from controller.core.policy import CanaryPolicy
from controller.core.schedule import Weights
from controller.core.state import RolloutState
from controller.ports import GatewayPair, PairSnapshot, StateStore, StoredState

__all__ = ["DryRunGatewayPair", "DryRunStateStore"]

_log = structlog.get_logger("controller.dry_run")


class DryRunGatewayPair:
    """Wraps a real GatewayPair; reads pass through, writes are logged and remembered."""

    def __init__(self, inner: GatewayPair) -> None:
        self._inner = inner
        self._written: dict[str, tuple[int | None, int | None]] = {}

    def observe(self, policy: CanaryPolicy) -> PairSnapshot:
        """The real Services with the intended (unwritten) weights laid over them."""
        real = self._inner.observe(policy)
        overlay = self._written.get(policy.name)
        if overlay is None:
            return real
        return replace(real, target_weight=overlay[0], source_weight=overlay[1])

    def write_weights(
        self,
        policy: CanaryPolicy,
        seen: PairSnapshot,
        weights: Weights,
        *,
        force: bool = False,
        drop_legacy_state: bool = False,
    ) -> None:
        """Log what would be patched."""
        _log.info(
            "dry-run: would patch weights",
            policy=policy.name,
            target=weights.target,
            source=weights.source,
            target_service=str(policy.spec.target.service),
            source_service=str(policy.spec.source.service),
        )
        source = weights.source if weights.source is not None else seen.source_weight
        self._written[policy.name] = (weights.target, source)

    def drop_legacy_state(self, policy: CanaryPolicy, seen: PairSnapshot) -> None:
        """Log the removal that would happen."""
        _log.info("dry-run: would remove the version-1 state annotation", policy=policy.name)

    def record_event(self, policy: CanaryPolicy, reason: str, message: str, *, warning: bool) -> None:
        """Log the Event that would be emitted."""
        _log.info(
            "dry-run: would emit event",
            policy=policy.name,
            reason=reason,
            message=message,
            type="Warning" if warning else "Normal",
        )


class DryRunStateStore:
    """Reads the real state object (``get`` only), keeps its own writes in memory."""

    def __init__(self, inner: StateStore) -> None:
        self._inner = inner
        self._written: dict[str, StoredState] = {}

    def load(self, policy: CanaryPolicy) -> StoredState:
        """What this dry run wrote, else what is really stored."""
        return self._written.get(policy.name) or self._inner.load(policy)

    def save(
        self,
        policy: CanaryPolicy,
        state: RolloutState,
        previous: StoredState,
        outbox: tuple[OutboxEntry, ...] = (),
        status: str | None = None,
    ) -> StoredState:
        """Remember, write nothing."""
        saved = StoredState(state=state, version=f"dry-run-{id(state)}", outbox=outbox)
        self._written[policy.name] = saved
        return saved

    def commands(self, policies: Iterable[CanaryPolicy]) -> dict[str, str]:
        """A dry run takes no commands (its answers could not be written where the CLI looks)."""
        return {}
