"""The weight schedule: which target weights a rollout passes through, and the source's share.

Pure arithmetic kept out of the decision so each can be read and tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from controller.core.enums import WeightMode
from controller.core.policy import ScheduleSpec

__all__ = ["FULL", "Weights", "next_target_weight", "source_first", "target_steps", "weights_for"]

#: The weight a promoted target ends at.
FULL = 100


@dataclass(frozen=True, slots=True)
class Weights:
    """The two annotation values; ``None`` for a source means 'leave as it is' (target-only mode)."""

    target: int
    source: int | None

    def __str__(self) -> str:
        source = "unchanged" if self.source is None else str(self.source)
        return f"target={self.target} source={source}"


def target_steps(schedule: ScheduleSpec) -> tuple[int, ...]:
    """The target weights in order, always ending at 100 (promotion follows the last step)."""
    explicit = schedule.step_weights()
    if explicit is not None:
        steps = list(explicit)
    else:
        assert schedule.step_weight is not None  # guaranteed by ScheduleSpec validation
        ceiling = schedule.max_weight if schedule.max_weight is not None else FULL
        steps = list(range(schedule.step_weight, ceiling + 1, schedule.step_weight))
        if steps[-1] != ceiling:
            steps.append(ceiling)
    if steps[-1] != FULL:
        steps.append(FULL)
    return tuple(steps)


def next_target_weight(schedule: ScheduleSpec, current: int) -> int | None:
    """The first step above ``current``; None once at 100.

    Derived from the current weight rather than a stored step index, so that an edited schedule
    continues from wherever the weight stands.
    """
    for weight in target_steps(schedule):
        if weight > current:
            return weight
    return None


def weights_for(target: int, mode: WeightMode, *, promoted: bool = False) -> Weights:
    """The pair of annotation values for a target weight.

    Complementary: source = 100 - target. Target-only: the source is left alone, except that a
    promotion sets it to 0 (that is what promoted means) and a rollback to 0 never leaves it 0
    (checked by the caller, which knows the observed value).
    """
    if mode is WeightMode.COMPLEMENTARY or promoted:
        return Weights(target=target, source=FULL - target)
    return Weights(target=target, source=None)


def source_first(weights: Weights, shown_source: int | None) -> bool:
    """Whether to patch the source before the target: only when target first would show both at 0.

    Target first is the rule (a rollback cuts the ASM gateway's traffic with its first request);
    but cutting the target to 0 while the source shows 0 would leave the CLB with no weight at all
    until the second patch lands (or forever, if it fails). Then the source goes first.
    """
    return weights.target == 0 and shown_source == 0 and weights.source is not None and weights.source > 0
