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
    SecretStr,
    StrictInt,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from controller.core.durations import format_promql_duration, parse_duration
from controller.core.enums import GatewayRole, OnEmpty, OnInconclusive, WeightMode

__all__ = [
    "AlertmanagerReceiver",
    "AnalysisSpec",
    "CanaryPolicy",
    "CloudSpec",
    "CustomGate",
    "Duration",
    "ErrorRateGate",
    "GatesSpec",
    "GatewaySpec",
    "InconclusivePolicy",
    "IstioGatewayRef",
    "LatencyGate",
    "PrometheusSpec",
    "Receiver",
    "ResponseMixGate",
    "RoutesSpec",
    "ScheduleSpec",
    "ServiceRef",
    "SlackReceiver",
    "TlsHandshakeGate",
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


_URL = re.compile(
    r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?:[^@/?#\[\]]*@)?"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^:/?#\[\]@]*)(?::(?P<port>[0-9]*))?(?P<rest>[/?#].*)?$"
)


def checked_url(text: str) -> str:
    """An http(s) URL with a host; ValueError saying what is wrong, never echoing the URL (a secret).

    Parsed here by a pattern, not urllib (the core imports no I/O library, urllib included).
    """
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise ValueError("the URL contains spaces or control characters")
    match = _URL.match(text)
    if not text.lower().startswith(("http://", "https://")):
        raise ValueError("the URL must start with http:// or https://")
    if match is None:
        raise ValueError("not a URL (its host or port is malformed, e.g. unbalanced [ ])")
    if not match.group("host"):
        raise ValueError("the URL has no host")
    port = match.group("port")
    if port is not None and (not port or not 0 < int(port) < 65536):
        raise ValueError("the URL's port is not a number from 1 to 65535")
    return text


def _printable(value: str | None) -> str | None:
    if value is not None and any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError("contains control characters (newlines, tabs, escapes)")
    return value


#: Free text people give things: no control characters (they would forge log lines and alert text).
Text = Annotated[str, BeforeValidator(lambda v: _printable(v) if isinstance(v, str) else v)]
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

    namespace: str = Field(min_length=1, max_length=63)
    name: str = Field(min_length=1, max_length=63)

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

    namespace: str = Field(min_length=1, max_length=63)
    name: str = Field(min_length=1, max_length=253)
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

    service: Annotated[ServiceRef, BeforeValidator(_split_service_ref)]
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


class ScheduleSpec(_Model):
    """Which target weights to pass through, how long to bake at each, how the source follows."""

    steps: list[StrictInt] | None = Field(
        default=None, description="explicit target weights, strictly increasing, each 1..100"
    )
    step_weight: StrictInt | None = Field(default=None, ge=1, le=100)
    max_weight: StrictInt | None = Field(default=None, ge=1, le=100)
    bake_time: Duration = Field(default=timedelta(minutes=5))
    weight_mode: WeightMode = WeightMode.COMPLEMENTARY

    @field_validator("steps")
    @classmethod
    def _steps_increasing(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("steps must list at least one weight, e.g. [1, 5, 10, 25, 50, 100]")
        for weight in value:
            if not 1 <= weight <= 100:
                raise ValueError(f"weight {weight} is outside 1..100 (0 is where a rollout starts)")
        for before, after in itertools.pairwise(value):
            if after <= before:
                raise ValueError(f"steps must be strictly increasing: {before} is followed by {after}")
        return value

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

    action: OnInconclusive = OnInconclusive.HOLD
    after_checks: StrictInt = Field(default=10, ge=1, le=10_000)


class AnalysisSpec(_Model):
    """How often and over what window both gateways are measured, and how verdicts add up."""

    interval: Duration = Field(default=timedelta(seconds=30))
    window: Duration = Field(default=timedelta(minutes=1))
    min_requests: StrictInt = Field(
        default=50, ge=1, le=1_000_000_000, description="requests per window needed on EACH gateway to judge"
    )
    failure_threshold: StrictInt = Field(default=2, ge=1, le=100, description="consecutive FAIL checks that roll back")
    on_missing_data: InconclusivePolicy = Field(default_factory=InconclusivePolicy)
    on_metrics_unavailable: InconclusivePolicy = Field(default_factory=InconclusivePolicy)
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


class ErrorRateGate(_Model):
    """5xx ratio: an absolute ceiling on the target and/or an allowed increase over the source."""

    max: Number | None = Field(default=None, ge=0, le=1, description="highest 5xx ratio on the target")
    max_increase: Number | None = Field(default=None, ge=0, le=1, description="highest (target - source) 5xx ratio")

    @model_validator(mode="after")
    def _some_limit(self) -> ErrorRateGate:
        if self.max is None and self.max_increase is None:
            raise ValueError("errorRate needs max and/or maxIncrease (ratios from 0 to 1, e.g. 0.01)")
        return self


class MaxLimit(_Model):
    """An absolute ceiling."""

    max: Number = Field(gt=0)


_PERCENTILE_FIELDS = {"p50_ms": 0.5, "p90_ms": 0.9, "p95_ms": 0.95, "p99_ms": 0.99, "p999_ms": 0.999}


class LatencyGate(_Model):
    """A latency quantile: an absolute ceiling on the target and/or a ratio over the source.

    The quantile is the one named by the ``pNNMs`` key (p99 when only ``maxRatio`` is given).
    """

    p50_ms: MaxLimit | None = None
    p90_ms: MaxLimit | None = None
    p95_ms: MaxLimit | None = None
    p99_ms: MaxLimit | None = None
    p999_ms: MaxLimit | None = None
    max_ratio: Number | None = Field(
        default=None, ge=1, le=100, description="highest target/source ratio of the quantile"
    )

    @model_validator(mode="after")
    def _one_quantile(self) -> LatencyGate:
        named = [key for key in _PERCENTILE_FIELDS if getattr(self, key) is not None]
        if len(named) > 1:
            raise ValueError("name one quantile per latency gate (one of p50Ms, p90Ms, p95Ms, p99Ms, p999Ms)")
        if not named and self.max_ratio is None:
            raise ValueError("latency needs a quantile limit such as p99Ms: {max: 500} and/or maxRatio")
        return self

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

    name: str = Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9_.-]+$")
    query: str = Field(min_length=1, max_length=8192)
    max: Number | None = None
    min: Number | None = None
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

    error_rate: ErrorRateGate | None = None
    latency: LatencyGate | None = None
    response_mix: ResponseMixGate = Field(default_factory=ResponseMixGate)
    tls_handshake: TlsHandshakeGate | None = Field(
        default=None, description="needs Envoy's listener TLS stats exported (docs/policies.md)"
    )
    custom: list[CustomGate] = Field(default_factory=list)

    @model_validator(mode="after")
    def _at_least_one(self) -> GatesSpec:
        if self.error_rate is None and self.latency is None and not self.custom:
            raise ValueError("a policy needs at least one gate: errorRate, latency or custom")
        names = [gate.name for gate in self.custom]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise ValueError(f"custom gate names must be unique: {', '.join(duplicated)}")
        return self


class _SecretUrlReceiver(_Model):
    """A receiver whose URL is a secret: given inline or, better, named by an environment variable."""

    name: Text | None = Field(default=None, max_length=63)
    url: SecretStr | None = None
    url_from_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)

    @model_validator(mode="after")
    def _one_url(self) -> _SecretUrlReceiver:
        if (self.url is None) == (self.url_from_env is None):
            raise ValueError("give exactly one of url or urlFromEnv (the name of an environment variable)")
        if self.url is not None:
            checked_url(self.url.get_secret_value())
        return self


class SlackReceiver(_SecretUrlReceiver):
    """A Slack incoming webhook."""

    type: Literal["slack"]


class WebhookReceiver(_SecretUrlReceiver):
    """Any HTTP endpoint that takes the alert as JSON."""

    type: Literal["webhook"]


class AlertmanagerReceiver(_Model):
    """An Alertmanager (v2 API), so on-call routing goes through the team's existing config."""

    type: Literal["alertmanager"]
    name: Text | None = Field(default=None, max_length=63)
    url: Url


Receiver = Annotated[SlackReceiver | WebhookReceiver | AlertmanagerReceiver, Field(discriminator="type")]


class PrometheusSpec(_Model):
    """Per-policy override of the Prometheus connection in the settings."""

    url: Url | None = None
    token_from_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)
    auth_scheme: Text | None = Field(
        default=None, description="'Bearer' (default) or '' for a raw 'Authorization: <token>' (ARMS)"
    )
    username: Text | None = Field(default=None, max_length=256)
    password_from_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)
    ca_file: Text | None = Field(default=None, max_length=4096)
    timeout: Duration | None = None


class PolicyMetadata(_Model):
    """Identity of a policy."""

    name: str = Field(min_length=1, max_length=63)

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


class RoutesSpec(_Model):
    """Route parity: each host:port the source gateway serves must be served by the target first."""

    check: bool = Field(default=True, description="compare the Istio Gateways selecting each gateway")
    ignore_hosts: list[Text] = Field(
        default_factory=list, max_length=1000, description="hosts (or host:port) not to require on the target"
    )


class PolicySpec(_Model):
    """Everything a rollout needs."""

    source: GatewaySpec
    target: GatewaySpec
    schedule: ScheduleSpec
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)
    gates: GatesSpec
    alerts: list[Receiver] = Field(default_factory=list)
    prometheus: PrometheusSpec | None = None
    cloud: CloudSpec = Field(default_factory=CloudSpec)
    routes: RoutesSpec = Field(default_factory=RoutesSpec)

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

    api_version: Literal["gateway-canary.io/v1alpha1"] = "gateway-canary.io/v1alpha1"
    kind: Literal["CanaryPolicy"] = "CanaryPolicy"
    metadata: PolicyMetadata
    spec: PolicySpec

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
            include={"source", "target", "schedule", "analysis", "gates"},
        )
        encoded = json.dumps(steering, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(encoded).hexdigest()[:16]
