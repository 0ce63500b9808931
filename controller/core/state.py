"""The rollout state a controller persists between checks and across restarts.

Since version 2 it lives in an object of its own (a ConfigMap per policy, see
``controller.adapters.kubernetes``), never on the gateway Services: the cloud controller reconciles
the load balancer on every annotation change of a Service, so the Services receive weight changes
and nothing else. Version 1 lived in the annotation ``gateway-canary.io/state`` on the target
Service; ``decode_state`` still reads it and migrates it (``migrate_v1``).

The state carries the write-ahead record of a weight change (``pending``, an ``Intent``): it is
persisted before the Services are patched and cleared once both show it (the protocol is described
in ``controller.runtime.reconciler``).

Decoding is strict, because what is stored can be wrong: a hand edit, a newer controller, a
truncated write. Bad JSON, ``Infinity``/``NaN``, naive timestamps, unknown fields, weights outside
0..100, oversized text or an unknown version all raise ``StateUnreadable`` with the reason; the
decision then holds at the observed weights (rule R5) instead of guessing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from controller.core.enums import Command, GatewayRole, InconclusiveCause, Phase, Verdict
from controller.core.schedule import Weights
from controller.core.sequential import MAX_TARGETS, Evidence, Increment, Reading
from controller.core.text import MAX_REASON_CHARS, bounded

__all__ = [
    "MAX_HISTORY",
    "MAX_REASON_CHARS",
    "MAX_STATE_BYTES",
    "STATE_VERSION",
    "CommandRecord",
    "Intent",
    "RolloutState",
    "StateUnreadable",
    "Transition",
    "decode_state",
    "encode_state",
]

STATE_VERSION = 2
#: A stored state larger than this is not read (a valid one is about 1 KiB; 2-5 KiB with sequential
#: gates, whose evidence keeps one reading per scrape target: at most 128 per gateway and gate).
MAX_STATE_BYTES = 128 * 1024


#: transitions kept in the state's history (the newest last)
MAX_HISTORY = 10
#: a transition's reason in the history is cut to this (the full text is in the Event and logs)
HISTORY_REASON_CHARS = 300


class StateUnreadable(ValueError):
    """The stored state cannot be trusted; the message says why."""


@dataclass(frozen=True, slots=True)
class Intent:
    """A weight change decided and recorded before it is written: the write-ahead record.

    ``source`` None means the change does not write the source (target-only mode).
    ``from_target``/``from_source`` are what the Services showed when it was decided (None: no
    annotation), so a half-written change is told apart from someone else's edit.
    """

    target: int
    source: int | None
    from_target: int | None
    from_source: int | None
    rollback: bool = False

    @property
    def weights(self) -> Weights:
        """The pair this intent writes."""
        return Weights(self.target, self.source)


@dataclass(frozen=True, slots=True)
class Transition:
    """One entry of the history ``status`` shows: what happened, who made it happen, when."""

    at: datetime
    action: str
    phase: Phase
    by: str
    reason: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", bounded(self.reason, HISTORY_REASON_CHARS))
        object.__setattr__(self, "by", bounded(self.by, 128))


@dataclass(frozen=True, slots=True)
class CommandRecord:
    """The last operator command this controller answered: the CLI waits for its ``id`` here."""

    id: str
    command: Command
    by: str
    at: datetime
    applied: bool
    reason: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", bounded(self.reason))
        object.__setattr__(self, "by", bounded(self.by, 128))
        object.__setattr__(self, "id", bounded(self.id, 128))


@dataclass(frozen=True, slots=True)
class RolloutState:
    """Where one policy's rollout stands.

    ``target_weight``/``source_weight`` are the values this controller last wrote (or adopted);
    a difference from the Services means someone else changed them, unless ``pending`` explains it.
    Bake coverage (rule R4): ``baked_seconds`` is what closed runs of passing checks covered at
    this step, ``run_started_at`` the first pass of the current run, ``last_pass_at`` its latest.
    ``last_pass_at`` is deliberately NOT stored: it changes on every check, and a healthy bake must
    write nothing. A restarted controller therefore closes the open run without counting it
    (conservative: the bake runs a little longer, never shorter).
    ``inconclusive`` counts inconclusive checks since the last pass, per cause (rule R6).
    ``refusal`` is the refusal last reported, so each is reported once (rule R3).
    """

    policy: str
    fingerprint: str
    phase: Phase
    reason: str
    target_weight: int
    source_weight: int | None
    changed_at: datetime
    step_started_at: datetime | None = None
    baked_seconds: float = 0.0
    run_started_at: datetime | None = None
    last_pass_at: datetime | None = None
    consecutive_failures: int = 0
    inconclusive: tuple[tuple[InconclusiveCause, int], ...] = ()
    stuck_reported: tuple[InconclusiveCause, ...] = ()
    last_verdict: Verdict | None = None
    last_failed_gate: str | None = None
    pending: Intent | None = None
    refusal: str | None = None
    #: when the last weight write finished, and which sides it changed: the cloud's confirmation
    #: is judged from it (R8); a side whose value did not change gets no new Event
    written_at: datetime | None = None
    written_roles: tuple[GatewayRole, ...] = ()
    #: when the cloud was seen to confirm that write (once is enough: its Events expire after an
    #: hour, and a later unrelated failure does not unmake an applied weight)
    confirmed_at: datetime | None = None
    #: why the cloud has not applied the last write, as reported (once) to people
    cloud_refusal: str | None = None
    #: ``approvalAt`` weights an operator approved in this rollout (cleared by a retry)
    approved: tuple[int, ...] = ()
    #: the ``approvalAt`` weight the rollout waits at (said once, when the wait starts)
    awaiting: int | None = None
    #: the last transitions, newest last (``status`` shows them)
    history: tuple[Transition, ...] = ()
    #: the last operator command answered
    last_command: CommandRecord | None = None
    #: while verifying at 100 (R10): the weights the Services showed before the promotion write, the
    #: split judged healthy against the old gateway, where a failed verification steps back to
    verifying_from: tuple[int, int | None] | None = None
    #: the last weights this rollout wrote were a rollback or a step back (the cloud not applying
    #: them pages: the ASM gateway may still carry traffic it should not)
    rolled_back_last: bool = False
    #: the sequential gates' evidence in this step (``controller.core.sequential``). Saved with
    #: whatever else is saved, never a reason to save: a restart continues from the saved readings
    #: (the time since becomes one longer interval, counted once)
    evidence: tuple[Evidence, ...] = ()

    def __post_init__(self) -> None:
        # Persisted free text is bounded wherever it came from (a Prometheus error body, a policy).
        object.__setattr__(self, "reason", bounded(self.reason))
        if self.refusal is not None:
            object.__setattr__(self, "refusal", bounded(self.refusal))
        if self.cloud_refusal is not None:
            object.__setattr__(self, "cloud_refusal", bounded(self.cloud_refusal))

    def evolve(self, **changes: Any) -> RolloutState:
        """A copy with some fields changed (dataclasses.replace, typed as ours)."""
        return replace(self, **changes)

    @property
    def open_run_seconds(self) -> float:
        """What the current run of passing checks covers so far."""
        if self.run_started_at is None or self.last_pass_at is None:
            return 0.0
        return max(0.0, (self.last_pass_at - self.run_started_at).total_seconds())

    @property
    def covered_seconds(self) -> float:
        """Bake time covered by passing checks at this step."""
        return self.baked_seconds + self.open_run_seconds

    def inconclusive_count(self, cause: InconclusiveCause) -> int:
        """Inconclusive checks of ``cause`` since the last pass."""
        return dict(self.inconclusive).get(cause, 0)

    def count_inconclusive(self, cause: InconclusiveCause) -> RolloutState:
        """One more inconclusive check of ``cause``; the other causes' counts are kept apart."""
        counts = dict(self.inconclusive)
        counts[cause] = counts.get(cause, 0) + 1
        return self.evolve(inconclusive=tuple(sorted(counts.items())))


# --- the stored form ----------------------------------------------------------------------------

_Weight = Annotated[int, Field(ge=0, le=100)]
_Text = Annotated[str, Field(max_length=MAX_REASON_CHARS)]
_Name = Annotated[str, Field(min_length=1, max_length=253)]
_Count = Annotated[int, Field(ge=0, le=1_000_000)]


class _Stored(BaseModel):
    """Strict: JSON types only, no coercion, unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _IntentV2(_Stored):
    target: _Weight
    source: _Weight | None
    from_target: _Weight | None
    from_source: _Weight | None
    rollback: bool


class _TransitionV2(_Stored):
    at: AwareDatetime
    action: Annotated[str, Field(max_length=64)]
    phase: Phase
    by: Annotated[str, Field(max_length=128)]
    reason: Annotated[str, Field(max_length=HISTORY_REASON_CHARS)]


class _CommandV2(_Stored):
    id: Annotated[str, Field(max_length=128)]
    command: Command
    by: Annotated[str, Field(max_length=128)]
    at: AwareDatetime
    applied: bool
    reason: _Text


class _StateV2(_Stored):
    v: Literal[2]
    policy: _Name
    fingerprint: Annotated[str, Field(max_length=64)]
    phase: Phase
    reason: _Text
    target_weight: _Weight
    source_weight: _Weight | None
    changed_at: AwareDatetime
    step_started_at: AwareDatetime | None
    baked_seconds: Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False)]
    run_started_at: AwareDatetime | None
    consecutive_failures: _Count
    inconclusive: dict[InconclusiveCause, _Count]
    stuck_reported: list[InconclusiveCause]
    last_verdict: Verdict | None
    last_failed_gate: Annotated[str, Field(max_length=128)] | None
    pending: _IntentV2 | None
    refusal: _Text | None
    written_at: AwareDatetime | None = None  # added in 0.3; absent in older version-2 states
    written_roles: list[GatewayRole] = []
    confirmed_at: AwareDatetime | None = None
    cloud_refusal: _Text | None = None
    approved: list[_Weight] = []  # added in 0.4
    awaiting: _Weight | None = None
    history: Annotated[list[_TransitionV2], Field(max_length=MAX_HISTORY)] = []
    last_command: _CommandV2 | None = None
    verifying_from: tuple[_Weight, _Weight | None] | None = None
    rolled_back_last: bool = False
    evidence: Annotated[list[_EvidenceV2], Field(max_length=4)] = []  # added in 0.7


_Float = Annotated[float, Field(allow_inf_nan=False, ge=-1e15, le=1e15)]
_Counter = Annotated[float, Field(allow_inf_nan=False, ge=0, le=1e18)]


_Seconds = Annotated[float, Field(allow_inf_nan=False, ge=0, le=1e11)]
_Checks = Annotated[int, Field(ge=0, le=10**12)]
#: one scrape target's last reading: instance, sample time, requests, bad requests
_Target = tuple[Annotated[str, Field(max_length=253)], _Seconds | None, _Counter, _Counter]


class _EvidenceV2(_Stored):
    gate: Annotated[str, Field(max_length=64)]
    step: Annotated[str, Field(max_length=256)]
    target: Annotated[list[_Target], Field(max_length=MAX_TARGETS)] | None
    source: Annotated[list[_Target], Field(max_length=MAX_TARGETS)] | None
    log_detector: Annotated[list[_Float], Field(max_length=64)]
    log_lik: Annotated[list[_Float], Field(max_length=64)]
    totals: tuple[_Counter, _Counter, _Counter, _Counter]
    intervals: _Checks
    changes: _Checks
    recent: tuple[_Counter, _Counter, _Counter, _Counter]
    lowest: _Float
    confirming: _Seconds | None
    quiet: bool
    waited: _Checks = 0
    rejected: bool


class _StateV1(_Stored):
    """What gateway-canary 0.1 kept in the ``gateway-canary.io/state`` annotation."""

    v: Literal[1]
    policy: _Name
    fingerprint: Annotated[str, Field(max_length=64)]
    phase: Phase
    reason: Annotated[str, Field(max_length=64 * 1024)]
    target_weight: _Weight
    source_weight: _Weight | None
    changed_at: AwareDatetime
    step_started_at: AwareDatetime | None = None
    first_pass_at: AwareDatetime | None = None
    consecutive_failures: _Count = 0
    consecutive_inconclusive: _Count = 0
    inconclusive_cause: InconclusiveCause | None = None
    stuck_reported: bool = False
    last_verdict: Verdict | None = None
    last_failed_gate: Annotated[str, Field(max_length=128)] | None = None
    source_weight_before: _Weight | None = None


def encode_state(state: RolloutState, *, evidence: bool = True) -> str:
    """Compact JSON, stable so that an unchanged state encodes identically (and is not rewritten).

    ``evidence=False`` leaves the sequential gates' evidence out: what decides whether a state
    changed (it moves on every check and is saved only along with something else).
    """
    pending = state.pending
    payload: dict[str, Any] = {
        "v": STATE_VERSION,
        "policy": state.policy,
        "fingerprint": state.fingerprint,
        "phase": state.phase.value,
        "reason": state.reason,
        "target_weight": state.target_weight,
        "source_weight": state.source_weight,
        "changed_at": state.changed_at.isoformat(),
        "step_started_at": _iso(state.step_started_at),
        "baked_seconds": round(state.baked_seconds, 3),
        "run_started_at": _iso(state.run_started_at),
        "consecutive_failures": state.consecutive_failures,
        "inconclusive": {cause.value: count for cause, count in state.inconclusive},
        "stuck_reported": [cause.value for cause in state.stuck_reported],
        "last_verdict": None if state.last_verdict is None else state.last_verdict.value,
        "last_failed_gate": state.last_failed_gate,
        "pending": None
        if pending is None
        else {
            "target": pending.target,
            "source": pending.source,
            "from_target": pending.from_target,
            "from_source": pending.from_source,
            "rollback": pending.rollback,
        },
        "refusal": state.refusal,
        "written_at": _iso(state.written_at),
        "written_roles": [role.value for role in state.written_roles],
        "confirmed_at": _iso(state.confirmed_at),
        "cloud_refusal": state.cloud_refusal,
        "approved": list(state.approved),
        "awaiting": state.awaiting,
        "history": [
            {"at": t.at.isoformat(), "action": t.action, "phase": t.phase.value, "by": t.by, "reason": t.reason}
            for t in state.history[-MAX_HISTORY:]
        ],
        "last_command": None if state.last_command is None else _command_json(state.last_command),
        "verifying_from": None if state.verifying_from is None else list(state.verifying_from),
        "rolled_back_last": state.rolled_back_last,
    }
    if evidence and state.evidence:
        payload["evidence"] = [_evidence_json(item) for item in state.evidence]
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _evidence_json(item: Evidence) -> dict[str, Any]:
    def targets(readings: tuple[Reading, ...] | None) -> list[list[Any]] | None:
        if readings is None:
            return None
        return [[r.instance, None if r.time is None else round(r.time, 3), r.requests, r.events] for r in readings]

    def counts(value: Increment) -> list[float]:
        return [value.target_requests, value.target_events, value.source_requests, value.source_events]

    return {
        "gate": item.gate,
        "step": item.step,
        "target": targets(item.target),
        "source": targets(item.source),
        # sums of log likelihood ratios: 9 decimals keep a restarted statistic within 1e-6 of the running one
        "log_detector": [round(value, 9) for value in item.log_detector],
        "log_lik": [round(value, 9) for value in item.log_lik],
        "totals": counts(item.totals),
        "intervals": item.intervals,
        "changes": item.changes,
        "recent": counts(item.recent),
        "lowest": round(item.lowest, 9),
        "confirming": item.confirming,
        "quiet": item.quiet,
        "waited": item.waited,
        "rejected": item.rejected,
    }


def _evidence_from(stored: _EvidenceV2) -> Evidence:
    def targets(value: list[tuple[str, float | None, float, float]] | None) -> tuple[Reading, ...] | None:
        if value is None:
            return None
        return tuple(Reading(requests, events, at, instance) for instance, at, requests, events in value)

    return Evidence(
        gate=stored.gate,
        step=stored.step,
        target=targets(stored.target),
        source=targets(stored.source),
        log_detector=tuple(stored.log_detector),
        log_lik=tuple(stored.log_lik),
        totals=Increment(*stored.totals),
        intervals=stored.intervals,
        changes=stored.changes,
        recent=Increment(*stored.recent),
        lowest=stored.lowest,
        confirming=stored.confirming,
        quiet=stored.quiet,
        waited=stored.waited,
        rejected=stored.rejected,
    )


def _command_json(record: CommandRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "command": record.command.value,
        "by": record.by,
        "at": record.at.isoformat(),
        "applied": record.applied,
        "reason": record.reason,
    }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _reject_constant(name: str) -> Any:
    raise StateUnreadable(f"{name} is not a valid value in a stored state")


def decode_state(text: str) -> RolloutState:
    """Parse a stored state of any known version (older ones are migrated).

    Raises StateUnreadable naming what is wrong; the caller decides how to continue safely.
    """
    if len(text.encode("utf-8", "replace")) > MAX_STATE_BYTES:
        raise StateUnreadable(f"stored state is larger than {MAX_STATE_BYTES} bytes")
    try:
        payload = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise StateUnreadable(f"stored state is not JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise StateUnreadable("stored state is not a JSON object")
    version = payload.get("v")
    try:
        if version == STATE_VERSION:
            return _from_v2(_StateV2.model_validate_json(text))
        if version == 1:
            return migrate_v1(_StateV1.model_validate_json(text))
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "state"
        raise StateUnreadable(f"stored state is invalid at {where}: {first['msg']}") from exc
    if isinstance(version, int) and not isinstance(version, bool) and version > STATE_VERSION:
        raise StateUnreadable(
            f"stored state has version {version}, newer than this controller understands ({STATE_VERSION})"
        )
    raise StateUnreadable(f"stored state has an unknown version {str(version)[:20]!r}")


def _from_v2(stored: _StateV2) -> RolloutState:
    pending = stored.pending
    return RolloutState(
        policy=stored.policy,
        fingerprint=stored.fingerprint,
        phase=stored.phase,
        reason=stored.reason,
        target_weight=stored.target_weight,
        source_weight=stored.source_weight,
        changed_at=stored.changed_at,
        step_started_at=stored.step_started_at,
        baked_seconds=stored.baked_seconds,
        run_started_at=stored.run_started_at,
        consecutive_failures=stored.consecutive_failures,
        inconclusive=tuple(sorted(stored.inconclusive.items())),
        stuck_reported=tuple(stored.stuck_reported),
        last_verdict=stored.last_verdict,
        last_failed_gate=stored.last_failed_gate,
        pending=None
        if pending is None
        else Intent(pending.target, pending.source, pending.from_target, pending.from_source, pending.rollback),
        refusal=stored.refusal,
        written_at=stored.written_at,
        written_roles=tuple(stored.written_roles),
        confirmed_at=stored.confirmed_at,
        cloud_refusal=stored.cloud_refusal,
        approved=tuple(sorted(set(stored.approved))),
        awaiting=stored.awaiting,
        history=tuple(Transition(t.at, t.action, t.phase, t.by, t.reason) for t in stored.history),
        last_command=None
        if stored.last_command is None
        else CommandRecord(
            id=stored.last_command.id,
            command=stored.last_command.command,
            by=stored.last_command.by,
            at=stored.last_command.at,
            applied=stored.last_command.applied,
            reason=stored.last_command.reason,
        ),
        verifying_from=stored.verifying_from,
        rolled_back_last=stored.rolled_back_last,
        evidence=tuple(_evidence_from(item) for item in stored.evidence),
    )


def migrate_v1(old: _StateV1) -> RolloutState:
    """Version 1 (the annotation) -> version 2.

    The bake coverage was not recorded in version 1, so the step's bake starts again (never the
    other way round). An unfinished source write (``source_weight_before``) becomes a pending
    intent, which the next tick completes or resolves by a rollback.
    """
    pending = None
    if old.source_weight_before is not None:
        pending = Intent(
            target=old.target_weight,
            source=old.source_weight,
            from_target=old.target_weight,
            from_source=old.source_weight_before,
            rollback=old.phase is Phase.ROLLED_BACK,
        )
    inconclusive: tuple[tuple[InconclusiveCause, int], ...] = ()
    if old.inconclusive_cause is not None and old.consecutive_inconclusive:
        inconclusive = ((old.inconclusive_cause, old.consecutive_inconclusive),)
    return RolloutState(
        policy=old.policy,
        fingerprint=old.fingerprint,
        phase=old.phase,
        reason=old.reason,
        target_weight=old.target_weight,
        source_weight=old.source_weight,
        changed_at=old.changed_at,
        step_started_at=old.step_started_at,
        consecutive_failures=old.consecutive_failures,
        inconclusive=inconclusive,
        stuck_reported=(old.inconclusive_cause,) if old.stuck_reported and old.inconclusive_cause else (),
        last_verdict=old.last_verdict,
        last_failed_gate=old.last_failed_gate,
        pending=pending,
    )
