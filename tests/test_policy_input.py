"""Hostile or mistaken policy files: one clear error with file:line, fast, bounded, never a traceback."""

from __future__ import annotations

import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.core.loader import MAX_ALIASES, MAX_FILE_BYTES, decode_policy_file, parse_policy_text
from tests.servers import wait_for

ROOT = Path(__file__).resolve().parents[1]
SHOP = (ROOT / "policies" / "shop-ingress.yaml").read_text()
LOCATED = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): ")


def laughs(levels: int = 9) -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        prev, cur = chr(96 + i), chr(97 + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def validate(tmp_path: Path, name: str, data: bytes) -> subprocess.CompletedProcess[str]:
    path = tmp_path / name
    path.write_bytes(data)
    return subprocess.run(
        [sys.executable, "-m", "controller", "validate", str(path)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip


HOSTILE = {
    "billion-laughs.yaml": (laughs().encode(), f"more than {MAX_ALIASES} aliases"),
    "recursive.yaml": (b"metadata: &m {name: x, self: *m}\n", "nested deeper than"),
    "self-list.yaml": (b"a: &x [*x]\n", "nested deeper than"),
    "deep.yaml": (("a: " + "[" * 400 + "]" * 400 + "\n").encode(), "nested deeper than"),
    "huge.yaml": (b"# padding\n" * (MAX_FILE_BYTES // 10 + 1), "a policy file may have"),
    "latin1.yaml": ("metadata: {name: caf\u00e9}\n".encode("latin-1"), "not UTF-8 text"),
    "binary.yaml": (b"\x00\x01\x02", "a NUL byte"),
    "empty.yaml": (b"", "no policy in this file"),
    "comments.yaml": (b"# nothing here\n---\n", "no policy in this file"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_files_are_one_located_error_fast_and_bounded(tmp_path: Path, name: str) -> None:
    data, needle = HOSTILE[name]
    started = time.perf_counter()
    result = validate(tmp_path, name, data)
    assert time.perf_counter() - started < 10  # a subprocess start included; the parse itself is < 0.1 s
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line]
    assert lines and all(LOCATED.match(line) for line in lines), lines
    assert needle in result.stderr


def test_billion_laughs_in_process_is_fast_and_small() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    result = parse_policy_text(laughs(12), "laughs.yaml")
    assert time.perf_counter() - started < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB: no expansion
    assert result.errors and result.errors[0].line >= 1


def test_a_duplicate_key_names_both_lines(tmp_path: Path) -> None:
    text = re.sub(r"(\n    bakeTime: 10m[^\n]*)", r"\1\n    bakeTime: 0s", SHOP, count=1)
    first = text.splitlines().index(next(line for line in text.splitlines() if "bakeTime: 10m" in line)) + 1
    result = validate(tmp_path, "dup.yaml", text.encode())
    assert result.returncode == 1
    assert f"dup.yaml:{first + 1}: duplicate key 'bakeTime' (lines {first} and {first + 1})" in result.stderr


BAD_VALUES = [
    ("stepWeight: true", "schedule", {"stepWeight": True}, "is not a valid integer|valid integer"),
    ("steps: [10, true]", "schedule", {"steps": [10, True]}, "valid integer"),
    ("bakeTime: -1ns", "schedule", {"steps": [10], "bakeTime": "-1ns"}, "is not a duration"),
    ("bakeTime: -5", "schedule", {"steps": [10], "bakeTime": -5}, "outside 0s..365d"),
    ("bakeTime: huge", "schedule", {"steps": [10], "bakeTime": "999999999999999d"}, "outside 0s..365d"),
    ("errorRate max inf", "gates", {"errorRate": {"max": float("inf")}}, "not a finite number"),
    ("errorRate max nan", "gates", {"errorRate": {"max": float("nan")}}, "not a finite number"),
    ("custom max string", "gates", {"custom": [{"name": "c", "query": "q", "max": "3"}]}, "is not a number"),
    ("latency bool", "gates", {"latency": {"p99Ms": {"max": True}}}, "is not a number"),
    ("url no host", "alerts", [{"type": "webhook", "url": "http://"}], "has no host"),
    ("url spaces", "alerts", [{"type": "webhook", "url": "https://a b.example/x"}], "spaces or control"),
    ("url brackets", "alerts", [{"type": "alertmanager", "url": "http://[::1/x"}], "not a URL"),
    ("url scheme", "alerts", [{"type": "alertmanager", "url": "ftp://am:9093"}], "http:// or https://"),
    ("name control", "alerts", [{"type": "webhook", "name": "a\u001b[31m", "url": "https://x.example"}], "control"),
    ("label control", "target", {"service": "a/c", "labels": {"x": "a\nb"}}, "control"),
]


@pytest.mark.parametrize(("what", "key", "value", "needle"), BAD_VALUES, ids=[v[0] for v in BAD_VALUES])
def test_values_that_cannot_be_meant_are_rejected_saying_what_is_allowed(
    what: str, key: str, value: Any, needle: str
) -> None:
    document = yaml.safe_load(SHOP)
    document["spec"][key] = value
    result = parse_policy_text(yaml.safe_dump(document, allow_unicode=True), "p.yaml")
    assert not result.policies, what
    assert any(re.search(needle, e.message) for e in result.errors), [str(e) for e in result.errors]
    assert all(e.line >= 1 and "\n" not in str(e) for e in result.errors)


def test_an_error_message_never_spans_lines() -> None:
    result = parse_policy_text("metadata: {name: x}\nspec: {source: {service: 'a\\nb/c'}}\n", "p.yaml")
    assert result.errors and all("\n" not in str(error) for error in result.errors)


# --- fuzzing from the shipped examples --------------------------------------------------------------------

EXAMPLES = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "policies").glob("*.yaml"))]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30), st.sampled_from(["30s", "-1s", "1h", "abc", "http://", "10", "[", "&a", "*a"]),
)  # fmt: skip


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


def _set(document: Any, path: tuple[Any, ...], value: Any) -> None:
    for part in path[:-1]:
        document = document[part]
    document[path[-1]] = value


def _delete(document: Any, path: tuple[Any, ...]) -> None:
    for part in path[:-1]:
        document = document[part]
    del document[path[-1]]


@st.composite
def mutated(draw: st.DrawFn) -> str:
    document = yaml.safe_load(yaml.safe_dump(draw(st.sampled_from(EXAMPLES))))
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(document)
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["set", "delete", "dup"]))
        try:
            if action == "set":
                _set(document, path, draw(SCALARS))
            elif action == "delete":
                _delete(document, path)
        except (KeyError, IndexError, TypeError):
            pass
    text = yaml.safe_dump(document, allow_unicode=True, sort_keys=False)
    if draw(st.booleans()):  # a duplicated line (a duplicate key, or a broken list)
        lines = text.splitlines()
        index = draw(st.integers(0, len(lines) - 1))
        lines.insert(index, lines[index])
        text = "\n".join(lines) + "\n"
    return text


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(text=mutated())
def test_fuzzed_policies_never_crash_and_every_rejection_is_located(text: str) -> None:
    result = parse_policy_text(text, "fuzz.yaml")
    for error in result.errors:
        assert error.file == "fuzz.yaml" and error.line >= 1 and "\n" not in str(error)


CLEARLY_INVALID = {
    "weight above 100": ("spec.schedule.steps", [10, 150]),
    "weight 0": ("spec.schedule.steps", [0, 10]),
    "non-increasing steps": ("spec.schedule.steps", [50, 10]),
    "zero failure threshold": ("spec.analysis.failureThreshold", 0),
    "negative duration": ("spec.schedule.bakeTime", -1),
    "zero p99 limit": ("spec.gates.latency.p99Ms.max", 0),
    "error rate above 1": ("spec.gates.errorRate.max", 2),
    "negative min requests": ("spec.analysis.minRequests", -5),
}


@pytest.mark.parametrize("mutation", sorted(CLEARLY_INVALID))
def test_clearly_invalid_mutations_of_the_examples_are_all_rejected(mutation: str) -> None:
    dotted, value = CLEARLY_INVALID[mutation]
    document = yaml.safe_load(SHOP)
    _set(document, tuple(dotted.split(".")), value)
    result = parse_policy_text(yaml.safe_dump(document), "p.yaml")
    assert not result.policies and result.errors, mutation


def test_decode_policy_file_accepts_utf8_and_rejects_the_rest() -> None:
    assert decode_policy_file("a: é\n".encode(), "f.yaml") == "a: é\n"
    error = decode_policy_file(b"ok: 1\nbad: \xff\n", "f.yaml")
    assert not isinstance(error, str) and error.line == 2


def test_at_run_time_a_hostile_file_is_one_alert_and_the_other_policies_keep_running(tmp_path: Path) -> None:
    from controller.adapters.memory import InMemoryGatewayPair, InMemoryStateStore
    from controller.demo import SimulatedGateways
    from controller.runtime.clock import SystemClock
    from controller.runtime.service import ControllerService
    from controller.settings import Settings

    class Inbox:
        name = "inbox"

        def __init__(self) -> None:
            self.alerts: list[Any] = []

        def send(self, alert: Any, *, timeout: float) -> None:
            self.alerts.append(alert)

    good = "metadata: {name: good}\nspec:\n  source: {service: a/b}\n  target: {service: a/c}\n"
    good += (
        "  schedule: {steps: [10, 100], bakeTime: 1h}\n  analysis: {interval: 1s}\n  gates: {errorRate: {max: 0.05}}\n"
    )
    (tmp_path / "good.yaml").write_text(good)
    (tmp_path / "laughs.yaml").write_text(laughs())
    (tmp_path / "overflow.yaml").write_text(
        good.replace("good", "other").replace("bakeTime: 1h", "bakeTime: 999999999999999d")
    )
    pair, inbox = InMemoryGatewayPair(target_weight=0, source_weight=100), Inbox()
    service = ControllerService(
        Settings(policies_dir=tmp_path, reload_interval_seconds=0.1),
        pair=pair,
        store=InMemoryStateStore(),
        metrics_for=lambda policy: SimulatedGateways(pair),
        clock=SystemClock(),
        extra_receivers=[inbox],
        serve_http=False,
    )
    service.start()
    try:
        wait_for(lambda: pair.target_weight == 10, timeout=20, what="the good policy to start beside the bad files")
        invalid = wait_for(
            lambda: [a for a in inbox.alerts if a.kind.value == "PolicyInvalid"] if len(inbox.alerts) >= 2 else None,
            timeout=10,
            what="the two PolicyInvalid alerts",
        )
        reasons = sorted(a.reason for a in invalid)
        assert reasons[0].startswith(f"{tmp_path / 'laughs.yaml'}:") and "aliases" in reasons[0]
        assert reasons[1].startswith(f"{tmp_path / 'overflow.yaml'}:") and "outside 0s..365d" in reasons[1]
        (tmp_path / "touch.yaml").write_text("# a change, so the directory is read again\n")
        wait_for(lambda: service.telemetry.policy_file_errors._value.get() == 2, timeout=10, what="a reload")
        assert len([a for a in inbox.alerts if a.kind.value == "PolicyInvalid"]) == 2  # once each, not per reload
        assert set(service.runners) == {"good"}
    finally:
        service.stop()
