"""PromQL for each gateway: Istio standard metrics, rendered from the policy's labels and window.

Kept apart from the Prometheus adapter (which only turns a query into a number), as Flagger's
observers are kept apart from its providers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from controller.core.durations import format_promql_duration
from controller.core.enums import GatewayRole, Measure
from controller.core.policy import CanaryPolicy, CustomGate
from controller.core.results import RenderedQuery

__all__ = [
    "COUNTER_ERRORS",
    "COUNTER_HISTOGRAM",
    "COUNTER_NAMES",
    "COUNTER_REQUESTS",
    "COUNTER_TIME",
    "COUNTER_WITHIN",
    "MIX_KINDS",
    "CheckQueries",
    "SharedMeasure",
    "breakdown_query",
    "counters_query",
    "newest_sample_query",
    "queries_for",
    "render_selector",
    "shared_index",
    "shared_value",
]

_REQUESTS = "istio_requests_total"
#: The kinds of responses the response-mix gate compares, each with its extra label matcher. Envoy
#: joins several response flags with commas, hence the four forms for NR (PromQL anchors regexes).
MIX_KINDS = {
    "4xx": 'response_code=~"4.."',
    "auth": 'response_code=~"401|403"',
    "noRoute": 'response_flags=~"NR|NR,.*|.*,NR|.*,NR,.*"',
}
#: Labels of Istio's standard metrics that say which route or policy a response came from.
BREAKDOWN_LABELS = ("response_code", "response_flags", "destination_service_name")
_TLS_ERRORS = "envoy_listener_ssl_connection_error"
_CONNECTIONS = "envoy_listener_downstream_cx_total"
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
        # Counts, not rates: the response-mix gate weighs an excess against its sampling noise.
        self.mix: dict[str, RenderedQuery] = {}
        if policy.spec.gates.response_mix.enabled:
            for kind, matcher in MIX_KINDS.items():
                counted = render_selector(labels, matcher)
                promql = f"sum(increase({_REQUESTS}{counted}[{window}])) or vector(0)"
                self.mix[kind] = RenderedQuery(promql, Measure.RESPONSES, role, gate=kind)
        if policy.spec.gates.tls_handshake is not None:
            # Envoy's own stats carry the pod, not the Istio workload labels: a Deployment's pods are
            # <workload>-<ReplicaSet hash>-<5 chars>; "<workload>-.*" would also match "<workload>-asm-...".
            workload = re.escape(gateway.workload or gateway.service.name)
            pods = render_selector(
                {"namespace": gateway.service.namespace}, f'pod=~"{_escape(workload)}-[a-z0-9]{{1,10}}-[a-z0-9]{{5}}"'
            )
            for kind, metric in (("tlsErrors", _TLS_ERRORS), ("connections", _CONNECTIONS)):
                self.mix[kind] = RenderedQuery(f"sum(increase({metric}{pods}[{window}]))", Measure.TLS, role, gate=kind)
        #: the raw counters of the sequential gates, all in one instant query (one evaluation time,
        #: so a gateway's requests and its bad ones are read from the same scrape)
        self.counters = counters_query(policy, role)
        self._labels = labels
        self._window = window
        #: the queries every gateway asks in the same form, answerable for many gateways at once
        self.shared: dict[RenderedQuery, SharedMeasure] = {
            self.requests: SharedMeasure(Measure.REQUESTS, window, tuple(sorted(labels))),
            self.error_rate: SharedMeasure(Measure.ERROR_RATE, window, tuple(sorted(labels))),
            self.latency: SharedMeasure(Measure.LATENCY, window, tuple(sorted(labels)), quantile=quantile),
        }
        for kind in MIX_KINDS:
            if kind in self.mix:
                self.shared[self.mix[kind]] = SharedMeasure(Measure.RESPONSES, window, tuple(sorted(labels)), kind)

    @property
    def labels(self) -> dict[str, str]:
        """The label matchers that select this gateway's Istio metrics."""
        return dict(self._labels)

    def all(self) -> list[RenderedQuery]:
        """Every scalar query of this gateway, built-in first (``counters`` is a vector query)."""
        return [self.requests, self.error_rate, self.latency, *self.mix.values(), *self.custom.values()]

    def breakdown(self, kind: str) -> RenderedQuery:
        """The responses of ``kind`` by route labels (asked only when a response-mix gate fails)."""
        return breakdown_query(self._labels, self._window, kind, self.role)


def _render_template(gate: CustomGate, values: dict[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        # Placeholders were checked when the policy loaded; a KeyError here is a programming error.
        return values[match.group(1)]

    return _PLACEHOLDER.sub(substitute, gate.query)


def breakdown_query(labels: dict[str, str], window: str, kind: str, role: GatewayRole) -> RenderedQuery:
    """``sum by (code, flags, destination) (increase(...))`` of one kind of response."""
    counted = render_selector(labels, MIX_KINDS[kind])
    by = ", ".join(BREAKDOWN_LABELS)
    return RenderedQuery(
        f"sum by ({by}) (increase({_REQUESTS}{counted}[{window}]))", Measure.RESPONSES, role, gate=f"{kind}:by-route"
    )


#: the names (label ``counter``) of the raw counters in ``counters_query``'s answer
COUNTER_REQUESTS, COUNTER_ERRORS = "requests", "errors"
COUNTER_HISTOGRAM, COUNTER_WITHIN = "histogramCount", "withinLatency"
#: when each scrape target was last scraped (the sample time of its counters, seconds)
COUNTER_TIME = "time"
COUNTER_NAMES = (COUNTER_REQUESTS, COUNTER_ERRORS, COUNTER_HISTOGRAM, COUNTER_WITHIN, COUNTER_TIME)


def counters_query(policy: CanaryPolicy, role: GatewayRole) -> RenderedQuery | None:
    """The raw counters the policy's sequential gates read on one gateway (None: it has none).

    Counters, not ``increase()``: the gates count the increments between two checks themselves, so
    every request is counted once whatever the timing of the checks (``controller.core.sequential``).
    Summed per scrape target (``instance``), each with its sample time, so that a target's restart,
    absence or an older answer is handled for that target alone. Each sum is labelled
    ``counter=<name>``; 5xx are 0 for a target with requests but no 5xx series.
    """
    gates = policy.spec.gates
    errors = gates.error_rate is not None and gates.error_rate.sequential is not None
    slow_ms = gates.latency.slow_ms if gates.latency is not None else None
    if not errors and slow_ms is None:
        return None
    labels = policy.gateway(role).selector()
    parts: list[str] = []

    def named(name: str, promql: str) -> None:
        parts.append(f'label_replace({promql}, "counter", "{name}", "", "")')

    requests = f"{_REQUESTS}{render_selector(labels)}"
    histogram = f"{_DURATION_BUCKETS}{render_selector(labels, _ALL_BUCKET)}"
    if errors:
        total = f"sum by (instance) ({requests})"
        named(COUNTER_REQUESTS, total)
        named(COUNTER_ERRORS, f"(sum by (instance) ({_REQUESTS}{render_selector(labels, _FIVE_XX)}) or 0 * {total})")
    if slow_ms is not None:
        named(COUNTER_HISTOGRAM, f"sum by (instance) ({histogram})")
        within = f"{_DURATION_BUCKETS}{render_selector(labels, _le_matcher(slow_ms))}"
        named(COUNTER_WITHIN, f"sum by (instance) ({within})")
    named(COUNTER_TIME, f"max by (instance) (timestamp({requests if errors else histogram}))")
    return RenderedQuery(" or ".join(parts), Measure.COUNTERS, role, gate="sequential")


_FIVE_XX = 'response_code=~"5.."'
_ALL_BUCKET = 'le="+Inf"'


def _le_matcher(bound: float) -> str:
    """The bucket ``le="<bound>"`` in any of the ways exporters and Prometheus write a number
    (``500``, ``500.0`` since Prometheus 3 normalises them, ``3.6e+06``)."""
    forms = {repr(float(bound)), f"{bound:g}"}
    if float(bound).is_integer():
        forms.add(str(int(bound)))
    return f'le=~"{_escape("|".join(_regex_literal(form) for form in sorted(forms)))}"'


def newest_sample_query(policy: CanaryPolicy) -> RenderedQuery:
    """When Prometheus last stored the ASM gateway's requests (the scrape's time, seconds since
    the epoch): checks can be phased just after the scrapes that change their answer."""
    selector = render_selector(policy.gateway(GatewayRole.TARGET).selector())
    return RenderedQuery(f"max(timestamp({_REQUESTS}{selector}))", Measure.CUSTOM, GatewayRole.TARGET, "newestSample")


def queries_for(policy: CanaryPolicy) -> dict[GatewayRole, CheckQueries]:
    """Both gateways' queries."""
    return {role: CheckQueries(policy, role) for role in GatewayRole}


@dataclass(frozen=True, slots=True)
class SharedMeasure:
    """A measure every gateway asks in the same form (built-in gates): one query, grouped by the
    selector's label names, answers it for all the gateways that share a Prometheus and a window.

    Per gateway it means what the gateway's own query means: the group of its labels is its
    ``sum(...)``; a gateway missing from the answer has no data (``None``), except for response
    counts, which are 0 then (their own query ends in ``or vector(0)``).
    """

    measure: Measure
    window: str
    #: the selector's label names, sorted: the groups of the answer
    keys: tuple[str, ...]
    #: which response kind (``MIX_KINDS``) for RESPONSES
    kind: str | None = None
    #: for LATENCY
    quantile: float | None = None

    @property
    def absent(self) -> float | None:
        """What a gateway missing from the answer has."""
        return 0.0 if self.measure is Measure.RESPONSES else None

    def promql(self, selectors: Iterable[Mapping[str, str]]) -> str:
        """One instant query for every selector given (each with exactly ``keys``).

        Each label is matched against the alternation of the values asked (an exact match when
        there is one): the product of those may select groups nobody asked for, which are ignored,
        while every group asked for is exactly a gateway's own selection.
        """
        values: dict[str, set[str]] = {key: set() for key in self.keys}
        for selector in selectors:
            for key in self.keys:
                values[key].add(selector[key])
        union = ",".join(_union_matcher(key, sorted(values[key])) for key in self.keys)
        by = ", ".join(self.keys)
        window = self.window
        everything = f"{_REQUESTS}{{{union}}}"
        match self.measure:
            case Measure.REQUESTS:
                return f"sum by ({by}) (increase({everything}[{window}]))"
            case Measure.ERROR_RATE:
                # A gateway with traffic and no 5xx series has 0 (its own query's "or vector(0)"),
                # by group: "or 0 * total" adds the groups the 5xx side lacks.
                errors = f'{_REQUESTS}{{{union},response_code=~"5.."}}'
                total = f"sum by ({by}) (rate({everything}[{window}]))"
                return f"(sum by ({by}) (rate({errors}[{window}])) or 0 * {total}) / {total}"
            case Measure.LATENCY:
                buckets = f"{_DURATION_BUCKETS}{{{union}}}"
                return f"histogram_quantile({self.quantile:g}, sum by (le, {by}) (rate({buckets}[{window}])))"
            case Measure.RESPONSES if self.kind in MIX_KINDS:
                counted = f"{_REQUESTS}{{{union},{MIX_KINDS[self.kind]}}}"
                return f"sum by ({by}) (increase({counted}[{window}]))"
        raise ValueError(f"{self.measure} {self.kind} is not a shared measure")


def _union_matcher(key: str, values: Sequence[str]) -> str:
    if len(values) == 1:
        return f'{key}="{_escape(values[0])}"'
    return f'{key}=~"{_escape("|".join(_regex_literal(value) for value in values))}"'


#: RE2's metacharacters (Prometheus anchors every label regex, so no value can match more than itself)
_RE2_SPECIAL = frozenset("\\.+*?()|[]{}^$")


def _regex_literal(value: str) -> str:
    return "".join("\\" + char if char in _RE2_SPECIAL else char for char in value)


def shared_index(
    measure: SharedMeasure, answer: Sequence[tuple[Mapping[str, str], float]]
) -> dict[tuple[str, ...], list[float]]:
    """A shared answer by group (the values of ``measure.keys``), built once for all its gateways:
    looking each gateway up in the whole answer would cost policies x policies per round."""
    index: dict[tuple[str, ...], list[float]] = {}
    for series, value in answer:
        index.setdefault(tuple(series.get(key, "") for key in measure.keys), []).append(value)
    return index


def shared_value(
    measure: SharedMeasure, index: Mapping[tuple[str, ...], Sequence[float]], labels: Mapping[str, str]
) -> float | None:
    """One gateway's value in a shared answer (``shared_index``): its group's, or ``measure.absent``.

    Raises ValueError for an infinite value (that gateway's own query would have been refused the
    same way) or for two series in its group (the answer is not what was asked).
    """
    found = index.get(tuple(labels[key] for key in measure.keys), ())
    if len(found) > 1:
        raise ValueError(f"the shared answer has {len(found)} series for one gateway")
    if not found:
        return measure.absent
    if math.isinf(found[0]):
        raise ValueError(f"the answer is {found[0]}: no finite value to judge")
    return found[0]
