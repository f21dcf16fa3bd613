"""Hyperparameter schedules: plain functions of the optimizer step.

Every scheduled option (``damping``, ``factor_decay``, ``kl_clip``, ``momentum``) takes a
float or a callable ``step -> float``. The value at step ``t`` depends on ``t`` alone, never
on earlier values, so a resumed run sees the same numbers as an uninterrupted one. The
classes below are ready-made callables that a LightningCLI config can name by class path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

#: A constant or a function of the optimizer step (0-based).
Schedule = float | Callable[[int], float]


def schedule_value(schedule: Schedule, step: int) -> float:
    """The value of ``schedule`` at optimizer step ``step``."""
    return float(schedule(step)) if callable(schedule) else float(schedule)


class StepDecay:
    """``value * factor**(number of milestones <= step)``.

    Args:
        value: the value at step 0.
        factor: multiplier applied at each milestone.
        milestones: optimizer steps at which the value is multiplied by ``factor``.
    """

    def __init__(self, value: float, factor: float, milestones: Sequence[int]) -> None:
        self.value = value
        self.factor = factor
        self.milestones = sorted(milestones)

    def __call__(self, step: int) -> float:
        passed = sum(1 for milestone in self.milestones if step >= milestone)
        return self.value * self.factor**passed

    def __repr__(self) -> str:
        return f"StepDecay(value={self.value}, factor={self.factor}, milestones={self.milestones})"


class ExponentialDecay:
    """``max(minimum, value * rate**(step / every))``: smooth decay toward a floor.

    Args:
        value: the value at step 0.
        rate: multiplier per ``every`` steps.
        every: steps per application of ``rate``.
        minimum: floor of the schedule.
    """

    def __init__(self, value: float, rate: float, every: int = 1, minimum: float = 0.0) -> None:
        self.value = value
        self.rate = rate
        self.every = every
        self.minimum = minimum

    def __call__(self, step: int) -> float:
        return max(self.minimum, self.value * self.rate ** (step / self.every))

    def __repr__(self) -> str:
        return (
            f"ExponentialDecay(value={self.value}, rate={self.rate}, every={self.every}, "
            f"minimum={self.minimum})"
        )
