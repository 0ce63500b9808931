"""Model-based test of the rollout rules: the REAL PolicyRunner under faults, checked after every step.

A hypothesis state machine drives one policy's runner with in-memory adapters that fail where real
ones do (a weight patch before, between or after the two Services; a state save), feeds it any
verdict at any time step, kills and restarts it (a new runner: only the store survives), lets a
human edit the weights, corrupts the stored state, withholds a receiver's secret, marks the policy
file invalid and changes the policy. After every step the invariants of controller.core.decision
are asserted against an independent model of what must have happened:

  I1  never both weights 0
  I2  the target weight rises only on a tick whose check allowed it (PASS; at weight 0 a target
      too quiet to judge beside a real baseline, R7), with no refusal (R3), and (from a weight
      above 0) once the passes at that weight covered the bake (R4)
  I3  when the last ``failureThreshold`` judged checks while the target carried traffic were FAIL,
      the target is 0 after that tick, or the tick's writes failed and the next fault-free tick
      makes it 0 (R1, R2)
  I4  Promoted and RolledBack are left only after a policy change (R5)
  I5  no exception escapes a tick, and no tick fails unexpectedly
  I6  the persisted state stays under MAX_MODEL_STATE_BYTES
  I8  once the last write is confirmed, a tick whose traffic vanished from the ASM gateway (a
      traffic deficit: it gets none of the share the CLB sends it) never raises; and
      ``onTrafficDeficit.afterChecks`` such ticks in a row while it carries traffic roll it back (R8)
  I7  after a weight write, the target weight rises only once the cloud's newest answer since that
      write has been a success (a confirmation stands once given: Events expire, unrelated
      reconciles fail later), and only passes on a confirmed write count towards a bake (R8); the
      cloud (a fault-injecting CloudInspector) answers each tick's writes with a success, a
      failure, or silence

Each run follows one of a few fixed policies (``FLAVOURS``): plain, with approvals (approvalAt),
with advance windows (in Asia/Shanghai, an overnight window and a freeze date), with
post-promotion verification (promotion.verifyFor), or all of them with a per-step bake; and an
operator gives commands (pause, resume, approve, abort, retry, promote) on any tick:

  I9  the target weight never goes up outside an advance window or on a freeze date (judged by
      an oracle written here from the policy's text, not by controller.core.windows)
  I10 no raise reaches or passes an approvalAt weight before an APPROVE was given for it in this
      rollout: the distinct approval weights the controller's raises crossed never outnumber the
      APPROVEs given, unless a PROMOTE was given (it approves everything); a rollout starts again
      when a rolled-back one goes live (a retry, or a policy change)
  I11 after an ABORT while the target carries traffic (the Services show a target weight above 0),
      the tick writes the target to 0, or its writes failed and the next fault-free tick does
  I12 every command gets an answer recorded in ``state.last_command`` in the tick that reads it
  I13 a rollback-worthy failure while Verifying never leaves the target at 100: it goes to the
      split the Services showed before the raise to 100 (the last step's, step by step; 0 after a
      promotion from 0), or, its write failed, the next fault-free tick writes it; the rollout is
      then one FAIL from 0: the next counted FAIL rolls back to 0; checks while Verifying are
      absolute-only

The runner runs under leader election (a fault-injecting Fence shared by it and its adapters, as
in the service): its term runs out before a tick (a paused process that resumed), a newer term
saves the state object first (the process does not know it was deposed), or the term ends in the
middle of a weight write; each time the process is then elected again, in a newer term, with a new
runner (a new term reads everything from the store):

  I14 a tick whose term ended writes nothing: no weight, no state, no Event (the one ending in the
      middle of a weight write, nothing after that point); a newer term's token in the store
      deposes the reader; the token in the store never goes back to an older term

The policy has a sequential gate (errorRate.sequential, R11) beside its threshold gate; the machine
may script its rejection (a decisive FAIL), and its evidence is computed for real over counters
that only grow:

  I15 a sequential rejection while the target carries traffic rolls it back on that tick, or its
      writes failed and the next fault-free tick does, whatever ``failureThreshold``; every
      evidence the runner hands to a check counts exactly the requests since a reading that began
      a chain (never a request twice, never one from before), and a new step or a rollback starts
      a new chain

Where verification and commands legitimately change I2-I8, the adjustment is explained where the
model makes it (look for "legitimately"): an operator's promotion skips the bake (I2); a step back
is the protection while Verifying, and leaves the rollout one FAIL from 0 (I3, I8); retry and
abort leave a terminal phase (I4); the history makes the state larger, within bounds (I6). A few
imprecisions of the earlier model showed once the draws moved (marked "the earlier model"), none of
them a change of the rules: a quiet target at 0 is no vanished traffic (I8), weights someone else
set need no confirmation of ours (I7), and a rolled-back rollout stays unarmed until a tick takes
a policy change in, or after a restart whose store kept it (I3, I8).

``GATEWAY_CANARY_MODEL_EXAMPLES`` sets the number of examples (CI default below).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from controller.adapters.memory import InMemoryGatewayPair, InMemoryStateStore
from controller.core.cloud import (
    FORCE_OVERRIDE,
    LB_ID,
    SCHEDULER,
    VGROUP_PORT,
    WEIGHT,
    BackendMode,
    Backends,
    CloudEvent,
    ServiceFacts,
)
from controller.core.decision import Action
from controller.core.enums import Command, GatewayRole, Phase, Verdict
from controller.core.lease import FenceToken
from controller.core.policy import CanaryPolicy, ServiceRef
from controller.core.results import CheckResult
from controller.core.schedule import Weights, source_first
from controller.core.sequential import Evidence, Reading, observe
from controller.core.state import (
    HISTORY_REASON_CHARS,
    MAX_HISTORY,
    MAX_REASON_CHARS,
    MAX_STATE_BYTES,
    StateUnreadable,
    decode_state,
    encode_state,
)
from controller.errors import AccessDenied, ClusterUnavailable, Conflict, NotLeader
from controller.notify.dispatcher import AlertDispatcher
from controller.ports import PairSnapshot, StoredState
from controller.runtime.cloud_watch import CloudWatch
from controller.runtime.reconciler import PolicyRunner
from controller.runtime.telemetry import Telemetry
from tests.helpers import FAIL, NO_DATA, PASS, PROM_DOWN, SOURCE_ERRORING, T0, TARGET_QUIET, make_policy, samples

EXAMPLES = int(os.environ.get("GATEWAY_CANARY_MODEL_EXAMPLES", "1000"))
STEPS = 40
#: legitimately larger with commands: the history (MAX_HISTORY transitions, each reason cut to
#: HISTORY_REASON_CHARS) and the last command's answer are bounded by construction; 4 KiB held before
#: them. Still well under what a state may be to be read at all (MAX_STATE_BYTES), which I6 guards.
#: ...and one sequential gate's evidence, two fixed grids of sums and four counters (R11).
MAX_MODEL_STATE_BYTES = 4096 + MAX_HISTORY * (HISTORY_REASON_CHARS + 200) + MAX_REASON_CHARS + 300 + 2048
assert MAX_MODEL_STATE_BYTES < MAX_STATE_BYTES
INTERVAL = 30
BAKE = 60
THRESHOLD = 2
DEFICIT_CHECKS = 2
UNKNOWN = -1  # a split judged before a promotion that the model lost track of (a corrupted state)
#: transitions that begin a new step or end the rollout: the sequential evidence starts again (I15)
_NEW_STEP = (Action.START, Action.ADVANCE, Action.PROMOTE, Action.ROLLBACK)


#: daily 20:00-20:03 and 20:06-21:00, Tue and Thu 23:00-00:30 (overnight), nothing on 2026-11-25 (the
#: tail of Tuesday's overnight window falls on it); in Shanghai (UTC+8, no DST): T0 (Tue 12:00 UTC)
#: is 20:00 there, and the freeze starts 4 h later
WINDOWS: dict[str, Any] = {
    "timeZone": "Asia/Shanghai",
    "windows": [{"hours": "20:00-20:03"}, {"hours": "20:06-21:00"}, {"days": ["Tue", "Thu"], "hours": "23:00-00:30"}],
    "freezeDates": ["2026-11-25"],
}
VERIFY = 60
OWN_BAKE = 90
#: the fixed policies a run chooses among (each a set of the features to switch on)
FLAVOURS: dict[str, dict[str, Any]] = {
    "plain": {},
    "approvals": {"approval_at": (50, 100)},
    "windows": {"windows": WINDOWS},
    "verification": {"verify_for": VERIFY},
    "everything": {"approval_at": (50,), "windows": WINDOWS, "verify_for": VERIFY, "own_bake": OWN_BAKE},
}


def window_open(at: datetime) -> bool:
    """I9's oracle for ``WINDOWS``, from its text: Shanghai is UTC+8 all year."""
    local = at.astimezone(UTC).replace(tzinfo=None) + timedelta(hours=8)
    minute = local.hour * 60 + local.minute
    day = local.strftime("%a")
    if local.date() == date(2026, 11, 25):
        return False
    return (
        1200 <= minute < 1203
        or 1206 <= minute < 1260
        or (day in ("Tue", "Thu") and minute >= 1380)
        or (day in ("Wed", "Fri") and minute < 30)  # the tail of the evening before
    )


def policy_with(bake: int = BAKE, steps: tuple[int, ...] = (10, 50, 100), flavour: str = "plain") -> CanaryPolicy:
    features = FLAVOURS[flavour]
    listed: list[Any] = list(steps)
    if "own_bake" in features:
        listed[0] = {"weight": steps[0], "bakeTime": f"{features['own_bake']}s"}
    schedule: dict[str, Any] = {"steps": listed, "bakeTime": f"{bake}s"}
    if "approval_at" in features:
        schedule["approvalAt"] = list(features["approval_at"])
    if "windows" in features:
        schedule["advanceWindows"] = features["windows"]
    extra: dict[str, Any] = {}
    if "verify_for" in features:
        extra["promotion"] = {"verifyFor": f"{features['verify_for']}s"}
    return make_policy(
        schedule=schedule,
        **extra,
        gates={"errorRate": {"max": 0.01, "sequential": {"alpha": 0.01, "minEffect": 1.5}}},
        analysis={
            "interval": f"{INTERVAL}s",
            "failureThreshold": THRESHOLD,
            "onMetricsUnavailable": {"action": "rollback", "afterChecks": 3},
            "onMissingData": {"action": "hold", "afterChecks": 4},
            "onTrafficDeficit": {"action": "rollback", "afterChecks": DEFICIT_CHECKS},
            "window": "1s",  # a confirmed write is settled by the next check
        },
        # a silent cloud keeps the write waiting (R8), not refused; a confirmed write is settled at once
        cloud={"confirmTimeout": "1h", "deficitGrace": "1s"},
    )


CHECKS = {
    "PASS": PASS,
    "FAIL": FAIL,
    "QUIET": TARGET_QUIET,
    "SRC_ERR": SOURCE_ERRORING,
    "PROM": PROM_DOWN,
    "NODATA": NO_DATA,
    # the checks pass, but the ASM gateway answered none of the requests the CLB sent it
    "VANISH": replace(
        PASS, source=samples(GatewayRole.SOURCE, requests=1000.0), target=samples(GatewayRole.TARGET, requests=None)
    ),
    # a sequential gate's rejection: a FAIL that rolls back at once (R11)
    "REJECT": replace(FAIL, gates=tuple(replace(gate, decisive=True) for gate in FAIL.gates)),
}
FAULTS = (None, "before", "between", "after")
#: how the cloud answers a tick's writes: mostly a success, sometimes a failure or nothing at all
ANSWERS = ("ok", "ok", "ok", "fail", "silent")


class FaultyCloud:
    """The cloud controller's Events, answered after each tick (so never before the write they answer).

    ``silent`` keeps it quiet for a while (a stuck cloud controller), whatever each tick would say.
    """

    def __init__(self) -> None:
        self.answers: list[CloudEvent] = []
        self.silent = False
        self.vanishing = False

    def answer(self, how: str, at: datetime) -> None:
        if self.silent:
            return
        if how == "ok":
            self.answers.append(CloudEvent("EnsuredLoadBalancer", "Ensured load balancer [lb-1]", at))
        elif how == "fail":
            self.answers.append(CloudEvent("SyncLoadBalancerFailed", "Error syncing load balancer", at, warning=True))

    def events(self, ref: ServiceRef, uid: str | None = None) -> tuple[CloudEvent, ...]:
        return tuple(self.answers)

    def backends(self, ref: ServiceRef) -> Backends | None:
        # known only while traffic vanishes (the share check needs them); otherwise unknown, and
        # only the confirmation decides settling
        return Backends(BackendMode.CLUSTER, nodes=20) if self.vanishing else None

    def facts(self, ref: ServiceRef) -> ServiceFacts:
        annotations = {LB_ID: "lb-1", VGROUP_PORT: "rsp-1:80", FORCE_OVERRIDE: "false", SCHEDULER: "wrr", WEIGHT: "0"}
        return ServiceFacts(str(ref), annotations, ports=(80,), workloads=(ref.name,))


@pytest.fixture(autouse=True)
def _quiet_logs() -> Iterator[None]:
    """Thousands of ticks: rendering their log lines would be most of the run time."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    yield
    structlog.reset_defaults()


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def now(self):  # type: ignore[no-untyped-def]
        return self.t


class ScriptedCollector:
    """Stands in for the collector: the machine chooses each check's verdict.

    The sequential gate's evidence is real (``observe``) over raw counters that only grow, by 100
    requests per check: every evidence handed in must count exactly the requests since a reading
    that started a chain (I15), so nothing is counted twice or made up, whatever the restarts,
    failed saves, corrupted states and policy changes in between.
    """

    def __init__(self) -> None:
        self.next: CheckResult = PASS
        self.ran = False
        self.absolute_only = False
        self.returned: CheckResult | None = None
        self.counter = 0.0
        self.bases: set[float] = set()

    def check(
        self,
        policy: CanaryPolicy,
        metrics: object,
        *,
        absolute_only: bool = False,
        evidence: dict[str, Evidence] | None = None,
    ) -> CheckResult:
        self.ran = True
        self.absolute_only = absolute_only
        self.counter += 100
        result = self.next
        if absolute_only:  # the sequential gates are comparative: never judged at 100/0
            result = replace(result, gates=tuple(replace(gate, decisive=False) for gate in result.gates))
        prior = (evidence or {}).get("errorRateSequential")
        if prior is not None and not absolute_only:
            if prior.target is None:
                self.bases.add(self.counter)
            else:
                (last,) = prior.target  # one scrape target
                start = last.requests - prior.totals.target_requests
                assert start in self.bases, f"I15/R11: evidence counted from {start}, which started no chain"
                assert last.requests < self.counter, "I15/R11: evidence from a reading not made yet"
            reading = Reading(self.counter, 0.0), Reading(9 * self.counter, 0.0)
            after, _, _ = observe(prior, *reading, 1.5, 0.01)
            result = replace(result, evidence=(after,))
        self.returned = result
        return result


class FaultyPair(InMemoryGatewayPair):
    """Fails a weight write before the target, between target and source, or after both."""

    fault: str | None = None
    error: type[Exception] = ClusterUnavailable
    fired: bool = False  # the last write_weights met its fault

    def write_weights(
        self,
        policy: CanaryPolicy,
        seen: PairSnapshot,
        weights: Weights,
        *,
        force: bool = False,
        drop_legacy_state: bool = False,
    ) -> None:
        fault, self.fault = self.fault, None
        self.fired = fault is not None
        roles = (GatewayRole.TARGET, GatewayRole.SOURCE)
        first, second = reversed(roles) if source_first(weights, seen.source_weight) else roles
        if fault == "before":
            raise self.error("injected: the first patch failed")
        self.write_one(first, seen, weights, force=force, drop_legacy_state=drop_legacy_state)
        if fault == "between":
            raise self.error("injected: the second patch failed")
        self.write_one(second, seen, weights, force=force, drop_legacy_state=drop_legacy_state)
        if fault == "after":
            raise self.error("injected: the answer was lost after both patches")


@dataclass
class ModelFence:
    """The leader election seen by one process: its term, and whether that term may still write."""

    term_no: int = 1
    expired: bool = False
    deposed_calls: list[str] = field(default_factory=list)

    def token(self) -> FenceToken:
        return FenceToken("model-process", self.term_no, None, "lease-uid")

    def check(self) -> None:
        if self.expired:
            raise NotLeader("model: this process's term ran out")

    def deposed(self, why: str) -> None:
        self.deposed_calls.append(why)


class FaultyStore(InMemoryStateStore):
    failing: bool = False

    def save(self, policy, state, previous: StoredState, outbox=(), status=None) -> StoredState:  # type: ignore[no-untyped-def]
        if self.failing:
            raise ClusterUnavailable("injected: the state object could not be written")
        return super().save(policy, state, previous, outbox, status)

    def load(self, policy):  # type: ignore[no-untyped-def]
        if self.failing:
            raise ClusterUnavailable("injected: the state object could not be read")
        return super().load(policy)


@dataclass
class Expect:
    """What the model knows, independently of the implementation."""

    fails_in_a_row: int = 0  # judged FAILs while the target carried traffic, since the last PASS
    rollback_owed: bool = False
    promoted: bool = False  # the Services showed 100/0 after our promotion
    rolled_back: bool = False  # a rollback landed and nothing restarted the rollout since
    covered: float = 0.0  # seconds covered by consecutive passes at the current weight
    last_pass: float | None = None
    weight_seen: int = 0
    deficits: int = 0  # judged ticks in a row whose traffic vanished, once settled
    step_back_owed: int | None = None  # the target of a step back whose write failed (I13)
    approvals: int = 0  # APPROVEs given in this rollout (I10)
    promote_given: bool = False  # a PROMOTE given in this rollout: it approves everything left (I10)
    crossed: set[int] = field(default_factory=set)  # approvalAt weights our raises reached or passed (I10)

    def new_rollout(self) -> None:
        """A rolled-back rollout went live again: what was approved belongs to the old one."""
        self.approvals, self.promote_given, self.crossed = 0, False, set()


#: the commands an operator gives, the likelier ones more often
COMMANDS = (
    Command.PAUSE,
    Command.RESUME,
    Command.RESUME,
    Command.APPROVE,
    Command.APPROVE,
    Command.APPROVE,
    Command.ABORT,
    Command.RETRY,
    Command.RETRY,
    Command.PROMOTE,
    Command.PROMOTE,
)


class RolloutMachine(RuleBasedStateMachine):
    @initialize(flavour=st.sampled_from(sorted(FLAVOURS)))
    def setup(self, flavour: str) -> None:
        self.flavour = flavour
        self.features = FLAVOURS[flavour]
        self.steps: tuple[int, ...] = (10, 50, 100)
        self.bake = BAKE
        self.policy = policy_with(self.bake, self.steps, flavour)
        self.fence = ModelFence()
        self.pair = FaultyPair(target_weight=0, source_weight=100, fence=self.fence)
        self.store = FaultyStore(fence=self.fence)
        self.tokens_stored: list[FenceToken] = []
        self.clock = Clock()
        self.collector = ScriptedCollector()
        self.config_error: str | None = None
        self.file_problem: str | None = None
        self.expect = Expect()
        self.elapsed = 0.0
        self.last_phase: Phase | None = None
        self.policy_changed = False
        self.unsaved = False
        self.cloud = FaultyCloud()
        self.confirmed_writes: set[datetime] = set()
        #: the target weight the Services showed before our last raise to 100: the split a failed
        #: verification steps back to (R10); UNKNOWN once the state was lost
        self.judged: int | None = None
        self.runner = self._new_runner()

    def _new_runner(self) -> PolicyRunner:
        runner = PolicyRunner(
            self.policy,
            pair=self.pair,
            store=self.store,
            metrics=object(),  # type: ignore[arg-type]
            receivers=[],
            dispatcher=AlertDispatcher(),
            collector=self.collector,  # type: ignore[arg-type]
            clock=self.clock,
            telemetry=Telemetry(),
            stopping=threading.Event(),
            config_error=self.config_error,
            cloud=CloudWatch(self.cloud),
            fence=self.fence,
        )
        runner.file_problem = self.file_problem
        return runner

    # -- rules -------------------------------------------------------------------------------------

    @rule(
        verdict=st.sampled_from(sorted(CHECKS)),
        step=st.sampled_from([5, 15, 30, 30, 30, 45, 61, 300, 3600]),
        fault=st.sampled_from(FAULTS),
        access_denied=st.booleans(),
        store_fails=st.booleans(),
        answer=st.sampled_from(ANSWERS),
    )
    def tick(
        self,
        verdict: str,
        step: int,
        fault: str | None,
        access_denied: bool,
        store_fails: bool,
        answer: str,
        command: Command | None = None,
        term_ends_mid_write: bool = False,
    ) -> None:
        self.elapsed += step
        self.clock.t = T0 + timedelta(seconds=self.elapsed)
        self.collector.next, self.collector.ran = CHECKS[verdict], False
        self.cloud.vanishing = verdict == "VANISH"
        memory = self.runner._memory
        settled = memory is not None and memory.confirmed_at is not None and memory.pending is None
        verifying = self._verifying(memory)
        self.pair.fault = fault
        self.pair.error = AccessDenied if access_denied else Conflict if fault == "after" else ClusterUnavailable
        if term_ends_mid_write:
            self.pair.error = NotLeader
        self.store.failing = store_fails
        self.unsaved = store_fails  # a tick with a working store saves what earlier ones could not
        before = (self.pair.target_weight or 0, self.pair.source_weight)
        refused = self.config_error is not None or self.file_problem is not None
        self._latch_confirmation()  # what the cloud said since the last tick is what this one sees
        prior_confirmed = self._confirmed()
        self._count_command(command)  # given before the tick decides
        outcome = self.runner.tick(command)  # I5: tick() must not raise
        self.store.failing = False
        faulted = (self.pair.fault is None and fault is not None) or store_fails
        self.pair.fault = None
        assert outcome.error is None or "failed unexpectedly" not in outcome.error, outcome.error  # I5
        after = self.pair.target_weight or 0
        check = self.collector.returned if self.collector.ran else None
        decision = outcome.decision
        if decision is not None and decision.transition and decision.action in _NEW_STEP:
            assert decision.state.evidence == (), f"I15/R11: {decision.action} kept the step's evidence"
        if verifying and self.collector.ran:
            assert self.collector.absolute_only, "I13/R10: a check while Verifying judged the comparative gates"
            event(f"a {verdict} check while verifying")
        self._count_coverage(before[0], check if prior_confirmed else None)
        self._judge_rise(before, after, check, refused, command)
        assert after <= before[0] or prior_confirmed, "I7/R8: a weight rose before the cloud confirmed the last write"
        self._judge_window(before[0], after)
        self._judge_approvals(before[0], after)
        if after >= 100 > before[0]:
            self.judged = before[0]
        retrying = self.expect.step_back_owed is not None
        self._judge_rollback(before[0], after, check, faulted, verifying, command)
        self._judge_deficit(before[0], after, verdict, settled and prior_confirmed, faulted, verifying, retrying)
        self._follow_step_back(outcome.decision, after, verifying, retrying)
        self._follow_terminal(after, command)
        self._judge_answer(command)
        self._the_write_is_recorded(before, fault, store_fails)
        self.cloud.answer(answer, self.clock.t)  # the cloud answers this tick's writes after them
        self._latch_confirmation()

    @rule(
        command=st.sampled_from(COMMANDS),
        verdict=st.sampled_from(["PASS", "PASS", "PASS", "FAIL", "NODATA", "QUIET"]),
        step=st.sampled_from([5, 30, 30, 61, 3600]),
        fault=st.sampled_from(FAULTS),
        answer=st.sampled_from(ANSWERS),
    )
    def an_operator_gives_a_command(
        self, command: Command, verdict: str, step: int, fault: str | None, answer: str
    ) -> None:
        self.tick(verdict, step, fault, False, False, answer, command=command)

    def _judge_deficit(
        self,
        before: int,
        after: int,
        verdict: str,
        settled: bool,
        faulted: bool,
        verifying: bool | None,
        retrying: bool,
    ) -> None:
        e = self.expect
        if verdict != "VANISH" or not self.collector.ran:
            if self.collector.ran and verdict in ("PASS", "FAIL"):
                e.deficits = 0  # a pass with traffic (or a judged failure) breaks the run
            return
        if not settled:
            return
        # (at weight 0 the CLB sends the ASM gateway nothing to lose: a quiet target is a start's
        # baseline (R7), not vanished traffic; the earlier model missed this, found once the draws moved)
        assert after <= before or before == 0, "I8/R8: a weight rose on a tick whose traffic vanished"
        armed = not e.promoted and not e.rolled_back
        if before > 0 and armed:
            e.deficits += 1
            # legitimately: while a step back is still being written, that write comes first (R2)
            if e.deficits >= DEFICIT_CHECKS and not faulted and not retrying:
                protected = self._protected(verifying)
                assert after in protected, (
                    f"I8/R8: {e.deficits} ticks of vanished traffic at weight {before}, still {after} (not {protected})"
                )
        if after == 0:
            e.deficits = 0

    def _confirmed(self) -> bool:
        """Whether the last recorded write of the state the runner holds has been confirmed: at some
        point the cloud's newest answer since it was a success (a confirmation stands once given;
        True when nothing is recorded, or a write is still unfinished: it completes first)."""
        state = self.runner._memory
        if state is None or state.written_at is None or state.pending is not None:
            return True
        if not state.written_roles:
            # weights someone else set and the rollout adopted: no write of ours for the cloud to
            # confirm (the earlier model missed this; found once the draws moved)
            return True
        return state.written_at in self.confirmed_writes

    def _latch_confirmation(self) -> None:
        state = self.runner._memory or self._stored()
        if state is None or state.written_at is None:
            return
        since = state.written_at.replace(microsecond=0)
        answers = [e for e in self.cloud.answers if e.last_seen >= since]
        if answers and max(answers, key=lambda e: (e.last_seen, e.reason != "EnsuredLoadBalancer")).reason == (
            "EnsuredLoadBalancer"
        ):
            self.confirmed_writes.add(state.written_at)

    def _stored(self) -> Any:
        """The state in the store, when the runner remembers none (a restart, an unreadable store)."""
        text = self.store.texts.get(self.policy.name)
        try:
            return None if text is None else decode_state(text)
        except StateUnreadable:
            return None

    def _the_write_is_recorded(self, before: tuple[int, int | None], fault: str | None, store_fails: bool) -> None:
        """Each side a write of ours changed is recorded, with its time, for the cloud to confirm (R8)."""
        state = self.runner._memory
        changed = {
            role
            for role, was, now in (
                (GatewayRole.TARGET, before[0], self.pair.target_weight or 0),
                (GatewayRole.SOURCE, before[1], self.pair.source_weight),
            )
            if was != now
        }
        if changed and state is not None and state.written_at is not None:
            assert state.written_at <= self.clock.t, "I7/R8: a write stamped in the future"
            assert changed <= set(state.written_roles), f"I7/R8: {changed} written, {state.written_roles} recorded"
        elif changed and fault is None and not store_fails and state is not None:
            raise AssertionError("I7/R8: a finished write was not recorded for confirmation")

    @rule(count=st.integers(2, 6), start=st.booleans(), answer=st.sampled_from(ANSWERS), approve=st.booleans())
    def a_healthy_stretch(self, count: int, start: bool, answer: str, approve: bool) -> None:
        """Several fault-free passing checks an interval apart: how a rollout really advances, and
        what a stalled cloud controller must hold back (R8); an operator may approve on the first."""
        for n in range(count):
            verdict = "QUIET" if start and n == 0 else "PASS"
            command = Command.APPROVE if approve and n == 0 else None
            self.tick(verdict, INTERVAL, None, False, False, answer, command=command)

    @rule(count=st.integers(1, 3), verdict=st.sampled_from(["FAIL", "FAIL", "REJECT", "VANISH", "PROM"]))
    def a_breaking_target(self, count: int, verdict: str) -> None:
        """Fault-free checks an interval apart that demand protection, the cloud answering each
        write: how a target breaks, at a step, or at 100 while verifying (R10)."""
        for _ in range(count):
            self.tick(verdict, INTERVAL, None, False, False, "ok")

    @rule(
        how=st.sampled_from(["expired", "deposed"]),
        verdict=st.sampled_from(["PASS", "FAIL", "FAIL", "NODATA"]),
        step=st.sampled_from([5, 30, 61]),
    )
    def the_term_ends_before_a_tick(self, how: str, verdict: str, step: int) -> None:
        """A paused process resumes past its Lease, or a newer term saved the state object first."""
        before = (self.pair.writes, self.store.saves, len(self.pair.events), self.pair.target_weight)
        if how == "expired":
            self.fence.expired = True
        else:
            self.store.stamp(self.policy.name, FenceToken("another-process", self.fence.term_no + 1, None, "lease-uid"))
        self.elapsed += step
        self.clock.t = T0 + timedelta(seconds=self.elapsed)
        self.collector.next, self.collector.ran = CHECKS[verdict], False
        outcome = self.runner.tick()
        after = (self.pair.writes, self.store.saves, len(self.pair.events), self.pair.target_weight)
        assert after == before, f"I14: a process whose term ended ({how}) wrote: {before} -> {after}"
        assert outcome.decision is None and outcome.error is not None, "I14: a tick ran without a term"
        if how == "deposed":
            assert self.fence.deposed_calls, "I14: a newer term's token in the store did not depose the reader"
        event(f"term ended before a tick: {how}")
        self._elected_again(self.fence.term_no + 2)

    @rule(
        fault=st.sampled_from(["before", "between"]),
        verdict=st.sampled_from(["PASS", "FAIL", "FAIL"]),
        step=st.sampled_from([5, 30, 61, 3600]),
    )
    def the_term_ends_mid_write(self, fault: str, verdict: str, step: int) -> None:
        """The fence refuses the first (or the second) Service patch of a weight change."""
        saves = self.store.saves
        self.pair.fired = False
        self.tick(verdict, step, fault, False, False, "ok", term_ends_mid_write=True)
        if self.pair.fired:  # the tick wrote weights and its term ended there
            event(f"term ended mid-write: {fault}")
            assert self.store.saves - saves <= 1, "I14: a term that ended mid-write saved after that"
        self._elected_again(self.fence.term_no + 1)

    def _elected_again(self, term: int) -> None:
        """This process is elected again, in a newer term: a new runner, reading from the store."""
        self.fence.expired = False
        self.fence.term_no = term
        self.fence.deposed_calls.clear()
        self.crash_and_restart()

    @invariant()
    def the_stored_token_never_goes_back(self) -> None:
        token = self.store.fences.get(self.policy.name)
        if token is None:
            return
        if self.tokens_stored:
            assert not self.tokens_stored[-1].supersedes(token), "I14: an older term's token replaced a newer one"
        if not self.tokens_stored or self.tokens_stored[-1] != token:
            self.tokens_stored.append(token)

    @rule(silent=st.booleans())
    def the_cloud_controller_stalls_or_recovers(self, silent: bool) -> None:
        self.cloud.silent = silent

    @rule()
    def crash_and_restart(self) -> None:
        self.runner = self._new_runner()
        self.expect.last_pass = None  # a restart closes the open run of passes
        if self.unsaved:
            # What was decided while the state object could not be written dies with the process:
            # the evidence, and a rollback's RolledBack phase (the weights stay 0/100, and a new start
            # needs a real baseline and a pass). A documented limit of a double fault, not a rule broken.
            self.expect.fails_in_a_row = 0
            self.expect.rollback_owed = False
            self.expect.step_back_owed = None  # (a step back is a rollback intent too)
            # ...but what was saved before survives: a landed rollback saved as such stays terminal
            # (the earlier model re-armed it here; found once the draws moved)
            stored = self._stored()
            kept = stored is not None and stored.phase is Phase.ROLLED_BACK and stored.pending is None
            self.expect.rolled_back = self.expect.rolled_back and kept
            self.last_phase = Phase.ROLLED_BACK if kept else None

    @rule(to_target=st.integers(0, 100), to_source=st.integers(0, 100))
    def human_edits_the_weights(self, to_target: int, to_source: int) -> None:
        if to_target == 0 and to_source == 0:
            to_source = 100
        self.pair.target_weight, self.pair.source_weight = to_target, to_source
        owed = self.expect.step_back_owed
        if owed is not None and to_target < owed:
            self.expect.step_back_owed = None  # legitimately: a step back never raises over a lower weight

    @rule(garbage=st.sampled_from(["not json", '{"v": 2, "target_weight": Infinity}', '{"v": 9}']))
    def corrupt_the_state(self, garbage: str) -> None:
        self.store.texts[self.policy.name] = garbage
        self.store.versions[self.policy.name] = self.store.versions.get(self.policy.name, 0) + 1
        self.runner = self._new_runner()  # and a restart, so nothing is remembered
        self.last_phase = None  # the phase is unknown now: I4 starts over
        self.expect.promoted = (self.pair.target_weight or 0) >= 100
        self.expect.rolled_back = False
        self.expect.last_pass = None
        self.expect.fails_in_a_row = 0  # the evidence (and a pending rollback) were in the state:
        self.expect.rollback_owed = False  # destroyed with it; the recovered state counts afresh, armed
        self.expect.step_back_owed = None
        self.judged = UNKNOWN  # and what the promotion was judged against

    @rule(missing=st.booleans())
    def a_receiver_secret_comes_and_goes(self, missing: bool) -> None:
        self.config_error = "alerts[0].urlFromEnv: environment variable PAGER is not set" if missing else None
        self.runner.config_error = self.config_error

    @rule(invalid=st.booleans())
    def the_policy_file_turns_invalid_or_is_fixed(self, invalid: bool) -> None:
        self.file_problem = "its policy file is invalid: p.yaml:3: spec.gatez: unknown field" if invalid else None
        self.runner.file_problem = self.file_problem

    @rule(bake=st.sampled_from([0, 30, 60, 90]), steps=st.sampled_from([(10, 50, 100), (5, 25, 100), (50,)]))
    def change_the_policy(self, bake: int, steps: tuple[int, ...]) -> None:
        changed = policy_with(bake, steps, self.flavour)
        if changed.rollout_fingerprint() == self.policy.rollout_fingerprint():
            return
        self.policy, self.bake, self.steps = changed, bake, steps
        self.runner = self._new_runner()
        self.policy_changed = True
        old = self.expect
        # approvals belong to the rollout, which a policy change continues; a rolled-back one is
        # started again by it only once a tick takes the change in (an outside change is adopted
        # first): _follow_terminal sees the rollout go live, re-arms the model and forgets them (the
        # earlier model re-armed here, and counted FAILs the restart does not; found once the draws moved)
        self.expect = Expect(
            promoted=old.promoted,
            rolled_back=old.rolled_back,
            weight_seen=self.pair.target_weight or 0,
            approvals=old.approvals,
            promote_given=old.promote_given,
            crossed=old.crossed,
        )

    # -- the model ---------------------------------------------------------------------------------

    def _split(self) -> int | None:
        """Where a failed verification steps back to: the split judged before the promotion, which
        is the last step's in a rollout that went step by step (R10); None: a rollback to 0 (the
        promotion came from 0); UNKNOWN when the model lost track (a corrupted state)."""
        if self.judged is None or self.judged == UNKNOWN:
            return self.judged
        return self.judged if 0 < self.judged < 100 else None

    def _bake_at(self, weight: int) -> float:
        """The bake at ``weight``, from the policy's text: the first step's own, else bakeTime."""
        own = self.features.get("own_bake")
        return float(own) if own is not None and weight == self.steps[0] else float(self.bake)

    def _protected(self, verifying: bool | None) -> set[int]:
        """The target weights protection may leave after a rollback-worthy tick: 0, or while
        Verifying the split judged before the promotion (R10); both when it is not known whether it
        was verifying; while Verifying with the split unknown, anything below 100 (I13)."""
        split = self._split()
        if split is None or verifying is False:
            return {0}
        below = {0, *range(1, 100)} if split == UNKNOWN else {0, split}
        return below - {0} if verifying and split != UNKNOWN else below

    @staticmethod
    def _verifying(state: Any) -> bool | None:
        """Whether the tick decides from a rollout Verifying at 100; None when that is not known (no
        state remembered, or a raise to 100 not fully written: a FAIL voids it, and it is no more)."""
        if state is None:
            return None
        if state.phase is not Phase.VERIFYING:
            return False
        return True if state.pending is None else None

    def _count_command(self, command: Command | None) -> None:
        if command is Command.APPROVE:
            self.expect.approvals += 1
        elif command is Command.PROMOTE:
            self.expect.promote_given = True

    def _judge_rise(
        self,
        before: tuple[int, int | None],
        after: int,
        check: CheckResult | None,
        refused: bool,
        command: Command | None,
    ) -> None:
        if after <= before[0]:
            return
        assert not refused, "I2/R3: a weight rose while the policy was refused"
        assert check is not None, "I2: a weight rose on a tick without a check"
        if before[0] == 0:
            allowed = check.verdict is Verdict.PASS or replace(check, evidence=()) == TARGET_QUIET
            assert allowed, f"I2/R7: started on a {check.verdict} check (baseline {check.baseline.verdict})"
        else:
            assert check.verdict is Verdict.PASS, f"I2: rose from {before[0]} to {after} on a {check.verdict}"
            if after >= 100 and self.expect.promote_given:
                # legitimately: an operator's promotion skips the bake (never the passing check), and
                # so does completing it when its write was cut short
                return
            bake = self._bake_at(before[0])
            assert self.expect.covered >= bake, f"I2/R4: rose with {self.expect.covered}s of {bake}s covered"

    def _judge_window(self, before: int, after: int) -> None:
        if "windows" not in self.features:
            return
        if after > before:
            assert window_open(self.clock.t), f"I9: the target rose {before} -> {after} at {self.clock.t}, closed"
        state = self.runner._memory
        if state is not None and state.reason.startswith("not raising the weight: outside the advance windows"):
            event("a raise held by a closed window")

    def _judge_approvals(self, before: int, after: int) -> None:
        gates = self.features.get("approval_at", ())
        if after <= before or not gates:
            return
        e = self.expect
        e.crossed |= {gate for gate in gates if before < gate <= after}
        event("a raise reached an approval weight")
        assert e.promote_given or len(e.crossed) <= e.approvals, (
            f"I10: the raise {before} -> {after} reached approval weights {sorted(e.crossed)} "
            f"with {e.approvals} APPROVE(s) given in this rollout"
        )

    def _judge_rollback(
        self,
        before: int,
        after: int,
        check: CheckResult | None,
        faulted: bool,
        verifying: bool | None,
        command: Command | None,
    ) -> None:
        e = self.expect
        retrying = e.step_back_owed is not None
        if e.rollback_owed and not faulted:
            assert after == 0, "I3/R2: a rollback that failed to write was not completed on a fault-free tick"
        if command is Command.ABORT and before > 0:
            event("an abort while the target carried traffic")
            if not faulted:
                assert after == 0, f"I11: an abort at target weight {before} left it at {after}"
            e.rollback_owed, e.step_back_owed = after != 0, None
            if after == 0:
                e.rollback_owed, e.fails_in_a_row = False, 0
            return
        if e.step_back_owed is not None and not faulted:
            owed = e.step_back_owed
            assert after == owed, f"I13/R2: a step back to {owed} that failed to write was retried as {after}"
            e.step_back_owed = None
        armed = not e.promoted and not e.rolled_back
        if check is not None and check.verdict is Verdict.PASS:
            e.fails_in_a_row = 0
        elif check is not None and check.verdict is Verdict.FAIL and before > 0 and armed:
            e.fails_in_a_row += 1
            if any(gate.decisive for gate in check.failing):  # I15/R11: no count for a sequential rejection
                event("a sequential gate rejected while the target carried traffic")
                e.fails_in_a_row = max(e.fails_in_a_row, THRESHOLD)
        # legitimately: a step back not fully written is written first (R2); the FAILs counted
        # meanwhile roll back to 0 on the next tick that does not pass
        if check is not None and e.fails_in_a_row >= THRESHOLD and armed and not retrying:
            protected = self._protected(verifying)
            if after not in protected:  # (0 while Verifying is no step back: I13)
                assert faulted, (
                    f"I3/R1/I13: {e.fails_in_a_row} FAILs in a row at weight {before} and the target is {after} "
                    f"(not {sorted(protected)[:3]})"
                )
                if protected == {0}:
                    e.rollback_owed = True
                # (a step back owed is taken in by _follow_step_back, from the intent it recorded)
        if after == 0:
            e.rollback_owed, e.step_back_owed, e.fails_in_a_row = False, None, 0

    def _follow_step_back(self, decision: Any, after: int, verifying: bool | None, retrying: bool) -> None:
        """A step back just decided (a rollback that is not to 0: written, or its intent recorded)
        leaves the rollout Paused one FAIL from 0 with its inconclusive counts cleared (R10):
        legitimately, the model follows; its target is what I13 checked against the judged split."""
        state = self.runner._memory
        if retrying or verifying is False or state is None or state.phase is not Phase.PAUSED:
            return
        pending = state.pending
        if decision is not None and decision.transition and decision.action is Action.ROLLBACK:
            target = decision.weights.target
        elif pending is not None and pending.rollback:
            target = pending.target
        else:
            return
        if target == 0:
            return
        split = self._split()
        assert split in (UNKNOWN, target), f"I13: stepped back to {target}, the split judged was {split}"
        event("a failed verification stepped back")
        self.expect.fails_in_a_row = THRESHOLD - 1
        self.expect.deficits = 0
        self.expect.step_back_owed = None if after == target else target

    def _count_coverage(self, before: int, check: CheckResult | None) -> None:
        """An upper bound of what the bake may count: consecutive passes at one weight (R4)."""
        e = self.expect
        if before != e.weight_seen:  # the weight moved (a step, a rollback, a human): a new bake
            e.covered, e.last_pass, e.weight_seen = 0.0, None, before
        if check is None:
            return
        if check.verdict is Verdict.PASS:
            if e.last_pass is not None and self.elapsed - e.last_pass <= 2 * INTERVAL:
                e.covered += self.elapsed - e.last_pass
            e.last_pass = self.elapsed
        elif check.verdict is Verdict.FAIL:
            e.covered, e.last_pass = 0.0, None
        else:
            e.last_pass = None

    def _follow_terminal(self, after: int, command: Command | None) -> None:
        state = self.runner._memory
        if state is None:
            return
        e = self.expect
        if state.phase is Phase.PROMOTED and after >= 100:
            e.promoted = True
        if state.phase is Phase.ROLLED_BACK and after == 0 and state.pending is None:
            e.rolled_back = True
        if self.last_phase in (Phase.PROMOTED, Phase.ROLLED_BACK) and not self.policy_changed:
            # legitimately (R9): an operator's retry restarts a rolled-back rollout, an abort rolls a
            # promoted one back; nothing else leaves a terminal phase
            retried = self.last_phase is Phase.ROLLED_BACK and command is Command.RETRY
            aborted = self.last_phase is Phase.PROMOTED and command is Command.ABORT
            left = state.phase is not self.last_phase
            assert not left or retried or aborted, f"I4/R5: {self.last_phase} became {state.phase} ({command})"
            if aborted and left:
                assert state.phase is Phase.ROLLED_BACK, f"I4/R5: an abort of a promoted rollout made it {state.phase}"
        if self.last_phase is Phase.ROLLED_BACK and state.phase in (Phase.PENDING, Phase.PROGRESSING):
            e.new_rollout()  # a new rollout (a retry, or a policy change): nothing approved yet
        if state.phase not in (Phase.PROMOTED, Phase.ROLLED_BACK):
            e.promoted = e.rolled_back = False  # live: armed
        # a terminal phase counts once it is written (an unfinished promotion is no promotion)
        self.last_phase = state.phase if state.pending is None else None
        # a policy change counts until the rollout has taken it in
        self.policy_changed = self.policy_changed and state.fingerprint != self.policy.rollout_fingerprint()

    def _judge_answer(self, command: Command | None) -> None:
        if command is None:
            return
        state = self.runner._memory
        if state is None:
            # legitimately: a process that never read a state, with the store unreachable, has nowhere
            # to record an answer (the CLI times out; the command is read again once the store answers)
            return
        record = state.last_command
        assert record is not None, f"I12: {command} got no answer"
        assert (record.command, record.at) == (command, self.clock.t), f"I12: {command} answered by {record}"
        assert record.reason != "not answered", f"I12: the decision gave {command} no answer"
        event(f"command {command.value} {'applied' if record.applied else 'rejected'}")

    # -- invariants after every step ------------------------------------------------------------------

    @invariant()
    def never_both_zero(self) -> None:
        assert (self.pair.target_weight, self.pair.source_weight) != (0, 0), "I1: both weights are 0"

    @invariant()
    def the_state_stays_small(self) -> None:
        for text in self.store.texts.values():
            assert len(text.encode()) < MAX_MODEL_STATE_BYTES, "I6: the stored state grows"
        if self.runner._memory is not None:
            assert len(encode_state(self.runner._memory).encode()) < MAX_MODEL_STATE_BYTES, "I6: state grows"


RolloutMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestRolloutRules = RolloutMachine.TestCase
