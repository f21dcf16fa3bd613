"""K-FAC hyperparameters, validated once at construction and at every scheduled read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lightning_kfac.preconditioning import DAMPING_METHODS
from lightning_kfac.schedules import Schedule, schedule_value

LOSS_REDUCTIONS = ("mean", "sum")
FACTOR_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _check_range(name: str, value: float, low: float, high: float, closed_high: bool) -> None:
    upper = "]" if closed_high else ")"
    ok = low <= value <= high if closed_high else low <= value < high
    if not ok:
        raise ValueError(f"{name} must be in [{low}, {high}{upper}, got {value}")


def check_damping(value: float) -> float:
    if not value > 0:
        raise ValueError(f"damping must be a positive number, got {value}")
    return value


def check_factor_decay(value: float) -> float:
    _check_range("factor_decay", value, 0.0, 1.0, closed_high=False)
    return value


def check_kl_clip(value: float) -> float:
    if not value > 0:
        raise ValueError(f"kl_clip must be a positive number or None (off), got {value}")
    return value


def check_momentum(value: float) -> float:
    _check_range("momentum", value, 0.0, 1.0, closed_high=False)
    return value


def _check_schedule(name: str, schedule: Any, check) -> None:
    if callable(schedule):
        return
    if isinstance(schedule, bool) or not isinstance(schedule, (int, float)):
        raise ValueError(f"{name} must be a float or a callable of the step, got {schedule!r}")
    check(float(schedule))


def _check_frequency(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_choice(name: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


@dataclass
class KFACOptions:
    """Every K-FAC hyperparameter; see ``KFACCallback`` for their meaning.

    Raises:
        ValueError: naming the argument and the allowed values, for any invalid setting.
    """

    damping: Schedule = 1e-2
    factor_decay: Schedule = 0.95
    factor_update_freq: int = 1
    inv_update_freq: int = 10
    kl_clip: Schedule | None = 1e-3
    damping_method: str = "exact"
    loss_reduction: str = "mean"
    momentum: Schedule | None = None
    factor_dtype: str = "float32"
    staleness: int = 0

    def __post_init__(self) -> None:
        _check_schedule("damping", self.damping, check_damping)
        _check_schedule("factor_decay", self.factor_decay, check_factor_decay)
        if self.kl_clip is not None:
            _check_schedule("kl_clip", self.kl_clip, check_kl_clip)
        if self.momentum is not None:
            _check_schedule("momentum", self.momentum, check_momentum)
        _check_frequency("factor_update_freq", self.factor_update_freq)
        _check_frequency("inv_update_freq", self.inv_update_freq)
        if self.inv_update_freq % self.factor_update_freq:
            raise ValueError(
                "inv_update_freq must be a multiple of factor_update_freq (so that every "
                f"decomposition sees freshly updated factors), got inv_update_freq="
                f"{self.inv_update_freq} and factor_update_freq={self.factor_update_freq}"
            )
        if isinstance(self.staleness, bool) or not isinstance(self.staleness, int):
            raise ValueError(f"staleness must be an integer >= 0, got {self.staleness!r}")
        if not 0 <= self.staleness <= self.inv_update_freq:
            raise ValueError(
                "staleness must be 0 (synchronous decompositions) or between 1 and "
                f"inv_update_freq={self.inv_update_freq}, got {self.staleness}"
            )
        _check_choice("damping_method", self.damping_method, DAMPING_METHODS)
        _check_choice("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        if isinstance(self.factor_dtype, torch.dtype):
            names = {dtype: name for name, dtype in FACTOR_DTYPES.items()}
            _check_choice("factor_dtype", self.factor_dtype, names)
            self.factor_dtype = names[self.factor_dtype]
        _check_choice("factor_dtype", self.factor_dtype, FACTOR_DTYPES)

    @property
    def dtype(self) -> torch.dtype:
        """The factor dtype as a ``torch.dtype``."""
        return FACTOR_DTYPES[self.factor_dtype]

    def damping_at(self, step: int) -> float:
        return check_damping(schedule_value(self.damping, step))

    def factor_decay_at(self, step: int) -> float:
        return check_factor_decay(schedule_value(self.factor_decay, step))

    def kl_clip_at(self, step: int) -> float | None:
        if self.kl_clip is None:
            return None
        return check_kl_clip(schedule_value(self.kl_clip, step))

    def momentum_at(self, step: int) -> float | None:
        if self.momentum is None:
            return None
        return check_momentum(schedule_value(self.momentum, step))

    def is_factor_step(self, step: int) -> bool:
        return step % self.factor_update_freq == 0

    def is_inverse_step(self, step: int) -> bool:
        return step % self.inv_update_freq == 0
