"""K-FAC under FSDP2 (``KFACModelParallelStrategy``) on 2 CPU ranks, float64.

Usage: started twice by ``tests/test_fsdp.py`` with RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*
set (so Lightning launches nothing and every fit below shares one process group):

    python tests/scripts/fit_sharded.py OUT_DIR

Runs, in order: the gather mode for ``STEPS`` steps (a distributed checkpoint at step
``STEPS // 2``), a resume from that checkpoint to ``STEPS``, the block-diagonal mode, the
gather mode under Lightning's plain ``ModelParallelStrategy``, a CNN with a grouped conv
(block-diagonal: the grouped conv gathered, the other layers row-local), a model with an
embedding, LayerNorm and BatchNorm1d (gather), EKFAC (gather), and the layout checks that
must refuse HSDP, non-dim-0 sharding and a sharded attention layer. Rank 0 writes
``OUT_DIR/results.pt``: every run's final full parameters, each rank's KL-clip scales,
whether K-FAC's replicated state was bitwise equal on both ranks, each rank's memory
report and the refusal messages.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from lightning_kfac import KFACCallback
from lightning_kfac.discovery import discover
from lightning_kfac.sharded import check_gradient_layouts, check_parameter
from lightning_kfac.strategy import KFACModelParallelStrategy
from tests.helpers import (
    LocalBatch,
    StepIndexedClassifier,
    TokenNet,
    classification_data,
    cnn,
    dummy_loader,
    mlp,
    sequence_data,
    token_data,
    trainer,
)

STEPS = 8
GLOBAL_BATCH = 24
#: K-FAC's options in every run (and in the single-process references of the test).
KFAC = dict(damping=1e-2, factor_update_freq=1, inv_update_freq=2, kl_clip=1e-4, verbose=False)
#: The CNN run's extra K-FAC options: decompositions in the background.
CNN_KFAC = {"staleness": 1}
#: The EKFAC run's extra K-FAC options.
EKFAC = {"eigenvalue_correction": True}
#: The tokens run's strategy options: eager reduction, gathers of one layer or less a bucket.
TOKENS_STRATEGY = {"kfac_reduce_every_update": True, "kfac_bucket_cap_mb": 0.001}


def dataset(kind: str = "mlp"):
    """float64 data: classification (mlp, narrow), sequences (cnn) or tokens (tokens)."""
    kinds = {"mlp": classification_data, "narrow": classification_data}
    kinds |= {"cnn": sequence_data, "tokens": token_data}
    data = kinds[kind](GLOBAL_BATCH * 4)
    x, y = data.tensors
    return torch.utils.data.TensorDataset(x.double() if x.is_floating_point() else x, y)


def network(kind: str = "mlp", ranks: int = 1) -> nn.Module:
    """The model, float64. ``tokens`` (embedding, LayerNorm, BatchNorm1d) runs its batch
    norm on ``ranks`` interleaved parts of the batch, as ``ranks`` ranks do."""
    torch.manual_seed(0)
    if kind == "mlp":
        return mlp().double()
    if kind == "narrow":  # every factor full rank at the global batch (see EKFAC's test)
        return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    if kind == "cnn":  # a grouped conv: its gradient is sharded along the groups
        return cnn().double()
    return TokenNet(ghost_batches=ranks).double()


class ShardedClassifier(StepIndexedClassifier):
    """The user's model: ``configure_model`` shards each Linear and the root with FSDP2."""

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for module in self.net.modules():
            if module is not self.net and next(module.parameters(recurse=False), None) is not None:
                fully_shard(module, mesh=mesh)
        fully_shard(self, mesh=mesh)


class Record(Callback):
    """KL-clip scales of every step; at the end, whether the replicated K-FAC state (global
    factors, decompositions every rank keeps) is bitwise equal on every rank."""

    def __init__(self) -> None:
        self.scales: list[float] = []
        self.identical = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = _kfac(trainer).last_stats
        self.scales.append(None if stats.kl_scale is None else float(stats.kl_scale))

    def on_train_end(self, trainer, pl_module) -> None:
        engine = _kfac(trainer).engine
        row_local = set(getattr(engine.distribution, "row_local", {}))
        parts = []
        for name, state in sorted(engine.state.items()):
            parts += [t.reshape(-1) for _, t in sorted(state.decomposed.items())]
            for key, decomposition in sorted(state.decompositions.items()):
                if (name in row_local and key == "G") or key not in state.decomposed:
                    continue
                parts += [t.reshape(-1) for t in decomposition.tensors()]
        flat = torch.cat(parts).contiguous()
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        self.identical = all(torch.equal(gathered[0], other) for other in gathered[1:])


def _kfac(trainer) -> KFACCallback:
    return next(c for c in trainer.callbacks if isinstance(c, KFACCallback))


def fit(
    out: Path, mode: str, steps: int, ckpt_path=None, save_at=None, kind="mlp", kfac=(), **options
):
    module = ShardedClassifier(network(kind), dataset(kind), GLOBAL_BATCH, lr=0.05)
    record = Record()
    kfac = KFACCallback(batch_size=LocalBatch(GLOBAL_BATCH), **{**KFAC, **dict(kfac)})
    callbacks = [kfac, record]
    if save_at:
        callbacks.append(
            ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=save_at, save_top_k=-1)
        )
    if mode == "plain":  # Lightning's own strategy: the callback detects the sharding
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = KFACModelParallelStrategy(
            data_parallel_size=2,
            tensor_parallel_size=1,
            kfac_shard_preconditioning=mode,
            **options,
        )
    trainer(
        devices=2,
        strategy=strategy,
        max_steps=steps,
        callbacks=callbacks,
        enable_checkpointing=bool(save_at),
    ).fit(module, dummy_loader(), ckpt_path=ckpt_path)
    params = {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in module.named_parameters()
    }
    scales = [None] * dist.get_world_size()
    dist.all_gather_object(scales, record.scales)
    memory = [None] * dist.get_world_size()
    distribution = kfac.engine.distribution
    dist.all_gather_object(memory, distribution.memory())
    traffic = [None] * dist.get_world_size()
    dist.all_gather_object(traffic, dict(distribution.collectives.traffic.bytes))
    return {
        "params": params,
        "scales": scales,
        "identical": record.identical,
        "memory": memory,
        "describe": distribution.describe(),
        "traffic": traffic,
        "distribution": type(distribution).__name__,
    }


def refusals() -> list[str]:
    """Layouts K-FAC must refuse: HSDP (a 2-D mesh) and sharding along dim 1."""
    from torch.distributed.device_mesh import init_device_mesh

    messages = []
    world = dist.get_world_size()
    hsdp = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    layer = nn.Linear(4, 4).double()
    fully_shard(layer, mesh=hsdp)
    flat = init_device_mesh("cpu", (world,))
    column = nn.Parameter(distribute_tensor(torch.zeros(4, 4), flat, [Shard(1)]))
    for name, parameter in (("hsdp", layer.weight), ("column", column)):
        try:
            check_parameter(name, parameter, world)
            messages.append("")
        except ValueError as error:
            messages.append(str(error))
    attention = nn.MultiheadAttention(4, 2)  # its block slices the packed q, k, v rows
    fully_shard(attention, mesh=flat)
    try:
        check_gradient_layouts(discover(nn.Sequential(attention)).blocks)
        messages.append("")
    except ValueError as error:
        messages.append(str(error))
    return messages


def main() -> None:
    out = Path(sys.argv[1])
    results = {"gather": fit(out, "gather", STEPS, save_at=STEPS // 2)}
    checkpoint = out / "ckpt" / f"epoch=0-step={STEPS // 2}.ckpt"
    results["resumed"] = fit(out, "gather", STEPS, ckpt_path=str(checkpoint))
    results["block_diagonal"] = fit(out, "block_diagonal", STEPS)
    results["plain"] = fit(out, "plain", STEPS)
    # background decompositions; factors reduced on every update, gathers in tiny buckets
    results["cnn"] = fit(out, "block_diagonal", STEPS, kind="cnn", kfac=CNN_KFAC)
    results["tokens"] = fit(out, "gather", STEPS, kind="tokens", **TOKENS_STRATEGY)
    results["ekfac"] = fit(out, "gather", STEPS, kind="narrow", kfac=EKFAC)
    results["refusals"] = refusals()
    results["checkpoint_is_dir"] = checkpoint.is_dir()
    if dist.get_rank() == 0:
        torch.save(results, out / "results.pt")
    dist.barrier()


if __name__ == "__main__":
    main()
    # As in fit_two_ranks.py: leave without interpreter teardown (gloo's rare abort at exit).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
