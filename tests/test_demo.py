"""The README's first command: the embedded demo climbs, rolls back, alerts and exits 0."""

from __future__ import annotations

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
