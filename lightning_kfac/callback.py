"""``KFACCallback``: K-FAC preconditioning for any LightningModule, as a Lightning callback."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_kfac.discovery import discover, summary_table
from lightning_kfac.distribution import DataParallelDistribution
from lightning_kfac.engine import KFACEngine, StepStats
from lightning_kfac.options import KFACOptions
from lightning_kfac.schedules import Schedule


class KFACCallback(Callback):
    """Precondition the gradients of every supported layer with K-FAC.

    At fit start the callback registers every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` of the
    LightningModule (see ``include``/``exclude``), collects their Kronecker factors with
    hooks, and in ``on_before_optimizer_step`` (after AMP unscaling, before gradient
    clipping and the optimizer) replaces their gradients with preconditioned ones. The
    user's optimizer then steps as usual; SGD with momentum is the reference pairing.

    Args:
        damping: lambda, added to the curvature; a float or a callable of the optimizer step.
        factor_decay: rho of the factors' running averages, in ``[0, 1)``; float or callable.
        factor_update_freq: update the factors every this many optimizer steps.
        inv_update_freq: recompute the eigendecompositions every this many optimizer steps;
            a multiple of ``factor_update_freq``.
        kl_clip: the Fisher-norm clip constant c (float or callable); None turns it off.
        damping_method: ``"exact"`` (eigenbasis damping of the Kronecker product) or
            ``"factored"`` (Tikhonov damping of each factor with the pi correction).
        loss_reduction: ``"mean"`` if the loss averages over the batch, ``"sum"`` if it sums.
        momentum: if set (float or callable), written into the optimizer's ``momentum``
            (SGD) or ``betas[0]`` (Adam) before every step.
        include: glob patterns of module names to register (default: every supported one).
        exclude: glob patterns of module names never to register.
        factor_dtype: ``"float32"`` or ``"float64"``, the dtype of factors and decompositions.
        verbose: print the table of registered and skipped layers at fit start.

    Raises:
        ValueError: at construction, for any invalid argument, naming it and what is allowed.
    """

    def __init__(
        self,
        damping: Schedule = 1e-3,
        factor_decay: Schedule = 0.95,
        factor_update_freq: int = 1,
        inv_update_freq: int = 10,
        kl_clip: Schedule | None = 1e-3,
        damping_method: Literal["exact", "factored"] = "exact",
        loss_reduction: Literal["mean", "sum"] = "mean",
        momentum: Schedule | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        factor_dtype: Literal["float32", "float64"] = "float32",
        verbose: bool = True,
    ) -> None:
        self.options = KFACOptions(
            damping=damping,
            factor_decay=factor_decay,
            factor_update_freq=factor_update_freq,
            inv_update_freq=inv_update_freq,
            kl_clip=kl_clip,
            damping_method=damping_method,
            loss_reduction=loss_reduction,
            momentum=momentum,
            factor_dtype=factor_dtype,
        )
        if isinstance(include, str) or isinstance(exclude, str):
            raise ValueError("include and exclude must be lists of glob patterns, not a string")
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude)
        self.verbose = verbose
        self.engine: KFACEngine | None = None
        self.last_stats: StepStats | None = None

    # -- Lightning hooks -------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.engine is not None:
            return
        found = discover(pl_module, self.include, self.exclude)
        if self.verbose:
            rank_zero_info(summary_table(found))
        if not found.blocks:
            rank_zero_warn(
                "KFACCallback found no supported layer (nn.Linear, nn.Conv1d/2d/3d) to "
                "precondition; training continues with the plain optimizer."
            )
            return
        self.engine = KFACEngine(
            found.blocks,
            self.options,
            distribution=self._distribution(trainer),
            warn=rank_zero_warn,
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.engine is not None:
            self.engine.attach()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._detach()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.engine is not None:
            self.engine.start_microbatch(self._loss_scale(trainer))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.engine is not None:
            self.last_stats = self.engine.step(optimizer.param_groups)

    # -- introspection ---------------------------------------------------------------------

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{module name: (A, G)}``, the running factors in the reference's convention.

        ``A`` is ``(groups, a_dim, a_dim)`` and ``G`` is ``(groups, g_dim, g_dim)``; groups is
        1 except for grouped convolutions. Empty before the first factor update.
        """
        return {} if self.engine is None else self.engine.factors()

    # -- helpers ---------------------------------------------------------------------------

    def _detach(self) -> None:
        if self.engine is not None:
            self.engine.detach()

    @staticmethod
    def _distribution(trainer: pl.Trainer):
        """The strategy's K-FAC distribution; under any other multi-process strategy, factors
        are still reduced (default options) so that replicas never diverge."""
        make = getattr(trainer.strategy, "kfac_distribution", None)
        if make is not None:
            return make()
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            rank_zero_info(
                "KFACCallback: reducing factors over ranks with default options; use "
                'strategy="kfac_ddp" to configure K-FAC\'s distribution.'
            )
            return DataParallelDistribution()
        return None

    @staticmethod
    def _loss_scale(trainer: pl.Trainer) -> float | Tensor:
        """The factor Lightning multiplied the loss by: ``1/k``, times a GradScaler's scale."""
        scale: float | Tensor = 1.0 / trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scale = scaler._scale * scale if scaler._scale is not None else scale
        return scale
