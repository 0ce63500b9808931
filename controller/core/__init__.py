"""The pure heart of gateway-canary.

Nothing in this package performs I/O, reads the clock or imports a third-party client:
policy + state + check result + now go in, a new state and an action come out. The
import-linter contracts in ``pyproject.toml`` and ``tests/test_layering.py`` keep it so.
"""
