"""Orchestration: one tick per policy (observe, measure, decide, apply, alert) and the service around it."""
