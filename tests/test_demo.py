"""The README's first command: the embedded demo climbs, rolls back, alerts and exits 0."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_command_climbs_rolls_back_alerts_and_exits_zero() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "controller", "demo"], capture_output=True, text=True, cwd=ROOT, timeout=90
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    climbed = [line for line in out.splitlines() if line.strip().startswith("weights target=")]
    weights = [int(line.split("target=")[1].split()[0]) for line in climbed]
    assert weights[:4] == [0, 5, 10, 25] and weights[-1] == 0
    assert "breaking the ASM gateway at weight 25: 12% 5xx" in out
    # the share the weights request and the share the CLB sends over 20 nodes
    assert "weights target=5 source=95 phase=Progressing: requested 5.0%, effective 20.0%" in out
    assert "[CRITICAL] demo-shop: ASM gateway rolled back to weight 0" in out
    assert "gate errorRate:" in out and "PromQL:" in out


def test_the_missing_route_scenario_rolls_back_on_404_nr_without_any_5xx() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "controller", "demo", "--scenario", "missing-route"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "12% of its requests get 404 NR" in out
    assert "gate responsesNoRoute: 0.12 breaks <= 0.01" in out
    assert "grew most: 404 NR (destination_service_name=unknown)" in out
    assert "gate errorRate" not in out  # no 5xx: the 5xx gates saw nothing
    assert out.rstrip().endswith("rolled back to 0 after 404 NR grew on the ASM gateway, alert delivered")


def _shape(line: str) -> str:
    """A line with its numbers and spacing masked: what a run must print alike."""
    return " ".join(re.sub(r"[0-9][0-9.e+-]*", "#", line).split())


def test_the_readme_shows_the_status_a_demo_run_prints() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- status-example:start -->")[1].split("<!-- status-example:end -->")[0]
    shown = block.split("```text\n")[1].split("```")[0].splitlines()
    result = subprocess.run(
        [sys.executable, "-m", "controller", "demo"],
        capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ, "COLUMNS": "100", "NO_COLOR": "1"},
    )  # fmt: skip
    printed = result.stdout.split("$ gateway-canary status demo-shop")[1].split("\ndemo finished")[0]
    printed_shapes = {_shape(line) for line in printed.splitlines()}
    # every line of the README's example is a line the status view prints (numbers aside), and the
    # parts an operator reads are there: the header, the gates with thresholds, the history
    for line in shown[1:]:
        if line.strip() and not line.startswith(("breaks", "again", "0.")):
            assert _shape(line) in printed_shapes or _shape(line).startswith("# s ago"), line
    assert shown[1].startswith("demo-shop  ✖ RolledBack  step 0/6")
    assert any(line.split()[:5] == ["GATE", "VERDICT", "VALUE", "THRESHOLD", "BASELINE"] for line in shown)
    assert "  last transitions" in shown
