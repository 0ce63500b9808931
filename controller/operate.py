"""The on-call commands: ``status`` and ``pause``/``resume``/``approve``/``abort``/``retry``/``promote``.

They read and annotate the policies' state objects as the person at the terminal (their
kubeconfig), through ``controller.adapters.operator``; nothing here knows a client library.

A command is an annotation with a fresh id; the running controller picks it up within a few
seconds (``GATEWAY_CANARY_COMMAND_POLL_SECONDS``), answers it in the state, and this side waits for
that answer. No answer within ``--wait`` means no controller is running the policy: the command is
then taken back, so that a controller started tomorrow does not act on tonight's ``promote``.
"""

from __future__ import annotations

import getpass
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from rich.console import Group, RenderableType
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from controller.core.commands import CommandRequest
from controller.core.enums import Command, Phase
from controller.core.state import CommandRecord
from controller.errors import GatewayCanaryError

__all__ = [
    "COMMAND_EXIT",
    "STATUS_EXIT",
    "DemoView",
    "Operator",
    "give_command",
    "render_list",
    "render_policy",
    "status_data",
]

#: exit codes of the commands
COMMAND_EXIT = {
    0: "the controller applied the command",
    1: "the controller rejected it (the reason is printed)",
    2: "no state object for the policy, or the cluster could not be reached",
    3: "no answer within --wait (is a controller running?): the command was taken back",
}
#: exit codes of ``status``
STATUS_EXIT = {
    0: "shown (with --watch: Promoted)",
    1: "a policy shown is RolledBack",
    2: "no such policy, or the cluster could not be reached",
    3: "--timeout passed before the policy was Promoted or RolledBack",
}

_SYMBOLS = {
    Phase.PENDING.value: ("◌", "dim"),
    Phase.PROGRESSING.value: ("▶", "cyan"),
    Phase.PAUSED.value: ("⏸", "yellow"),
    Phase.VERIFYING.value: ("◎", "cyan"),
    Phase.PROMOTED.value: ("✔", "green"),
    Phase.ROLLED_BACK.value: ("✖", "bold red"),
}
_DONE = (Phase.PROMOTED.value, Phase.ROLLED_BACK.value)


class PolicyLike(Protocol):
    """What the operator adapter returns for one policy (``controller.adapters.operator.PolicyView``)."""

    @property
    def name(self) -> str: ...

    @property
    def state_json(self) -> dict[str, Any] | None: ...

    @property
    def status(self) -> dict[str, Any] | None: ...

    @property
    def error(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class DemoView:
    """A policy shown without a cluster (the demo's in-memory store)."""

    name: str
    state_json: dict[str, Any] | None
    status: dict[str, Any] | None
    error: str | None


class Operator(Protocol):
    """The operator's side of the state objects (``controller.adapters.operator``)."""

    namespace: str

    def policies(self) -> Sequence[PolicyLike]: ...

    def policy(self, name: str) -> PolicyLike | None: ...

    def give(self, name: str, request: CommandRequest) -> None: ...

    def answer(self, name: str, ident: str) -> CommandRecord | None: ...

    def take_back(self, name: str, ident: str) -> CommandRecord | None: ...


# --- status ---------------------------------------------------------------------------------------


def status_data(view: PolicyLike) -> dict[str, Any]:
    """One policy for ``-o json|yaml``: the stored state as it is (it decodes back to the state) and
    the controller's status."""
    return {"name": view.name, "state": view.state_json, "status": view.status, "error": view.error}


def phase_of(view: PolicyLike) -> str:
    """The phase, from the status or else the state."""
    for source in (view.status, view.state_json):
        if source and isinstance(source.get("phase"), str):
            return str(source["phase"])
    return "Unknown"


def _ago(iso: str | None, now: datetime) -> str:
    if not iso:
        return "-"
    try:
        seconds = (now - datetime.fromisoformat(iso)).total_seconds()
    except (TypeError, ValueError):
        return "-"
    return _duration(max(0.0, seconds))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _phase_text(phase: str) -> Text:
    symbol, style = _SYMBOLS.get(phase, ("?", ""))
    return Text(f"{symbol} {phase}", style=style)


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_list(views: Sequence[PolicyLike], now: datetime) -> RenderableType:
    """Every policy in one table: NAME PHASE STEP WEIGHT LAST-CHECK AGE."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NAME", "PHASE", "STEP", "WEIGHT", "LAST-CHECK", "WAITING", "AGE"):
        table.add_column(column)
    for view in views:
        status = view.status or {}
        state = view.state_json or {}
        step = status.get("step") or {}
        check = status.get("lastCheck") or {}
        weights = status.get("weights") or {"target": state.get("target_weight"), "source": state.get("source_weight")}
        last = f"{check.get('verdict', '-')} {_ago(check.get('at'), now)} ago" if check else "-"
        table.add_row(
            view.name,
            _phase_text(phase_of(view)),
            f"{step.get('index', '?')}/{step.get('count', '?')}" if step else "-",
            f"{weights.get('target')}/{_number(weights.get('source'))}",
            last,
            str((status.get("waiting") or {}).get("kind", "-")),
            _ago(state.get("changed_at"), now),
        )
    return table


def render_policy(view: PolicyLike, now: datetime) -> RenderableType:
    """One policy: a header, the last check's gates next to their thresholds and baselines, the
    counts, the last command and the last transitions."""
    status = view.status or {}
    state = view.state_json or {}
    parts: list[RenderableType] = []
    header = Text()
    header.append(view.name, style="bold")
    header.append("  ")
    header.append_text(_phase_text(phase_of(view)))
    step = status.get("step") or {}
    if step:
        header.append(f"  step {step.get('index')}/{step.get('count')}")
    weights = status.get("weights") or {"target": state.get("target_weight"), "source": state.get("source_weight")}
    header.append(f"  weights target={weights.get('target')} source={_number(weights.get('source'))}")
    parts.append(header)
    if view.error:
        parts.append(Text(f"  state unreadable: {view.error}", style="red"))
    parts.append(Text(f"  reason: {status.get('reason') or state.get('reason', '-')}"))
    waiting = status.get("waiting") or {}
    line = f"  at this step {_ago(status.get('stepStartedAt') or state.get('step_started_at'), now)}"
    upcoming = status.get("next")
    if upcoming:
        if upcoming.get("needs"):
            line += f" · next: {upcoming['weight']} after `{upcoming['needs']}`"
        elif upcoming.get("earliest"):
            eta = _until(upcoming["earliest"], now)
            line += f" · next: {upcoming['weight']} in {eta} at the earliest"
    if waiting:
        line += f" · waiting: {waiting.get('kind')}"
    parts.append(Text(line))
    if waiting.get("kind") not in (None, "nothing") and waiting.get("reason") != status.get("reason"):
        parts.append(Text(f"  waiting for: {waiting.get('reason')}"))
    parts += _details(status, state, now)
    return Group(*parts)


def _details(status: dict[str, Any], state: dict[str, Any], now: datetime) -> list[RenderableType]:
    """Approvals, bake, the last check's gates, the counts, the last command, the history."""
    parts: list[RenderableType] = []
    approvals = status.get("approvals") or {}
    if approvals.get("at"):
        parts.append(Text(f"  approvals at {approvals['at']}, approved {approvals.get('approved', [])}"))
    bake = status.get("bake") or {}
    if bake:
        parts.append(Text(f"  bake: {_duration(bake.get('covered', 0))} of {_duration(bake.get('needed', 0))} covered"))
    check = status.get("lastCheck")
    if check:
        parts.append(Text(f"  last check {_ago(check.get('at'), now)} ago: {check.get('verdict')}", style="bold"))
        parts.append(_gates_table(check.get("gates") or []))
    counts = status.get("counts") or {}
    if counts:
        inconclusive = ", ".join(
            f"{cause} {value.get('count')}/{value.get('limit')}"
            for cause, value in (counts.get("inconclusive") or {}).items()
        )
        parts.append(
            Text(
                f"  consecutive failures {counts.get('failures')}/{counts.get('failureThreshold')}"
                + (f"; inconclusive {inconclusive}" if inconclusive else "")
            )
        )
    command = state.get("last_command")
    if command:
        verdict = "applied" if command.get("applied") else "rejected"
        parts.append(
            Text(
                f"  last command: {command.get('command')} by {command.get('by')} "
                f"{_ago(command.get('at'), now)} ago: {verdict}: {command.get('reason')}"
            )
        )
    history = state.get("history") or []
    if history:
        parts.append(Text("  last transitions", style="bold"))
        parts.append(_history_table(history[-5:], now))
    return parts


def _until(iso: str, now: datetime) -> str:
    try:
        seconds = (datetime.fromisoformat(iso) - now).total_seconds()
    except (TypeError, ValueError):
        return "?"
    return _duration(max(0.0, seconds))


def _indented(table: Table) -> RenderableType:
    return Padding(table, (0, 0, 0, 4))


def _gates_table(gates: list[dict[str, Any]]) -> RenderableType:
    table = Table(box=None, pad_edge=False, header_style="bold", padding=(0, 2))
    for column in ("GATE", "VERDICT", "VALUE", "THRESHOLD", "BASELINE"):
        table.add_column(column)
    for gate in gates:
        verdict = str(gate.get("verdict"))
        style = {"PASS": "green", "FAIL": "bold red"}.get(verdict, "yellow")
        table.add_row(
            str(gate.get("gate")),
            Text(verdict, style=style),
            _number(gate.get("value")),
            f"{gate.get('comparator', '<=')} {_number(gate.get('threshold'))}",
            _number(gate.get("baseline")),
        )
    return _indented(table)


def _history_table(history: list[dict[str, Any]], now: datetime) -> RenderableType:
    """A line per transition, cut at the terminal's edge (the full reason is in the state and Events)."""
    by_width = min(24, max(len(str(entry.get("by"))) for entry in history))
    rows = [Text(f"    {'WHEN':<9} {'WHAT':<13} {'PHASE':<11} {'BY':<{by_width}} REASON", style="bold")]
    for entry in history:
        when = f"{_ago(entry.get('at'), now)} ago"
        line = f"    {when:<9} {entry.get('action')!s:<13} {entry.get('phase')!s:<11} {entry.get('by')!s:<{by_width}} "
        rows.append(Text(line + str(entry.get("reason")), no_wrap=True, overflow="ellipsis"))
    return Group(*rows)


def status_exit(views: Sequence[PolicyLike]) -> int:
    """1 when a policy shown is RolledBack, else 0."""
    return 1 if any(phase_of(view) == Phase.ROLLED_BACK.value for view in views) else 0


def finished(views: Sequence[PolicyLike]) -> bool:
    """Whether ``--watch`` can stop: every policy shown is Promoted or RolledBack."""
    return bool(views) and all(phase_of(view) in _DONE for view in views)


# --- commands -------------------------------------------------------------------------------------


def who(by: str | None, operator_identity: Callable[[], str | None], kubeconfig_user: str | None) -> str:
    """Who gives a command: ``--by``, else who the API server says, else the kubeconfig user, else the login."""
    if by:
        return by
    for candidate in (operator_identity(), kubeconfig_user):
        if candidate:
            return candidate
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def give_command(
    operator: Operator,
    name: str,
    command: Command,
    by: str,
    *,
    wait_seconds: float,
    say: Callable[[str], None],
    poll_seconds: float = 0.5,
) -> int:
    """Write the command, wait for the controller's answer, print it; the exit code (COMMAND_EXIT)."""
    try:
        if operator.policy(name) is None:
            say(
                f"no state object gateway-canary-{name} in namespace {operator.namespace}: no controller has run "
                "policy {name} there (wrong -n?)".replace("{name}", name)
            )
            return 2
        request = CommandRequest(command, uuid.uuid4().hex[:16], by, datetime.now(UTC))
        operator.give(name, request)
        deadline = time.monotonic() + wait_seconds
        while True:
            answer = operator.answer(name, request.id)
            if answer is not None:
                return _report(answer, name, say)
            if time.monotonic() >= deadline:
                break
            time.sleep(min(poll_seconds, max(0.0, deadline - time.monotonic())))
        # taken back unless answered meanwhile; a tick under way that answers it after this cannot
        # record it (its save fails: the controller's store refuses a withdrawn command)
        late = operator.take_back(name, request.id)
        if late is not None:
            return _report(late, name, say)
    except GatewayCanaryError as exc:
        say(f"{command.value} {name}: {exc}")
        return 2
    say(
        f"{command.value} {name}: no answer from a controller within {wait_seconds:g}s; the command was taken "
        f"back. Is gateway-canary running with policy {name} and GATEWAY_CANARY_NAMESPACE={operator.namespace}? "
        "(kubectl get pods -A -l app.kubernetes.io/name=gateway-canary)"
    )
    return 3


def _report(answer: CommandRecord, name: str, say: Callable[[str], None]) -> int:
    verdict = "applied" if answer.applied else "rejected"
    say(f"{answer.command.value} {name}: {verdict}: {answer.reason}")
    return 0 if answer.applied else 1
