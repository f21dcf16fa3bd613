"""Running averages of Kronecker factors (reference, section 2)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


def ema_update(running: Tensor | None, batch: Tensor, decay: float) -> Tensor:
    """``running <- decay * running + (1 - decay) * batch``, in place; the first update copies.

    Args:
        running: the current average, or None before the first update.
        batch: this batch's factor, same shape.
        decay: rho in ``[0, 1)``.
    """
    if running is None:
        return batch.clone()
    return running.mul_(decay).add_(batch, alpha=1.0 - decay)


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
        self.A = ema_update(self.A, A, decay)
        self.G = ema_update(self.G, G, decay)
