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
    assert "injecting 12% 5xx" in out
    assert "[CRITICAL] demo-shop: ASM gateway rolled back to weight 0" in out
    assert "gate errorRate:" in out and "PromQL:" in out
