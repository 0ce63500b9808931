"""Dry run: read the real Services, write nothing, and log every write that would have happened.

The intended writes are kept in memory and laid over what is read, so a dry-run rollout
progresses exactly as a real one would (against real metrics) without touching the cluster.
"""

from __future__ import annotations

from dataclasses import replace

import structlog

from controller.core.policy import CanaryPolicy
from controller.core.schedule import Weights
from controller.core.state import RolloutState
from controller.ports import GatewayPair, PairSnapshot

__all__ = ["DryRunGatewayPair"]

_log = structlog.get_logger("controller.dry_run")


class DryRunGatewayPair:
    """Wraps a real GatewayPair; reads pass through, writes are logged and remembered."""

    def __init__(self, inner: GatewayPair) -> None:
        self._inner = inner
        self._written: dict[str, tuple[int | None, int | None, RolloutState]] = {}

    def observe(self, policy: CanaryPolicy) -> PairSnapshot:
        """The real Services with the intended (unwritten) weights and state laid over them."""
        real = self._inner.observe(policy)
        overlay = self._written.get(policy.name)
        if overlay is None:
            return real
        target, source, state = overlay
        return replace(real, target_weight=target, source_weight=source, state=state)

    def apply(
        self,
        policy: CanaryPolicy,
        seen: PairSnapshot,
        weights: Weights | None,
        state: RolloutState,
        *,
        force: bool = False,
    ) -> None:
        """Log what would be patched."""
        target, source = seen.target_weight, seen.source_weight
        if weights is not None:
            _log.info(
                "dry-run: would patch weights",
                policy=policy.name,
                target=weights.target,
                source=weights.source,
                target_service=str(policy.spec.target.service),
                source_service=str(policy.spec.source.service),
            )
            target = weights.target
            source = weights.source if weights.source is not None else source
        self._written[policy.name] = (target, source, state)

    def record_event(self, policy: CanaryPolicy, reason: str, message: str, *, warning: bool) -> None:
        """Log the Event that would be emitted."""
        _log.info(
            "dry-run: would emit event",
            policy=policy.name,
            reason=reason,
            message=message,
            type="Warning" if warning else "Normal",
        )
