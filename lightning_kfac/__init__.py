"""Distributed K-FAC preconditioning for PyTorch Lightning."""

from lightning_kfac.callback import KFACCallback
from lightning_kfac.schedules import ExponentialDecay, StepDecay
from lightning_kfac.strategy import KFACDDPStrategy

__version__ = "0.1.0"

__all__ = ["ExponentialDecay", "KFACCallback", "KFACDDPStrategy", "StepDecay", "__version__"]
