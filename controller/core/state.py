"""The rollout state a controller persists between checks and across restarts.

Stored as JSON in an annotation on the target Service, written in the same merge patch as the
target's weight, so that the weight and the record of why it is there can never disagree.
Only fields that matter for decisions are stored, and a write is skipped when the encoding is
unchanged: a healthy bake produces no API writes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Any

from controller.core.enums import InconclusiveCause, Phase, Verdict

__all__ = ["STATE_VERSION", "RolloutState", "decode_state", "encode_state"]

STATE_VERSION = 1


@dataclass(frozen=True, slots=True)
class RolloutState:
    """Where one policy's rollout stands.

    ``target_weight``/``source_weight`` are the values this controller last wrote (or adopted);
    a difference from the Service annotations means someone else changed them.
    """

    policy: str
    fingerprint: str
    phase: Phase
    reason: str
    target_weight: int
    source_weight: int | None
    changed_at: datetime
    step_started_at: datetime | None = None
    first_pass_at: datetime | None = None
    consecutive_failures: int = 0
    consecutive_inconclusive: int = 0
    inconclusive_cause: InconclusiveCause | None = None
    stuck_reported: bool = False
    last_verdict: Verdict | None = None
    last_failed_gate: str | None = None
    #: the source weight before this controller's last change of it, until the change is seen
    #: on the Service: tells our own unfinished write apart from someone else's edit
    source_weight_before: int | None = None

    def evolve(self, **changes: Any) -> RolloutState:
        """A copy with some fields changed (dataclasses.replace, typed as ours)."""
        return replace(self, **changes)


def encode_state(state: RolloutState) -> str:
    """Compact JSON for the annotation, stable so that unchanged state encodes identically."""
    raw = asdict(state)
    payload: dict[str, Any] = {"v": STATE_VERSION}
    for key, value in raw.items():
        if isinstance(value, datetime):
            payload[key] = value.isoformat()
        elif isinstance(value, Phase | Verdict | InconclusiveCause):
            payload[key] = value.value
        else:
            payload[key] = value
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))


def _datetime(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(str(value))


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def decode_state(text: str) -> RolloutState:
    """Parse an annotation written by ``encode_state``.

    Raises ValueError naming what is wrong; the caller decides how to continue safely.
    """
    try:
        payload = json.loads(text)
        if not isinstance(payload, dict):
            raise ValueError("state is not a JSON object")
        if payload.get("v") != STATE_VERSION:
            raise ValueError(f"state version {payload.get('v')!r} is not {STATE_VERSION}")
        changed_at = _datetime(payload["changed_at"])
        assert changed_at is not None
        cause = payload.get("inconclusive_cause")
        verdict = payload.get("last_verdict")
        return RolloutState(
            policy=str(payload["policy"]),
            fingerprint=str(payload["fingerprint"]),
            phase=Phase(payload["phase"]),
            reason=str(payload["reason"]),
            target_weight=int(payload["target_weight"]),
            source_weight=_optional_int(payload.get("source_weight")),
            changed_at=changed_at,
            step_started_at=_datetime(payload.get("step_started_at")),
            first_pass_at=_datetime(payload.get("first_pass_at")),
            consecutive_failures=int(payload.get("consecutive_failures", 0)),
            consecutive_inconclusive=int(payload.get("consecutive_inconclusive", 0)),
            inconclusive_cause=None if cause is None else InconclusiveCause(cause),
            stuck_reported=bool(payload.get("stuck_reported", False)),
            last_verdict=None if verdict is None else Verdict(verdict),
            last_failed_gate=payload.get("last_failed_gate"),
            source_weight_before=_optional_int(payload.get("source_weight_before")),
        )
    except (KeyError, TypeError, AssertionError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable rollout state: {exc}") from exc
