"""The benchmarks in bench/ at their smallest size: each runs and produces every figure it reports.

Never timings: a CI machine's speed is not the code's; the figures themselves are read by people.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# --- bench/scale.py: many policies in one controller ----------------------------------------------------

#: every figure bench/scale.py reports per run (the table's columns), each a finite number
_SCALE_FIGURES = (
    "ticks_per_s",
    "lateness_p50_s",
    "lateness_p99_s",
    "lateness_max_s",
    "check_p50_s",
    "check_p99_s",
    "tick_p50_s",
    "tick_p99_s",
    "prometheus_queries_per_s",
    "kube_reads_per_s",
    "kube_writes_per_s",
    "cpu_percent",
    "rss_mb",
    "rss_peak_mb",
)


def _scale_need_binaries() -> None:
    from tests.conftest import PROMETHEUS, TEST_BIN, _need
    from tests.kube_cluster import binary_paths

    binaries = binary_paths(TEST_BIN)
    for binary in (PROMETHEUS, str(binaries["etcd"]), str(binaries["kube-apiserver"])):
        _need(binary)


@pytest.mark.integration
def test_scale_benchmark_produces_figures(tmp_path: Path) -> None:
    """One policy, with and without shared queries: every figure present and finite, the table printed."""
    _scale_need_binaries()
    out = tmp_path / "scale.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scale.py"), "--quick", "--sizes", "1", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    runs = json.loads(out.read_text())["runs"]
    assert [(run["size"], run["share_seconds"]) for run in runs] == [(1, 0.0), (1, 1.0)]
    for run in runs:
        assert run["warmed_up"], run
        for name in _SCALE_FIGURES:
            value = run.get(name)
            assert isinstance(value, int | float) and math.isfinite(value), f"{name}: {value!r}"
    assert "late p99" in done.stdout and "kube w/s" in done.stdout  # the table


# --- bench/footprint.py: what one `gateway-canary run` costs ----------------------------------------------

#: every number bench/footprint.py reports, each finite (with Prometheus or without: both are figures)
_FOOTPRINT_FIGURES = (
    "import_ms",
    "import_modules",
    "ready_median_s",
    "ready_rss_mib",
    "idle_rss_mib",
    "idle_rss_anon_mib",
    "idle_rss_file_mib",
    "peak_rss_mib",
    "wheel_kib",
    "installed_mib",
    "base_image_mib",
    "image_estimate_mib",
)


def _footprint_need_binaries() -> None:
    """The control plane is needed; Prometheus is not (the benchmark then gives an unreachable URL)."""
    from tests.conftest import TEST_BIN, _need
    from tests.kube_cluster import binary_paths

    binaries = binary_paths(TEST_BIN)
    for name in ("etcd", "kube-apiserver"):
        _need(str(binaries[name]))


def _footprint_finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


@pytest.mark.integration
def test_footprint_benchmark_produces_figures(tmp_path: Path) -> None:
    """The smallest size: every figure present and finite, the top lists filled, the report printed."""
    _footprint_need_binaries()
    out = tmp_path / "footprint.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "footprint.py"), "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    figures = json.loads(out.read_text())
    for name in _FOOTPRINT_FIGURES:
        assert _footprint_finite(figures.get(name)), f"{name}: {figures.get(name)!r}"
    assert len(figures["ready_s"]) == 2 and all(_footprint_finite(s) for s in figures["ready_s"])
    assert figures["idle_checks"] >= 1  # idle RSS was read after checks, not at import only
    for top in ("import_top_cumulative", "import_top_packages", "installed_top"):
        assert figures[top] and all(isinstance(name, str) and _footprint_finite(v) for name, v in figures[top]), top
    assert any(name.startswith("controller") for name, _ in figures["import_top_cumulative"])  # the run path's
    for line in ("import time of the run path", "start -> ready", "idle RSS", "wheel:", "image estimate:"):
        assert line in done.stdout, line


# --- bench/rollback.py: rollback latency against the floor --------------------------------------------

#: every figure bench/rollback.py reports per row (scenario x failureThreshold), each as p50 and p95
_ROLLBACK_FIGURES = (
    "a_floor_s",
    "b_zero_s",
    "b_minus_a_s",
    "b_over_a",
    "c_minus_b_s",
    "webhook_minus_b_s",
    "floor_after_scrape_s",
    "scrape_to_check_s",
    "wait_for_check_s",
    "rollback_check_s",
    "check_end_to_b_s",
)
#: what each injection measured, from the injection (the raw samples)
_ROLLBACK_SAMPLE_TIMES = (
    "floor_s",
    "crossing_scrape_s",
    "zero_s",
    "alertmanager_s",
    "webhook_s",
    "first_fail_check_start_s",
    "rollback_check_end_s",
)


def _rollback_need_binaries() -> None:
    from tests.conftest import ALERTMANAGER, PROMETHEUS, TEST_BIN, _need
    from tests.kube_cluster import binary_paths

    binaries = binary_paths(TEST_BIN)
    for binary in (PROMETHEUS, ALERTMANAGER, str(binaries["etcd"]), str(binaries["kube-apiserver"])):
        _need(binary)


def _rollback_finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.integration
def test_rollback_benchmark_produces_figures(tmp_path: Path) -> None:
    """The smallest size (one scenario, failureThreshold 1, two injections): every figure present and
    finite for each injection and in the row, the table and the targets printed. No timing is judged."""
    _rollback_need_binaries()
    out = tmp_path / "rollback.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "rollback.py"), "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    report = json.loads(out.read_text())
    config = report["config"]
    assert (config["scenarios"], config["thresholds"], config["injections"]) == (["5xx-0to100"], [1], 2)
    samples = report["samples"]
    assert len(samples) == 2
    for sample in samples:
        assert sample["error"] is None, sample
        for name in _ROLLBACK_SAMPLE_TIMES:
            assert _rollback_finite(sample[name]), f"{name}: {sample[name]!r}"
        assert sample["floor_value"] > 0.05  # the floor is the gate's limit crossed
        assert sample["floor_trace"]  # the poller's answers, kept
    (row,) = report["summary"]
    assert (row["scenario"], row["threshold"], row["asked"], row["n"]) == ("5xx-0to100", 1, 2, 2)
    for name in _ROLLBACK_FIGURES:
        figure = row["figures"][name]
        assert figure["n"] == 2, (name, figure)
        assert _rollback_finite(figure["p50"]) and _rollback_finite(figure["p95"]), (name, figure)
    assert len(report["targets"]) == 3 and all(isinstance(t["met"], bool) for t in report["targets"])
    for text in ("(b-a) s", "(c-b) ms", "where (b - a) goes", "targets at failureThreshold 1", "wall time"):
        assert text in done.stdout, text
    assert "5xx-0to100    1    2/2" in done.stdout  # the row
