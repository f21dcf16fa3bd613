"""``KFACCallback``: K-FAC preconditioning for any LightningModule, as a Lightning callback."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor, nn
from typing_extensions import override

from lightning_kfac import registry
from lightning_kfac.capture import LossScale
from lightning_kfac.discovery import discover, summary_table
from lightning_kfac.distribution import DataParallelDistribution
from lightning_kfac.ekfac import eigenvalue_corrected
from lightning_kfac.engine import KFACEngine, StepStats
from lightning_kfac.inverse import INVERSE_METHODS
from lightning_kfac.likelihood import Likelihood
from lightning_kfac.options import (
    Damping,
    DampingMethod,
    FactorDecay,
    FactorDtype,
    FactorUpdateFreq,
    Fisher,
    InvUpdateFreq,
    KFACOptions,
    KLClip,
    LikelihoodName,
    LogEveryNSteps,
    LossReduction,
    LossTerms,
    Momentum,
    ProgressBarMetric,
    Staleness,
    check_bool,
    check_choice,
    check_int_at_least,
    check_str_list,
)
from lightning_kfac.structure import StructurePolicy

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
        loss_reduction: ``"mean"`` if the loss averages over terms, ``"sum"`` if it sums (the
            curvature is then that of the summed loss).
        loss_terms: what a mean-reduced loss averages over, K: ``"examples"`` (the default;
            K = N, the micro-batch's examples), ``"positions"`` (K = the positions of the
            output of the last registered layer the forward pass runs: N*T for a language
            model's token-mean cross-entropy), ``"elements"`` (K = that output's elements:
            MSE averaged over every output), or a callable ``batch -> K`` (exact counts with
            ``ignore_index`` or class weights). A wrong K scales the curvature by the ratio.
        momentum: if set (float or callable), written into the optimizer's ``momentum``
            (SGD) or ``betas[0]`` (Adam) before every step.
        include: glob patterns of module names to register (default: every supported one).
        exclude: glob patterns of module names never to register.
        reduce: glob patterns of Linear and Conv layers that use K-FAC-reduce (an example's
            positions combined before the outer products) instead of the default expand (every
            position a row). Choose reduce for layers whose positions are pooled into one
            prediction per example (sequence classification, a ViT classifier) and expand for
            a loss with one term per position (language modelling, per-pixel losses).
        max_factor_size: a factor side of a Linear or Conv layer wider than this (``A``'s
            ``d_in + 1``, ``G``'s ``d_out``) is stored as ``large_factors`` instead of dense;
            None keeps every side dense.
        factor_block_size: the widest block of a block-diagonal side (its blocks are nearly
            equal, so they decompose in one batched call).
        large_factors: ``"block-diagonal"`` or ``"diagonal"``.
        factor_examples: take the factors of Linear and Conv layers from the first this many
            examples of each batch (distributed K-FAC's cheaper statistics: A and G are the
            same estimators over those examples); None uses every example. Other layer kinds
            always use every example; under data parallelism each rank uses its first ones.
        inverse_method: ``"eigen"`` (eigendecompositions), or ``"cholesky"``: the damped
            inverses of dense Linear/Conv factors by Cholesky factorisation, formed once per
            decomposition and damping (several times cheaper than ``eigh``; each step is two
            products, as with eigen and factored damping); needs ``damping_method="factored"``.
            Block-diagonal or diagonal factors and other layer types keep the eigen method.
        factor_structure: per-layer structures regardless of size, ``{module name pattern:
            "dense" | "block-diagonal" | "diagonal"}`` or ``{pattern: {"A": ..., "G": ...}}``.
        factor_dtype: the dtype of factors and decompositions: ``"auto"`` (float64 for
            float64 parameters, else float32), ``"float32"`` or ``"float64"``.
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
        batch_size: a callable ``batch -> N`` for batches whose size Lightning's
            ``extract_batch_size`` cannot read (default: that function).
        block_types: ``{module class: block class}`` for this fit, looked up before the
            global table of ``register_block_type``.
        fisher: ``"empirical"`` (G from the training loss's gradients, the default) or
            ``"true"`` (G from the gradients of a loss on targets sampled from the model's
            predictive distribution, one extra backward pass over the same graph on factor
            steps; the training loss and gradients are unchanged).
        likelihood: with ``fisher="true"``, the distribution whose negative log-likelihood
            is the loss: ``"categorical"`` (softmax cross-entropy), ``"gaussian"``
            (``MSELoss``) or ``"bernoulli"`` (``BCEWithLogitsLoss``), or a ``Likelihood``.
        fisher_output: with ``fisher="true"``, the name of the module whose output is the
            model output (the logits); None: the last registered layer the forward pass runs.
        eigenvalue_correction: EKFAC: every dense Linear and Conv block keeps a running
            average of the per-example gradients' second moments in the Kronecker eigenbasis
            and uses it in place of the eigenvalue products (needs ``damping_method="exact"``).

    Raises:
        ValueError: at construction, for any invalid argument, naming it and what is allowed.
    """

    def __init__(
        self,
        damping: Damping | Callable[[int], float] = 1e-2,
        factor_decay: FactorDecay | Callable[[int], float] = 0.95,
        factor_update_freq: FactorUpdateFreq = 1,
        inv_update_freq: InvUpdateFreq = 10,
        kl_clip: KLClip | Callable[[int], float] | None = 1e-3,
        damping_method: DampingMethod = "exact",
        loss_reduction: LossReduction = "mean",
        momentum: Momentum | Callable[[int], float] | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = (),
        reduce: Sequence[str] | None = (),
        max_factor_size: int | None = 2048,
        factor_block_size: int = 512,
        large_factors: Literal["block-diagonal", "diagonal"] = "block-diagonal",
        factor_structure: Mapping[str, str | Mapping[str, str]] | None = None,
        inverse_method: Literal["eigen", "cholesky"] = "eigen",
        factor_examples: int | None = None,
        factor_dtype: FactorDtype = "auto",
        staleness: Staleness = 0,
        verbose: bool = True,
        log_every_n_steps: LogEveryNSteps | None = None,
        progress_bar: Sequence[ProgressBarMetric] | None = (),
        loss_terms: LossTerms | Callable[[Any], float] = "examples",
        batch_size: Callable[[Any], int] | None = None,
        block_types: Mapping[type[nn.Module], Callable[[nn.Module], Any]] | None = None,
        fisher: Fisher = "empirical",
        likelihood: LikelihoodName | Likelihood = "categorical",
        fisher_output: str | None = None,
        eigenvalue_correction: bool = False,
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
            loss_terms=loss_terms,
            fisher=fisher,
            likelihood=likelihood,
            eigenvalue_correction=eigenvalue_correction,
        )
        if fisher_output is not None and not isinstance(fisher_output, str):
            raise ValueError(f"fisher_output must be None or a module name, got {fisher_output!r}")
        self.fisher_output = fisher_output
        patterns = "glob patterns (strings) of module names"
        self.include = None if include is None else check_str_list("include", include, patterns)
        self.exclude = check_str_list("exclude", exclude, patterns)
        self.reduce = check_str_list("reduce", reduce, patterns)
        self.factor_examples = check_int_at_least(
            "factor_examples", factor_examples, 1, none_ok=True
        )
        self.inverse_method = check_choice("inverse_method", inverse_method, INVERSE_METHODS)
        if self.inverse_method == "cholesky" and self.options.damping_method != "factored":
            raise ValueError(
                'inverse_method="cholesky" needs damping_method="factored" (exact damping '
                f"needs eigendecompositions), got damping_method={damping_method!r}"
            )
        self.structures = StructurePolicy(
            max_factor_size, factor_block_size, large_factors, factor_structure or {}
        )
        self.verbose = check_bool("verbose", verbose)
        self.log_every_n_steps = check_int_at_least(
            "log_every_n_steps", log_every_n_steps, 0, none_ok=True
        )
        self.progress_bar = check_str_list(
            "progress_bar", progress_bar, f"metric names from {METRICS}", METRICS
        )
        if batch_size is not None and not callable(batch_size):
            raise ValueError(
                f"batch_size must be None or a callable batch -> N, got {batch_size!r}"
            )
        self.batch_size = batch_size
        if block_types is not None and not isinstance(block_types, Mapping):
            raise ValueError(
                f"block_types must be a mapping of module class to block class, got {block_types!r}"
            )
        self.block_types = dict(block_types or {})
        self.engine: KFACEngine | None = None
        self.last_stats: StepStats | None = None
        self._module: pl.LightningModule | None = None
        self._lazy: list[str] = []
        #: Registration waits for fit start under ModelParallelStrategy (the parameters are
        #: sharded by ``configure_model``, after ``setup``); a checkpoint's state waits with it.
        self._deferred = False
        self._deferred_state: dict[str, Any] | None = None

    # -- Lightning hooks -------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.engine is not None and self._module is pl_module:
            return  # the same model fitted again keeps its K-FAC state
        if self._module is not None and self._module is not pl_module:
            rank_zero_info(
                "KFACCallback: a new model; the previous model's registration and K-FAC state "
                "are dropped."
            )
            self._close()
            self.engine = None
        self._module = pl_module
        self._lazy = []
        self._check_loss_modules(pl_module)
        self._deferred = isinstance(trainer.strategy, ModelParallelStrategy)
        if not self._deferred:
            self._register(trainer, pl_module)

    def _check_loss_modules(self, pl_module: pl.LightningModule) -> None:
        """Warn once if a torch loss module of the model reduces otherwise than
        ``loss_reduction`` says (K-FAC's curvature would be off by the number of terms)."""
        expected = self.options.loss_reduction
        kinds = {"mean": "mean", "batchmean": "mean", "sum": "sum"}
        mismatched = [
            f"{name or '<root>'!r} ({type(module).__name__}, reduction={module.reduction!r})"
            for name, module in pl_module.named_modules()
            if isinstance(module, nn.modules.loss._Loss)
            and kinds.get(getattr(module, "reduction", None), expected) != expected
        ]
        if mismatched:
            rank_zero_warn(
                f"K-FAC: loss module {', '.join(mismatched)} of the model "
                f"disagrees with KFACCallback(loss_reduction={expected!r}); if the training "
                "loss uses it, set loss_reduction to match, or the curvature is off by the "
                "number of loss terms."
            )

    def _register(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        lookup = functools.partial(registry.block_type_for, overrides=self.block_types)
        found = discover(
            pl_module,
            self.include,
            self.exclude,
            reduce=self.reduce,
            structures=self.structures,
            inverse=self.inverse_method,
            factor_examples=self.factor_examples,
            block_type_for=lookup,
        )
        materialised = bool(self._lazy)  # registering again after the first batch
        self._lazy = found.lazy
        if self.verbose:
            rank_zero_info(summary_table(found))
        for message in [] if materialised else found.warnings():
            rank_zero_warn(message)
        for message in [] if self._lazy else [n.message() for n in found.not_applied]:
            rank_zero_warn(message)  # once every layer is known
        if self._lazy:
            rank_zero_warn(
                f"KFACCallback: lazy modules {self._lazy} are not materialised yet; K-FAC "
                "registers the model's layers after the first training batch and starts at "
                "the second step."
            )
            return
        if not found.blocks:
            rank_zero_warn(
                "KFACCallback found no supported layer to precondition (see the table of "
                "skipped layers); training continues with the plain optimizer."
            )
            return
        blocks = found.blocks
        if self.options.eigenvalue_correction:
            blocks = eigenvalue_corrected(blocks)
        self.engine = KFACEngine(
            blocks,
            self.options,
            distribution=self._distribution(trainer),
            warn=rank_zero_warn,
            output_module=self._fisher_output_module(pl_module),
            seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
        )

    def _fisher_output_module(self, pl_module: pl.LightningModule) -> nn.Module | None:
        """The ``fisher_output`` module (None: the last registered layer's output is used)."""
        if self.fisher_output is None or self.options.fisher != "true":
            return None
        modules = dict(pl_module.named_modules())
        if self.fisher_output not in modules:
            names = [name for name in modules if name][:8]
            raise ValueError(
                f"K-FAC: fisher_output={self.fisher_output!r} names no module of the model; "
                f"module names look like: {names}"
            )
        return modules[self.fisher_output]

    def _attach(self) -> None:
        """Install the hooks and say what K-FAC assumes (the factor dtype is known only
        now, after Lightning has converted the model's precision)."""
        self.engine.attach()
        rank_zero_info(f"KFACCallback: {self._loss_assumption()}; factors in {self.engine.dtype}.")
        if self.engine.true_fisher is not None or self.engine._live:
            likelihood = self.engine.true_fisher.likelihood if self.engine.true_fisher else None
            notes = [f"true Fisher ({likelihood.name} likelihood)"] if likelihood else []
            if self.engine._live:
                live, total = len(self.engine._live), len(self.engine.blocks)
                notes.append(f"EKFAC on {live} of {total} layers")
            rank_zero_info(f"KFACCallback: {', '.join(notes)}.")
        describe = getattr(self.engine.distribution, "describe", None)
        if describe is not None and self.verbose:
            rank_zero_info(f"KFACCallback: {describe()}.")

    def _loss_assumption(self) -> str:
        """The loss convention K-FAC works under, for the fit-start summary."""
        if self.options.loss_reduction == "sum":
            return "loss taken as a sum over the batch (loss_reduction='sum')"
        terms = self.options.loss_terms
        if callable(terms):
            return "loss taken as a mean over the K terms counted by loss_terms(batch)"
        if terms == "examples":
            return (
                "loss taken as a mean over the examples of each batch (set loss_terms= for "
                "a loss averaged over tokens or elements, loss_reduction='sum' for a sum)"
            )
        return f"loss taken as a mean over the {terms} of the last registered layer's output"

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._deferred:
            self._deferred = False
            self._register(trainer, pl_module)
            state, self._deferred_state = self._deferred_state, None
            if state:
                self.load_state_dict(state)
        if self.engine is not None:
            self._attach()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.engine is None:
            return
        examples = self.batch_size(batch) if self.batch_size else extract_batch_size(batch)
        terms = self.options.loss_terms
        self.engine.start_microbatch(
            self._loss_scale(trainer),
            examples=int(examples),
            loss_terms=float(terms(batch)) if callable(terms) else None,
        )

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._lazy and self.engine is None:
            self._register(trainer, pl_module)
            if self.engine is not None:
                self._attach()

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        if self.engine is not None:
            self.engine.begin_backward(self._loss_scale(trainer))

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.engine is not None:
            self.engine.end_backward()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.engine is None:
            return
        if self._scaler_found_inf(trainer, optimizer):
            self.engine.skip_step()  # the scaler skips the optimizer step; so does K-FAC
            return
        index = next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), 0)
        self.last_stats = self.engine.step(optimizer.param_groups, optimizer=index)
        self._log(trainer, pl_module, self.last_stats)

    # -- checkpoints -----------------------------------------------------------------------

    @property
    @override
    def state_key(self) -> str:
        """Constant, so that changing hyperparameters does not orphan the saved state."""
        return "KFACCallback"

    @override
    def state_dict(self) -> dict[str, Any]:
        """Step counters, running factors, the factors behind the current decompositions and
        counters (tensors, dicts and primitives only). Schedules are functions of the step,
        so the step counter is all their state."""
        return {} if self.engine is None else self.engine.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self._deferred:
            self._deferred_state = state_dict
            return
        if self.engine is None:
            raise ValueError(
                "K-FAC: the checkpoint holds K-FAC state for layers "
                f"{sorted(state_dict.get('layers', {}))}, but this model has no registered layer"
            )
        self.engine.load_state_dict(state_dict)

    # -- introspection ---------------------------------------------------------------------

    def factors(self) -> dict[str, tuple[Tensor, ...]]:
        """``{module name: factors}``, the running factors in the reference's convention:
        ``(A, G)`` for Kronecker blocks, ``(a_dim, a_dim)`` and ``(g_dim, g_dim)``; grouped
        convolutions keep a leading groups dimension. Empty before the first factor update.
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
        # GradScaler has no public query for what ``unscale_`` found; this private method
        # has been stable since torch 1.6. Without it, the step goes ahead and the engine's
        # own finiteness check keeps non-finite statistics out of the factors.
        found_inf = getattr(scaler, "_found_inf_per_device", None)
        if found_inf is None:
            return False
        found = found_inf(optimizer)
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
        if isinstance(trainer.strategy, ModelParallelStrategy):
            from lightning_kfac.sharded import ShardedDistribution

            rank_zero_info(
                "KFACCallback: sharded parameters, default options; use "
                'strategy="kfac_model_parallel" to configure K-FAC\'s sharded distribution.'
            )
            return ShardedDistribution()
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
        (``get_scale()``: one host read per backward pass, once the scaler has scaled the
        loss, which it has by ``on_before_backward``)."""
        accumulation = 1.0 / trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return accumulation
        return scaler.get_scale() * accumulation
