"""Operator commands as they travel: an annotation on the policy's state object.

Why there (and not on a gateway Service, or in the policy file): any change of a Service's
annotations makes the cloud controller reconcile the load balancer; a policy file is owned by
GitOps, which would revert an edit of it. The state object belongs to the controller, so a
command written there is read on the next tick (the service looks for new ones every few seconds
and runs that tick at once), answered in the state (``RolloutState.last_command``, which the CLI
waits for) and removed by the save that records the answer.

The value is JSON written by the CLI, or a bare command word for people without it::

    gateway-canary.io/command: '{"command": "pause", "id": "3f0c…", "by": "alice", "at": "2026-11-29T03:00:00Z"}'
    gateway-canary.io/command: pause                  # kubectl annotate; the id is the object's version
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime

from controller.core.enums import Command
from controller.core.state import RolloutState

__all__ = [
    "COMMAND_ANNOTATION",
    "CommandRequest",
    "CommandUnreadable",
    "answered",
    "encode_command",
    "parse_command",
    "read_command",
]

COMMAND_ANNOTATION = "gateway-canary.io/command"
_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_MAX_CHARS = 2048


@dataclass(frozen=True, slots=True)
class CommandRequest:
    """One command: ``id`` makes it answerable once, ``by`` is who gave it."""

    command: Command
    id: str
    by: str
    at: datetime | None = None


class CommandUnreadable(ValueError):
    """The annotation holds something that is not a command; the message says what is allowed."""


_ALLOWED = ", ".join(command.value for command in Command)


def parse_command(text: str, fallback_id: str) -> CommandRequest:
    """Read the annotation's value; ``fallback_id`` (the object's version) names a bare word.

    Raises CommandUnreadable with what is allowed; the controller answers it as rejected.
    """
    text = text.strip()
    if len(text) > _MAX_CHARS:
        raise CommandUnreadable(f"the command annotation is longer than {_MAX_CHARS} characters")
    if not text.startswith("{"):
        word = text.lower()
        if word not in {command.value for command in Command}:
            raise CommandUnreadable(f"{text[:40]!r} is not a command; allowed: {_ALLOWED}")
        return CommandRequest(Command(word), fallback_id, "kubectl annotate")
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CommandUnreadable(f"the command annotation is not JSON: {exc.msg}") from exc
    if not isinstance(payload, dict):
        raise CommandUnreadable("the command annotation is not a JSON object")
    name = payload.get("command")
    if name not in {command.value for command in Command}:
        raise CommandUnreadable(f"{str(name)[:40]!r} is not a command; allowed: {_ALLOWED}")
    ident = payload.get("id", fallback_id)
    if not isinstance(ident, str) or not _ID.match(ident):
        raise CommandUnreadable("the command id must be 1-128 letters, digits, '.', '_', ':' or '-'")
    by = payload.get("by", "unknown")
    if not isinstance(by, str) or any(ord(ch) < 32 for ch in by):
        raise CommandUnreadable("'by' must be a name on one line")
    at = None
    if isinstance(payload.get("at"), str):
        try:
            at = datetime.fromisoformat(payload["at"].replace("Z", "+00:00"))
        except ValueError as exc:
            raise CommandUnreadable(f"'at' is not an ISO time: {exc}") from exc
    return CommandRequest(Command(name), ident, by[:128] or "unknown", at)


def encode_command(request: CommandRequest) -> str:
    """The annotation value the CLI writes."""
    payload: dict[str, str] = {"command": request.command.value, "id": request.id, "by": request.by}
    if request.at is not None:
        payload["at"] = request.at.isoformat()
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))


def read_command(text: str | None, version: str) -> tuple[CommandRequest | None, str | None]:
    """The command in an annotation value (None: there is none), or why it cannot be read.

    A bare word is named by the object's ``version``: the next one written is a new command.
    """
    if text is None:
        return None, None
    try:
        return parse_command(text, f"v{version}"), None
    except CommandUnreadable as exc:
        return None, str(exc)


def answered(state: RolloutState, command: CommandRequest | None) -> bool:
    """Whether ``state`` records the answer to ``command`` (its annotation can go)."""
    return command is not None and state.last_command is not None and state.last_command.id == command.id
