"""The fault suite's tally: per scenario, how many runs and how many violations of the promise.

Every scenario test adds its runs and violations here (``tally(...)``); the suite prints the table
at the end of the session and writes it as JSON to ``GATEWAY_CANARY_FAULTS_REPORT`` (default
``.cache/faults-report.json``), which ``scripts/faults.sh`` turns into the table of
``docs/reliability.md``. A test also *asserts* zero violations: the tally is what the figures
come from, the assertions are what fail CI.

Size: ``GATEWAY_CANARY_FAULTS=large`` (``scripts/faults.sh --large``) runs each scenario at the
size the issue names (kill -9 at 50 moments in CI already; 60 s outages; 10 000 fuzzed policies);
unset, the CI size, which fits inside the README's test command.

Every log the suite writes is registered in ``LOG_FILES`` (and every secret the suite hands the
controller in ``SECRETS``): scenario 7 reads them all at the end and finds no secret in any line.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LARGE", "LOG_FILES", "SECRETS", "Tally", "register_log", "sized", "tallies", "tally", "write_report"]

LARGE = os.environ.get("GATEWAY_CANARY_FAULTS", "").lower() == "large"

#: every log file written by a controller in the suite (scanned for secrets by scenario 7)
LOG_FILES: list[Path] = []
#: every secret handed to a controller in the suite: none may appear in any log line
SECRETS: dict[str, str] = {
    "prometheus token": "prom-token-" + secrets.token_hex(12),
    "webhook secret path": "hook-secret-" + secrets.token_hex(12),
    "slack secret path": "slack-secret-" + secrets.token_hex(12),
    "robot secret": "robot-secret-" + secrets.token_hex(12),
}

_lock = threading.Lock()


def sized(ci: int, large: int) -> int:
    """``ci`` runs in CI, ``large`` with GATEWAY_CANARY_FAULTS=large."""
    return large if LARGE else ci


@dataclass
class Tally:
    """One scenario's figures: runs, violations (each with what it was) and measured numbers."""

    number: int
    title: str
    runs: int = 0
    violations: list[str] = field(default_factory=list)
    figures: dict[str, str] = field(default_factory=dict)

    def run(self, violations: list[str] | None = None) -> None:
        """One run done, with the violations it found (none: an empty list)."""
        with _lock:
            self.runs += 1
            self.violations.extend(violations or [])

    def figure(self, name: str, value: str) -> None:
        with _lock:
            self.figures[name] = value


_TALLIES: dict[int, Tally] = {}


def tally(number: int, title: str) -> Tally:
    """The tally of scenario ``number`` (created on first use; several tests may add to one)."""
    with _lock:
        if number not in _TALLIES:
            _TALLIES[number] = Tally(number, title)
        return _TALLIES[number]


def tallies() -> list[Tally]:
    return [_TALLIES[number] for number in sorted(_TALLIES)]


def register_log(path: Path) -> Path:
    """A log file the suite wrote: scenario 7 scans it for secrets."""
    with _lock:
        LOG_FILES.append(path)
    return path


def write_report(path: Path) -> None:
    rows = [
        {
            "scenario": t.number,
            "title": t.title,
            "runs": t.runs,
            "violations": len(t.violations),
            "examples": t.violations[:5],
            "figures": t.figures,
        }
        for t in tallies()
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"size": "large" if LARGE else "ci", "scenarios": rows}, indent=2) + "\n")
