"""Running averages of Kronecker factors (reference, section 2)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class KroneckerFactors:
    """The running ``A`` and ``G`` of one block, ``(groups, d, d)`` each (None until updated)."""

    A: Tensor | None = None
    G: Tensor | None = None

    @property
    def ready(self) -> bool:
        """Whether both factors have been updated at least once."""
        return self.A is not None and self.G is not None

    def update(self, A: Tensor, G: Tensor, decay: float) -> None:
        """Fold one batch's factors into the running averages."""
        update_running([(self, A, G)], decay)


def update_running(
    updates: Iterable[tuple[KroneckerFactors, Tensor, Tensor]], decay: float
) -> None:
    """``F <- decay * F + (1 - decay) * F_batch`` for many factors at once; a first update
    copies the batch factor.

    Uses two ``torch._foreach`` kernels for all factors rather than two ops per factor: on
    small layers the per-op host cost dominates.

    Args:
        updates: ``(running factors, batch A, batch G)`` triples.
        decay: rho in ``[0, 1)``.
    """
    running, batch = [], []
    for factors, A, G in updates:
        if factors.ready:
            running += [factors.A, factors.G]
            batch += [A, G]
        else:
            factors.A, factors.G = A.clone(), G.clone()
    if running:
        torch._foreach_mul_(running, decay)
        torch._foreach_add_(running, batch, alpha=1.0 - decay)
