"""gateway-canary: metric-gated migration of ingress traffic between two gateways on one CLB."""

__version__ = "0.1.0"
