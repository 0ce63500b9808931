"""Policy files: shipped examples validate, mistakes are located by file:line:field, schema exports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from controller.core.durations import parse_duration
from controller.core.enums import Phase
from controller.core.loader import check_conflicts, parse_policy_text
from controller.core.policy import CanaryPolicy
from controller.core.schedule import target_steps
from controller.core.state import RolloutState, decode_state, encode_state
from tests.helpers import T0, make_policy

ROOT = Path(__file__).resolve().parents[1]

BROKEN = """\
apiVersion: gateway-canary.io/v1alpha1
kind: CanaryPolicy
metadata:
  name: broken
spec:
  source: {service: istio-system/a}
  target: {service: istio-system/b}
  schedule:
    steps: [10, 5, 100]
    bakeTme: 5m
  analysis:
    interval: soon
  gates:
    errorRate: {max: 3}
  alerts:
    - type: pager
"""


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller", *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )


def test_shipped_examples_validate_through_the_cli() -> None:
    result = cli("validate", "policies/")
    assert result.returncode == 0, result.stderr
    assert "2 valid, 0 error(s)" in result.stdout


def test_broken_file_reports_file_line_field_and_what_is_allowed(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BROKEN)
    result = cli("validate", str(bad), "policies/")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert f"{bad}:9: spec.schedule.steps: steps must be strictly increasing: 10 is followed by 5" in lines
    assert any(
        line.startswith(
            f"{bad}:10: spec.schedule.bakeTme: unknown field; allowed here: advanceWindows, approvalAt, bakeTime,"
        )
        for line in lines
    )
    assert any(line.startswith(f"{bad}:12: spec.analysis.interval: 'soon' is not a duration") for line in lines)
    assert f"{bad}:14: spec.gates.errorRate.max: Input should be less than or equal to 1" in lines
    assert (
        f"{bad}:16: spec.alerts[0]: unknown receiver type; allowed: slack, webhook, alertmanager, dingtalk, feishu, "
        "wecom" in lines
    )
    assert "2 valid" in result.stdout  # the good files still load beside the bad one


def test_yaml_syntax_error_is_located() -> None:
    result = parse_policy_text("metadata:\n  name: x\n spec: [\n", "f.yaml")
    assert not result.policies
    assert str(result.errors[0]).startswith("f.yaml:3: not valid YAML")


def test_multiple_documents_one_bad_one_good() -> None:
    good = (ROOT / "policies/shop-ingress.yaml").read_text()
    result = parse_policy_text(good + "\n---\n" + BROKEN, "multi.yaml")
    assert [p.policy.name for p in result.policies] == ["shop-ingress"]
    assert result.errors and all(e.line > good.count("\n") for e in result.errors)


def test_two_policies_on_one_service_conflict() -> None:
    first = parse_policy_text((ROOT / "policies/shop-ingress.yaml").read_text(), "a.yaml").policies[0]
    clone = first.policy.model_copy(update={"metadata": first.policy.metadata.model_copy(update={"name": "other"})})
    from controller.core.loader import SourcedPolicy

    checked = check_conflicts([first, SourcedPolicy(clone, "b.yaml", 1)])
    assert [p.policy.name for p in checked.policies] == ["shop-ingress"]
    assert "already managed by policy 'shop-ingress' (a.yaml:4)" in str(checked.errors[0])


def test_schema_export_is_json_schema_with_camel_case_fields() -> None:
    result = cli("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema["title"] == "gateway-canary CanaryPolicy"
    assert "bakeTime" in json.dumps(schema) and "failureThreshold" in json.dumps(schema)


def test_step_weight_schedule_ends_in_promotion() -> None:
    policy = make_policy(schedule={"stepWeight": 15, "maxWeight": 50})
    assert target_steps(policy.spec.schedule) == (15, 30, 45, 50, 100)


def test_validation_rejects_insane_values() -> None:
    import pytest
    from pydantic import ValidationError

    for spec in (
        {"schedule": {"steps": [0, 10]}},
        {"analysis": {"interval": "100ms"}},
        {"gates": {}},
        {"gates": {"latency": {"p99Ms": {"max": 1}, "p95Ms": {"max": 1}}}},
        {"gates": {"custom": [{"name": "x", "query": "{{ nope }}", "max": 1}]}},
        {"target": {"service": "istio-system/istio-ingressgateway"}},
        {"alerts": [{"type": "slack"}]},
    ):
        with pytest.raises(ValidationError):
            make_policy(**spec)


def test_durations() -> None:
    assert parse_duration("1h30m").total_seconds() == 5400
    assert parse_duration("250ms").total_seconds() == 0.25
    assert parse_duration(45).total_seconds() == 45


def test_state_round_trips_and_rejects_garbage() -> None:
    import pytest

    state = RolloutState(
        policy="p",
        fingerprint="f",
        phase=Phase.PROGRESSING,
        reason="r",
        target_weight=25,
        source_weight=75,
        changed_at=T0,
        step_started_at=T0,
    )
    assert decode_state(encode_state(state)) == state
    for garbage in ("", "{", "[]", '{"v": 99}', '{"v": 1}'):
        with pytest.raises(ValueError):
            decode_state(garbage)


def test_fingerprint_ignores_alert_receivers_but_not_gates() -> None:
    base = make_policy()
    assert (
        base.rollout_fingerprint()
        == make_policy(alerts=[{"type": "alertmanager", "url": "http://am"}]).rollout_fingerprint()
    )
    assert base.rollout_fingerprint() != make_policy(gates={"errorRate": {"max": 0.02}}).rollout_fingerprint()
    assert isinstance(base, CanaryPolicy)


def _run(env_changes: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, "GATEWAY_CANARY_HTTP_PORT": "0", "HOME": str(tmp_path), **env_changes}
    return subprocess.run(
        [sys.executable, "-m", "controller", "run"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60
    )


def _bad_settings(tmp_path: Path, busy_port: int) -> list[tuple[str, str, str]]:
    not_yaml = tmp_path / "not-yaml"
    not_yaml.write_text("clusters: [unclosed\n")
    return [
        ("PROMETHEUS_TIMEOUT_SECONDS", "inf", "finite number"),
        ("NOTIFY_CRITICAL_DEADLINE_SECONDS", "1e30", "less than or equal to 604800"),
        ("HTTP_PORT", "99999", "less than or equal to 65535"),
        ("PROMETHEUS_URL", "http://no-such-host.invalid:9090", "the host no-such-host.invalid does not resolve"),
        ("HTTP_PORT", str(busy_port), "is already in use"),
        ("KUBECONFIG", str(not_yaml), "is not a kubeconfig"),
        ("KUBECONFIG", str(tmp_path), "is not a file"),
        ("ASM_KUBECONFIG", str(not_yaml), "is not a kubeconfig"),
        ("LOG_LEVEL", "LOUD", "is not a log level"),
        ("ALERTMANAGER_URL", "http://", "the URL has no host"),
        ("ALERTMANAGER_URL", "alertmanager:9093", "must start with http:// or https://"),
        ("WEBHOOK_URL", "https://hooks example/SECRETVALUE", "spaces or control characters"),
        ("SLACK_WEBHOOK_URL", "hooks.slack.com/services/T/B/SECRETVALUE", "must start with http"),
        ("SECRET_ENV_PATTERN", "[", "not a regular expression"),
        ("NAMESPACE", "Bad_NS", "should match pattern"),
    ]


def test_every_bad_setting_is_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        for name, value, needle in _bad_settings(tmp_path, busy.getsockname()[1]):
            result = _run({f"GATEWAY_CANARY_{name}": value}, tmp_path)
            assert result.returncode == 2, (name, value, result.stderr)
            assert "Traceback" not in result.stderr and "SECRETVALUE" not in result.stderr, result.stderr
            lines = result.stderr.strip().splitlines()
            assert any(line.startswith(f"GATEWAY_CANARY_{name}: ") and needle in line for line in lines), (
                name,
                value,
                lines,
            )


def test_several_bad_settings_are_all_reported_at_once(tmp_path: Path) -> None:
    result = _run({"GATEWAY_CANARY_LOG_LEVEL": "LOUD", "GATEWAY_CANARY_HTTP_PORT": "-1"}, tmp_path)
    assert result.returncode == 2
    names = sorted(line.split(":", 1)[0] for line in result.stderr.strip().splitlines())
    assert names == ["GATEWAY_CANARY_HTTP_PORT", "GATEWAY_CANARY_LOG_LEVEL"]


def test_run_without_any_cluster_config_says_so(tmp_path: Path) -> None:
    result = _run({}, tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("cannot start: no usable Kubernetes configuration")


def test_the_fingerprint_ignores_defaults_so_an_upgrade_does_not_look_like_a_policy_change() -> None:
    gate = {"name": "resets", "query": "sum(x) or vector(0)", "max": 1}
    plain = make_policy(gates={"custom": [gate]})
    spelled_out = make_policy(gates={"custom": [{**gate, "onEmpty": "inconclusive"}]})
    assert plain.rollout_fingerprint() == spelled_out.rollout_fingerprint()
    assert make_policy(gates={"custom": [{**gate, "onEmpty": "zero"}]}).rollout_fingerprint() != (
        plain.rollout_fingerprint()
    )


def test_receiver_names_are_distinct_and_not_global() -> None:
    twice = [{"type": "webhook", "name": "ops", "url": "https://a.example"}] * 2
    errors = parse_policy_text(
        yaml.safe_dump({"metadata": {"name": "p"}, "spec": {**_SPEC, "alerts": twice}}), "p.yaml"
    ).errors
    assert any("ops is used twice" in e.message for e in errors)
    taken = [{"type": "webhook", "name": "global", "url": "https://a.example"}]
    errors = parse_policy_text(
        yaml.safe_dump({"metadata": {"name": "p"}, "spec": {**_SPEC, "alerts": taken}}), "p.yaml"
    ).errors
    assert any("'global' is taken" in e.message for e in errors)


_SPEC = {
    "source": {"service": "a/b"},
    "target": {"service": "a/c"},
    "schedule": {"steps": [10, 100]},
    "gates": {"errorRate": {"max": 0.01}},
}
