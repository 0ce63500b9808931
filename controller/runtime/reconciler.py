"""One tick of one policy: observe -> measure -> decide -> apply -> tell.

The only module that sequences the edges around the pure decision. Failure handling, in short:
an unreachable API server or Prometheus ends the tick without writing (never a weight up); a
rollback is written even while the service is stopping; a raise is abandoned if a stop arrives
before it is written; alerts go to the dispatcher and never wait.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import structlog

from controller.core.alerts import build_alert
from controller.core.decision import Action, Decision, Observation, decide, initial_state
from controller.core.enums import AlertKind, Command, Phase, Severity, Verdict
from controller.core.policy import CanaryPolicy
from controller.core.results import CheckResult
from controller.core.schedule import Weights
from controller.errors import AccessDenied, ClusterError, ServiceNotFound, WeightChangedExternally
from controller.notify.dispatcher import AlertDispatcher
from controller.ports import Clock, GatewayPair, MetricsSource, Notifier, PairSnapshot
from controller.runtime.collector import Collector
from controller.runtime.telemetry import Telemetry

__all__ = ["PolicyRunner", "TickOutcome"]

_EVENT_REASONS = {
    Action.START: "Started",
    Action.ADVANCE: "WeightRaised",
    Action.PROMOTE: "Promoted",
    Action.ROLLBACK: "RolledBack",
    Action.PAUSE: "Paused",
    Action.RESUME: "Resumed",
    Action.RETRY: "Retried",
    Action.RESTART_BAKE: "BakeRestarted",
}


@dataclass(frozen=True, slots=True)
class TickOutcome:
    """What a tick did; ``recheck_soon`` asks the scheduler for an early next check."""

    decision: Decision | None
    check: CheckResult | None
    recheck_soon: bool = False
    error: str | None = None


class PolicyRunner:
    """Everything one policy needs between ticks."""

    def __init__(
        self,
        policy: CanaryPolicy,
        *,
        pair: GatewayPair,
        metrics: MetricsSource,
        receivers: list[Notifier],
        dispatcher: AlertDispatcher,
        collector: Collector,
        clock: Clock,
        telemetry: Telemetry,
        stopping: threading.Event,
        config_error: str | None = None,
    ) -> None:
        self.policy = policy
        self._pair = pair
        self._metrics = metrics
        self._receivers = receivers
        self._dispatcher = dispatcher
        self._collector = collector
        self._clock = clock
        self._telemetry = telemetry
        self._stopping = stopping
        self._config_error = config_error
        self._lock = threading.Lock()
        self._reported_refusal: str | None = None
        self.log = structlog.get_logger("controller.rollout").bind(policy=policy.name)

    # -- the tick ----------------------------------------------------------------------------------

    def tick(self, command: Command | None = None) -> TickOutcome:
        """Run one tick; never raises for cluster, metrics or receiver trouble."""
        with self._lock:
            if self._config_error is not None:
                self._refuse(self._config_error)
                return TickOutcome(None, None, error=self._config_error)
            try:
                seen = self._pair.observe(self.policy)
            except ClusterError as exc:
                return self._cluster_trouble(exc, "observe")
            if seen.refusal is not None:
                self._refuse(seen.refusal)
                return TickOutcome(None, None, error=seen.refusal)
            self._reported_refusal = None
            return self._decide_and_apply(seen, command)

    def _decide_and_apply(self, seen: PairSnapshot, command: Command | None) -> TickOutcome:
        state = seen.state
        if state is None:
            if seen.state_error:
                self.log.warning("stored state unreadable; starting from the observed weights", error=seen.state_error)
            state = initial_state(self.policy, Observation(seen.target_weight, seen.source_weight), self._clock.now())
        check = None
        terminal = state.phase in (Phase.PROMOTED, Phase.ROLLED_BACK)
        if not terminal or state.fingerprint != self.policy.rollout_fingerprint():
            started = time.perf_counter()
            check = self._collector.check(self.policy, self._metrics)
            seconds = time.perf_counter() - started
            self._telemetry.record_check(self.policy.name, check, seconds)
            self._log_check(check, state.target_weight, seconds)
        now = self._clock.now()
        decision = decide(self.policy, state, Observation(seen.target_weight, seen.source_weight, check, command), now)
        rolling_back = decision.action is Action.ROLLBACK
        if self._stopping.is_set() and decision.weights is not None and not rolling_back:
            self.log.info("stopping: weight change abandoned before it was written", action=decision.action.value)
            return TickOutcome(None, check)
        try:
            self._pair.apply(self.policy, seen, decision.weights, decision.state, force=rolling_back)
        except WeightChangedExternally as exc:
            self.log.warning("weight changed by someone else during the write; re-reading next tick", error=str(exc))
            return TickOutcome(None, check, recheck_soon=True, error=str(exc))
        except ClusterError as exc:
            return self._cluster_trouble(exc, "apply", check=check, urgent=rolling_back)
        self._telemetry.record_state(decision.state)
        self._tell(state_before=Weights(state.target_weight, state.source_weight), decision=decision, check=check)
        failing = check is not None and check.verdict is Verdict.FAIL and not rolling_back
        return TickOutcome(decision, check, recheck_soon=failing)

    # -- what the tick tells people ----------------------------------------------------------------

    def _log_check(self, check: CheckResult, weight: int, seconds: float) -> None:
        # Most telling first (terminals read left to right); the per-gate evidence last.
        fields: dict[str, Any] = {"verdict": check.verdict.value, "target_weight": weight, "reason": check.reason}
        if check.cause is not None:
            fields["cause"] = check.cause.value
        share = check.observed_target_share
        if share is not None:
            fields["observed_target_share"] = round(share, 4)
        if check.target is not None:
            fields["target"] = check.target.summary()
        if check.source is not None:
            fields["source"] = check.source.summary()
        fields["seconds"] = round(seconds, 4)
        fields["gates"] = [gate.as_dict() for gate in check.gates]
        self.log.info("check", **fields)

    def _tell(self, *, state_before: Weights, decision: Decision, check: CheckResult | None) -> None:
        state = decision.state
        after = decision.weights or Weights(state.target_weight, state.source_weight)
        if decision.transition:
            self.log.info(
                "transition",
                action=decision.action.value,
                phase=state.phase.value,
                reason=state.reason,
                weights_before=str(state_before),
                weights_after=str(after),
            )
            reason = _EVENT_REASONS.get(decision.action, decision.action.value)
            warning = decision.action is Action.ROLLBACK or decision.alert is AlertKind.WEIGHT_CHANGED_EXTERNALLY
            self._event(reason, f"{state.reason} (weights {state_before} -> {after})", warning=warning)
        elif decision.action is not Action.NONE:
            self.log.info("no transition", action=decision.action.value, phase=state.phase.value, reason=state.reason)
        if decision.action is Action.ROLLBACK:
            self._telemetry.rollbacks.labels(self.policy.name).inc()
        if decision.alert is not None:
            if not decision.transition:
                self._event(decision.alert.value, state.reason, warning=decision.severity is not Severity.INFO)
            self._alert(
                decision.alert,
                decision.severity,
                state.reason,
                before=state_before,
                after=after,
                check=check,
                suffix=state.changed_at.isoformat(),
            )

    def _event(self, reason: str, message: str, *, warning: bool) -> None:
        try:
            self._pair.record_event(self.policy, reason, message, warning=warning)
        except ClusterError as exc:
            self.log.warning("could not record Kubernetes Event", reason=reason, error=str(exc))

    def _alert(
        self,
        kind: AlertKind,
        severity: Severity,
        reason: str,
        *,
        suffix: str,
        before: Weights | None = None,
        after: Weights | None = None,
        check: CheckResult | None = None,
    ) -> None:
        alert = build_alert(
            kind=kind,
            severity=severity,
            policy=self.policy.name,
            reason=reason,
            at=self._clock.now(),
            source_service=str(self.policy.spec.source.service),
            target_service=str(self.policy.spec.target.service),
            weights_before=before,
            weights_after=after,
            check=check,
            dedup_suffix=suffix,
        )
        self.log.warning(
            "alert",
            kind=kind.value,
            severity=severity.value,
            reason=reason,
            receivers=[r.name for r in self._receivers],
        )
        self._dispatcher.submit(alert, self._receivers)

    def alert_removed(self) -> None:
        """The policy file is gone: its weights stay where they are, and people are told."""
        self.log.warning("policy removed; weights left as they are")
        self._event(AlertKind.POLICY_REMOVED.value, "policy removed; weights left as they are", warning=True)
        self._alert(
            AlertKind.POLICY_REMOVED,
            Severity.WARNING,
            "the policy was removed from the policies directory",
            suffix=self._clock.now().isoformat(),
        )

    def _refuse(self, why: str) -> None:
        self._telemetry.errors.labels(self.policy.name, "refused").inc()
        if why == self._reported_refusal:
            return
        self._reported_refusal = why
        self.log.error("policy refused; no weights changed", reason=why)
        self._event(AlertKind.POLICY_REFUSED.value, f"refused: {why}", warning=True)
        self._alert(AlertKind.POLICY_REFUSED, Severity.WARNING, why, suffix=why)

    def _cluster_trouble(
        self, exc: ClusterError, step: str, *, check: CheckResult | None = None, urgent: bool = False
    ) -> TickOutcome:
        kind = type(exc).__name__
        self._telemetry.errors.labels(self.policy.name, kind).inc()
        if isinstance(exc, AccessDenied | ServiceNotFound):
            self._refuse(str(exc))
        else:
            self.log.error(
                "Kubernetes API trouble; nothing changed this tick",
                step=step,
                error=str(exc),
                rollback_pending=urgent,
            )
        return TickOutcome(None, check, recheck_soon=urgent, error=str(exc))
