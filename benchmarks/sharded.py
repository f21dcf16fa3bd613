"""K-FAC with sharded parameters (FSDP2) against FSDP2 + SGD/AdamW and K-FAC under DDP.

    python -m benchmarks.sharded            # a 512-wide MLP, 2 CPU ranks (gloo)
    python -m benchmarks.sharded --quick    # a smoke test

Every configuration trains the same MLP for ``--steps`` optimizer steps at a fixed global
batch on 2 ranks, one thread each, around the engine and the distribution that
``KFACCallback`` uses with ``strategy="kfac_model_parallel"`` (``ShardedDistribution``) or
``"kfac_ddp"`` (``DataParallelDistribution``). Reported: median and p95 ms per step (rank
0); K-FAC bytes handed to collectives per step (rank 0, all steps); and per rank the bytes
of the model's parameters held (a shard under FSDP2, whole under DDP) and of
K-FAC's state: running factors, the decompositions the rank keeps, and the gradient
buffers K-FAC allocates in a step (under FSDP2 the largest bucket gathered or, in owner
mode, received; in kfac_ddp's owner mode the other owners' broadcast gradients).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from benchmarks.loop import train_step
from lightning_kfac.communication import Collectives, free_port
from lightning_kfac.discovery import discover
from lightning_kfac.distribution import DataParallelDistribution
from lightning_kfac.engine import KFACEngine
from lightning_kfac.options import DataParallelOptions, KFACOptions, ShardedOptions
from lightning_kfac.sharded import ShardedDistribution

WORLD = 2
CONFIGS = {
    # name: (parallelism, optimizer, K-FAC: None, the sharded mode or kfac_ddp's mode)
    "FSDP2 + SGD": ("fsdp", "sgd", None),
    "FSDP2 + AdamW": ("fsdp", "adamw", None),
    "FSDP2 + K-FAC, gather": ("fsdp", "sgd", "gather"),
    "FSDP2 + K-FAC, block_diagonal": ("fsdp", "sgd", "block_diagonal"),
    "FSDP2 + K-FAC, owner": ("fsdp", "sgd", "owner"),
    "DDP + K-FAC (kfac_ddp)": ("ddp", "sgd", "shared"),
    "DDP + K-FAC (kfac_ddp, owner)": ("ddp", "sgd", "owner"),
}


def build(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(256, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


def ddp_memory(distribution: DataParallelDistribution) -> dict[str, int]:
    """K-FAC's bytes per rank under kfac_ddp: whole factors on every rank; every
    decomposition (shared mode) or those of the rank's own layers and the broadcast buffers
    of the others' preconditioned gradients (owner mode)."""
    itemsize = torch.empty((), dtype=distribution.dtype).element_size()
    blocks = distribution.blocks
    owner = distribution.options.precondition_mode == "owner"
    running = sum(math.prod(s) for b in blocks.values() for s in b.factor_shapes().values())
    kept = sum(
        math.prod(s)
        for name, b in blocks.items()
        for k in b.factor_shapes()
        if not owner or distribution.assignment.owner((name, k)) == distribution.rank
        for s in b.decomposition_shapes(k)
    )
    received = sum(
        p.numel() * p.element_size()
        for name, b in blocks.items()
        if owner and distribution.assignment.owner((name, "A")) != distribution.rank
        for p in b.parameters()
    )
    shards = sum(p.numel() * p.element_size() for b in blocks.values() for p in b.parameters())
    return {
        "running": running * itemsize,
        "decompositions": kept * itemsize,
        "gradient_buffers": received,
        "parameter_shards": shards,
    }


def worker(rank: int, port: int, args, config: tuple, queue) -> None:
    parallelism, optimizer_name, kfac = config
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120)
    )
    torch.manual_seed(0)
    net = build(args.width)
    if parallelism == "fsdp":
        mesh = init_device_mesh("cpu", (WORLD,))
        for module in net:
            if isinstance(module, nn.Linear):
                fully_shard(module, mesh=mesh)
        model = fully_shard(net, mesh=mesh)
    else:
        model = DistributedDataParallel(net)
    engine = None
    if kfac is not None:
        if parallelism == "ddp":
            options = DataParallelOptions(precondition_mode=kfac)
            distribution = DataParallelDistribution(Collectives(), options)
        else:
            options = ShardedOptions(shard_preconditioning=kfac)
            distribution = ShardedDistribution(Collectives(), options)
        engine = KFACEngine(
            discover(net).blocks,
            KFACOptions(
                factor_update_freq=args.factor_update_freq, inv_update_freq=args.inv_update_freq
            ),
            distribution=distribution,
            warn=lambda message: None,
        )
        engine.attach()
    if optimizer_name == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    local = args.batch // WORLD
    generator = torch.Generator().manual_seed(rank)
    # a batch per step: on one repeated batch the loss reaches zero and the vanishing
    # gradients make float32 subnormal arithmetic slow
    steps = args.warmup + args.steps
    x = torch.randn(steps, local, 256, generator=generator)
    y = torch.randint(0, 10, (steps, local), generator=generator)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        train_step(model, optimizer, engine, x[step], y[step])
        times.append(time.perf_counter() - start)
    times = times[args.warmup :]
    memory = {}
    traffic = 0
    if engine is not None:
        distribution = engine.distribution
        memory = distribution.memory() if parallelism == "fsdp" else ddp_memory(distribution)
        traffic = distribution.collectives.traffic.total
    result = {
        "median_ms": 1000 * statistics.median(times),
        "p95_ms": 1000 * sorted(times)[int(0.95 * (len(times) - 1))],
        "bytes_per_step": traffic / (args.warmup + args.steps),
        "memory": memory,
        "parameters": sum(
            (p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
            for p in net.parameters()
        ),
    }
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, result)
    if rank == 0:
        queue.put(gathered)
        queue.close()
        queue.join_thread()
    dist.barrier()
    os._exit(0)  # as in benchmarks.distributed: no gloo teardown at exit


def run(args, config: tuple):
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=worker, args=(r, port, args, config, queue)) for r in range(WORLD)
    ]
    for p in processes:
        p.start()
    result = queue.get(timeout=600)
    for p in processes:
        p.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256, help="global batch size")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--factor-update-freq", type=int, default=1)
    parser.add_argument("--inv-update-freq", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="a few steps: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.width = 4, 1, 64
    print(
        f"MLP 256-{args.width}-{args.width}-10, float32, global batch {args.batch} on "
        f"{WORLD} ranks, factor_update_freq {args.factor_update_freq}, inv_update_freq "
        f"{args.inv_update_freq}, {args.steps} timed steps after {args.warmup} warm-up, "
        "1 thread per rank, gloo\n"
    )
    print(
        "| configuration | median ms/step | p95 ms/step | K-FAC bytes/step | parameters "
        "MiB/rank | running factors MiB/rank | decompositions MiB/rank (rank 0, 1) | "
        "gradient buffers MiB/rank (rank 0, 1) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, config in CONFIGS.items():
        ranks = run(args, config)
        first = ranks[0]
        memory = [r["memory"] for r in ranks]

        def mib(key: str, memory=memory) -> str:
            return f"{memory[0][key] / 2**20:.2f}" if memory[0] else "-"

        def per_rank(key: str, memory=memory) -> str:
            return ", ".join(f"{m[key] / 2**20:.2f}" for m in memory) if memory[0] else "-"

        print(
            f"| {name} | {first['median_ms']:.1f} | {first['p95_ms']:.1f} | "
            f"{first['bytes_per_step']:,.0f} | {first['parameters'] / 2**20:.2f} | "
            f"{mib('running')} | {per_rank('decompositions')} | {per_rank('gradient_buffers')} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
