"""Each tick's look at the cloud: did it apply the last write, what split does it make, may we start?

The runner asks here, before deciding, for what ``decide`` needs to know about the cloud (rule R8
in ``controller.core.decision``):

- ``settling``: the step's passes do not count yet (the write is not confirmed, or the observed
  share of requests is off the effective share);
- ``cloud_refusal``: the cloud said it did not apply the last write, or said nothing in time;
- ``refusal``: the runbook's preflight or route parity fails (before a raise);
- ``split``: requested vs effective share at the weights the Services show.

The rules are pure (``controller.core.cloud``); this module only gathers their inputs through the
``CloudInspector`` and ``RouteInspector`` ports, and turns an unreadable input into a refusal,
never into a pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from controller.core import cloud
from controller.core.enums import GatewayRole, Phase
from controller.core.policy import CanaryPolicy, ServiceRef
from controller.core.results import CheckResult
from controller.core.state import RolloutState
from controller.errors import ClusterError
from controller.ports import CloudInspector, PairSnapshot, RouteInspector

__all__ = ["CloudView", "CloudWatch"]


@dataclass(frozen=True, slots=True)
class CloudView:
    """What the cloud says this tick (see the module docstring)."""

    settling: str | None = None
    cloud_refusal: str | None = None
    cloud_detail: str | None = None
    refusal: str | None = None
    split: cloud.Split | None = None
    confirmation: cloud.ConfirmationState | None = None
    deficit: str | None = None


class CloudWatch:
    """Gathers a ``CloudView`` per tick; one per policy runner."""

    def __init__(
        self, inspector: CloudInspector, routes: RouteInspector | None = None, *, verify_writes: bool = True
    ) -> None:
        self._inspector = inspector
        self._routes = routes
        #: False in a dry run: nothing is written, so nothing can be confirmed or followed by traffic
        self._verify_writes = verify_writes
        self._log = structlog.get_logger("controller.cloud")
        self._last_split: tuple[int, int | None, float | None] | None = None

    def view(
        self,
        policy: CanaryPolicy,
        state: RolloutState,
        seen: PairSnapshot,
        check: CheckResult | None,
        now: datetime,
    ) -> CloudView:
        """This tick's view; reads only what the phase needs (preflight and routes before raises)."""
        log = self._log.bind(policy=policy.name)
        split = self._split(policy, seen, log)
        confirmed = self._confirmation(policy, state, seen, now) if self._verify_writes else None
        flow = cloud.Traffic()
        if check is not None and self._verify_writes:
            flow = cloud.traffic(
                target_requests=_requests(check, GatewayRole.TARGET),
                source_requests=_requests(check, GatewayRole.SOURCE),
                expected=None if split is None else split.effective,
                tolerance=policy.spec.cloud.share_tolerance,
                max_deficit=policy.spec.cloud.max_deficit,
                confirmed=confirmed,
                settled_for=_settled_for(state, confirmed, now),
                grace=max(policy.spec.analysis.window, policy.spec.cloud.deficit_grace),
            )
            if state.pending is not None:  # half written: neither split is the one to judge yet
                flow = cloud.Traffic(settling="settling: a weight write is not finished") if flow.deficit else flow
        cloud_refusal = cloud_detail = None
        if confirmed is not None and confirmed.status in (cloud.Confirmation.FAILED, cloud.Confirmation.UNCONFIRMED):
            cloud_refusal = f"the cloud did not confirm the last weight write: {confirmed.reason}"
            cloud_detail = confirmed.detail or None
        refusals = []
        may_raise = state.phase in (Phase.PENDING, Phase.PROGRESSING) and state.pending is None
        if may_raise and state.target_weight == 0:
            refusals.append(self._preflight(policy, log))
        if may_raise and policy.spec.routes.check and self._routes is not None:
            refusals.append(self._route_parity(policy))
        refusal = "; ".join(r for r in refusals if r) or None
        return CloudView(flow.settling, cloud_refusal, cloud_detail, refusal, split, confirmed, flow.deficit)

    # -- the split ---------------------------------------------------------------------------------

    def _split(
        self, policy: CanaryPolicy, seen: PairSnapshot, log: structlog.typing.FilteringBoundLogger
    ) -> cloud.Split | None:
        if seen.target_weight is None:
            return None
        target = self._backends(policy.spec.target.service)
        source = self._backends(policy.spec.source.service)
        split = cloud.split(seen.target_weight, seen.source_weight, target, source)
        key = (split.target_weight, split.source_weight, split.effective)
        if key != self._last_split:  # said when it changes, not on every tick
            self._last_split = key
            tolerance = policy.spec.cloud.share_tolerance
            if split.off_by() > tolerance:
                log.warning(
                    "the CLB's split differs from the requested one",
                    split=split.describe(),
                    tolerance=tolerance,
                    hint="the cloud controller spreads a weight as max(1, w // backends) per backend",
                )
            else:
                log.info("split", split=split.describe())
        return split

    def _backends(self, ref: ServiceRef) -> cloud.Backends | None:
        try:
            return self._inspector.backends(ref)
        except ClusterError as exc:
            self._log.warning("backends unreadable; effective share unknown", service=str(ref), error=str(exc))
            return None

    # -- the cloud's confirmation of the last write --------------------------------------------------

    def _confirmation(
        self, policy: CanaryPolicy, state: RolloutState, seen: PairSnapshot, now: datetime
    ) -> cloud.ConfirmationState | None:
        """None when nothing was written that needs confirming (no write yet, or one still pending).

        Once confirmed, a write stays confirmed (``state.confirmed_at``): the Events expire after
        an hour, and a later failure of an unrelated reconcile does not take an applied weight back.
        """
        if state.written_at is None or state.pending is not None or not state.written_roles:
            return None
        if state.confirmed_at is not None:
            return cloud.ConfirmationState(cloud.Confirmation.CONFIRMED, "confirmed earlier")
        timeout = policy.spec.cloud.confirm_timeout
        states: list[cloud.ConfirmationState] = []
        for role in state.written_roles:
            ref = policy.gateway(role).service
            if role is GatewayRole.TARGET and seen.target_kind != "Service":
                asm = _asm_confirmation(policy, seen, state.written_at, now)
                if asm is not None:
                    states.append(asm)
                    continue
            try:
                events = self._inspector.events(ref)
            except ClusterError as exc:  # not an answer: wait, and after the deadline say so
                late = now - state.written_at > timeout
                status = cloud.Confirmation.UNCONFIRMED if late else cloud.Confirmation.WAITING
                why = f"{ref}: the cloud controller's Events cannot be read"
                states.append(cloud.ConfirmationState(status, why, str(exc)))
                continue
            states.append(cloud.confirmation(events, state.written_at, now, timeout, service=str(ref)))
        return cloud.combined(states)

    # -- before a raise ------------------------------------------------------------------------------

    def _preflight(self, policy: CanaryPolicy, log: structlog.typing.FilteringBoundLogger) -> str | None:
        try:
            items = preflight_items(self._inspector, policy)
        except ClusterError as exc:
            return f"preflight: cannot read the gateway Services: {exc}"
        refusal = cloud.blocking(items)
        for item in items:
            if not item.ok and item.warn_only:
                log.warning("preflight warning", item=item.line())
        return refusal

    def _route_parity(self, policy: CanaryPolicy) -> str | None:
        assert self._routes is not None
        try:
            return self._routes.route_refusal(policy)
        except ClusterError as exc:
            return f"route parity: cannot read the Istio Gateways: {exc}"


def _requests(check: CheckResult, role: GatewayRole) -> float | None:
    """A gateway's requests in the window: no series is none (0), an error unknown (None)."""
    samples = check.target if role is GatewayRole.TARGET else check.source
    return None if samples is None else samples.served


def _settled_for(state: RolloutState, confirmed: cloud.ConfirmationState | None, now: datetime) -> timedelta | None:
    """How long the weights have been confirmed (0: just now); None when nothing was ever written."""
    if state.confirmed_at is not None:
        return now - state.confirmed_at
    return timedelta(0) if confirmed is not None else None


def preflight_items(inspector: CloudInspector, policy: CanaryPolicy) -> tuple[cloud.PreflightItem, ...]:
    """The runbook's checklist for one policy (``gateway-canary preflight`` and before the first raise)."""
    target = inspector.facts(policy.spec.target.service)
    source = inspector.facts(policy.spec.source.service)
    return cloud.preflight(
        target,
        source,
        require_wrr=policy.spec.cloud.require_wrr,
        target_workload=policy.spec.target.workload or policy.spec.target.service.name,
    )


def _asm_confirmation(
    policy: CanaryPolicy, seen: PairSnapshot, written_at: datetime, now: datetime
) -> cloud.ConfirmationState | None:
    """ASM's part for an IstioGateway target: its error, or the Service not showing the weight yet.

    None once ASM copied the weight onto the Service: the cloud controller's Events decide then.
    """
    gateway = policy.spec.target.istio_gateway
    where = f"IstioGateway {gateway}"
    if seen.target_service_weight == seen.target_weight:
        return None  # copied: whatever ASM reports besides, the cloud controller's answer decides
    if seen.asm_error:
        return cloud.ConfirmationState(cloud.Confirmation.FAILED, f"{where}: ASM reports an error", seen.asm_error)
    shows = f"Service {policy.spec.target.service} shows {seen.target_service_weight}, not {seen.target_weight}"
    if now - written_at > policy.spec.cloud.confirm_timeout:
        return cloud.ConfirmationState(
            cloud.Confirmation.UNCONFIRMED, f"{where}: ASM has not applied the weight: {shows}"
        )
    return cloud.ConfirmationState(cloud.Confirmation.WAITING, f"{where}: waiting for ASM: {shows}")
