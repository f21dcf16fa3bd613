"""``KFACDDPStrategy`` (``strategy="kfac_ddp"``): Lightning's DDP plus K-FAC's distribution."""

from __future__ import annotations

import inspect
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.utilities import rank_zero_warn
from torch.nn.parallel import DistributedDataParallel

from lightning_kfac.callback import KFACCallback
from lightning_kfac.communication import Collectives
from lightning_kfac.distribution import DataParallelDistribution
from lightning_kfac.options import (
    BucketCapMB,
    DataParallelOptions,
    PreconditionMode,
    ShardedOptions,
    ShardPreconditioning,
)
from lightning_kfac.sharded import ShardedDistribution

#: How long ``teardown`` yields the GIL to gloo's worker threads.
_GLOO_RELEASE_SECONDS = 0.2

#: Keyword arguments passed through: DDPStrategy's own and DistributedDataParallel's.
_PASS_THROUGH = sorted(
    (
        set(inspect.signature(DDPStrategy.__init__).parameters)
        | set(inspect.signature(DistributedDataParallel.__init__).parameters)
    )
    - {"self", "module", "kwargs"}
)


class KFACDDPStrategy(DDPStrategy):
    """Distributed data parallel in which K-FAC reduces factors and delegates inversions.

    Takes every argument of ``DDPStrategy`` (passed through) plus the K-FAC distribution
    options. Used with ``KFACCallback``; registered as ``"kfac_ddp"`` when ``lightning_kfac``
    is imported, so ``Trainer(strategy="kfac_ddp", devices=N)`` works.

    Args:
        kfac_reduce_every_update: reduce the factors over ranks on every factor update
            instead of only on decomposition steps (the default, exact and
            ``inv_update_freq / factor_update_freq`` times less traffic).
        kfac_pack_triangular: send only the upper triangle of each symmetric factor.
        kfac_precondition_mode: ``"shared"`` (communication-optimised: decompositions are
            broadcast and every rank preconditions its own gradient) or ``"owner"``
            (memory-optimised: each decomposition stays on its owner, which preconditions
            its layers and broadcasts their gradients).
        kfac_bucket_cap_mb: the largest buffer handed to one K-FAC collective, in MiB.
        *args: ``DDPStrategy`` arguments.
        **kwargs: ``DDPStrategy`` keyword arguments (``start_method``,
            ``process_group_backend``, ``timeout``, DDP's own options, ...).

    Raises:
        ValueError: for an invalid K-FAC option, at construction.
    """

    strategy_name = "kfac_ddp"

    def __init__(
        self,
        *args: Any,
        kfac_reduce_every_update: bool = False,
        kfac_pack_triangular: bool = True,
        kfac_precondition_mode: PreconditionMode = "shared",
        kfac_bucket_cap_mb: BucketCapMB = 25.0,
        **kwargs: Any,
    ) -> None:
        try:
            options = DataParallelOptions(
                reduce_every_update=kfac_reduce_every_update,
                pack_triangular=kfac_pack_triangular,
                precondition_mode=kfac_precondition_mode,
                bucket_cap_mb=kfac_bucket_cap_mb,
            )
        except ValueError as error:  # name the strategy's argument, not the field
            raise ValueError(f"kfac_{error}") from None
        unknown = sorted(set(kwargs) - set(_PASS_THROUGH))
        if unknown:
            raise ValueError(
                f"KFACDDPStrategy got unknown options {unknown}. K-FAC options: "
                "kfac_reduce_every_update, kfac_pack_triangular, kfac_precondition_mode, "
                f"kfac_bucket_cap_mb; other options go to DDPStrategy/DDP: {_PASS_THROUGH}"
            )
        super().__init__(*args, **kwargs)
        #: The validated K-FAC distribution options.
        self.kfac_options = options

    def setup(self, trainer: pl.Trainer) -> None:
        """Lightning's DDP set-up; warns if no ``KFACCallback`` would use this strategy."""
        super().setup(trainer)
        self._warn_without_kfac_callback(trainer)

    @staticmethod
    def _warn_without_kfac_callback(trainer: pl.Trainer) -> None:
        if not any(isinstance(c, KFACCallback) for c in trainer.callbacks):
            rank_zero_warn(
                "strategy='kfac_ddp' without a KFACCallback: K-FAC is inactive and this is "
                "plain DDP; add KFACCallback() to the Trainer's callbacks."
            )

    def teardown(self) -> None:
        """Lightning's teardown, then a short pause that yields the GIL.

        Gloo's worker threads release each finished collective (whose tensors may be owned
        by Python) right after running it, and need the GIL for that; a rank that exits
        within milliseconds of its last collective can finalize the interpreter first and
        abort ("terminate called without an active exception", a known torch issue). The
        pause lets them finish. No collective here: teardown also runs after an exception
        on one rank alone.
        """
        super().teardown()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            time.sleep(_GLOO_RELEASE_SECONDS)

    def kfac_distribution(self) -> DataParallelDistribution:
        """The K-FAC distribution over this strategy's process group (called at fit set-up)."""
        return DataParallelDistribution(Collectives(), self.kfac_options)


if KFACDDPStrategy.strategy_name not in StrategyRegistry:
    StrategyRegistry.register(
        KFACDDPStrategy.strategy_name,
        KFACDDPStrategy,
        description="DDP with K-FAC factor reduction and delegated inversions",
    )


#: ``ModelParallelStrategy``'s own keyword arguments, passed through.
_MODEL_PARALLEL_PASS_THROUGH = sorted(
    set(inspect.signature(ModelParallelStrategy.__init__).parameters) - {"self"}
)


class KFACModelParallelStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2: the LightningModule calls ``fully_shard``
    in ``configure_model``) in which K-FAC preconditions sharded parameters.

    Only the data-parallel dimension may be sharded: ``tensor_parallel_size`` must be 1 (or
    ``"auto"`` on one node, which Lightning then sets to the number of processes, so give
    ``data_parallel_size`` and ``tensor_parallel_size=1``). Registered as
    ``"kfac_model_parallel"``; used with ``KFACCallback``. The user's ``configure_model`` and
    ``training_step`` are unchanged.

    Args:
        kfac_shard_preconditioning: ``"gather"`` (exact; each layer's gradient rows are
            gathered by shape group, every rank keeps every decomposition and
            preconditions every layer), ``"block_diagonal"`` (no gradient traffic; the
            diagonal block of ``G`` for each rank's rows, an approximation) or ``"owner"``
            (exact, memory-optimised: each layer's decompositions stay on one rank, which
            preconditions the layer and sends each rank its rows back).
        kfac_reduce_every_update: as for ``KFACDDPStrategy``.
        kfac_pack_triangular: as for ``KFACDDPStrategy``.
        kfac_bucket_cap_mb: the largest buffer handed to one K-FAC collective (factor
            reductions and gradient gathers), in MiB.
        **kwargs: ``ModelParallelStrategy`` arguments (``data_parallel_size``,
            ``tensor_parallel_size``, ``save_distributed_checkpoint``,
            ``process_group_backend``, ``timeout``).

    Raises:
        ValueError: for an invalid K-FAC option, an unknown argument, or
            ``tensor_parallel_size`` other than 1 or ``"auto"``, at construction.
    """

    strategy_name = "kfac_model_parallel"

    def __init__(
        self,
        kfac_shard_preconditioning: ShardPreconditioning = "gather",
        kfac_reduce_every_update: bool = False,
        kfac_pack_triangular: bool = True,
        kfac_bucket_cap_mb: BucketCapMB = 25.0,
        **kwargs: Any,
    ) -> None:
        try:
            options = ShardedOptions(
                reduce_every_update=kfac_reduce_every_update,
                pack_triangular=kfac_pack_triangular,
                bucket_cap_mb=kfac_bucket_cap_mb,
                shard_preconditioning=kfac_shard_preconditioning,
            )
        except ValueError as error:
            raise ValueError(f"kfac_{error}") from None
        unknown = sorted(set(kwargs) - set(_MODEL_PARALLEL_PASS_THROUGH))
        if unknown:
            raise ValueError(
                f"KFACModelParallelStrategy got unknown options {unknown}. K-FAC options: "
                "kfac_shard_preconditioning, kfac_reduce_every_update, kfac_pack_triangular, "
                f"kfac_bucket_cap_mb; other options go to ModelParallelStrategy: "
                f"{_MODEL_PARALLEL_PASS_THROUGH}"
            )
        tensor_parallel = kwargs.get("tensor_parallel_size", "auto")
        if tensor_parallel not in ("auto", 1):
            raise ValueError(
                "KFACModelParallelStrategy supports FSDP2 over the data-parallel dimension "
                f"only: tensor_parallel_size must be 1, got {tensor_parallel!r} (tensor "
                "parallelism shards layers along other dims, which K-FAC does not support)"
            )
        super().__init__(**kwargs)
        #: The validated K-FAC distribution options.
        self.kfac_options = options

    def setup_environment(self) -> None:
        """Lightning's set-up, then a check that the mesh is data parallel only.

        Raises:
            ValueError: if the tensor-parallel dimension has more than one rank.
        """
        super().setup_environment()
        if self.device_mesh["tensor_parallel"].size() != 1:
            raise ValueError(
                "KFACModelParallelStrategy supports FSDP2 over the data-parallel dimension "
                f"only; the device mesh is {self.device_mesh} (pass data_parallel_size="
                f"{self.world_size}, tensor_parallel_size=1)"
            )

    def setup(self, trainer: pl.Trainer) -> None:
        """Lightning's set-up; warns if no ``KFACCallback`` would use this strategy."""
        super().setup(trainer)
        if not any(isinstance(c, KFACCallback) for c in trainer.callbacks):
            rank_zero_warn(
                "strategy='kfac_model_parallel' without a KFACCallback: K-FAC is inactive; "
                "add KFACCallback() to the Trainer's callbacks."
            )

    def teardown(self) -> None:
        """Lightning's teardown, then the pause ``KFACDDPStrategy.teardown`` explains."""
        super().teardown()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            time.sleep(_GLOO_RELEASE_SECONDS)

    def kfac_distribution(self) -> ShardedDistribution:
        """The K-FAC distribution over the data-parallel ranks (called at fit set-up)."""
        return ShardedDistribution(Collectives(), self.kfac_options)


if KFACModelParallelStrategy.strategy_name not in StrategyRegistry:
    StrategyRegistry.register(
        KFACModelParallelStrategy.strategy_name,
        KFACModelParallelStrategy,
        description="ModelParallelStrategy (FSDP2) with K-FAC for sharded parameters",
    )
