"""gateway-canary's own exceptions; library errors are translated into these at the edges.

    GatewayCanaryError
    ├── MetricsUnavailable         Prometheus unreachable, timed out, or answered an error
    ├── ClusterError               anything the Kubernetes API refused or failed at
    │   ├── ClusterUnavailable     connection refused, timeout, 5xx: try again next check
    │   ├── AccessDenied           401/403: the controller's RBAC does not cover the object
    │   ├── ServiceNotFound        404: a Service the policy names does not exist
    │   ├── Conflict               409: the object changed since it was read (state object)
    │   │   └── CommandWithdrawn   ...and the command the save answers was taken back meanwhile
    │   ├── WeightChangedExternally  someone else changed a weight annotation mid-write
    │   └── NotLeader          this process does not hold the leader Lease (or a newer term wrote)
    └── NotificationError          an alert receiver failed (retried, never blocks a rollback)
        └── NotificationTimeout    no answer in time: it may have arrived ("unknown")

The original exception is always chained (``raise ... from exc``) for the logs.
"""

from __future__ import annotations

__all__ = [
    "AccessDenied",
    "ClusterError",
    "ClusterUnavailable",
    "CommandWithdrawn",
    "Conflict",
    "GatewayCanaryError",
    "MetricsUnavailable",
    "NotLeader",
    "NotificationError",
    "NotificationTimeout",
    "ServiceNotFound",
    "WeightChangedExternally",
]


class GatewayCanaryError(Exception):
    """Base of every error this package raises on purpose."""


class MetricsUnavailable(GatewayCanaryError):
    """The metrics source could not answer; the check becomes INCONCLUSIVE, never a PASS."""


class ClusterError(GatewayCanaryError):
    """The Kubernetes API did not do what was asked."""


class ClusterUnavailable(ClusterError):
    """Transient: unreachable, timed out or a server error."""


class AccessDenied(ClusterError):
    """The API server refused the controller's identity (RBAC)."""


class ServiceNotFound(ClusterError):
    """A Service named by a policy does not exist."""


class Conflict(ClusterError):
    """The object changed between reading and writing it (optimistic concurrency)."""


class CommandWithdrawn(Conflict):
    """The operator's command a save answers was taken back (or replaced) while the tick ran."""


class WeightChangedExternally(ClusterError):
    """A weight annotation changed between reading and writing: someone else is steering."""


class NotLeader(ClusterError):
    """A write this process may not make: it does not hold the leader Lease now, or the state object
    carries a newer term's token (it was deposed). Nothing was written; the tick is abandoned."""


class NotificationError(GatewayCanaryError):
    """An alert could not be delivered to one receiver."""


class NotificationTimeout(NotificationError):
    """The receiver did not answer in time; the alert may or may not have arrived."""
