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
def _run(script: str, *args: str, timeout: float) -> str:
    """Run a benchmark at its smallest size; it must exit 0 (it exits 1 when a figure is missing).
    Its printed report is returned."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _need_binaries(*servers: str) -> None:
    """The servers a benchmark starts: "prometheus", "alertmanager", "etcd", "kube-apiserver"."""
    from tests.conftest import ALERTMANAGER, PROMETHEUS, TEST_BIN, _need
    from tests.kube_cluster import binary_paths

    binaries = {name: str(path) for name, path in binary_paths(TEST_BIN).items()}
    for server in servers:
        _need({"prometheus": PROMETHEUS, "alertmanager": ALERTMANAGER}.get(server) or binaries[server])


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


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


@pytest.mark.integration
def test_scale_benchmark_produces_figures(tmp_path: Path) -> None:
    """One policy, with and without shared queries: every figure present and finite, the table printed."""
    _need_binaries("prometheus", "etcd", "kube-apiserver")
    out = tmp_path / "scale.json"
    stdout = _run("scale.py", "--quick", "--sizes", "1", "--json", str(out), timeout=180)
    runs = json.loads(out.read_text())["runs"]
    assert [(run["size"], run["share_seconds"]) for run in runs] == [(1, 0.0), (1, 1.0)]
    for run in runs:
        assert run["warmed_up"], run
        for name in _SCALE_FIGURES:
            value = run.get(name)
            assert isinstance(value, int | float) and math.isfinite(value), f"{name}: {value!r}"
    assert "late p99" in stdout and "kube w/s" in stdout  # the table


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


@pytest.mark.integration
def test_footprint_benchmark_produces_figures(tmp_path: Path) -> None:
    """The smallest size: every figure present and finite, the top lists filled, the report printed."""
    _need_binaries("etcd", "kube-apiserver")  # no Prometheus: an unreachable URL then
    out = tmp_path / "footprint.json"
    stdout = _run("footprint.py", "--quick", "--json", str(out), timeout=180)
    figures = json.loads(out.read_text())
    for name in _FOOTPRINT_FIGURES:
        assert _finite(figures.get(name)), f"{name}: {figures.get(name)!r}"
    assert len(figures["ready_s"]) == 2 and all(_finite(s) for s in figures["ready_s"])
    assert figures["idle_checks"] >= 1  # idle RSS was read after checks, not at import only
    for top in ("import_top_cumulative", "import_top_packages", "installed_top"):
        assert figures[top] and all(isinstance(name, str) and _finite(v) for name, v in figures[top]), top
    assert any(name.startswith("controller") for name, _ in figures["import_top_cumulative"])  # the run path's
    for line in ("import time of the run path", "start -> ready", "idle RSS", "wheel:", "image estimate:"):
        assert line in stdout, line


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


@pytest.mark.integration
def test_rollback_benchmark_produces_figures(tmp_path: Path) -> None:
    """The smallest size (one scenario, failureThreshold 1, two injections): every figure present and
    finite for each injection and in the row, the table and the targets printed. No timing is judged."""
    _need_binaries("prometheus", "alertmanager", "etcd", "kube-apiserver")
    out = tmp_path / "rollback.json"
    stdout = _run("rollback.py", "--quick", "--json", str(out), timeout=240)
    report = json.loads(out.read_text())
    config = report["config"]
    assert (config["scenarios"], config["thresholds"], config["injections"]) == (["5xx-0to100"], [1], 2)
    samples = report["samples"]
    assert len(samples) == 2
    for sample in samples:
        assert sample["error"] is None, sample
        for name in _ROLLBACK_SAMPLE_TIMES:
            assert _finite(sample[name]), f"{name}: {sample[name]!r}"
        assert sample["floor_value"] > 0.05  # the floor is the gate's limit crossed
        assert sample["floor_trace"]  # the poller's answers, kept
    (row,) = report["summary"]
    assert (row["scenario"], row["threshold"], row["asked"], row["n"]) == ("5xx-0to100", 1, 2, 2)
    for name in _ROLLBACK_FIGURES:
        figure = row["figures"][name]
        assert figure["n"] == 2, (name, figure)
        assert _finite(figure["p50"]) and _finite(figure["p95"]), (name, figure)
    assert len(report["targets"]) == 3 and all(isinstance(t["met"], bool) for t in report["targets"])
    for text in ("(b-a) s", "(c-b) ms", "where (b - a) goes", "targets at failureThreshold 1", "wall time"):
        assert text in stdout, text
    assert "5xx-0to100    1    2/2" in stdout  # the row


# --- bench/sequential.py: the sequential gate against the threshold gate, simulated -------------------


def test_sequential_benchmark_produces_figures(tmp_path: Path) -> None:
    """The smoke size (pure Python, no servers): every figure present, the tables printed. No value is
    judged (tests/test_sequential_validity.py judges the gate itself)."""
    out = tmp_path / "sequential.json"
    stdout = _run("sequential.py", "--quick", "--json", str(out), timeout=120)
    report = json.loads(out.read_text())
    config = report["config"]
    false_rollbacks = report["false_rollbacks"]
    assert set(false_rollbacks["sequential"]) == {"0.01", "0.002"}  # alpha per step, and alpha / 5 steps
    for figures in (*false_rollbacks["sequential"].values(), *false_rollbacks["threshold"]):
        assert isinstance(figures["count"], int) and 0 <= figures["count"] <= config["migrations"], figures
        assert _finite(figures["rate"]) and all(_finite(bound) for bound in figures["ci"]), figures
    assert len(false_rollbacks["threshold"]) == 5 * 6 * 3  # windows x limits x failureThresholds
    assert report["best"] is None or len(report["best"]) == 3
    assert len(report["detection"]) == 9  # 3 effects x 3 ASM rates
    for row in report["detection"]:
        times = [t for by_before in row["sequential"].values() for t in by_before.values()]
        for figures in (*times, *row["threshold"].values()):
            assert figures["n"] == config["runs"] and 0 <= figures["within"] <= 1, row
        if row["effect"] == 10.0 and row["asm_rps"] >= 100:  # caught in every run, by every gate
            assert _finite(row["sequential"]["0.01"]["0"]["median"]), row
            assert _finite(row["threshold"]["threshold typical"]["p90"]), row
    assert len(report["scraped"]) == 6 and all(row["migrations"] == 100 for row in report["scraped"])
    assert _finite(report["observe_us"]) and report["observe_us"] > 0
    for text in (
        "### (a) False rollbacks",
        "| sequential, alpha 0.01 per step |",
        "| threshold typical (W 60 s, limit 0.01, threshold 2) |",
        "### (b) Detection",
        "| 0.5 % → 5 % (r 10) | 100 |",
        "### Healthy evidence before the fault",
        "### Threshold gate: per window",
        "### (c) Counters as Prometheus serves them",
        "- median <= 2 s:",
        "µs per `observe` call",
        "wall time",
    ):
        assert text in stdout, text
