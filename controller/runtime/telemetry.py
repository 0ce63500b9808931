"""The controller's own metrics, exposed at ``/metrics``.

Gate values are exported next to their thresholds (Flagger users ask for exactly that), the
phase as a one-hot gauge, and every rollback counted with its reason.
"""

from __future__ import annotations

import contextlib
import math
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from controller.core.cloud import ConfirmationState, Split
from controller.core.enums import Phase
from controller.core.results import CheckResult
from controller.core.sequential import confidence_sequence, estimate
from controller.core.state import RolloutState

__all__ = ["Telemetry"]


#: from a millisecond to ten seconds, fine enough for a p99 read off the buckets
_FINE_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)


class Telemetry:
    """All metrics in one registry of their own (tests and the demo can have several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.target_weight = Gauge(
            "gateway_canary_target_weight", "ASM (target) gateway CLB weight", ["policy"], registry=r
        )
        self.source_weight = Gauge(
            "gateway_canary_source_weight", "Source gateway CLB weight (-1 unmanaged)", ["policy"], registry=r
        )
        self.phase = Gauge("gateway_canary_phase", "1 for the policy's current phase", ["policy", "phase"], registry=r)
        self.checks = Counter("gateway_canary_checks", "Checks by verdict", ["policy", "verdict"], registry=r)
        self.rollbacks = Counter("gateway_canary_rollbacks", "Rollbacks", ["policy"], registry=r)
        self.gate_value = Gauge("gateway_canary_gate_value", "Last observed gate value", ["policy", "gate"], registry=r)
        self.gate_threshold = Gauge(
            "gateway_canary_gate_threshold", "Threshold of the gate", ["policy", "gate"], registry=r
        )
        self.gate_baseline = Gauge(
            "gateway_canary_gate_baseline",
            "Source (baseline) value of the gate",
            ["policy", "gate"],
            registry=r,
        )
        self.sequential_requests = Gauge(
            "gateway_canary_sequential_requests",
            "Requests a sequential gate counted on each gateway since the step began",
            ["policy", "gate", "gateway"],
            registry=r,
        )
        self.sequential_bad = Gauge(
            "gateway_canary_sequential_bad_requests",
            "Bad requests (5xx, or slower than the bound) a sequential gate counted on each gateway this step",
            ["policy", "gate", "gateway"],
            registry=r,
        )
        self.sequential_effect = Gauge(
            "gateway_canary_sequential_effect",
            "The target's rate over the source's this step: estimate, and the anytime-valid confidence "
            "sequence's lower and upper bounds",
            ["policy", "gate", "bound"],
            registry=r,
        )
        self.sequential_rejected = Gauge(
            "gateway_canary_sequential_rejected",
            "1 once a sequential gate rejected in this step (its e-value, gateway_canary_gate_value, reached "
            "1/alpha, gateway_canary_gate_threshold)",
            ["policy", "gate"],
            registry=r,
        )
        self.observed_share = Gauge(
            "gateway_canary_observed_target_share",
            "Share of requests the target served in the window",
            ["policy"],
            registry=r,
        )
        self.requested_share = Gauge(
            "gateway_canary_requested_target_share",
            "Share of the CLB the weights request for the target: w_t / (w_t + w_s)",
            ["policy"],
            registry=r,
        )
        self.effective_share = Gauge(
            "gateway_canary_effective_target_share",
            "Share the CLB sends the target once the cloud controller spreads each weight over its backends",
            ["policy"],
            registry=r,
        )
        self.cloud_confirmed = Gauge(
            "gateway_canary_cloud_confirmed",
            "1 when the cloud confirmed the last weight write, 0 while waiting or after it failed",
            ["policy"],
            registry=r,
        )
        self.query_seconds = Histogram(
            "gateway_canary_prometheus_query_seconds",
            "Prometheus query latency",
            ["policy"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.check_seconds = Histogram(
            "gateway_canary_check_seconds", "Whole check (all queries) latency", ["policy"], registry=r
        )
        self.notifications = Counter(
            "gateway_canary_notifications",
            "Alert delivery attempts by receiver, alert kind and outcome (delivered, delivered_late, failed, "
            "unknown: timed out, expired: deadline passed, deduplicated)",
            ["receiver", "kind", "outcome"],
            registry=r,
        )
        self.oldest_undelivered = Gauge(
            "gateway_canary_oldest_undelivered_alert_seconds",
            "Age of the oldest alert not yet delivered to some receiver (0: none): alerting itself is broken",
            registry=r,
        )
        self.errors = Counter("gateway_canary_errors", "Ticks that failed, by kind", ["policy", "kind"], registry=r)
        self.policies = Gauge("gateway_canary_policies", "Policies loaded and running", registry=r)
        self.refused = Gauge(
            "gateway_canary_policy_refused", "1 while the policy refuses to raise weights (see its reason)", ["policy"],
            registry=r,
        )  # fmt: skip
        self.policy_file_errors = Gauge("gateway_canary_policy_file_errors", "Errors in policy files", registry=r)
        self.waiting = Gauge(
            "gateway_canary_waiting_info",
            "1 for what the policy waits for now (kind: paused, approval, window, refused, cloud, bake, ...) "
            "with the reason in words",
            ["policy", "phase", "kind", "reason"],
            registry=r,
        )
        self._waiting_labels: dict[str, tuple[str, str, str]] = {}
        self.is_leader = Gauge(
            "gateway_canary_is_leader",
            "1 while this replica holds the leader Lease (only it ticks and writes); 0 on a standby. Without "
            "leader election always 1",
            registry=r,
        )
        self.leader_transitions = Counter(
            "gateway_canary_leader_transitions", "Terms this replica started or ended, by what happened", ["event"],
            registry=r,
        )  # fmt: skip
        # Unlabelled: what the scheduler costs is the process's, and 500 policies' buckets would
        # make /metrics itself a load (docs/benchmarks.md reads these two).
        self.check_lateness = Histogram(
            "gateway_canary_check_lateness_seconds",
            "Seconds from when a policy's tick was due to when it started (the scheduler keeping up)",
            registry=r,
            buckets=_FINE_SECONDS,
        )
        self.ticks_skipped = Counter(
            "gateway_canary_ticks_skipped",
            "Ticks not run because the policy's previous tick was still running: the process cannot keep up",
            registry=r,
        )
        self.tick_seconds = Histogram(
            "gateway_canary_tick_seconds",
            "Seconds a policy's tick took, reads, check, decision and writes included",
            registry=r,
            buckets=_FINE_SECONDS,
        )
        self.cluster_reachable = Gauge(
            "gateway_canary_cluster_reachable",
            "0 while the Kubernetes API server cannot be reached (nothing moves: no weight, no state, no Lease "
            "can be written), else 1",
            registry=r,
        )
        self.cluster_reachable.set(1)
        self._reachable = True
        self.unreachable_at: float | None = None

    def reachable(self, reachable: bool) -> bool:
        """Record whether the API server answered; True when that changed (worth one log line)."""
        changed, self._reachable = self._reachable != reachable, reachable
        self.cluster_reachable.set(1 if reachable else 0)
        if not reachable:
            #: monotonic time the API server was last found unreachable, by any part of the process (a
            #: term's runners start after an outage ended the last term: its 403 grace still applies)
            self.unreachable_at = time.monotonic()
        return changed

    def notified(self, receiver: str, kind: str, outcome: str) -> None:
        """One delivery outcome (the dispatcher's callback)."""
        self.notifications.labels(receiver, kind, outcome).inc()

    def record_state(self, state: RolloutState) -> None:
        """Weights and phase of a policy."""
        self.target_weight.labels(state.policy).set(state.target_weight)
        self.source_weight.labels(state.policy).set(-1 if state.source_weight is None else state.source_weight)
        for phase in Phase:
            self.phase.labels(state.policy, phase.value).set(1 if phase is state.phase else 0)
        self.refused.labels(state.policy).set(0 if state.refusal is None else 1)

    def record_waiting(self, policy: str, phase: str, kind: str, reason: str) -> None:
        """The info metric of what ``policy`` waits for; the previous series goes (one per policy)."""
        labels = (phase, kind, reason[:200])
        previous = self._waiting_labels.get(policy)
        if previous == labels:
            return
        if previous is not None:
            with contextlib.suppress(KeyError):
                self.waiting.remove(policy, *previous)
        self.waiting.labels(policy, *labels).set(1)
        self._waiting_labels[policy] = labels

    def record_check(self, policy: str, check: CheckResult, seconds: float) -> None:
        """Verdict, gate values next to thresholds, query latencies."""
        self.checks.labels(policy, check.verdict.value).inc()
        self.check_seconds.labels(policy).observe(seconds)
        for gate in check.gates:
            if gate.value is not None:
                self.gate_value.labels(policy, gate.gate).set(gate.value)
            if gate.threshold is not None:
                self.gate_threshold.labels(policy, gate.gate).set(gate.threshold)
            if gate.baseline is not None:
                self.gate_baseline.labels(policy, gate.gate).set(gate.baseline)
        self._record_sequential(policy, check)
        share = check.observed_target_share
        if share is not None:
            self.observed_share.labels(policy).set(share)
        for samples in (check.source, check.target):
            if samples is not None:
                for outcome in samples.outcomes():
                    self.query_seconds.labels(policy).observe(outcome.seconds)

    def _record_sequential(self, policy: str, check: CheckResult) -> None:
        """Both gateways' counts, the estimate and confidence sequence, and the decision of each sequential gate."""
        thresholds = {gate.gate: gate.threshold for gate in check.gates}
        for evidence in check.evidence:
            threshold = thresholds.get(evidence.gate)
            if threshold is None or threshold <= 1:
                continue
            totals = evidence.totals
            for gateway, requests, bad in (
                ("target", totals.target_requests, totals.target_events),
                ("source", totals.source_requests, totals.source_events),
            ):
                self.sequential_requests.labels(policy, evidence.gate, gateway).set(requests)
                self.sequential_bad.labels(policy, evidence.gate, gateway).set(bad)
            low, high = confidence_sequence(evidence, 1 / threshold)
            ratio = estimate(totals)
            for bound, value in (("estimate", math.nan if ratio is None else ratio), ("lower", low), ("upper", high)):
                self.sequential_effect.labels(policy, evidence.gate, bound).set(value)
            self.sequential_rejected.labels(policy, evidence.gate).set(1 if evidence.rejected else 0)

    def record_cloud(self, policy: str, split: Split | None, confirmation: ConfirmationState | None) -> None:
        """Requested vs effective share, and whether the cloud confirmed the last write."""
        if split is not None and split.requested is not None:
            self.requested_share.labels(policy).set(split.requested)
        if split is not None and split.effective is not None:
            self.effective_share.labels(policy).set(split.effective)
        if confirmation is not None:
            self.cloud_confirmed.labels(policy).set(1 if confirmation.applied else 0)

    def stand_by(self) -> None:
        """This replica stopped leading: it exports no policy's series (the leader does), so sums over
        replicas count each policy once and a standby's stale phase cannot hide the leader's."""
        for metric in (
            self.target_weight,
            self.source_weight,
            self.phase,
            self.gate_value,
            self.gate_threshold,
            self.gate_baseline,
            self.sequential_requests,
            self.sequential_bad,
            self.sequential_effect,
            self.sequential_rejected,
            self.observed_share,
            self.requested_share,
            self.effective_share,
            self.cloud_confirmed,
            self.refused,
            self.waiting,
        ):
            metric.clear()
        self._waiting_labels.clear()
        self.policies.set(0)

    def forget(self, policy: str) -> None:
        """Drop a removed policy's series."""
        for metric in (
            self.target_weight,
            self.source_weight,
            self.observed_share,
            self.refused,
            self.requested_share,
            self.effective_share,
            self.cloud_confirmed,
        ):
            with contextlib.suppress(KeyError):
                metric.remove(policy)
        previous = self._waiting_labels.pop(policy, None)
        if previous is not None:
            with contextlib.suppress(KeyError):
                self.waiting.remove(policy, *previous)
