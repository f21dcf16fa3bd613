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

from lightning_kfac.capture import LossScale
from lightning_kfac.discovery import discover, summary_table
from lightning_kfac.distribution import DataParallelDistribution
from lightning_kfac.engine import KFACEngine, StepStats
from lightning_kfac.options import KFACOptions
from lightning_kfac.schedules import Schedule

#: Metrics logged under ``kfac/``: the damping, the KL-clip scale nu, the number of
#: registered layers, host milliseconds in factor updates and in decompositions this step,
#: the count of factor batches skipped as non-finite, and the staleness (steps since the
#: step whose factors the decompositions in use were computed from).
METRICS = (
    "damping",
    "kl_scale",
    "layers",
    "factor_update_ms",
    "decomposition_ms",
    "skipped_batches",
    "staleness",
)


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
        staleness: 0 for synchronous decompositions; s in ``1..inv_update_freq`` computes
            them in the background (a worker thread; a side stream on CUDA) from a snapshot of
            the factors of their step t, while training goes on with the previous ones, and
            installs them at step t + s. The first decomposition is always synchronous.
        verbose: print the table of registered and skipped layers at fit start.
        log_every_n_steps: send K-FAC's metrics (``kfac/...``, see ``METRICS``) to the
            Trainer's loggers every this many optimizer steps (reading the KL-clip scale then
            costs one host synchronisation); None uses the Trainer's ``log_every_n_steps``,
            0 turns logging off.
        progress_bar: metric names (from ``METRICS``, without the ``kfac/`` prefix) also shown
            in the progress bar.

    Raises:
        ValueError: at construction, for any invalid argument, naming it and what is allowed.
    """

    def __init__(
        self,
        damping: Schedule = 1e-2,
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
        staleness: int = 0,
        verbose: bool = True,
        log_every_n_steps: int | None = None,
        progress_bar: Sequence[str] = (),
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
            staleness=staleness,
        )
        if isinstance(include, str) or isinstance(exclude, str):
            raise ValueError("include and exclude must be lists of glob patterns, not a string")
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude)
        self.verbose = verbose
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool)
            or not isinstance(log_every_n_steps, int)
            or log_every_n_steps < 0
        ):
            raise ValueError(
                f"log_every_n_steps must be None or an integer >= 0, got {log_every_n_steps!r}"
            )
        unknown = sorted(set(progress_bar) - set(METRICS))
        if isinstance(progress_bar, str) or unknown:
            raise ValueError(
                f"progress_bar must be a list of metric names from {METRICS}, got {progress_bar!r}"
            )
        self.log_every_n_steps = log_every_n_steps
        self.progress_bar = list(progress_bar)
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
        self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.engine is not None:
            self.engine.start_microbatch(self._loss_scale(trainer))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.engine is None:
            return
        if self._scaler_found_inf(trainer, optimizer):
            self.engine.skip_step()  # the scaler skips the optimizer step; so does K-FAC
            return
        self.last_stats = self.engine.step(optimizer.param_groups)
        self._log(trainer, pl_module, self.last_stats)

    # -- checkpoints -----------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        """Constant, so that changing hyperparameters does not orphan the saved state."""
        return "KFACCallback"

    def state_dict(self) -> dict[str, Any]:
        """Step counter, running factors, the factors behind the current decompositions and
        counters (tensors, dicts and primitives only). Schedules are functions of the step,
        so the step counter is all their state."""
        return {} if self.engine is None else self.engine.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.engine is None:
            raise ValueError(
                "K-FAC: the checkpoint holds K-FAC state for layers "
                f"{sorted(state_dict.get('layers', {}))}, but this model has no registered layer"
            )
        self.engine.load_state_dict(state_dict)

    # -- introspection ---------------------------------------------------------------------

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{module name: (A, G)}``, the running factors in the reference's convention.

        ``A`` is ``(groups, a_dim, a_dim)`` and ``G`` is ``(groups, g_dim, g_dim)``; groups is
        1 except for grouped convolutions. Empty before the first factor update.
        """
        return {} if self.engine is None else self.engine.factors()

    # -- helpers ---------------------------------------------------------------------------

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stats: StepStats) -> None:
        interval = self.log_every_n_steps
        if interval is None:
            interval = trainer.log_every_n_steps
        if not interval or stats.step % interval:
            return
        values = {
            "damping": stats.damping,
            "kl_scale": 1.0 if stats.kl_scale is None else float(stats.kl_scale),
            "layers": float(len(self.engine.blocks)),
            "factor_update_ms": 1000 * stats.factor_seconds,
            "decomposition_ms": 1000 * stats.decomposition_seconds,
            "skipped_batches": float(self.engine.counters.skipped_batches),
            "staleness": float(stats.step - (self.engine.decomposed_at or 0)),
        }
        for logger in trainer.loggers:
            logger.log_metrics({f"kfac/{k}": v for k, v in values.items()}, step=stats.step)
        for name in self.progress_bar:
            pl_module.log(
                f"kfac/{name}",
                values[name],
                prog_bar=True,
                logger=False,
                on_step=True,
                on_epoch=False,
                batch_size=1,
            )

    @staticmethod
    def _scaler_found_inf(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> bool:
        """Whether a GradScaler found non-finite gradients (and will skip this step)."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return False
        found = scaler._found_inf_per_device(optimizer)
        return bool(found) and bool(torch.stack([f.cpu() for f in found.values()]).sum() > 0)

    def _close(self) -> None:
        """Remove the hooks and join or cancel background decompositions (idempotent)."""
        if self.engine is not None:
            self.engine.close()

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
    def _loss_scale(trainer: pl.Trainer) -> LossScale:
        """The factor Lightning multiplied the loss by: ``1/k``, times a GradScaler's scale
        (read during backward, when the scaler's scale tensor exists; no host sync)."""
        accumulation = 1.0 / trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return accumulation
        return lambda: scaler._scale * accumulation
