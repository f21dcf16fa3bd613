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
        value: the value at step 0 (finite).
        factor: multiplier applied at each milestone (finite, > 0).
        milestones: optimizer steps (integers >= 0) at which the value is multiplied by
            ``factor``.

    Raises:
        ValueError: for an invalid argument, naming it.
    """

    def __init__(self, value: float, factor: float, milestones: Sequence[int]) -> None:
        from lightning_kfac.options import check_int_at_least, check_real  # options imports us

        self.value = check_real("StepDecay value", value)
        self.factor = check_real("StepDecay factor", factor, above=0.0)
        try:
            steps = None if isinstance(milestones, (str, bytes)) else list(milestones)
        except TypeError:  # not iterable: a bare number
            steps = None
        if steps is None:
            raise ValueError(
                "StepDecay milestones must be a sequence of integers >= 0 (steps), "
                f"got {milestones!r}"
            )
        self.milestones = sorted(
            check_int_at_least("StepDecay milestones", step, 0) for step in steps
        )

    def __call__(self, step: int) -> float:
        passed = sum(1 for milestone in self.milestones if step >= milestone)
        return self.value * self.factor**passed

    def __repr__(self) -> str:
        return f"StepDecay(value={self.value}, factor={self.factor}, milestones={self.milestones})"


class ExponentialDecay:
    """``max(minimum, value * rate**(step / every))``: smooth decay toward a floor.

    Args:
        value: the value at step 0 (finite).
        rate: multiplier per ``every`` steps (finite, > 0).
        every: steps per application of ``rate`` (an integer >= 1).
        minimum: floor of the schedule (finite, >= 0).

    Raises:
        ValueError: for an invalid argument, naming it.
    """

    def __init__(self, value: float, rate: float, every: int = 1, minimum: float = 0.0) -> None:
        from lightning_kfac.options import check_int_at_least, check_real  # options imports us

        self.value = check_real("ExponentialDecay value", value)
        self.rate = check_real("ExponentialDecay rate", rate, above=0.0)
        self.every = check_int_at_least("ExponentialDecay every", every, 1)
        self.minimum = check_real("ExponentialDecay minimum", minimum, at_least=0.0)

    def __call__(self, step: int) -> float:
        return max(self.minimum, self.value * self.rate ** (step / self.every))

    def __repr__(self) -> str:
        return (
            f"ExponentialDecay(value={self.value}, rate={self.rate}, every={self.every}, "
            f"minimum={self.minimum})"
        )
