"""``gateway-canary plan``: a policy's schedule as a table (``controller.core.plan``), no cluster."""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from controller.cli import OutputFormat, emit
from controller.core.durations import format_promql_duration
from controller.core.plan import PlanRow, plan_rows
from controller.core.windows import describe, zone
from controller.policy_files import read_policies

__all__ = ["plan_main"]


def _row_data(row: PlanRow) -> dict[str, Any]:
    return {
        "step": row.step,
        "targetWeight": row.target_weight,
        "sourceWeight": row.source_weight,
        "bake": format_promql_duration(row.bake),
        "gates": list(row.gates),
        "approval": row.approval,
        "window": row.window,
        "earliest": None if row.earliest is None else row.earliest.isoformat(),
        "promotedAt": None if row.promoted_at is None else row.promoted_at.isoformat(),
    }


def _human(seconds: float) -> str:
    """'10m', '1h30m', '45s': a bake as people write it."""
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + (f"{secs}s" if secs else "")
    return text or "0s"


def _table(rows: list[PlanRow], zone: Any) -> Table:
    every = rows[0].gates if rows else ()
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("STEP", "TARGET", "SOURCE", "BAKE", "GATES", "APPROVAL", "WINDOW", "EARLIEST"):
        table.add_column(column)
    for row in rows:
        bake = _human(row.bake.total_seconds())
        if row.target_weight >= 100:
            bake = f"verify {bake}" if row.bake.total_seconds() else "-"
        gates = "all" if row.gates == every else "absolute: " + ", ".join(row.gates)
        earliest = "never (no window opens within a year)" if row.earliest is None else _when(row.earliest, zone)
        if row.approval:
            earliest += " + approval"
        if row.promoted_at is not None and row.bake.total_seconds():
            earliest += f"; Promoted {_when(row.promoted_at, zone)}"
        table.add_row(
            str(row.step),
            str(row.target_weight),
            "unchanged" if row.source_weight is None else str(row.source_weight),
            bake,
            gates,
            "approve" if row.approval else "-",
            "held" if row.window else "-",
            earliest,
        )
    return table


def _table_of(rows: list[PlanRow], zone: Any) -> Callable[[object], Table]:
    return lambda _: _table(rows, zone)


def _when(moment: datetime, zone: Any) -> str:
    return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M %Z")


def plan_main(path: str, start: str | None, output: OutputFormat, console: Console) -> int:
    """Print the plan of one policy file (exit codes: 0 printed, 1 invalid, 2 no such file)."""
    file = Path(path)
    if not file.is_file():
        print(f"{path}: no such file", file=sys.stderr)
        return 2
    policies, errors, _ = read_policies([file])
    for error in errors:
        print(error, file=sys.stderr)
    if errors or not policies:
        return 1
    try:
        begin = datetime.now(UTC) if start is None else datetime.fromisoformat(start)
    except ValueError as exc:
        print(f"--start {start!r}: {exc}", file=sys.stderr)
        return 2
    if begin.tzinfo is None:
        begin = begin.replace(tzinfo=UTC)
    for sourced in policies:
        policy = sourced.policy
        rows = plan_rows(policy, begin)
        windows = policy.spec.schedule.advance_windows
        shown_in = zone(windows.time_zone) if windows is not None else begin.tzinfo
        if output is OutputFormat.TABLE:
            console.print(f"[bold]{policy.name}[/bold]: {len(rows)} steps from {_when(begin, shown_in)}")
            console.print(f"gates (all): {', '.join(rows[0].gates)}", soft_wrap=True)
            if windows is not None:
                console.print(
                    f"raises only in: {describe(windows)}; frozen: {windows.freeze_dates or '-'}", soft_wrap=True
                )
        data = {"policy": policy.name, "start": begin.isoformat(), "steps": [_row_data(row) for row in rows]}
        emit(data, output, _table_of(rows, shown_in))
    return 0
