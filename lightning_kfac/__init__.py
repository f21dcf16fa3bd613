"""Distributed K-FAC preconditioning for PyTorch Lightning."""

from lightning_kfac.callback import KFACCallback
from lightning_kfac.curvature import CurvatureBlock, KroneckerBlock
from lightning_kfac.registry import register_block_type
from lightning_kfac.schedules import ExponentialDecay, StepDecay
from lightning_kfac.strategy import KFACDDPStrategy, KFACModelParallelStrategy

__version__ = "0.1.0"

__all__ = [
    "CurvatureBlock",
    "ExponentialDecay",
    "KFACCallback",
    "KFACDDPStrategy",
    "KFACModelParallelStrategy",
    "KroneckerBlock",
    "StepDecay",
    "__version__",
    "register_block_type",
]
