"""One tick of one policy: observe -> load state -> measure -> decide -> write -> tell.

The only module that sequences the edges around the pure decision.

Write-ahead protocol for a weight change (the crash points are numbered)::

    decide  -> state' with pending = Intent(to: target/source, from: what the Services showed)
    1. save state' (the intent) in the state object            crash here: nothing visible
    2. patch the target's weight                                crash here: target only
    3. patch the source's weight                                crash here: both, intent still open
    4. save state' with the intent cleared                      done

On every tick (and so after a restart) ``decide`` compares the Services with an open intent: both
show it -> complete (the intent is cleared); each side shows either its "from" or its "to" value ->
our own unfinished change, completed (a raise only with the permission a raise needs, R3/R4) or
superseded by a rollback when the check says so (R1); anything else -> someone else's edit.

Failures: a raise is written only after its intent is durable (step 1 failing abandons it);
a rollback is written whatever the state store says, and a failing patch leaves the rollback
pending, retried on every tick (R2). An unreachable API server or Prometheus ends the tick without
raising anything. A raise is abandoned if a stop arrives before it is written; a rollback is
written even while stopping. Alerts go to the dispatcher and never wait. Nothing escapes a tick:
an unexpected exception is logged with its traceback, counted, reported once, and the next tick
runs (``failing_since`` feeds ``/healthz``).

Leader election: the tick runs only while this process's term holds (``Fence.check``), and every
write asks the fence again (the adapters do, right before each request). ``NotLeader`` from any of
them, or a later term's token found in the state object, abandons the tick, writing nothing more:
the new leader decides from the state object. The first save of a term writes its token even when
nothing else changed, so a deposed term's next save is refused by the store.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import structlog

from controller.core.alerts import MAX_OUTBOX, Alert, OutboxEntry, build_alert
from controller.core.cloud import ConfirmationState, Split
from controller.core.commands import CommandRequest, answered
from controller.core.decision import (
    TERMINAL_PHASES,
    Action,
    CommandOutcome,
    Decision,
    Notice,
    Observation,
    decide,
    initial_state,
)
from controller.core.decision import recovered_state as recovered
from controller.core.enums import AlertKind, Command, GatewayRole, Phase, Severity, Verdict
from controller.core.gates import sequential_prior
from controller.core.lease import FenceToken
from controller.core.policy import CanaryPolicy
from controller.core.results import CheckResult
from controller.core.schedule import FULL, Weights
from controller.core.state import CommandRecord, Intent, RolloutState, StateUnreadable, decode_state, encode_state
from controller.core.status import status_view
from controller.core.text import bounded
from controller.errors import (
    AccessDenied,
    ClusterError,
    ClusterUnavailable,
    CommandWithdrawn,
    NotLeader,
    ServiceNotFound,
    WeightChangedExternally,
)
from controller.notify.dispatcher import AlertDispatcher
from controller.ports import (
    Clock,
    Fence,
    GatewayPair,
    MetricsSource,
    Notifier,
    PairSnapshot,
    SoleWriter,
    StateStore,
    StoredState,
)
from controller.runtime.cloud_watch import CloudView, CloudWatch
from controller.runtime.collector import Collector
from controller.runtime.telemetry import Telemetry

#: a passing check like the last one is logged at info this often (else at debug)
_CHECK_LOG_SECONDS = 60.0

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
    Action.ADOPT: "WeightChangedExternally",
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
        store: StateStore,
        metrics: MetricsSource,
        receivers: list[Notifier],
        dispatcher: AlertDispatcher,
        collector: Collector,
        clock: Clock,
        telemetry: Telemetry,
        stopping: threading.Event,
        config_error: str | None = None,
        forbidden_grace_seconds: float = 30.0,
        cloud: CloudWatch | None = None,
        status_refresh_seconds: float = 60.0,
        runbook_url: str = "",
        fence: Fence | None = None,
    ) -> None:
        self.policy = policy
        #: leader election: a tick runs only while this process leads, and is abandoned, writing
        #: nothing more, the moment it does not (its adapters ask the same fence before each write)
        self._fence = fence or SoleWriter()
        self._retired = False
        self._foreign: FenceToken | None = None  # a token of another Lease found in the state object, said once
        self._pair = pair
        self._store = store
        self._metrics = metrics
        self._receivers = receivers
        self._dispatcher = dispatcher
        self._collector = collector
        self._clock = clock
        self._telemetry = telemetry
        self._stopping = stopping
        #: why this policy may not raise weights, from its configuration (e.g. a missing secret)
        self.config_error = config_error
        #: the file it was read from, and why that file is currently invalid (the last good version
        #: keeps running; the service reports it once, as PolicyInvalid)
        self.file: str | None = None
        self.file_problem: str | None = None
        #: monotonic time since when ticks keep crashing (None: the last tick finished)
        self.failing_since: float | None = None
        self._forbidden_grace = forbidden_grace_seconds
        self._cloud = cloud
        self._last_view = CloudView()  # the last cloud view read (its refusals stand on skipped ticks)
        #: the last split and confirmation seen (for status)
        self.split: Split | None = None
        self.confirmation: ConfirmationState | None = None
        self._unreachable_at: float | None = None  # monotonic time the API server was last unreachable
        self._lock = threading.Lock()
        self._memory: RolloutState | None = None  # the last state this runner decided, for store outages
        self._version: str | None = None  # the state object's version this process last read or wrote
        self._known: str | None = None  # the encoded state this process last read or wrote
        self._reported: str | None = None  # the last trouble reported outside the state (observe, crash)
        self._provisional: RolloutState | None = None  # decided while no state could be read
        self._provisional_passed = False  # ...and whether a check passed meanwhile
        self._restored = False  # the stored outbox was handed to the dispatcher
        #: (receiver, alert id) of the undelivered alerts in the state object as last read or saved: whoever
        #: leads next delivers those, so a replica whose term ended stops delivering them
        self.persisted: set[tuple[str, str]] = set()
        #: the id of the last operator command this runner answered (the service's quick tick skips it)
        self.last_command_id: str | None = None
        self._status_refresh = status_refresh_seconds
        self._runbook_url = runbook_url
        self._status_written: float | None = None  # monotonic time the status was last saved
        self._last_check: tuple[CheckResult, datetime] | None = None
        self._waiting: tuple[str, str] | None = None  # what the rollout waits for, as last logged
        self.log = structlog.get_logger("controller.rollout").bind(policy=policy.name)
        #: monotonic time this runner last read its state object (a command there was seen then)
        self.read_at: float | None = None
        self._last_verdict: Verdict | None = None
        self._check_logged_at = -math.inf

    # -- the tick ----------------------------------------------------------------------------------

    @property
    def metrics(self) -> MetricsSource:
        """Where this policy's checks are measured."""
        return self._metrics

    def tick(self, command: Command | None = None) -> TickOutcome:
        """Run one tick (``command``: an operator's, given directly rather than through the store). Never raises."""
        with self._lock:
            if self._retired:
                return TickOutcome(None, None, error="retired: its term ended")
            try:
                outcome = self._tick(command)
            except NotLeader as exc:  # deposed, or the term ran out mid-tick: the new leader decides
                return self._stand_down(exc)
            except Exception as exc:  # the promise: a bug costs one tick, never the controller
                return self._crashed(exc)
            self.failing_since = None
            if outcome.error is None:
                self._reported = None  # trouble that comes back later is reported again
            return outcome

    def _tick(self, command: Command | None) -> TickOutcome:
        self._fence.check()  # not leading (any more): not even a read
        try:
            seen = self._pair.observe(self.policy)
        except ClusterError as exc:
            return self._cluster_trouble(exc, "observe")
        if self._telemetry.reachable(True):
            self.log.info("the Kubernetes API server answers again")
        stored, store_problem = self._load()
        if stored is not None and not self._restored:
            self._restored = True
            self._restore(stored.outbox)
        state, state_problem = self._state_for(stored, seen, store_problem)
        request = self._request(stored, state, command)
        check = self._check(state)
        view = self._look_at_cloud(state, seen, check)
        refusals = [self.config_error, seen.refusal, store_problem, state_problem, view.refusal]
        refusal = "; ".join(r for r in refusals if r) or None
        quiet = self.file_problem  # already reported by the service
        if refusal is not None and self._warming_up():
            # A refusal right after the API server was unreachable may be its authorizer warming
            # up: it blocks raising at once, and is reported only if it outlasts the grace period.
            quiet, refusal = "; ".join(r for r in (quiet, refusal) if r), None
        observed = Observation(
            seen.target_weight,
            seen.source_weight,
            check,
            None if request is None else request.command,
            refusal,
            quiet,
            settling=view.settling,
            cloud_refusal=view.cloud_refusal,
            cloud_detail=view.cloud_detail,
            deficit=view.deficit,
            command_by="operator" if request is None else request.by,
        )
        decision = self._stamp(state, decide(self.policy, state, observed, self._clock.now()), view)
        decision = self._acknowledge(decision, request)
        self._describe(decision.state, check)
        provisional = stored is None and self._memory is None
        outcome = self._apply(decision, seen, stored or StoredState(state=None), check)
        # Decided without any state (the store unreadable since this process started): never
        # remembered as the truth, but its evidence, a rollback it wrote, and what it reported are.
        self._provisional = decision.state if provisional else None
        passed = check is not None and check.verdict is Verdict.PASS
        self._provisional_passed = provisional and (passed or self._provisional_passed)
        if provisional:
            self._memory = None
        return outcome

    # -- state -------------------------------------------------------------------------------------

    def _load(self) -> tuple[StoredState | None, str | None]:
        try:
            stored = self._store.load(self.policy)
            self.read_at = time.monotonic()
        except ClusterError as exc:
            self._telemetry.errors.labels(self.policy.name, "state_store").inc()
            if isinstance(exc, ClusterUnavailable):
                self._unreachable_at = time.monotonic()
            return None, f"state store unavailable: {exc}"
        token = self._fence.token()
        if token is not None and stored.fence is not None and stored.fence.supersedes(token):
            why = f"term {stored.fence.term} of {stored.fence.holder} saved the state of {self.policy.name}"
            self._fence.deposed(why)
            raise NotLeader(f"a newer leader decides: {why}")
        foreign = stored.fence
        if (
            token is not None
            and foreign is not None
            and foreign.lease_uid != token.lease_uid
            and foreign != self._foreign
        ):
            self._foreign = foreign  # said once: a Lease created again, or a second controller on this policy
            self.log.warning(
                "the state object was last saved under another leader Lease; two controllers running this "
                "policy are two writers (a Lease deleted and created again explains it too)",
                holder=foreign.holder,
                term=foreign.term,
            )
        text = None if stored.state is None else encode_state(stored.state)
        if stored.version not in (self._version, "") and (text is None or text != self._known):
            # someone else wrote the state since: what is stored wins over what was remembered. An
            # object that moved with the state this process last read or wrote (an operator's command
            # annotated) keeps the memory: the open bake run, and what could not be saved (a rollback)
            self._memory = None
        self._version = stored.version
        self._known = text
        self.persisted = _deliveries(stored.outbox)
        return stored, None

    def _state_for(
        self, stored: StoredState | None, seen: PairSnapshot, store_problem: str | None
    ) -> tuple[RolloutState, str | None]:
        """The state to decide from, with what was counted while no state could be read."""
        state, problem = self._stored_or_new(stored, seen, store_problem)
        held = self._provisional
        if held is None:
            return state, problem
        if held.phase is Phase.ROLLED_BACK:  # a rollback written while the store was down stands
            return held.evolve(fingerprint=state.fingerprint), problem
        if self._provisional_passed:  # a pass since the store went away: its counts are the ones
            return state.evolve(
                consecutive_failures=held.consecutive_failures,
                inconclusive=held.inconclusive,
                stuck_reported=held.stuck_reported,
                refusal=state.refusal or held.refusal,
                evidence=held.evidence or state.evidence,
            ), problem
        # what was counted while the store was unreadable follows what the store had counted before
        merged = dict(state.inconclusive)
        for cause, count in held.inconclusive:
            merged[cause] = merged.get(cause, 0) + count
        carried = state.evolve(
            consecutive_failures=state.consecutive_failures + held.consecutive_failures,
            inconclusive=tuple(sorted(merged.items())),
            # what was said while the store was unreadable is not said again
            stuck_reported=tuple(sorted({*state.stuck_reported, *held.stuck_reported})),
            refusal=state.refusal or held.refusal,
            # the sequential evidence gathered meanwhile is the newest (R11): its readings go on
            evidence=held.evidence or state.evidence,
        )
        return carried, problem

    def _stored_or_new(
        self, stored: StoredState | None, seen: PairSnapshot, store_problem: str | None
    ) -> tuple[RolloutState, str | None]:
        """The state to decide from, and why it cannot be trusted for a raise (if so)."""
        observed = Observation(seen.target_weight, seen.source_weight)
        now = self._clock.now()
        if stored is not None and self._memory is not None and stored.version == self._version:
            # Nobody wrote the object since this process did (or read it): what this process decided
            # is the truth, with what is not stored (the last pass) and what failed to be saved.
            return self._memory, None
        if stored is not None and stored.state is not None:
            return stored.state, None
        if stored is not None and stored.error is not None:
            why = f"stored state unreadable: {stored.error}"
            return recovered(self.policy, observed, now, stored.error), why
        if self._memory is not None:
            return self._memory, None  # the store is unreachable or was emptied: what this process decided
        if seen.legacy_state is not None:
            try:
                legacy = decode_state(seen.legacy_state)
            except StateUnreadable as exc:
                return recovered(self.policy, observed, now, str(exc)), f"version-1 state unreadable: {exc}"
            if legacy.policy == self.policy.name:
                # Version 1 computed its fingerprint differently: the policy is taken as unchanged
                # by the upgrade (never as changed, which would restart a rolled-back rollout).
                self.log.info("adopting the version-1 state annotation into the state object")
                return legacy.evolve(fingerprint=self.policy.rollout_fingerprint()), None
        if stored is None:  # no store, no memory: never guess a Start (R5)
            return recovered(self.policy, observed, now, store_problem or "state store unavailable"), None
        return initial_state(self.policy, observed, now), None

    def _save(self, state: RolloutState, base: StoredState, outbox: tuple[OutboxEntry, ...]) -> StoredState | None:
        """Persist ``state`` and the outbox unless unchanged; None when the store refused (logged, counted)."""
        self._memory = state
        # the sequential gates' evidence is saved along with anything else, never on its own (R11)
        unchanged = (
            base.state is not None
            and base.error is None
            and encode_state(base.state, evidence=False) == encode_state(state, evidence=False)
        )
        written = self._status_written
        stale = written is None or time.monotonic() - written >= self._status_refresh
        # a new term saves once even with nothing new: its token in the object fences off the old term
        claimed = self._fence.token() in (None, base.fence)
        quiet = _outbox_key(base.outbox) == _outbox_key(outbox) and base.command_error is None
        if unchanged and quiet and claimed and not stale:
            return base
        view = self._view(state)
        status = None if view is None else json.dumps(view, sort_keys=True, separators=(",", ":"))
        try:
            saved = self._store.save(self.policy, state, base, outbox, status)
        except NotLeader:
            raise
        except CommandWithdrawn as exc:
            if state.rolled_back_last or (state.pending is not None and state.pending.rollback):
                # R2: a rollback (or step back) stands whatever became of the command: saved without
                # the answer to it
                return self._save_unanswered(state, base, outbox, status)
            # the operator was told their command was not applied: this tick's decision on it is
            # forgotten, and the next tick decides again from what is stored
            self._memory = self._known = None
            self.log.warning("the command this tick answered was taken back; its decision is dropped", error=str(exc))
            return None
        except ClusterError as exc:
            self._telemetry.errors.labels(self.policy.name, "state_store").inc()
            self.log.error("could not save the rollout state", error=str(exc))
            return None
        return self._saved(state, saved)

    def _save_unanswered(
        self, state: RolloutState, base: StoredState, outbox: tuple[OutboxEntry, ...], status: str | None
    ) -> StoredState | None:
        """Save ``state`` on the object as it is now, without the answer to a command taken back."""
        try:
            fresh = self._store.load(self.policy)
            before = fresh.state
            command = base.command
            answers = [] if command is None else [command.command.value]
            kept = state.evolve(
                last_command=None if before is None else before.last_command,
                history=tuple(
                    entry
                    for entry in state.history
                    if before is None or entry in before.history or entry.action not in answers
                ),
            )
            self._memory = kept
            saved = self._store.save(self.policy, kept, fresh, outbox, status)
        except NotLeader:
            raise
        except ClusterError as exc:  # what this process decided stays in memory for the next tick
            self._telemetry.errors.labels(self.policy.name, "state_store").inc()
            self.log.error("could not save the rollout state", error=str(exc))
            return None
        self.log.warning("the command this tick answered was taken back; the rollback stands, the answer is dropped")
        return self._saved(kept, saved)

    def _saved(self, state: RolloutState, saved: StoredState) -> StoredState:
        """What this process knows after ``state`` was saved as ``saved``."""
        self._status_written = time.monotonic()
        self._version = saved.version
        self._known = encode_state(state)
        self.persisted = _deliveries(saved.outbox)
        return saved

    # -- operators' commands and the status they read -----------------------------------------------

    def _request(
        self, stored: StoredState | None, state: RolloutState, direct: Command | None
    ) -> CommandRequest | None:
        """This tick's command: one given directly, else one waiting on the state object and not
        answered yet (the save that records the answer removes it)."""
        if direct is not None:
            return CommandRequest(direct, f"direct-{self._clock.now().isoformat()}", "operator")
        if stored is None or stored.command is None or answered(state, stored.command):
            return None
        return stored.command

    def _acknowledge(self, decision: Decision, request: CommandRequest | None) -> Decision:
        """Record the answer in the state (the CLI waits for it), as an Event, and in the log."""
        if request is None:
            return decision
        outcome = decision.outcome or CommandOutcome(False, "not answered")
        record = CommandRecord(
            id=request.id,
            command=request.command,
            by=request.by,
            at=self._clock.now(),
            applied=outcome.applied,
            reason=outcome.reason,
        )
        self.last_command_id = request.id
        verb = "applied" if outcome.applied else "rejected"
        self.log.info(
            "operator command", command=request.command.value, by=request.by, id=request.id, outcome=verb,
            reason=outcome.reason,
        )  # fmt: skip
        message = f"{request.command.value} by {request.by} (id {request.id}): {verb}: {outcome.reason}"
        self._event(f"Command{request.command.value.capitalize()}", message, warning=not outcome.applied)
        return replace(decision, state=decision.state.evolve(last_command=record))

    def _describe(self, state: RolloutState, check: CheckResult | None) -> None:
        """The waiting metric, and a log line when what the rollout waits for changes."""
        if check is not None:
            self._last_check = (check, self._clock.now())
        view = self._view(state)
        if view is None:
            return
        kind, reason = view["waiting"]["kind"], view["waiting"]["reason"]
        self._telemetry.record_waiting(self.policy.name, state.phase.value, kind, reason)
        if self._waiting != (kind, reason):
            self._waiting = (kind, reason)
            self.log.info("waiting", kind=kind, reason=reason, phase=state.phase.value)

    def _view(self, state: RolloutState) -> dict[str, Any] | None:
        """What ``status`` shows for ``state`` (saved with it); None when it cannot be made (logged).

        Guarded: it runs before the weights are written, and a bug in what people read must never
        cost a rollback.
        """
        last, checked_at = self._last_check if self._last_check is not None else (None, None)
        try:
            view = status_view(
                self.policy,
                state,
                last,
                checked_at,
                self._clock.now(),
                split=self.split,
                confirmation=self.confirmation,
            )
            json.dumps(view, allow_nan=False)  # what cannot be saved is no status
        except Exception:
            self._telemetry.errors.labels(self.policy.name, "status").inc()
            self.log.exception("the status view failed; the rollout goes on without it")
            return None
        return view

    # -- measuring -----------------------------------------------------------------------------------

    def _check(self, state: RolloutState) -> CheckResult | None:
        settled_terminal = state.phase in TERMINAL_PHASES and state.pending is None
        if settled_terminal and state.fingerprint == self.policy.rollout_fingerprint():
            return None
        started = time.perf_counter()
        # at 100/0 (verifying, or paused there) the old gateway has no traffic to compare with:
        # absolute gates only, or every check would be inconclusive (onMissingData: rollback fires)
        at_full = state.phase is Phase.VERIFYING or (state.target_weight >= FULL and state.source_weight == 0)
        prior = sequential_prior(self.policy, state.evidence, state.target_weight, state.source_weight)
        check = self._collector.check(self.policy, self._metrics, absolute_only=at_full, evidence=prior)
        seconds = time.perf_counter() - started
        self._telemetry.record_check(self.policy.name, check, seconds)
        self._log_check(check, state.target_weight, seconds)
        return check

    def _look_at_cloud(self, state: RolloutState, seen: PairSnapshot, check: CheckResult | None) -> CloudView:
        """What the cloud did with the weights (R8); nothing to look at without a cloud (the demo's pair).

        Never in the way of a rollback: on a failing check or with a rollback pending nothing is
        read (no raise can follow; a slow ASM control plane must not delay the rollback), the last
        view's refusals stand; a failure of the cloud checks themselves only holds raises.
        """
        if self._cloud is None:
            return CloudView()
        failing = check is not None and check.verdict is Verdict.FAIL
        if failing or (state.pending is not None and state.pending.rollback):
            last = self._last_view
            return CloudView(cloud_refusal=last.cloud_refusal, cloud_detail=last.cloud_detail, refusal=last.refusal)
        try:
            view = self._cloud.view(self.policy, state, seen, check, self._clock.now())
        except Exception as exc:  # a bug in a check must not cost the tick (and its rollback)
            self._telemetry.errors.labels(self.policy.name, "cloud_checks").inc()
            self.log.exception("the cloud checks failed; holding raises")
            why = f"the cloud checks failed ({type(exc).__name__}); see the controller's log"
            return CloudView(settling=why, refusal=why)
        self._telemetry.record_cloud(self.policy.name, view.split, view.confirmation)
        self.split = view.split
        self.confirmation = view.confirmation
        self._last_view = view
        return view

    def _stamp(self, before: RolloutState, decision: Decision, view: CloudView) -> Decision:
        """Record in the decided state what the cloud is to confirm (R8), before anything is written.

        A new intent is stamped with its time and the sides whose value it changes; the same intent
        again (a retried rollback, a completion) keeps its stamp and adds sides, so a side written
        on an earlier attempt is still judged. A confirmed write is remembered as such.
        """
        state = decision.state
        intent = state.pending
        if decision.weights is not None and intent is not None:
            roles = _changed_roles(intent)
            previous = before.pending
            if previous is not None and previous.weights == intent.weights and before.written_at is not None:
                merged = tuple(role for role in _ROLE_ORDER if role in (*before.written_roles, *roles))
                state = state.evolve(written_at=before.written_at, written_roles=merged, confirmed_at=None)
            elif roles:
                state = state.evolve(written_at=self._clock.now(), written_roles=roles, confirmed_at=None)
        elif any(notice.kind is AlertKind.WEIGHT_CHANGED_EXTERNALLY for notice in decision.notices):
            # someone else's weights: nothing of ours to confirm, but traffic moves to them late too
            now = self._clock.now()
            state = state.evolve(written_at=now, written_roles=(), confirmed_at=now)
        elif view.confirmation is not None and view.confirmation.applied and state.confirmed_at is None:
            state = state.evolve(confirmed_at=self._clock.now())
        return decision if state is decision.state else replace(decision, state=state)

    # -- writing (the write-ahead protocol) ----------------------------------------------------------

    def _apply(
        self, decision: Decision, seen: PairSnapshot, stored: StoredState, check: CheckResult | None
    ) -> TickOutcome:
        state, weights = decision.state, decision.weights
        failing = check is not None and check.verdict is Verdict.FAIL and decision.action is not Action.ROLLBACK
        # The alerts of this decision are in the outbox of the very save that records it: a crash
        # right after cannot lose them, and a restarted controller sends them with the same ids.
        alerts = self._alerts(decision, seen, check)
        if weights is None:
            saved = self._save(state, stored, self._outbox(alerts))
            if saved is not None and saved.version and seen.legacy_state is not None and state.phase in TERMINAL_PHASES:
                self._drop_legacy(seen)
            self._send_all(alerts)
            self._tell(seen, decision)
            return TickOutcome(decision, check, recheck_soon=failing)
        if self._stopping.is_set() and not decision.force:
            self.log.info("stopping: weight change abandoned before it was written", action=decision.action.value)
            return TickOutcome(None, check)
        # 1. the intent is durable before any Service changes; a rollback's alert with it, and sent
        # at once (people hear of a rollback when it is decided, not once it lands); a raise's
        # alert only once it is written
        early = alerts if decision.force else []
        recorded = self._save(state, stored, self._outbox(early))
        self._send_all(early)
        if recorded is None and not decision.force:
            return TickOutcome(None, check, error="weight change abandoned: its intent could not be recorded")
        try:  # 2. + 3. the target, then the source
            self._pair.write_weights(
                self.policy,
                seen,
                weights,
                force=decision.force,
                drop_legacy_state=recorded is not None and bool(recorded.version),
            )
        except NotLeader:
            raise
        except WeightChangedExternally as exc:
            self.log.warning("weight changed by someone else during the write; re-reading next tick", error=str(exc))
            return TickOutcome(None, check, recheck_soon=True, error=str(exc))
        except ClusterError as exc:
            # The intent stays recorded: the next tick completes it, or (a rollback) writes it again.
            if decision.force:
                self._tell(seen, decision)
            return self._cluster_trouble(exc, "write weights", check=check, urgent=decision.force)
        late = [] if decision.force else alerts
        self._save(state.evolve(pending=None), recorded or stored, self._outbox(late))  # 4. done
        self._send_all(late)
        self._tell(seen, decision)
        return TickOutcome(decision, check, recheck_soon=failing)

    def _outbox(self, new: list[Alert]) -> tuple[OutboxEntry, ...]:
        """What is not delivered yet: the dispatcher's pending alerts of this policy and ``new``."""
        now = self._clock.now()
        entries = [
            OutboxEntry(alert, receivers, now - timedelta(seconds=age))
            for alert, receivers, age in self._dispatcher.pending(self.policy.name)
        ]
        names = tuple(sorted(r.name for r in self._receivers))
        entries += [OutboxEntry(alert, names, now) for alert in new if names]
        entries.sort(key=lambda e: e.queued_at)
        if len(entries) > MAX_OUTBOX:
            self.log.error("outbox full: the oldest undelivered alerts are dropped", dropped=len(entries) - MAX_OUTBOX)
        return tuple(entries[-MAX_OUTBOX:])

    def _restore(self, outbox: tuple[OutboxEntry, ...]) -> None:
        """After a restart: deliver what the previous process had not (same ids, deadline kept)."""
        by_name = {r.name: r for r in self._receivers}
        now = self._clock.now()
        for entry in outbox:
            receivers = [by_name[name] for name in entry.receivers if name in by_name]
            if receivers:
                self.log.info("re-sending an undelivered alert", kind=entry.alert.kind.value, alert_id=entry.alert.id)
                age = max(0.0, (now - entry.queued_at).total_seconds())
                self._dispatcher.submit(entry.alert, receivers, age_seconds=age)

    def _drop_legacy(self, seen: PairSnapshot) -> None:
        try:
            self._pair.drop_legacy_state(self.policy, seen)
            self.log.info("removed the version-1 state annotation from the target Service")
        except ClusterError as exc:
            self.log.warning("could not remove the version-1 state annotation", error=str(exc))

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
        # A pass like the last one says nothing new: at debug, but one a minute at info (the log
        # shows the policy is checked). 500 policies' checks at info were ~440 KB of log a second.
        now = time.monotonic()
        routine = (
            check.verdict is Verdict.PASS
            and self._last_verdict is Verdict.PASS
            and now - self._check_logged_at < _CHECK_LOG_SECONDS
        )
        self._last_verdict = check.verdict
        if routine:
            self.log.debug("check", **fields)
            return
        self._check_logged_at = now
        self.log.info("check", **fields)

    def _alerts(self, decision: Decision, seen: PairSnapshot, check: CheckResult | None) -> list[Alert]:
        before, after = self._weights(seen, decision)
        # Each occurrence is its own event (its id carries the time it was decided): a problem that
        # returns after it cleared is said again; a repeat of one occurrence is de-duplicated.
        suffix = self._clock.now().isoformat()
        return [
            self._build(notice, before=before, after=after, check=check, suffix=suffix) for notice in decision.notices
        ]

    @staticmethod
    def _weights(seen: PairSnapshot, decision: Decision) -> tuple[Weights, Weights]:
        state = decision.state
        before = Weights(seen.target_weight or 0, seen.source_weight)
        return before, decision.weights or Weights(state.target_weight, state.source_weight)

    def _send_all(self, alerts: list[Alert]) -> None:
        for alert in alerts:
            if alert.kind not in (AlertKind.ROLLED_BACK, AlertKind.PROMOTED):  # (their transition has an Event)
                self._event(alert.kind.value, alert.reason, warning=alert.severity is not Severity.INFO)
            self._send(alert)

    def _tell(self, seen: PairSnapshot, decision: Decision) -> None:
        state = decision.state
        self._telemetry.record_state(state)
        before, after = self._weights(seen, decision)
        if decision.transition:
            self.log.info(
                "transition",
                action=decision.action.value,
                phase=state.phase.value,
                reason=state.reason,
                weights_before=str(before),
                weights_after=str(after),
                **({} if self.split is None else {"split_before": self.split.describe()}),
            )
            reason = _EVENT_REASONS.get(decision.action, decision.action.value)
            warning = decision.action in (Action.ROLLBACK, Action.PAUSE, Action.ADOPT)
            self._event(reason, f"{state.reason} (weights {before} -> {after})", warning=warning)
        elif decision.action is not Action.NONE:
            self.log.info("no transition", action=decision.action.value, phase=state.phase.value, reason=state.reason)
        if decision.action is Action.ROLLBACK and decision.transition:
            self._telemetry.rollbacks.labels(self.policy.name).inc()

    @property
    def receivers(self) -> list[Notifier]:
        """Who hears about this policy."""
        return list(self._receivers)

    def event(self, reason: str, message: str) -> None:
        """A Warning Event on the policy's target Service (for what the service reports)."""
        self._event(reason, message, warning=True)

    def _event(self, reason: str, message: str, *, warning: bool) -> None:
        try:
            self._pair.record_event(self.policy, reason, bounded(message, 1024), warning=warning)
        except ClusterError as exc:
            self.log.warning("could not record Kubernetes Event", reason=reason, error=str(exc))

    def _build(
        self,
        notice: Notice,
        *,
        suffix: str,
        before: Weights | None = None,
        after: Weights | None = None,
        check: CheckResult | None = None,
    ) -> Alert:
        return build_alert(
            kind=notice.kind,
            severity=notice.severity,
            policy=self.policy.name,
            reason=notice.reason,
            at=self._clock.now(),
            source_service=str(self.policy.spec.source.service),
            target_service=str(self.policy.spec.target.service),
            weights_before=before,
            weights_after=after,
            check=check,
            dedup_suffix=f"{suffix}/{notice.reason}"[:300],
            runbook_base_url=self._runbook_url,
            labels=self.policy.metadata.labels,
            template=self.policy.spec.alert_template,
        )

    def _send(self, alert: Alert) -> None:
        self.log.warning(
            "alert",
            kind=alert.kind.value,
            severity=alert.severity.value,
            reason=alert.reason,
            alert_id=alert.id,
            receivers=[r.name for r in self._receivers],
        )
        self._dispatcher.submit(alert, self._receivers)

    def alert_removed(self) -> None:
        """The policy file is gone: its weights stay where they are, and people are told."""
        self.log.warning("policy removed; weights left as they are")
        self._event(AlertKind.POLICY_REMOVED.value, "policy removed; weights left as they are", warning=True)
        notice = Notice(
            AlertKind.POLICY_REMOVED, Severity.WARNING, "the policy was removed from the policies directory"
        )
        self._send(self._build(notice, suffix=self._clock.now().isoformat()))

    def _report_once(self, kind: AlertKind, why: str, severity: Severity = Severity.WARNING) -> None:
        """Trouble that happens before a state can be decided on (observe failed, a crash): once each."""
        if why == self._reported:
            return
        self._reported = why
        self._event(kind.value, why, warning=True)
        self._send(self._build(Notice(kind, severity, why), suffix=f"{self._clock.now().isoformat()}/{why}"))

    def _warming_up(self) -> bool:
        """Whether the API server was unreachable within the grace period (its 403s may be spurious)."""
        times = [t for t in (self._unreachable_at, self._telemetry.unreachable_at) if t is not None]
        return bool(times) and time.monotonic() - max(times) < self._forbidden_grace

    def _cluster_trouble(
        self, exc: ClusterError, step: str, *, check: CheckResult | None = None, urgent: bool = False
    ) -> TickOutcome:
        kind = type(exc).__name__
        self._telemetry.errors.labels(self.policy.name, kind).inc()
        if isinstance(exc, ClusterUnavailable):
            self._unreachable_at = time.monotonic()
            if self._telemetry.reachable(False):
                self.log.error(
                    "the Kubernetes API server is unreachable: no weight, state or Event can be written until it "
                    "answers (gateway_canary_cluster_reachable 0)",
                    error=str(exc),
                )
        if isinstance(exc, AccessDenied) and self._warming_up():
            self.log.warning(
                "403 right after the API server was unreachable; retrying before calling it a refusal",
                step=step,
                grace_s=self._forbidden_grace,
                error=str(exc),
            )
            return TickOutcome(None, check, recheck_soon=True, error=str(exc))
        if isinstance(exc, AccessDenied | ServiceNotFound):
            self.log.error("policy refused; the API server denied what it needs", step=step, reason=str(exc))
            why = "; ".join(str(r) for r in (exc, self.config_error, self.file_problem) if r)
            live = self._memory is not None and self._memory.target_weight > 0
            if live:  # the ASM gateway carries traffic and this controller cannot see or protect it
                why = f"protection is blind while the ASM gateway carries traffic: {why}"
            self._report_once(
                AlertKind.POLICY_REFUSED, f"refused: {why}", Severity.CRITICAL if live else Severity.WARNING
            )
        else:
            self.log.error(
                "Kubernetes API trouble; nothing changed this tick", step=step, error=str(exc), rollback_pending=urgent
            )
        return TickOutcome(None, check, recheck_soon=urgent, error=str(exc))

    def retire(self) -> None:
        """Its term ended: wait for the tick in flight, and never tick again (a new term has new runners)."""
        with self._lock:
            self._retired = True

    def _stand_down(self, exc: NotLeader) -> TickOutcome:
        """Not the leader (any more): nothing more is written; whoever leads reads the state object."""
        self._memory = self._known = None
        self._provisional = None
        self.log.info("not leading: tick abandoned, nothing more written", why=str(exc))
        return TickOutcome(None, None, error=str(exc))

    def _crashed(self, exc: Exception) -> TickOutcome:
        if self.failing_since is None:
            self.failing_since = time.monotonic()
        self._telemetry.errors.labels(self.policy.name, "crash").inc()
        self.log.exception("tick failed unexpectedly; the next tick runs as scheduled")
        why = bounded(f"tick failed unexpectedly: {type(exc).__name__}: {exc}", 300)
        try:
            self._report_once(AlertKind.TICK_FAILED, why)
        except Exception:  # reporting must not turn one failure into two
            self.log.exception("could not report the failed tick")
        return TickOutcome(None, None, error=why)


_ROLE_ORDER = (GatewayRole.TARGET, GatewayRole.SOURCE)


def _changed_roles(intent: Intent) -> tuple[GatewayRole, ...]:
    """The sides an intent changes: only those get an answer from the cloud controller."""
    roles: list[GatewayRole] = []
    if intent.target != intent.from_target:
        roles.append(GatewayRole.TARGET)
    if intent.source is not None and intent.source != intent.from_source:
        roles.append(GatewayRole.SOURCE)
    return tuple(roles)


def _deliveries(outbox: tuple[OutboxEntry, ...]) -> set[tuple[str, str]]:
    return {(receiver, entry.alert.id) for entry in outbox for receiver in entry.receivers}


def _outbox_key(outbox: tuple[OutboxEntry, ...]) -> list[tuple[str, tuple[str, ...]]]:
    return sorted((entry.alert.id, entry.receivers) for entry in outbox)
