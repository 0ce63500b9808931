"""Selectors cannot be widened by a policy, custom gates say what "empty" means, and every shipped
example (policies/*.yaml and the README's policy) advances a healthy rollout against a REAL Prometheus.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.adapters.prometheus import PrometheusMetricsSource
from controller.core.decision import Action, Observation, decide, initial_state
from controller.core.enums import GatewayRole, InconclusiveCause, Verdict
from controller.core.gates import judge
from controller.core.loader import parse_policy_text
from controller.core.policy import CanaryPolicy
from controller.core.queries import queries_for
from controller.core.results import GatewaySamples
from controller.core.schedule import target_steps
from controller.core.windows import next_opening
from controller.runtime.collector import Collector
from controller.settings import PrometheusConnection, Settings
from tests.helpers import T0, make_policy, samples
from tests.servers import TrafficExporter, wait_for

ROOT = Path(__file__).resolve().parents[1]
#: closes the label matcher's string and adds a matcher that selects every workload
ESCAPE = 'x",source_workload=~".+'


def source_for(url: str) -> PrometheusMetricsSource:
    return PrometheusMetricsSource(
        PrometheusConnection(Settings(prometheus_url=url, prometheus_timeout_seconds=2), None)
    )


def test_a_label_value_cannot_widen_the_selector_against_a_real_prometheus(
    prometheus: str, traffic: TrafficExporter, gateways: tuple[str, str]
) -> None:
    traffic.share = lambda: 0.5
    honest = make_policy(target={"service": "istio-system/asm", "workload": gateways[1]}, analysis={"window": "10s"})
    hostile = make_policy(
        target={"service": "istio-system/asm", "labels": {"reporter": "source", "source_workload": ESCAPE}},
        gates={
            "custom": [{"name": "mine", "query": "sum(rate(istio_requests_total{ {{ selector }} }[10s]))", "max": 1}]
        },
        analysis={"window": "10s"},
    )
    metrics = source_for(prometheus)

    def requests_of(policy: CanaryPolicy) -> float | None:
        return metrics.query(queries_for(policy)[GatewayRole.TARGET].requests)

    wait_for(lambda: (requests_of(honest) or 0) > 0, timeout=30, what="the honest selector to see traffic")
    plan = queries_for(hostile)
    target = plan[GatewayRole.TARGET]
    assert 'source_workload="x\\",source_workload=~\\".+"' in target.requests.promql  # one escaped literal
    assert requests_of(hostile) is None  # no series carries that literal value: nothing, not everything
    assert metrics.query(target.custom["mine"]) is None


@pytest.mark.parametrize(
    ("labels", "needle"),
    [
        ({"a-b": "x"}, "is not a Prometheus label name"),
        ({"9lives": "x"}, "is not a Prometheus label name"),
        ({"__name__": "istio_requests_total"}, "not starting with a digit or '__'"),
        ({"reporter": ""}, "an empty value matches every series without the label"),
        ({}, "an empty selector would match every gateway"),
    ],
)
def test_label_names_and_values_are_validated(labels: dict[str, str], needle: str) -> None:
    text = yaml.safe_dump(
        {
            "metadata": {"name": "p"},
            "spec": {
                "source": {"service": "a/b"},
                "target": {"service": "a/c", "labels": labels},
                "schedule": {"steps": [10, 100]},
                "gates": {"errorRate": {"max": 0.01}},
            },
        }
    )
    result = parse_policy_text(text, "p.yaml")
    assert not result.policies
    assert any(e.field == "spec.target.labels" and needle in e.message for e in result.errors), result.errors


def test_a_workload_must_be_a_workload_name() -> None:
    bad = yaml.safe_dump(
        {
            "metadata": {"name": "p"},
            "spec": {
                "source": {"service": "a/b", "workload": 'gw"} or vector(1) or up{x="'},
                "target": {"service": "a/c"},
                "schedule": {"steps": [10, 100]},
                "gates": {"errorRate": {"max": 0.01}},
            },
        }
    )
    errors = parse_policy_text(bad, "p.yaml").errors
    assert errors and errors[0].field == "spec.source.workload" and "is not a workload name" in errors[0].message


def test_placeholders_are_escaped_as_string_literals() -> None:
    policy = make_policy(
        gates={
            "custom": [{"name": "c", "query": 'sum(x{w="{{ workload }}",n="{{ namespace }}"}) or vector(0)', "max": 1}]
        },
        source={"service": "istio-system/gw", "workload": "my.gw-1"},
    )
    query = queries_for(policy)[GatewayRole.SOURCE].custom["c"].promql
    assert query == 'sum(x{w="my.gw-1",n="istio-system"}) or vector(0)'


def _custom(on_empty: str | None) -> CanaryPolicy:
    gate: dict[str, Any] = {"name": "resets", "query": "sum(rate(x{ {{ selector }} }[1m]))", "max": 2}
    if on_empty is not None:
        gate["onEmpty"] = on_empty
    return make_policy(gates={"custom": [gate]})


def _target_with_empty_custom() -> tuple[GatewaySamples, GatewaySamples]:
    return samples(GatewayRole.SOURCE, custom={"resets": None}), samples(GatewayRole.TARGET, custom={"resets": None})


@pytest.mark.parametrize(
    ("on_empty", "verdict", "cause"),
    [
        ("zero", Verdict.PASS, None),
        ("inconclusive", Verdict.INCONCLUSIVE, InconclusiveCause.NO_DATA),
        (None, Verdict.INCONCLUSIVE, InconclusiveCause.NO_DATA),
    ],
)
def test_a_custom_gate_says_what_an_empty_answer_means(
    on_empty: str | None, verdict: Verdict, cause: InconclusiveCause | None
) -> None:
    source, target = _target_with_empty_custom()
    result = judge(_custom(on_empty), source, target)
    assert (result.verdict, result.cause) == (verdict, cause)
    if on_empty == "zero":
        assert result.gates[0].value == 0.0


def test_validate_warns_about_a_sum_that_may_be_empty(tmp_path: Path) -> None:
    text = """\
metadata: {name: p}
spec:
  source: {service: a/b}
  target: {service: a/c}
  schedule: {steps: [10, 100]}
  gates:
    custom:
      - name: resets
        query: sum(rate(istio_requests_total{ {{ selector }},response_flags="UC"}[{{ window }}]))
        max: 2
"""
    path = tmp_path / "p.yaml"
    path.write_text(text)
    run = subprocess.run(
        [sys.executable, "-m", "controller", "validate", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert run.returncode == 0  # valid: a warning, not an error
    assert f"{path}:9: spec.gates.custom[0].query: warning: sum(...) is an empty answer" in run.stderr
    for fixed in ("        max: 2\n        onEmpty: zero\n", "        max: 2\n        onEmpty: inconclusive\n"):
        path.write_text(text.replace("        max: 2\n", fixed))
        assert not parse_policy_text(path.read_text(), str(path)).warnings
    path.write_text(text.replace("[{{ window }}]))", "[{{ window }}])) or vector(0)"))
    assert not parse_policy_text(path.read_text(), str(path)).warnings


# --- every shipped policy advances a healthy rollout ---------------------------------------------------


def _readme_policy() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## A policy, explained") :]
    match = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


def _examples() -> list[tuple[str, str]]:
    shipped = [(path.name, path.read_text()) for path in sorted((ROOT / "policies").glob("*.yaml"))]
    return [*shipped, ("README.md", _readme_policy())]


@pytest.mark.parametrize(("where", "text"), _examples(), ids=[name for name, _ in _examples()])
def test_every_shipped_example_advances_a_healthy_rollout(
    where: str, text: str, prometheus: str, traffic: TrafficExporter, gateways: tuple[str, str]
) -> None:
    loaded = parse_policy_text(text, where)
    assert loaded.errors == () and loaded.warnings == () and len(loaded.policies) == 1
    example = loaded.policies[0].policy
    # Its gates and schedule as written; its gateways, window and Prometheus the test's.
    spec = example.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    spec["source"] = {"service": "istio-system/istio-ingressgateway", "workload": gateways[0]}
    spec["target"] = {"service": "istio-system/istio-ingressgateway-asm", "workload": gateways[1]}
    spec["analysis"] = {**spec.get("analysis", {}), "window": "10s", "minRequests": 10}
    spec.pop("prometheus", None)
    spec.pop("alerts", None)
    policy = CanaryPolicy.model_validate({"metadata": {"name": example.name}, "spec": spec})
    traffic.share = lambda: 0.5
    traffic.source.latency_ms = traffic.target.latency_ms = 40.0
    collector, metrics = Collector(), source_for(prometheus)

    def passing():
        check = collector.check(policy, metrics)
        return check if check.verdict is Verdict.PASS else None

    check = wait_for(passing, timeout=40, interval=0.5, what=f"{where}: a passing check on healthy traffic")
    assert all(gate.verdict is Verdict.PASS for gate in check.gates)
    first = target_steps(policy.spec.schedule)[0]
    # ...at a moment its advance windows allow a raise (when it has some)
    windows = policy.spec.schedule.advance_windows
    when = T0 if windows is None else next_opening(windows, T0)
    assert when is not None, f"{where}: its advance windows never open"
    state = initial_state(policy, Observation(first, 100 - first), when)  # baking at the first step...
    state = state.evolve(baked_seconds=policy.spec.schedule.bake_for(first).total_seconds())  # ...bake covered
    decision = decide(policy, state, Observation(first, 100 - first, check), when)
    assert decision.action in (Action.ADVANCE, Action.PROMOTE), decision.reason
