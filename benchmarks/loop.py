"""The training step every timing benchmark runs: a plain loop around the engine that
``KFACCallback`` drives (the same calls, in the same order)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kfac.engine import KFACEngine


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    engine: KFACEngine | None,
    x: Tensor,
    y: Tensor,
) -> None:
    """One step of cross-entropy training, preconditioned by ``engine`` if given."""
    if engine is not None:
        engine.start_microbatch()
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    if engine is not None:
        engine.step(optimizer.param_groups)
    optimizer.step()
