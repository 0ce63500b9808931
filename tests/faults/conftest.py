"""The fault suite's session: the table of runs and violations at the end, secrets scanned last."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.faults.report import LARGE, tallies, write_report

ROOT = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Scenario 7 (no secret in any log of the suite) runs after every other test."""
    last = [item for item in items if "secrets_never_logged" in item.nodeid]
    for item in last:
        items.remove(item)
    items.extend(last)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    rows = tallies()
    if not rows:
        return
    terminalreporter.write_line(f"FAULT SUITE ({'large' if LARGE else 'CI'} size): scenario | runs | violations")
    for t in rows:
        figures = ", ".join(f"{k} {v}" for k, v in t.figures.items())
        terminalreporter.write_line(
            f"  {t.number}. {t.title} | {t.runs} | {len(t.violations)}" + (f" | {figures}" if figures else "")
        )
    write_report(Path(os.environ.get("GATEWAY_CANARY_FAULTS_REPORT", ROOT / ".cache" / "faults-report.json")))
