"""How factors, decompositions and preconditioned gradients are shared between processes.

``LocalDistribution`` is the single-process case: every operation is local. The engine talks
only to this interface, so data-parallel training is a different ``Distribution`` and not a
different engine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from lightning_kfac.blocks import LayerBlock
from lightning_kfac.capture import BatchFactors
from lightning_kfac.decomposition import Eigen
from lightning_kfac.factors import KroneckerFactors

#: ``(A, G)`` per block name.
FactorPairs = dict[str, tuple[Tensor, Tensor]]
#: ``(eigen of A, eigen of G)`` per block name; None where the decomposition failed.
EigenPairs = dict[str, tuple[Eigen | None, Eigen | None]]


def all_finite(batch: Mapping[str, BatchFactors]) -> bool:
    """Whether every factor in ``batch`` is finite, with one host synchronisation."""
    if not batch:
        return True
    flags = [torch.isfinite(b.A).all() & torch.isfinite(b.G).all() for b in batch.values()]
    return bool(torch.stack(flags).all())


class LocalDistribution:
    """Single process: nothing is communicated and every decomposition is computed here."""

    world_size = 1
    rank = 0

    def setup(self, blocks: Mapping[str, LayerBlock]) -> None:
        """Prepare for ``blocks`` (the distributed versions check ranks agree and assign work)."""

    def combine_batch(self, batch: Mapping[str, BatchFactors]) -> FactorPairs | None:
        """The batch factors to fold into this process's running averages, or None to skip.

        A batch with any non-finite factor is skipped whole.
        """
        if not all_finite(batch):
            return None
        return {name: (b.A, b.G) for name, b in batch.items()}

    def global_factors(self, factors: Mapping[str, KroneckerFactors]) -> FactorPairs:
        """The factors the decompositions are computed from."""
        return {name: (f.A, f.G) for name, f in factors.items() if f.ready}

    def decompose(
        self, factors: FactorPairs, decompose: Callable[[Tensor], Eigen | None]
    ) -> EigenPairs:
        """Decompose every factor; returns the decompositions this process keeps."""
        return {name: (decompose(A), decompose(G)) for name, (A, G) in factors.items()}

    def precondition(
        self, grads: Mapping[str, Tensor], apply: Callable[[str, Tensor], Tensor]
    ) -> dict[str, Tensor]:
        """The preconditioned gradient of every block in ``grads``."""
        return {name: apply(name, grad) for name, grad in grads.items()}
