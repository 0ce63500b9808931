"""The canary policy: what on-call engineers write in ``policies/*.yaml``.

A pydantic model, so that a bad file is rejected with the field path and what is allowed, and so
that the JSON Schema for editors comes from the same source as the validation
(``gateway-canary schema``). Every model forbids unknown fields: a misspelt threshold must never
be silently ignored.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictInt,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.alias_generators import to_camel

from controller.core.durations import format_promql_duration, parse_duration
from controller.core.enums import GatewayRole, OnEmpty, OnInconclusive, WeightMode
from controller.core.receivers import DingTalkReceiver, FeishuReceiver, SecretUrlReceiver, WeComReceiver
from controller.core.templates import template_problems
from controller.core.text import Text, checked_url

__all__ = [
    "AdvanceWindows",
    "AlertmanagerReceiver",
    "AnalysisSpec",
    "CanaryPolicy",
    "CloudSpec",
    "CustomGate",
    "DingTalkReceiver",
    "Duration",
    "ErrorRateGate",
    "FeishuReceiver",
    "GatesSpec",
    "GatewaySpec",
    "InconclusivePolicy",
    "IstioGatewayRef",
    "LatencyGate",
    "LatencySequentialGate",
    "PrometheusSpec",
    "PromotionSpec",
    "Receiver",
    "ResponseMixGate",
    "RoutesSpec",
    "ScheduleSpec",
    "SequentialGate",
    "ServiceRef",
    "SlackReceiver",
    "StepSpec",
    "TimeWindow",
    "TlsHandshakeGate",
    "WeComReceiver",
    "WebhookReceiver",
]

Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_promql_duration, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^(\d+(\.\d+)?(ms|s|m|h|d))+$"},
                {"type": "number", "minimum": 0},
            ],
            "description": "a duration such as '30s', '5m', '1h30m', or a number of seconds",
        }
    ),
]


def _real_number(value: Any) -> Any:
    """A YAML number: not a boolean (``true`` is 1 to Python), not text, not inf or nan."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{str(value)[:40]!r} is not a number")
    if not math.isfinite(value):
        raise ValueError(f"{value} is not a finite number")
    return value


#: Numbers in policies: strict (no booleans, no strings), finite.
Number = Annotated[float, BeforeValidator(_real_number)]


Url = Annotated[str, BeforeValidator(lambda v: checked_url(v) if isinstance(v, str) else v)]

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
#: Prometheus label names; names starting with "__" are reserved for Prometheus itself.
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_TEMPLATE_KEY = re.compile(r"\{\{\s*(\w+)\s*\}\}")
#: Placeholders a custom gate's PromQL template may use; anything else is an error at load time.
TEMPLATE_KEYS = frozenset({"selector", "window", "namespace", "workload", "service"})


class _Model(BaseModel):
    """Base: camelCase keys in YAML, unknown keys rejected, immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True)


def _split_service_ref(value: Any) -> Any:
    """Accept ``"namespace/name"`` as shorthand for ``{namespace, name}``."""
    if isinstance(value, str):
        namespace, sep, name = value.partition("/")
        if not sep or not namespace or not name or "/" in name:
            raise ValueError(f"{value!r}: write 'namespace/name' or {{namespace: ..., name: ...}}")
        return {"namespace": namespace, "name": name}
    return value


class ServiceRef(_Model):
    """A Kubernetes Service of type LoadBalancer that carries the CLB weight annotation."""

    namespace: str = Field(min_length=1, max_length=63, description="the Service's namespace")
    name: str = Field(
        min_length=1, max_length=63, description="the Service's name (the gateway's LoadBalancer Service on the CLB)"
    )

    @field_validator("namespace", "name")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if not _DNS_LABEL.match(value):
            raise ValueError(f"{value!r} is not a DNS label (lowercase letters, digits and '-')")
        return value

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


class IstioGatewayRef(_Model):
    """An ASM ``IstioGateway`` (istio.alibabacloud.com) on the ASM control plane.

    ASM generates the gateway's Service from it and copies its ``serviceAnnotations`` onto that
    Service (overwriting a direct edit), so the weight is written here, not on the Service.
    """

    namespace: str = Field(
        min_length=1, max_length=63, description="the IstioGateway's namespace on the ASM control plane"
    )
    name: str = Field(min_length=1, max_length=253, description="the IstioGateway's name")
    cluster_id: str | None = Field(
        default=None,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="the data-plane cluster's id: its spec.overrides entry may shadow serviceAnnotations",
    )

    @field_validator("namespace")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if not _DNS_LABEL.match(value):
            raise ValueError(f"{value!r} is not a DNS label (lowercase letters, digits and '-')")
        return value

    @field_validator("name")
    @classmethod
    def _dns_subdomain(cls, value: str) -> str:
        if not _DNS_SUBDOMAIN.match(value):
            raise ValueError(f"{value[:80]!r} is not a Kubernetes object name (lowercase letters, digits, '-', '.')")
        return value

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


class GatewaySpec(_Model):
    """One gateway: its Service and the Prometheus labels that select its traffic."""

    service: Annotated[ServiceRef, BeforeValidator(_split_service_ref)] = Field(
        description="'namespace/name' (or {namespace, name}) of the gateway's Service: its "
        "service.beta.kubernetes.io/alibaba-cloud-loadbalancer-weight annotation is the gateway's share of the CLB"
    )
    istio_gateway: Annotated[IstioGatewayRef | None, BeforeValidator(_split_service_ref)] = Field(
        default=None,
        description="target only: the ASM IstioGateway whose serviceAnnotations carry the weight "
        "('namespace/name' or {namespace, name, clusterId}); the Service is then read, never written",
    )
    gateway_selector: dict[str, Text] | None = Field(
        default=None,
        description="the Istio Gateway spec.selector that binds hosts to this gateway; "
        "default {istio: <Service name without 'istio-'>}",
    )
    workload: str | None = Field(
        default=None,
        max_length=253,
        description="source_workload label value (a Kubernetes workload name); defaults to the Service name",
    )
    labels: dict[str, Text] | None = Field(
        default=None,
        description="Prometheus label matchers that replace the default Istio selector entirely",
    )

    @field_validator("workload")
    @classmethod
    def _workload_name(cls, value: str | None) -> str | None:
        if value is not None and not _DNS_SUBDOMAIN.match(value):
            raise ValueError(f"{value[:80]!r} is not a workload name (lowercase letters, digits, '-' and '.')")
        return value

    @field_validator("labels")
    @classmethod
    def _labels_not_empty(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("an empty selector would match every gateway: name at least one label")
        for key, text in value.items():
            if not _LABEL_NAME.match(key) or key.startswith("__"):
                raise ValueError(
                    f"{key[:80]!r} is not a Prometheus label name (letters, digits and '_', not starting "
                    "with a digit or '__')"
                )
            if not text:
                raise ValueError(f"label {key}: an empty value matches every series without the label; give a value")
            if len(text) > 1024:
                raise ValueError(f"label {key}: value longer than 1024 characters")
        return value

    @field_validator("gateway_selector")
    @classmethod
    def _selector_not_empty(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and not value:
            raise ValueError("an empty selector would select every gateway: name at least one label")
        return value

    def routing_selector(self) -> dict[str, str]:
        """The Istio ``Gateway`` selector that binds hosts to this gateway (runbook step 2)."""
        if self.gateway_selector is not None:
            return dict(self.gateway_selector)
        name = self.service.name
        return {"istio": name.removeprefix("istio-") or name}

    def selector(self) -> dict[str, str]:
        """Label matchers for this gateway's Istio standard metrics."""
        if self.labels is not None:
            return dict(self.labels)
        return {
            "reporter": "source",
            "source_workload": self.workload or self.service.name,
            "source_workload_namespace": self.service.namespace,
        }


class StepSpec(_Model):
    """One step with a bake time of its own (a plain number in ``steps`` bakes ``bakeTime``)."""

    weight: StrictInt = Field(ge=1, le=100, description="the target weight of this step")
    bake_time: Duration | None = Field(default=None, description="how long to bake here; default schedule.bakeTime")

    @model_serializer(mode="wrap")
    def _plain_number_when_plain(self, handler: Any) -> Any:
        # a step without a bake time of its own is written as the plain number it was given as, so
        # the rollout fingerprint of a policy written before per-step bakes existed does not change
        return self.weight if self.bake_time is None else handler(self)

    @field_validator("bake_time")
    @classmethod
    def _bake_not_negative(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value < timedelta(0):
            raise ValueError("bakeTime cannot be negative")
        return value


_STEP_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "integer", "minimum": 1, "maximum": 100},
        {
            "type": "object",
            "properties": {
                "weight": {"type": "integer", "minimum": 1, "maximum": 100},
                "bakeTime": {"type": "string", "pattern": r"^(\d+(\.\d+)?(ms|s|m|h|d))+$"},
            },
            "required": ["weight"],
            "additionalProperties": False,
        },
    ],
    "description": "a target weight, or {weight, bakeTime} to bake this step for its own time",
}


def _step(value: Any) -> Any:
    """A step is a weight, or ``{weight, bakeTime}``; anything else says so in one line."""
    if isinstance(value, int) and not isinstance(value, bool):
        return {"weight": value}
    if isinstance(value, dict | StepSpec):
        return value
    shown = str(value).lower() if isinstance(value, bool) else repr(str(value)[:40])
    raise ValueError(f"{shown}: a step is a valid integer weight (1..100) or {{weight: 5, bakeTime: 30m}}")


Weekday = Literal["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
_WEEKDAYS: tuple[Weekday, ...] = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_HOURS = re.compile(r"^(?P<h1>[01]\d|2[0-3]):(?P<m1>[0-5]\d)-(?P<h2>[01]\d|2[0-4]):(?P<m2>[0-5]\d)$")
_DATE = r"\d{4}-\d{2}-\d{2}"
_FREEZE = re.compile(rf"^(?P<first>{_DATE})(\.\.(?P<last>{_DATE}))?$")


class TimeWindow(_Model):
    """Days of the week and a time of day in which the weight may go up.

    ``hours`` is ``HH:MM-HH:MM`` in the windows' time zone; an end before the start runs past
    midnight (``22:00-06:00`` opens on the listed days at 22:00 and closes at 06:00 the next day).
    """

    days: list[Weekday] = Field(
        default_factory=lambda: list(_WEEKDAYS), min_length=1, description="weekdays (Mon..Sun) the window opens on"
    )
    hours: str = Field(default="00:00-24:00", description="HH:MM-HH:MM, local time in advanceWindows.timeZone")

    @field_validator("hours")
    @classmethod
    def _hours_format(cls, value: str) -> str:
        match = _HOURS.match(value)
        if match is None:
            raise ValueError(f"{value[:40]!r}: write HH:MM-HH:MM with a 24-hour clock, e.g. 10:00-16:30")
        if match.group("h2") == "24" and match.group("m2") != "00":
            raise ValueError(f"{value!r}: 24:00 is the latest end")
        if value[:5] == value[6:]:
            raise ValueError(f"{value!r}: the window is empty (start equals end)")
        return value

    def minutes(self) -> tuple[int, int]:
        """Start and end as minutes after midnight (end may be 1440, or below start: overnight)."""
        start, end = self.hours.split("-")
        return _minutes(start), _minutes(end)


def _minutes(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


class AdvanceWindows(_Model):
    """When the weight may go UP; analysis, rollback and lowering run at any time.

    Outside every window (or on a freeze date) a raise that is due waits, with its reason in
    ``status``; nothing else changes.
    """

    time_zone: str = Field(default="UTC", max_length=64, description="an IANA time zone, e.g. Asia/Shanghai")
    windows: list[TimeWindow] = Field(min_length=1, max_length=50, description="the windows the weight may rise in")
    freeze_dates: list[str] = Field(
        default_factory=list,
        max_length=500,
        description="local dates with no raise at all: YYYY-MM-DD or a range YYYY-MM-DD..YYYY-MM-DD",
    )

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from controller.core.windows import zone

        zone(value)  # ValueError naming the zone when it is not an IANA name
        return value

    @field_validator("freeze_dates")
    @classmethod
    def _dates(cls, value: list[str]) -> list[str]:
        from datetime import date

        for text in value:
            match = _FREEZE.match(text)
            if match is None:
                raise ValueError(f"{text[:40]!r}: write YYYY-MM-DD or YYYY-MM-DD..YYYY-MM-DD")
            try:
                first = date.fromisoformat(match.group("first"))
                last = date.fromisoformat(match.group("last") or match.group("first"))
            except ValueError as exc:
                raise ValueError(f"{text!r}: {exc}") from exc
            if last < first:
                raise ValueError(f"{text!r}: the range ends before it starts")
        return value


class ScheduleSpec(_Model):
    """Which target weights to pass through, how long to bake at each, how the source follows."""

    steps: list[Annotated[StepSpec, BeforeValidator(_step), WithJsonSchema(_STEP_SCHEMA)]] | None = Field(
        default=None,
        description="explicit target weights, strictly increasing, each 1..100; a step may be "
        "{weight: 5, bakeTime: 30m} to bake longer (or shorter) than bakeTime",
    )
    step_weight: StrictInt | None = Field(
        default=None,
        ge=1,
        le=100,
        description="instead of steps: raise the target weight by this much per step (10: 10, 20, 30, ...) "
        "up to maxWeight, then to 100",
    )
    max_weight: StrictInt | None = Field(
        default=None,
        ge=1,
        le=100,
        description="with stepWeight: the last step before the final raise to 100 (unset: 100)",
    )
    bake_time: Duration = Field(
        default=timedelta(minutes=5),
        description="the time each step must be covered by passing checks before the next raise (gaps and "
        "inconclusive checks do not count); a step's own bakeTime overrides it",
    )
    weight_mode: WeightMode = Field(
        default=WeightMode.COMPLEMENTARY,
        description="complementary: the source gets 100 - target at every step; target-only: only the "
        "target's weight is written (the source keeps its own)",
    )

    advance_windows: AdvanceWindows | None = Field(
        default=None, description="when the weight may go up (default: at any time)"
    )
    approval_at: list[StrictInt] = Field(
        default_factory=list,
        max_length=100,
        description="weights the rollout waits for `gateway-canary approve` before reaching (or "
        "passing): [50, 100] asks before the raise to 50 and before promotion",
    )

    @field_validator("steps")
    @classmethod
    def _steps_increasing(cls, value: list[StepSpec] | None) -> list[StepSpec] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("steps must list at least one weight, e.g. [1, 5, 10, 25, 50, 100]")
        weights = [step.weight for step in value]
        for weight in weights:
            if not 1 <= weight <= 100:
                raise ValueError(f"weight {weight} is outside 1..100 (0 is where a rollout starts)")
        for before, after in itertools.pairwise(weights):
            if after <= before:
                raise ValueError(f"steps must be strictly increasing: {before} is followed by {after}")
        return value

    @field_validator("approval_at")
    @classmethod
    def _approvals(cls, value: list[int]) -> list[int]:
        for weight in value:
            if not 1 <= weight <= 100:
                raise ValueError(f"approvalAt weight {weight} is outside 1..100")
        if len(set(value)) != len(value):
            raise ValueError("approvalAt lists a weight twice")
        return sorted(value)

    def step_weights(self) -> list[int] | None:
        """The explicit steps as weights (None: stepWeight is used)."""
        if self.steps is None:
            return None
        return [step.weight for step in self.steps]

    def bake_for(self, weight: int) -> timedelta:
        """How long the step at ``weight`` bakes: its own bakeTime, else the schedule's."""
        for step in self.steps or ():
            if step.weight == weight and step.bake_time is not None:
                return step.bake_time
        return self.bake_time

    @field_validator("bake_time")
    @classmethod
    def _bake_not_negative(cls, value: timedelta) -> timedelta:
        if value < timedelta(0):
            raise ValueError("bakeTime cannot be negative")
        return value

    @model_validator(mode="after")
    def _one_way_to_say_steps(self) -> ScheduleSpec:
        if self.steps is not None and (self.step_weight is not None or self.max_weight is not None):
            raise ValueError("give either steps or stepWeight (+ maxWeight), not both")
        if self.steps is None and self.step_weight is None:
            raise ValueError("give steps (e.g. [1, 5, 10, 25, 50, 100]) or stepWeight (+ maxWeight)")
        if self.max_weight is not None and self.step_weight is not None and self.max_weight < self.step_weight:
            raise ValueError(f"maxWeight {self.max_weight} is below stepWeight {self.step_weight}")
        return self


class InconclusivePolicy(_Model):
    """What a run of inconclusive checks leads to, and after how many in a row."""

    action: OnInconclusive = Field(
        default=OnInconclusive.HOLD,
        description="hold: keep the weights and warn once; rollback: target 0 (source 100) and a critical alert",
    )
    after_checks: StrictInt = Field(
        default=10,
        ge=1,
        le=10_000,
        description="how many such checks since the last pass trigger the action (a count of checks: "
        "times analysis.interval gives the time)",
    )


class AnalysisSpec(_Model):
    """How often and over what window both gateways are measured, and how verdicts add up."""

    interval: Duration = Field(
        default=timedelta(seconds=30),
        description="how often both gateways are measured and judged (one check), 1s..1h; no shorter than "
        "the Prometheus scrape interval, or checks judge the same samples again",
    )
    window: Duration = Field(
        default=timedelta(minutes=1),
        description="the PromQL range of every query ([1m]), 1s..24h: the traffic one check judges; give it "
        "several scrape intervals (rate() needs two samples) and enough requests for minRequests",
    )
    min_requests: StrictInt = Field(
        default=50, ge=1, le=1_000_000_000, description="requests per window needed on EACH gateway to judge"
    )
    failure_threshold: StrictInt = Field(default=2, ge=1, le=100, description="consecutive FAIL checks that roll back")
    on_missing_data: InconclusivePolicy = Field(
        default_factory=InconclusivePolicy,
        description="checks that cannot judge for lack of data: too few requests (minRequests), no series, NaN",
    )
    on_metrics_unavailable: InconclusivePolicy = Field(
        default_factory=InconclusivePolicy,
        description="checks that cannot judge because Prometheus is unreachable, errors or answers malformed",
    )
    on_traffic_deficit: InconclusivePolicy = Field(
        default_factory=lambda: InconclusivePolicy(action=OnInconclusive.ROLLBACK, after_checks=3),
        description="the ASM gateway gets persistently fewer requests than the CLB sends it: requests "
        "fail before HTTP (TLS, listener ports, a missing Gateway server); rollback (default) or hold",
    )

    @field_validator("interval")
    @classmethod
    def _interval_sane(cls, value: timedelta) -> timedelta:
        if not timedelta(seconds=1) <= value <= timedelta(hours=1):
            raise ValueError("interval must be between 1s and 1h")
        return value

    @field_validator("window")
    @classmethod
    def _window_sane(cls, value: timedelta) -> timedelta:
        if not timedelta(seconds=1) <= value <= timedelta(days=1):
            raise ValueError("window must be between 1s and 24h")
        return value


class SequentialGate(_Model):
    """An anytime-valid sequential comparison of the target's rate of bad requests with the source's
    (``controller.core.sequential``): checked as often as the policy checks, it rolls back when the
    evidence suffices, and rolls back a target no worse than the source with probability at most
    ``alpha`` over the whole step, however many checks there are."""

    alpha: Number = Field(
        default=0.01,
        gt=0,
        le=0.2,
        description="the false-rollback budget per step: the chance of ever rolling back a target no worse "
        "than the source (0.01: 1 %)",
    )
    min_effect: Number = Field(
        default=1.5,
        ge=1,
        le=100,
        description="the smallest (target rate) / (source rate) worth a rollback: the test's power is aimed "
        "at effects of at least this size; a FAIL rolls back at once (failureThreshold does not apply)",
    )


class ErrorRateGate(_Model):
    """5xx ratio: an absolute ceiling on the target, an allowed increase over the source, and/or a
    sequential comparison with the source."""

    max: Number | None = Field(default=None, ge=0, le=1, description="highest 5xx ratio on the target")
    max_increase: Number | None = Field(default=None, ge=0, le=1, description="highest (target - source) 5xx ratio")
    sequential: SequentialGate | None = Field(
        default=None,
        description="{alpha, minEffect}: roll back as soon as the target's 5xx rate is credibly minEffect x the "
        "source's or more (gate errorRateSequential)",
    )

    @model_validator(mode="after")
    def _some_limit(self) -> ErrorRateGate:
        if self.max is None and self.max_increase is None and self.sequential is None:
            raise ValueError("errorRate needs max and/or maxIncrease (ratios from 0 to 1, e.g. 0.01) and/or sequential")
        return self


class LatencySequentialGate(SequentialGate):
    """The sequential comparison of the share of requests slower than a histogram bound."""

    slower_than_ms: Number | None = Field(
        default=None,
        gt=0,
        description="a request slower than this is a bad one; a bucket bound of the gateways' latency "
        "histogram (Istio's defaults include 100, 250, 500, 1000, 2500, 5000 ms); unset: the pNNMs max",
    )


class MaxLimit(_Model):
    """An absolute ceiling."""

    max: Number = Field(gt=0, description="the highest value allowed on the target (for latency: milliseconds)")


_PERCENTILE_FIELDS = {"p50_ms": 0.5, "p90_ms": 0.9, "p95_ms": 0.95, "p99_ms": 0.99, "p999_ms": 0.999}


class LatencyGate(_Model):
    """A latency quantile: an absolute ceiling on the target and/or a ratio over the source.

    The quantile is the one named by the ``pNNMs`` key (p99 when only ``maxRatio`` is given).
    """

    p50_ms: MaxLimit | None = Field(default=None, description="{max: ms}: judge the median (p50), in milliseconds")
    p90_ms: MaxLimit | None = Field(default=None, description="{max: ms}: judge the p90 latency, in milliseconds")
    p95_ms: MaxLimit | None = Field(default=None, description="{max: ms}: judge the p95 latency, in milliseconds")
    p99_ms: MaxLimit | None = Field(default=None, description="{max: ms}: judge the p99 latency, in milliseconds")
    p999_ms: MaxLimit | None = Field(default=None, description="{max: ms}: judge the p99.9 latency, in milliseconds")
    max_ratio: Number | None = Field(
        default=None, ge=1, le=100, description="highest target/source ratio of the quantile"
    )
    sequential: LatencySequentialGate | None = Field(
        default=None,
        description="{alpha, minEffect, slowerThanMs}: roll back as soon as the target's share of requests "
        "slower than slowerThanMs is credibly minEffect x the source's or more (gate latencySequential)",
    )

    @model_validator(mode="after")
    def _one_quantile(self) -> LatencyGate:
        named = [key for key in _PERCENTILE_FIELDS if getattr(self, key) is not None]
        if len(named) > 1:
            raise ValueError("name one quantile per latency gate (one of p50Ms, p90Ms, p95Ms, p99Ms, p999Ms)")
        if not named and self.max_ratio is None and self.sequential is None:
            raise ValueError(
                "latency needs a quantile limit such as p99Ms: {max: 500} and/or maxRatio and/or sequential"
            )
        if self.sequential is not None and self.sequential.slower_than_ms is None and not named:
            raise ValueError(
                "latency.sequential needs slowerThanMs (a histogram bucket bound, e.g. 500) or a pNNMs max to "
                "take it from"
            )
        return self

    @property
    def slow_ms(self) -> float | None:
        """The bound above which the sequential gate counts a request as slow."""
        if self.sequential is None:
            return None
        return self.sequential.slower_than_ms if self.sequential.slower_than_ms is not None else self.max_ms

    @property
    def quantile(self) -> float:
        """The quantile both limits judge."""
        for key, quantile in _PERCENTILE_FIELDS.items():
            if getattr(self, key) is not None:
                return quantile
        return 0.99

    @property
    def max_ms(self) -> float | None:
        """The absolute ceiling in milliseconds, if one is set."""
        for key in _PERCENTILE_FIELDS:
            limit = getattr(self, key)
            if limit is not None:
                return float(limit.max)
        return None

    @property
    def label(self) -> str:
        """``p99`` and the like, for gate names and messages."""
        text = f"{self.quantile * 100:g}".replace(".", "")
        return f"p{text}"


class CustomGate(_Model):
    """Any PromQL, rendered per gateway with ``{{ selector }}``, ``{{ window }}`` and friends."""

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="the gate's name in checks, metrics and alerts (unique in the policy; a min bound is "
        "reported as <name>Min)",
    )
    query: str = Field(
        min_length=1,
        max_length=8192,
        description="PromQL giving one number, run for each gateway with {{ selector }}, {{ window }}, "
        "{{ namespace }}, {{ workload }} and {{ service }} filled in; the target's value is judged",
    )
    max: Number | None = Field(
        default=None, description="the target's value must be at most this (in the query's own unit)"
    )
    min: Number | None = Field(
        default=None, description="the target's value must be at least this (e.g. a success ratio)"
    )
    on_empty: OnEmpty = Field(
        default=OnEmpty.INCONCLUSIVE,
        description="what an empty answer means: 'zero' (e.g. no resets at all) or 'inconclusive' (no data)",
    )

    @field_validator("query")
    @classmethod
    def _known_placeholders(cls, value: str) -> str:
        unknown = sorted(set(_TEMPLATE_KEY.findall(value)) - TEMPLATE_KEYS)
        if unknown:
            raise ValueError(
                f"unknown placeholder(s) {', '.join(unknown)}; allowed: "
                + ", ".join("{{ " + key + " }}" for key in sorted(TEMPLATE_KEYS))
            )
        return value

    @model_validator(mode="after")
    def _some_bound(self) -> CustomGate:
        if self.max is None and self.min is None:
            raise ValueError("a custom gate needs max and/or min")
        if self.max is not None and self.min is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class ResponseMixGate(_Model):
    """The ASM gateway's responses must look like the old gateway's: both serve the same clients.

    Configuration left behind in the runbook's step 2 shows here, not as 5xx: a missing route
    answers 404 with Envoy's flag ``NR``, a missing AuthorizationPolicy 403, a missing
    RequestAuthentication 401. Each limit is the largest allowed excess of the target's ratio over
    the source's; an excess must also stand out of the sampling noise by ``noiseSigmas`` standard
    deviations (a two-proportion test), so that a quiet healthy pair does not trip it
    (docs/policies.md has the figures).
    """

    enabled: bool = Field(default=True, description="false: no response-mix gate")
    max_increase_4xx: Number = Field(
        default=0.03, ge=0, le=1, alias="maxIncrease4xx", description="target 4xx ratio minus source 4xx ratio"
    )
    max_increase_auth: Number = Field(
        default=0.01, ge=0, le=1, description="target (401 + 403) ratio minus the source's"
    )
    max_increase_no_route: Number = Field(
        default=0.01, ge=0, le=1, description="target ratio of responses flagged NR (no route) minus the source's"
    )
    noise_sigmas: Number = Field(
        default=4.0, ge=0, le=20, description="an excess must exceed this many standard deviations of the noise"
    )
    min_excess: StrictInt = Field(
        default=5,
        ge=0,
        le=1_000_000,
        description="and be at least this many responses more than the source's ratio gives (a few stray "
        "404s at low traffic are not a missing route)",
    )


class TlsHandshakeGate(_Model):
    """Handshake failures per connection, target vs source (Envoy listener TLS stats, when exported)."""

    max_increase: Number = Field(default=0.01, ge=0, le=1, description="target minus source failure ratio")


class GatesSpec(_Model):
    """The limits a check judges. Both gateways' numbers are always measured and reported."""

    error_rate: ErrorRateGate | None = Field(default=None, description="the 5xx gate; unset: 5xx are not judged")
    latency: LatencyGate | None = Field(default=None, description="the latency gate; unset: latency is not judged")
    response_mix: ResponseMixGate = Field(
        default_factory=ResponseMixGate,
        description="on by default: the target's 4xx, 401/403 and 404 NR ratios against the source's",
    )
    tls_handshake: TlsHandshakeGate | None = Field(
        default=None, description="needs Envoy's listener TLS stats exported (docs/policies.md)"
    )
    custom: list[CustomGate] = Field(
        default_factory=list, description="more gates, each a PromQL query with a max and/or min"
    )

    @model_validator(mode="after")
    def _at_least_one(self) -> GatesSpec:
        if self.error_rate is None and self.latency is None and not self.custom:
            raise ValueError("a policy needs at least one gate: errorRate, latency or custom")
        names = [gate.name for gate in self.custom]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise ValueError(f"custom gate names must be unique: {', '.join(duplicated)}")
        return self


class SlackReceiver(SecretUrlReceiver):
    """A Slack incoming webhook."""

    type: Literal["slack"] = Field(description="which kind of receiver this is")


class WebhookReceiver(SecretUrlReceiver):
    """Any HTTP endpoint that takes the alert as JSON."""

    type: Literal["webhook"] = Field(description="which kind of receiver this is")


class AlertmanagerReceiver(_Model):
    """An Alertmanager (v2 API), so on-call routing goes through the team's existing config."""

    type: Literal["alertmanager"] = Field(description="which kind of receiver this is")
    name: Text | None = Field(
        default=None,
        max_length=63,
        description="what logs, metrics and delivery outcomes call this receiver (unique in the policy; "
        "'global' is taken); default: its type, host and a digest of its URL",
    )
    url: Url = Field(description="the Alertmanager's base URL (alerts are posted to /api/v2/alerts); not a secret")


Receiver = Annotated[
    SlackReceiver | WebhookReceiver | AlertmanagerReceiver | DingTalkReceiver | FeishuReceiver | WeComReceiver,
    Field(discriminator="type"),
]


class PrometheusSpec(_Model):
    """Per-policy override of the Prometheus connection in the settings."""

    url: Url | None = Field(
        default=None,
        description="the Prometheus HTTP API this policy queries (e.g. an ARMS endpoint); unset: "
        "GATEWAY_CANARY_PROMETHEUS_URL. Another URL gets only the credentials named here",
    )
    token_from_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        max_length=128,
        description="the environment variable that holds the token, sent as 'Authorization: <authScheme> <token>'",
    )
    auth_scheme: Text | None = Field(
        default=None, description="'Bearer' (default) or '' for a raw 'Authorization: <token>' (ARMS)"
    )
    username: Text | None = Field(
        default=None, max_length=256, description="basic-auth user (ARMS V2: the AccessKey ID)"
    )
    password_from_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        max_length=128,
        description="the environment variable that holds the basic-auth password (ARMS V2: the AccessKey secret)",
    )
    ca_file: Text | None = Field(
        default=None,
        max_length=4096,
        description="path in the controller's pod of a CA bundle to verify the server's certificate",
    )
    timeout: Duration | None = Field(
        default=None, description="per query; unset: GATEWAY_CANARY_PROMETHEUS_TIMEOUT_SECONDS (5s)"
    )


class PolicyMetadata(_Model):
    """Identity of a policy, and the environment it runs in."""

    name: str = Field(
        min_length=1,
        max_length=63,
        description="the policy's name, unique (a DNS label): it names the state ConfigMap "
        "gateway-canary-<name>, the commands' NAME, and labels metrics, logs and alerts",
    )
    labels: dict[str, Text] = Field(
        default_factory=dict,
        max_length=32,
        description="environment labels (env: prod, region: cn-hangzhou): alert templates can show them as "
        "{{ labels.env }}, and Alertmanager alerts carry them for routing",
    )

    @field_validator("labels")
    @classmethod
    def _label_names(cls, value: dict[str, str]) -> dict[str, str]:
        for key, text in value.items():
            if not _LABEL_NAME.match(key) or key.startswith("__"):
                raise ValueError(
                    f"{key[:80]!r} is not a label name (letters, digits and '_', not starting with a digit)"
                )
            if len(text) > 256:
                raise ValueError(f"label {key}: value longer than 256 characters")
        return value

    @field_validator("name")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if not _DNS_LABEL.match(value):
            raise ValueError(f"{value!r} is not a DNS label (lowercase letters, digits and '-')")
        return value


class CloudSpec(_Model):
    """How closely the cloud's actual split is verified (docs/alibaba-cloud.md)."""

    confirm_timeout: Duration = Field(
        default=timedelta(minutes=3),
        description="how long the cloud controller (and ASM) may take to confirm a weight write "
        "(EnsuredLoadBalancer newer than the write); later counts as unconfirmed: hold and alert",
    )
    share_tolerance: Number = Field(
        default=0.05,
        gt=0,
        le=1,
        description="largest allowed gap (share points) between requested and effective share (a "
        "warning), and between effective and observed share (the step is settling until within it)",
    )
    settle_timeout: Duration = Field(
        default=timedelta(minutes=10),
        description="how long the observed split may take to reach the effective share before an alert",
    )
    max_deficit: Number = Field(
        default=0.3,
        gt=0,
        le=1,
        description="once settled, the ASM gateway missing more than this fraction of the requests the "
        "CLB sends it (and more than the noise) is a traffic deficit (analysis.onTrafficDeficit)",
    )
    deficit_grace: Duration = Field(
        default=timedelta(minutes=3),
        description="after a confirmed write, how long traffic may take to move before a shortfall counts as "
        "a traffic deficit (clients on kept-alive connections follow new weights late; raise it for "
        "long-lived HTTP/2, gRPC or TCP connections); at least one analysis window is always waited",
    )
    require_wrr: bool = Field(
        default=True,
        description="refuse unless the listener scheduler is wrr (weights are ignored under rr); false: warn only",
    )


class PromotionSpec(_Model):
    """What happens at 100: by default the rollout is promoted on reaching it."""

    verify_for: Duration = Field(
        default=timedelta(0),
        description="keep checking the ASM gateway this long at 100 (absolute gates only: the old "
        "gateway has no traffic to compare with); a failure steps back to the last step's split, "
        "and Promoted comes only after it passes",
    )

    @field_validator("verify_for")
    @classmethod
    def _sane(cls, value: timedelta) -> timedelta:
        if not timedelta(0) <= value <= timedelta(days=7):
            raise ValueError("verifyFor must be between 0s and 7d")
        return value


class RoutesSpec(_Model):
    """Route parity: each host:port the source gateway serves must be served by the target first."""

    check: bool = Field(default=True, description="compare the Istio Gateways selecting each gateway")
    ignore_hosts: list[Text] = Field(
        default_factory=list, max_length=1000, description="hosts (or host:port) not to require on the target"
    )


class PolicySpec(_Model):
    """Everything a rollout needs."""

    source: GatewaySpec = Field(
        description="the gateway traffic leaves (the self-managed Istio gateway): every check's baseline"
    )
    target: GatewaySpec = Field(description="the gateway traffic moves to (the ASM gateway): the one judged")
    schedule: ScheduleSpec = Field(description="the target weights to pass through and how long each bakes")
    analysis: AnalysisSpec = Field(
        default_factory=AnalysisSpec, description="how often checks run, over what window, and what rolls back"
    )
    gates: GatesSpec = Field(description="the limits each check judges; at least one of errorRate, latency, custom")
    alerts: list[Receiver] = Field(
        default_factory=list,
        description="this policy's receivers, in addition to those in the settings (ALERTMANAGER_URL, "
        "SLACK_WEBHOOK_URL, WEBHOOK_URL)",
    )
    prometheus: PrometheusSpec | None = Field(
        default=None, description="unset: the controller's Prometheus settings (GATEWAY_CANARY_PROMETHEUS_*)"
    )
    cloud: CloudSpec = Field(
        default_factory=CloudSpec, description="the checks that a written weight is the traffic the CLB sends"
    )
    routes: RoutesSpec = Field(default_factory=RoutesSpec, description="route parity, checked before the first raise")
    promotion: PromotionSpec = Field(
        default_factory=PromotionSpec, description="what happens once the target reaches 100"
    )
    alert_template: str | None = Field(
        default=None,
        max_length=4096,
        description="the text of this policy's alerts, with {{ field }} placeholders (docs/policies.md lists "
        "them); unset: the built-in text",
    )

    @model_validator(mode="after")
    def _verification_has_absolute_gates(self) -> PolicySpec:
        gates = self.gates
        absolute = (
            (gates.error_rate is not None and gates.error_rate.max is not None)
            or (gates.latency is not None and gates.latency.max_ms is not None)
            or bool(gates.custom)
        )
        if self.promotion.verify_for > timedelta(0) and not absolute:
            raise ValueError(
                "promotion.verifyFor needs an absolute gate (gates.errorRate.max, a latency pNNMs.max or a "
                "custom gate): at 100 the old gateway has no traffic to compare with"
            )
        return self

    @model_validator(mode="after")
    def _istio_gateway_on_target(self) -> PolicySpec:
        if self.source.istio_gateway is not None:
            raise ValueError(
                "source.istioGateway: only the target (the ASM gateway) can be an IstioGateway; "
                "the self-managed gateway's weight is on its Service"
            )
        return self

    @model_validator(mode="after")
    def _receiver_names(self) -> PolicySpec:
        names = [receiver.name for receiver in self.alerts if receiver.name]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"alert receivers need distinct names: {', '.join(repeated)} is used twice")
        if "global" in names:
            raise ValueError("the receiver name 'global' is taken by the receivers in the settings")
        return self

    @model_validator(mode="after")
    def _two_services(self) -> PolicySpec:
        if self.source.service == self.target.service:
            raise ValueError(f"source and target are the same Service {self.source.service}")
        return self


class CanaryPolicy(_Model):
    """One migration from a source gateway to a target gateway."""

    api_version: Literal["gateway-canary.io/v1alpha1"] = Field(
        default="gateway-canary.io/v1alpha1", description="the version of the policy format (the only one)"
    )
    kind: Literal["CanaryPolicy"] = Field(default="CanaryPolicy", description="always CanaryPolicy")
    metadata: PolicyMetadata = Field(description="the policy's name and environment labels")
    spec: PolicySpec = Field(description="the migration: the two gateways, the steps, the checks and the alerts")

    @model_validator(mode="after")
    def _template_fields(self) -> CanaryPolicy:
        template = self.spec.alert_template
        problems = [] if template is None else template_problems(template, self.metadata.labels.keys())
        if problems:
            raise ValueError(f"spec.alertTemplate: {'; '.join(problems)}")
        return self

    @property
    def name(self) -> str:
        """The policy's name, bound to every log line about it."""
        return self.metadata.name

    def gateway(self, role: GatewayRole) -> GatewaySpec:
        """The gateway playing ``role``."""
        return self.spec.source if role is GatewayRole.SOURCE else self.spec.target

    def rollout_fingerprint(self) -> str:
        """A digest of what steers the rollout (not alerts or connections).

        Persisted with the state: when it differs, the policy changed and the bake restarts.
        """
        # Defaults are left out, so that a field added in a later release (with a default that keeps
        # today's behaviour) does not make every running policy look changed after an upgrade.
        steering = self.spec.model_dump(
            mode="json",
            by_alias=True,
            exclude_defaults=True,
            include={"source", "target", "schedule", "analysis", "gates", "promotion"},
            # when raises may happen and who approves them do not steer the evidence: editing them
            # neither restarts a bake nor re-arms a rolled-back rollout
            exclude={"schedule": {"advance_windows", "approval_at"}},
        )
        encoded = json.dumps(steering, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(encoded).hexdigest()[:16]
