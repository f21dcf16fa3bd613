"""K-FAC under FSDP2 (``KFACModelParallelStrategy``) on 2 CPU ranks, float64.

Usage: started twice by ``tests/test_fsdp.py`` with RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*
set (so Lightning launches nothing and every fit below shares one process group):

    python tests/scripts/fit_sharded.py OUT_DIR

Runs, in order: the gather and the owner modes for ``STEPS`` steps (a distributed
checkpoint at step ``STEPS // 2``), each resumed from that checkpoint to ``STEPS``, the
block-diagonal mode, the gather mode under Lightning's plain ``ModelParallelStrategy``, a
CNN with a grouped conv (block-diagonal: the grouped conv gathered, the other layers
row-local), a model with an embedding, LayerNorm and BatchNorm1d (gather), EKFAC (gather),
the CNN and the embedding model in owner mode, a wider and deeper MLP on badly scaled inputs
(K-FAC gather and owner, SGD at three learning rates, K-FAC under ``kfac_ddp`` for the
memory comparison), and the checks that must refuse HSDP, non-dim-0 sharding, a sharded
attention layer and EKFAC in owner mode. Rank 0 writes ``OUT_DIR/results.pt``: every run's
final full parameters, each rank's KL-clip scales and losses, whether K-FAC's replicated
state was bitwise equal on both ranks, each rank's memory report, the bytes each rank held
(measured from the tensors) and the refusal messages.
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
from lightning_kfac.blocks import LinearBlock
from lightning_kfac.communication import Collectives
from lightning_kfac.discovery import discover
from lightning_kfac.distribution import OwnerPreconditioning
from lightning_kfac.ekfac import EigenvalueCorrectedBlock
from lightning_kfac.options import ShardedOptions
from lightning_kfac.sharded import ShardedDistribution, check_gradient_layouts, check_parameter
from lightning_kfac.strategy import KFACDDPStrategy, KFACModelParallelStrategy
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
#: The wide run: steps, K-FAC's options and learning rate, SGD's learning rates (the best is
#: the middle one: the grid brackets SGD's optimum), and gathers of one layer a bucket.
WIDE_STEPS = 40
WIDE_KFAC = dict(damping=1e-2, factor_update_freq=1, inv_update_freq=2, kl_clip=3e-4, verbose=False)
WIDE_KFAC_LR = 0.1
WIDE_SGD_LRS = (0.01, 0.03, 0.1)
WIDE_STRATEGY = {"kfac_bucket_cap_mb": 0.04}


def dataset(kind: str = "mlp"):
    """float64 data: classification (mlp, narrow; wide: 8 batches of inputs scaled from 0.1
    to 10, which curvature corrects and SGD does not), sequences (cnn) or tokens (tokens)."""
    if kind == "wide":
        x, y = classification_data(GLOBAL_BATCH * 8).tensors
        scales = torch.logspace(-1, 1, x.shape[1], dtype=torch.float64)
        return torch.utils.data.TensorDataset(x.double() * scales, y)
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
    if kind == "wide":  # 12-64-64-64-64-64-64-3, Tanh
        layers = [nn.Linear(12, 64), nn.Tanh()]
        for _ in range(5):
            layers += [nn.Linear(64, 64), nn.Tanh()]
        return nn.Sequential(*layers, nn.Linear(64, 3)).double()
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
    factors, decompositions every rank keeps) is bitwise equal on every rank, and the
    layers whose decompositions this rank holds."""

    def __init__(self) -> None:
        self.scales: list[float] = []
        self.identical = None
        self.kept: list[str] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        kfac = _kfac(trainer)
        if kfac is not None:
            stats = kfac.last_stats
            self.scales.append(None if stats.kl_scale is None else float(stats.kl_scale))

    def on_train_end(self, trainer, pl_module) -> None:
        if _kfac(trainer) is None:
            return
        engine = _kfac(trainer).engine
        row_local = set(getattr(engine.distribution, "row_local", {}))
        owner = isinstance(engine.distribution.assignment, OwnerPreconditioning)
        self.kept = sorted(name for name, state in engine.state.items() if state.decompositions)
        parts = []
        for name, state in sorted(engine.state.items()):
            parts += [t.reshape(-1) for _, t in sorted(state.decomposed.items())]
            for key, decomposition in sorted(state.decompositions.items()):
                if owner or (name in row_local and key == "G") or key not in state.decomposed:
                    continue
                parts += [t.reshape(-1) for t in decomposition.tensors()]
        flat = torch.cat(parts).contiguous()
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        self.identical = all(torch.equal(gathered[0], other) for other in gathered[1:])


def _kfac(trainer) -> KFACCallback | None:
    return next((c for c in trainer.callbacks if isinstance(c, KFACCallback)), None)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once)."""
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def held(module: nn.Module, kfac: KFACCallback | None) -> dict[str, int]:
    """Bytes this rank holds, measured from the tensors: its parameters (local shards under
    FSDP2) and K-FAC's state: running factors, the factors behind the decompositions and
    the decompositions it keeps."""
    out = {"parameters": storage_bytes(_local(p) for p in module.parameters())}
    if kfac is not None:
        states = kfac.engine.state.values()
        out["running"] = storage_bytes(t for s in states for t in s.running.values())
        out["decomposed"] = storage_bytes(t for s in states for t in s.decomposed.values())
        out["decompositions"] = storage_bytes(
            t for s in states for d in s.decompositions.values() for t in d.tensors()
        )
    return out


def _local(tensor):
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _everyone(value) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def fit(
    out: Path,
    mode: str,
    steps: int,
    ckpt_path=None,
    save_at=None,
    kind="mlp",
    kfac: dict | None = KFAC,
    lr: float = 0.05,
    **options,
):
    """One fit. ``mode``: a ``kfac_shard_preconditioning``, ``"plain"`` (Lightning's own
    ``ModelParallelStrategy``) or ``"ddp"`` (``kfac_ddp``, the model unsharded); ``kfac``:
    the callback's options, None for SGD alone."""
    cls = StepIndexedClassifier if mode == "ddp" else ShardedClassifier
    module = cls(network(kind), dataset(kind), GLOBAL_BATCH, lr=lr)
    record = Record()
    callback = None if kfac is None else KFACCallback(batch_size=LocalBatch(GLOBAL_BATCH), **kfac)
    callbacks = [record] + ([] if callback is None else [callback])
    if save_at:
        callbacks.append(
            ModelCheckpoint(
                dirpath=out / f"ckpt-{mode}", every_n_train_steps=save_at, save_top_k=-1
            )
        )
    if mode == "ddp":
        strategy = KFACDDPStrategy(**options)
    elif mode == "plain":  # Lightning's own strategy: the callback detects the sharding
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
    params = {n: _full(p).detach().clone() for n, p in module.named_parameters()}
    result = {
        "params": params,
        "losses": _everyone(module.losses),
        "held": _everyone(held(module, callback)),
    }
    if callback is None:
        return result
    distribution = callback.engine.distribution
    reported = distribution.memory() if hasattr(distribution, "memory") else None
    return result | {
        "scales": _everyone(record.scales),
        "identical": record.identical,
        "kept": _everyone(record.kept),
        "memory": _everyone(reported),
        "describe": getattr(distribution, "describe", lambda: "")(),
        "traffic": _everyone(dict(distribution.collectives.traffic.bytes)),
        "distribution": type(distribution).__name__,
    }


def _full(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def wide(out: Path) -> dict:
    """The wide model: K-FAC (gather and owner) and SGD at each of ``WIDE_SGD_LRS`` under
    FSDP2, and K-FAC under ``kfac_ddp`` (shared and owner), for the same steps and data."""
    kfac = dict(kind="wide", kfac=WIDE_KFAC, lr=WIDE_KFAC_LR)
    runs = {
        "kfac": fit(out, "gather", WIDE_STEPS, **kfac, **WIDE_STRATEGY),
        "owner": fit(out, "owner", WIDE_STEPS, **kfac, **WIDE_STRATEGY),
        "ddp": fit(out, "ddp", WIDE_STEPS, **kfac),
        "ddp_owner": fit(out, "ddp", WIDE_STEPS, **kfac, kfac_precondition_mode="owner"),
    }
    for lr in WIDE_SGD_LRS:
        runs[f"sgd {lr}"] = fit(out, "plain", WIDE_STEPS, kind="wide", kfac=None, lr=lr)
    return runs


def refusals() -> list[str]:
    """What K-FAC must refuse under sharding: HSDP (a 2-D mesh), sharding along dim 1, a
    sharded attention layer and EKFAC in owner mode."""
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
    ekfac = {"0": EigenvalueCorrectedBlock(LinearBlock(fully_shard(nn.Linear(4, 4), mesh=flat)))}
    owner = ShardedDistribution(Collectives(), ShardedOptions(shard_preconditioning="owner"))
    try:
        owner.setup(ekfac, torch.float32)
        messages.append("")
    except ValueError as error:
        messages.append(str(error))
    return messages


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)  # 2 ranks on 2 cores: more threads only spin against each other
    checkpoint = f"epoch=0-step={STEPS // 2}.ckpt"
    results = {}
    for mode, resumed in (("gather", "resumed"), ("owner", "owner_resumed")):
        results[mode] = fit(out, mode, STEPS, save_at=STEPS // 2)
        results[resumed] = fit(out, mode, STEPS, ckpt_path=str(out / f"ckpt-{mode}" / checkpoint))
    results["block_diagonal"] = fit(out, "block_diagonal", STEPS)
    results["plain"] = fit(out, "plain", STEPS)
    # background decompositions; factors reduced on every update, gathers in tiny buckets
    results["cnn"] = fit(out, "block_diagonal", STEPS, kind="cnn", kfac=KFAC | CNN_KFAC)
    results["tokens"] = fit(out, "gather", STEPS, kind="tokens", **TOKENS_STRATEGY)
    results["ekfac"] = fit(out, "gather", STEPS, kind="narrow", kfac=KFAC | EKFAC)
    # owner mode with background decompositions, a grouped conv, embeddings and norms
    results["cnn_owner"] = fit(out, "owner", STEPS, kind="cnn", kfac=KFAC | CNN_KFAC)
    results["tokens_owner"] = fit(out, "owner", STEPS, kind="tokens", **TOKENS_STRATEGY)
    results["wide"] = wide(out)
    results["refusals"] = refusals()
    results["checkpoint_is_dir"] = (out / "ckpt-gather" / checkpoint).is_dir()
    if dist.get_rank() == 0:
        torch.save(results, out / "results.pt")
    dist.barrier()


if __name__ == "__main__":
    main()
    # As in fit_two_ranks.py: leave without interpreter teardown (gloo's rare abort at exit).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
