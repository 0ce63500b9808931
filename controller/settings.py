"""All configuration in one place, from environment variables prefixed ``GATEWAY_CANARY_``.

Per-policy overrides (a policy's ``prometheus:`` block) are merged in ``PrometheusConnection``;
nothing else reads the environment except ``urlFromEnv``/``tokenFromEnv`` secrets, which are
resolved when a policy starts so that a missing secret is reported against the policy.
"""

from __future__ import annotations

import enum
import os
import re
from datetime import timedelta
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from controller.core.policy import PrometheusSpec
from controller.core.text import checked_url

__all__ = ["LogFormat", "PrometheusConnection", "Settings", "invalid_settings"]


class LogFormat(enum.StrEnum):
    """How logs are rendered: JSON for the container, readable for a terminal, or by detection."""

    AUTO = "auto"
    JSON = "json"
    CONSOLE = "console"


_SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _pod_namespace() -> str:
    """The namespace the pod runs in (mounted with its service account), else gateway-canary."""
    try:
        return _SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "gateway-canary"
    except OSError:
        return "gateway-canary"


class Settings(BaseSettings):
    """Controller settings. Every field is ``GATEWAY_CANARY_<FIELD>`` in the environment."""

    # Numbers are finite (no inf/nan) and bounded; each bad value is one line naming the variable.
    model_config = SettingsConfigDict(env_prefix="GATEWAY_CANARY_", extra="ignore", allow_inf_nan=False)

    policies_dir: Path = Field(default=Path("policies"), description="directory of *.yaml policies")
    reload_interval_seconds: float = Field(default=5.0, gt=0, le=3600, description="how often policies are re-read")

    prometheus_url: str = Field(default="http://127.0.0.1:9090")
    prometheus_token: SecretStr | None = Field(default=None, description="sent as Authorization header")
    prometheus_auth_scheme: str = Field(default="Bearer", description="'' sends the raw token (ARMS V1)")
    prometheus_username: str | None = None
    prometheus_password: SecretStr | None = None
    prometheus_ca_file: Path | None = None
    prometheus_timeout_seconds: float = Field(default=5.0, gt=0, le=300)

    kubeconfig: Path | None = Field(default=None, description="unset: in-cluster config, then ~/.kube/config")
    namespace: str = Field(
        default_factory=_pod_namespace,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        max_length=63,
        description="where the state objects live; unset: the pod's namespace, else gateway-canary",
    )
    unhealthy_after_seconds: float = Field(
        default=300.0,
        gt=0,
        le=7 * 86400,
        description="/healthz fails once a policy's ticks have kept failing this long",
    )
    kube_context: str | None = None
    asm_kubeconfig: Path | None = Field(
        default=None,
        description="kubeconfig of the ASM control plane (IstioGateways, the ASM side's Istio Gateways); "
        "unset: the data-plane cluster's",
    )
    asm_context: str | None = Field(default=None, description="context in GATEWAY_CANARY_ASM_KUBECONFIG")
    dry_run: bool = Field(default=False, description="log intended writes, write nothing")

    http_host: str = "0.0.0.0"
    http_port: int = Field(default=8080, ge=0, le=65535, description="/metrics, /healthz, /readyz; 0 = any")

    log_format: LogFormat = LogFormat.AUTO
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL")

    alertmanager_url: str | None = Field(default=None, description="receiver added to every policy")
    slack_webhook_url: SecretStr | None = Field(default=None, description="receiver added to every policy")
    webhook_url: SecretStr | None = Field(default=None, description="receiver added to every policy")
    notify_backoff_seconds: float = Field(default=0.5, ge=0, le=3600, description="first retry delay, doubling")
    notify_backoff_max_seconds: float = Field(default=60.0, gt=0, le=3600, description="longest retry delay")
    notify_timeout_seconds: float = Field(default=5.0, gt=0, le=300, description="per delivery (warning, info)")
    notify_critical_timeout_seconds: float = Field(
        default=60.0, gt=0, le=600, description="per delivery of a critical alert: wait rather than re-send"
    )
    notify_deadline_seconds: float = Field(
        default=3600.0, gt=0, le=7 * 86400, description="keep retrying a warning or info alert this long"
    )
    notify_critical_deadline_seconds: float = Field(
        default=6 * 3600.0, gt=0, le=7 * 86400, description="keep retrying a critical alert (a rollback) this long"
    )
    command_poll_seconds: float = Field(
        default=2.0,
        ge=0,
        le=300,
        description="how often the state objects are looked at for operators' commands (their tick then runs "
        "at once); 0: commands wait for the policy's next tick",
    )
    status_refresh_seconds: float = Field(
        default=60.0,
        ge=0,
        le=3600,
        description="the status `gateway-canary status` shows is rewritten at least this often while "
        "nothing else changes (every change of the rollout writes it at once)",
    )
    runbook_url: str = Field(
        default="https://github.com/gateway-canary/gateway-canary/blob/main/docs/runbook.md",
        description="where docs/runbook.md is published: every alert links to its section there",
    )
    forbidden_grace_seconds: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="a 403 right after the API server was unreachable is retried this long before it is a refusal",
    )

    leader_election: bool = Field(
        default=False,
        description="elect one leader among replicas with a coordination.k8s.io Lease; only it ticks and writes "
        "(the chart turns it on; off, this process is the only writer)",
    )
    lease_name: str = Field(
        default="gateway-canary",
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        max_length=253,
        description="the Lease in GATEWAY_CANARY_NAMESPACE the replicas elect a leader with",
    )
    lease_duration_seconds: float = Field(
        default=15.0,
        gt=0,
        le=3600,
        description="a candidate takes the Lease over once it has seen it unrenewed this long",
    )
    renew_deadline_seconds: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="the leader stops ticking and writing when it has not renewed the Lease for this long "
        "(less than the lease duration: it stops before anyone else may start)",
    )
    retry_period_seconds: float = Field(
        default=2.0,
        gt=0,
        le=600,
        description="how often the leader renews and candidates try to acquire the Lease",
    )
    identity: str | None = Field(
        default=None,
        max_length=128,
        description="this replica's name in the Lease; unset: the host (pod) name and a random suffix, new "
        "for every process",
    )

    @model_validator(mode="after")
    def _election_timing(self) -> Settings:
        if self.renew_deadline_seconds >= self.lease_duration_seconds:
            raise ValueError(
                "GATEWAY_CANARY_RENEW_DEADLINE_SECONDS must be less than GATEWAY_CANARY_LEASE_DURATION_SECONDS: a "
                "leader must stop writing before a candidate may take the Lease"
            )
        if self.retry_period_seconds >= self.renew_deadline_seconds:
            raise ValueError(
                "GATEWAY_CANARY_RETRY_PERIOD_SECONDS must be less than GATEWAY_CANARY_RENEW_DEADLINE_SECONDS: the "
                "leader renews several times within its deadline"
            )
        return self

    @field_validator("prometheus_url", "alertmanager_url", "runbook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None:
            checked_url(value)  # its messages never echo the URL (it may hold a password)
        return value

    @field_validator("slack_webhook_url", "webhook_url")
    @classmethod
    def _secret_http_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            checked_url(value.get_secret_value())
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"{value[:20]!r} is not a log level; use DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return value.upper()

    secret_env_pattern: str = Field(
        default=r"^GATEWAY_CANARY_POLICY_[A-Z0-9_]+$",
        description="environment variables a policy may name (urlFromEnv, tokenFromEnv, passwordFromEnv)",
    )

    @field_validator("secret_env_pattern")
    @classmethod
    def _a_pattern(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from exc
        return value

    def secret_from_env(self, name: str, where: str) -> str:
        """A secret a policy names, if the name is allowed and set; ValueError saying which it is not.

        The allow-list keeps a policy author (who edits a ConfigMap) from reading any other
        secret of the pod into a header or a URL of their choosing.
        """
        if not re.fullmatch(self.secret_env_pattern, name):
            raise ValueError(
                f"{where}: environment variable {name} may not be read by a policy; allowed names match "
                f"{self.secret_env_pattern} (GATEWAY_CANARY_SECRET_ENV_PATTERN)"
            )
        value = os.environ.get(name, "")
        if not value:
            raise ValueError(f"{where}: environment variable {name} is not set")
        return value

    query_share_seconds: float = Field(
        default=1.0,
        ge=0,
        le=60,
        description=(
            "checks of policies that share a Prometheus endpoint and window share one query per measure "
            "for all their gateways, answered at most this long before a check asks (and never an answer "
            "a policy already judged, nor older than half its interval or half FAILURE_RECHECK_SECONDS); a "
            "shared query that fails leaves each check to its own query; 0: every check asks its own"
        ),
    )
    check_after_scrape_seconds: float = Field(
        default=0.0,
        ge=0,
        le=60,
        description=(
            "0: off. Else each policy's checks run this long after Prometheus's newest sample of the "
            "ASM gateway's requests (re-phased every minute): a check then sees a scrape as soon as it is "
            "stored, not up to an interval later. For a check interval that is a multiple of the scrape "
            "interval (docs/benchmarks.md)"
        ),
    )
    failure_recheck_seconds: float = Field(
        default=15.0,
        ge=0,
        le=3600,
        description=(
            "after a FAIL, check again this soon (0: at the normal interval); keep it at least the scrape "
            "interval, or the re-check sees the same samples and counts the same evidence twice"
        ),
    )


class PrometheusConnection:
    """The connection one policy uses: settings, overridden by the policy's ``prometheus`` block."""

    def __init__(self, settings: Settings, override: PrometheusSpec | None) -> None:
        spec = override or PrometheusSpec()
        self.url = (spec.url or settings.prometheus_url).rstrip("/")
        # Credentials follow their URL: the controller-wide token and password go to the
        # controller-wide Prometheus only; a policy that names another URL brings its own.
        own_url = self.url != settings.prometheus_url.rstrip("/")
        token: str | None = None
        if spec.token_from_env:
            token = settings.secret_from_env(spec.token_from_env, "prometheus.tokenFromEnv")
        elif settings.prometheus_token is not None and not own_url:
            token = settings.prometheus_token.get_secret_value()
        scheme = spec.auth_scheme if spec.auth_scheme is not None else settings.prometheus_auth_scheme
        self.headers: dict[str, str] = {}
        if token:
            self.headers["Authorization"] = f"{scheme} {token}".strip()
        username = spec.username or (settings.prometheus_username if not own_url else None)
        password: str | None = None
        if spec.password_from_env:
            password = settings.secret_from_env(spec.password_from_env, "prometheus.passwordFromEnv")
        elif settings.prometheus_password is not None and not own_url:
            password = settings.prometheus_password.get_secret_value()
        self.basic_auth = (username, password or "") if username else None
        self.ca_file = spec.ca_file or (str(settings.prometheus_ca_file) if settings.prometheus_ca_file else None)
        timeout = spec.timeout or timedelta(seconds=settings.prometheus_timeout_seconds)
        self.timeout_seconds = timeout.total_seconds()

    def key(self) -> tuple[object, ...]:
        """Policies with equal keys share one client."""
        return (
            self.url,
            tuple(sorted(self.headers.items())),
            self.basic_auth,
            self.ca_file,
            self.timeout_seconds,
        )


def invalid_settings(exc: ValidationError) -> list[str]:
    """One line per bad setting, named by its environment variable (``GATEWAY_CANARY_...: why``)."""
    problems = []
    for error in exc.errors(include_url=False):
        why = " ".join(str(error["msg"]).removeprefix("Value error, ").split())
        if not error["loc"]:  # a rule across settings names them itself
            problems.append(why)
            continue
        name = "GATEWAY_CANARY_" + "_".join(str(part) for part in error["loc"]).upper()
        problems.append(f"{name}: {why}")
    return problems
