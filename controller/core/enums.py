"""String enums shared by the core and the edges.

String enums (not bare strings) so that a typo is a type error and the values serialise
into annotations, logs and metric labels unchanged.
"""

from __future__ import annotations

import enum

__all__ = [
    "AlertKind",
    "Command",
    "GatewayRole",
    "InconclusiveCause",
    "Measure",
    "OnEmpty",
    "OnInconclusive",
    "Phase",
    "Severity",
    "Verdict",
    "WeightMode",
]


class Verdict(enum.StrEnum):
    """Outcome of one gate or of one whole check. INCONCLUSIVE is never a pass and never a failure."""

    PASS = "PASS"
    FAIL = "FAIL"
    INCONCLUSIVE = "INCONCLUSIVE"


class InconclusiveCause(enum.StrEnum):
    """Why a check could not judge. Each cause can carry its own limit and action."""

    TOO_FEW_REQUESTS = "TooFewRequests"
    NO_DATA = "NoData"
    NOT_A_NUMBER = "NotANumber"
    METRICS_UNAVAILABLE = "MetricsUnavailable"
    #: the checks pass but the traffic does not follow the weights yet (or the cloud has not
    #: confirmed them): the bake waits (R8)
    SETTLING = "Settling"
    #: the ASM gateway gets persistently fewer requests than the CLB sends it: requests fail
    #: before HTTP (R8, ``analysis.onTrafficDeficit``)
    TRAFFIC_DEFICIT = "TrafficDeficit"


class Phase(enum.StrEnum):
    """Where a policy's rollout stands."""

    PENDING = "Pending"
    PROGRESSING = "Progressing"
    PAUSED = "Paused"
    #: at 100, checked for ``promotion.verifyFor`` before it counts as promoted
    VERIFYING = "Verifying"
    PROMOTED = "Promoted"
    ROLLED_BACK = "RolledBack"


class WeightMode(enum.StrEnum):
    """How the source weight follows the target weight."""

    COMPLEMENTARY = "complementary"
    TARGET_ONLY = "target-only"


class OnInconclusive(enum.StrEnum):
    """What to do once a run of inconclusive checks reaches its limit."""

    HOLD = "hold"
    ROLLBACK = "rollback"


class OnEmpty(enum.StrEnum):
    """What an empty answer (no series) to a custom gate's query means."""

    ZERO = "zero"
    INCONCLUSIVE = "inconclusive"


class GatewayRole(enum.StrEnum):
    """Which side of the migration a value belongs to."""

    SOURCE = "source"
    TARGET = "target"


class Measure(enum.StrEnum):
    """What a query measures; lets a simulated metrics source answer without parsing PromQL."""

    REQUESTS = "requests"
    ERROR_RATE = "errorRate"
    LATENCY = "latency"
    CUSTOM = "custom"
    #: counts of one kind of response (the query's ``gate`` says which: 4xx, auth, noRoute)
    RESPONSES = "responses"
    #: Envoy listener TLS counters (``gate``: tlsErrors, connections)
    TLS = "tls"
    #: the raw counters the sequential gates read, one series per counter (label ``counter``:
    #: requests, errors, histogramCount, withinLatency)
    COUNTERS = "counters"


class Severity(enum.StrEnum):
    """Alert severity, in Alertmanager's customary label values."""

    CRITICAL = "critical"
    WARNING = "warning"
    INFO = "info"


class AlertKind(enum.StrEnum):
    """Why an alert was raised; also the Kubernetes Event reason."""

    ROLLED_BACK = "RolledBack"
    PROMOTED = "Promoted"
    POLICY_REFUSED = "PolicyRefused"
    STUCK_INCONCLUSIVE = "StuckInconclusive"
    POLICY_REMOVED = "PolicyRemoved"
    WEIGHT_CHANGED_EXTERNALLY = "WeightChangedExternally"
    POLICY_INVALID = "PolicyInvalid"
    TICK_FAILED = "TickFailed"
    CLOUD_NOT_APPLIED = "CloudNotApplied"
    #: the rollout waits for an operator's approval before a raise (``schedule.approvalAt``)
    AWAITING_APPROVAL = "AwaitingApproval"
    #: a condition said earlier (stuck, refused, cloud not applied) has cleared
    RECOVERED = "Recovered"


class Command(enum.StrEnum):
    """Operator commands, fed into the same decision function as check results.

    They arrive as the annotation ``gateway-canary.io/command`` on the policy's state object
    (``controller.adapters.kube_state``), never on a gateway Service.
    """

    RETRY = "retry"
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    APPROVE = "approve"
    #: skip the remaining steps (``promote --full``); only on a passing check
    PROMOTE = "promote"
