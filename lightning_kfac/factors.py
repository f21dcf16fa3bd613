"""Running averages of curvature factors (reference, section 2)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor


def update_running(
    updates: Iterable[tuple[dict[str, Tensor], Mapping[str, Tensor]]], decay: float
) -> None:
    """``F <- decay * F + (1 - decay) * F_batch`` for every factor of many blocks at once; a
    factor seen for the first time copies its batch value.

    Uses two ``torch._foreach`` kernels for all factors rather than two ops per factor: on
    small layers the per-op host cost dominates.

    Args:
        updates: ``(running factors of a block, its batch factors)`` pairs; the running
            dict is updated in place.
        decay: rho in ``[0, 1)``.
    """
    running, batch = [], []
    for factors, new in updates:
        for key, value in new.items():
            if key in factors:
                running.append(factors[key])
                batch.append(value)
            else:
                factors[key] = value.clone()
    if running:
        torch._foreach_mul_(running, decay)
        torch._foreach_add_(running, batch, alpha=1.0 - decay)
