"""PromQL for each gateway: Istio standard metrics, rendered from the policy's labels and window.

Kept apart from the Prometheus adapter (which only turns a query into a number), as Flagger's
observers are kept apart from its providers.
"""

from __future__ import annotations

import re

from controller.core.durations import format_promql_duration
from controller.core.enums import GatewayRole, Measure
from controller.core.policy import CanaryPolicy, CustomGate
from controller.core.results import RenderedQuery

__all__ = ["CheckQueries", "queries_for", "render_selector"]

_REQUESTS = "istio_requests_total"
_DURATION_BUCKETS = "istio_request_duration_milliseconds_bucket"
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def render_selector(labels: dict[str, str], extra: str = "") -> str:
    """``{a="b",c="d"}`` with values escaped as PromQL string literals."""
    parts = [f'{key}="{_escape(value)}"' for key, value in sorted(labels.items())]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}"


def _escape(value: str) -> str:
    """The inside of a double-quoted PromQL string literal (the escapes PromQL's lexer accepts there)."""
    return (
        value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    )


class CheckQueries:
    """The queries of one check, per gateway."""

    def __init__(self, policy: CanaryPolicy, role: GatewayRole) -> None:
        gateway = policy.gateway(role)
        labels = gateway.selector()
        window = format_promql_duration(policy.spec.analysis.window)
        selector = render_selector(labels)
        errors = render_selector(labels, 'response_code=~"5.."')
        self.role = role
        self.requests = RenderedQuery(f"sum(increase({_REQUESTS}{selector}[{window}]))", Measure.REQUESTS, role)
        # A gateway that served traffic but never a 5xx has no 5xx series: "or vector(0)" makes that
        # a ratio of 0. Only an absent denominator (no traffic) leaves the vector empty.
        self.error_rate = RenderedQuery(
            f"(sum(rate({_REQUESTS}{errors}[{window}])) or vector(0)) / sum(rate({_REQUESTS}{selector}[{window}]))",
            Measure.ERROR_RATE,
            role,
        )
        latency = policy.spec.gates.latency
        quantile = latency.quantile if latency is not None else 0.99
        self.latency = RenderedQuery(
            f"histogram_quantile({quantile:g}, sum by (le) (rate({_DURATION_BUCKETS}{selector}[{window}])))",
            Measure.LATENCY,
            role,
        )
        # Names are substituted as the inside of a PromQL string literal ("{{ workload }}" stands
        # between quotes in a template), escaped so that no value can end the literal and widen
        # the selector; the selector and window are PromQL syntax built here from escaped parts.
        values = {
            "selector": selector[1:-1],
            "window": window,
            "namespace": _escape(gateway.service.namespace),
            "workload": _escape(gateway.workload or gateway.service.name),
            "service": _escape(gateway.service.name),
        }
        self.custom = {
            gate.name: RenderedQuery(_render_template(gate, values), Measure.CUSTOM, role, gate=gate.name)
            for gate in policy.spec.gates.custom
        }

    def all(self) -> list[RenderedQuery]:
        """Every query of this gateway, built-in first."""
        return [self.requests, self.error_rate, self.latency, *self.custom.values()]


def _render_template(gate: CustomGate, values: dict[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        # Placeholders were checked when the policy loaded; a KeyError here is a programming error.
        return values[match.group(1)]

    return _PLACEHOLDER.sub(substitute, gate.query)


def queries_for(policy: CanaryPolicy) -> dict[GatewayRole, CheckQueries]:
    """Both gateways' queries."""
    return {role: CheckQueries(policy, role) for role in GatewayRole}
