"""Distributed K-FAC cost: per-step time, K-FAC bytes per step, time in decompositions.

    python -m benchmarks.distributed            # MLP and CNN, 1 and 2 CPU ranks (gloo)
    python -m benchmarks.distributed --quick    # a smoke test

Each configuration trains for ``--steps`` optimizer steps at a fixed global batch (one
rank: the whole batch; two ranks: half each), one thread per rank, with the engine and the
distribution that ``KFACCallback`` and ``strategy="kfac_ddp"`` use, around PyTorch's
DistributedDataParallel. Reported per configuration: median and p95 ms per step (rank 0),
K-FAC payload bytes per step (the size of the buffers rank 0 handed to K-FAC collectives,
averaged over all steps), and each rank's seconds in eigendecompositions with their count.
SGD rows (no K-FAC) give the baseline step time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from benchmarks.loop import train_step
from lightning_kfac.communication import Collectives, free_port
from lightning_kfac.discovery import discover
from lightning_kfac.distribution import DataParallelDistribution
from lightning_kfac.engine import KFACEngine
from lightning_kfac.options import DataParallelOptions, KFACOptions


def build(model: str) -> tuple[nn.Module, tuple[int, ...]]:
    if model == "mlp":
        net = nn.Sequential(
            nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )
        return net, (256,)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 10),
    )
    return net, (3, 16, 16)


CONFIGS = {
    # name: (ranks, K-FAC on, distribution options)
    "SGD, 1 rank": (1, False, {}),
    "SGD, 2 ranks": (2, False, {}),
    "K-FAC, 1 rank": (1, True, None),
    "K-FAC, 2 ranks, lazy, packed": (2, True, dict()),
    "K-FAC, 2 ranks, lazy, unpacked": (2, True, dict(pack_triangular=False)),
    "K-FAC, 2 ranks, every update, packed": (2, True, dict(reduce_every_update=True)),
    "K-FAC, 2 ranks, every update, unpacked": (
        2,
        True,
        dict(reduce_every_update=True, pack_triangular=False),
    ),
    "K-FAC, 2 ranks, owner mode, lazy, packed": (2, True, dict(precondition_mode="owner")),
}


def worker(rank: int, world: int, port: int, args, model_name: str, kfac: bool, options, queue):
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group(
            "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
        )
    torch.manual_seed(0)
    net, shape = build(model_name)
    engine = None
    if kfac:
        distribution = (
            DataParallelDistribution(Collectives(), DataParallelOptions(**options))
            if world > 1
            else None
        )
        blocks = discover(net).blocks
        engine = KFACEngine(
            blocks,
            KFACOptions(
                factor_update_freq=args.factor_update_freq, inv_update_freq=args.inv_update_freq
            ),
            distribution=distribution,
            warn=lambda message: None,
        )
        engine.attach()
    model = DistributedDataParallel(net) if world > 1 else net
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    local = args.batch // world
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(local, *shape, generator=generator)
    y = torch.randint(0, 10, (local,), generator=generator)
    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        train_step(model, optimizer, engine, x, y)
        times.append(time.perf_counter() - start)
    times = times[args.warmup :]
    traffic = 0
    if engine and world > 1:
        traffic = engine.distribution.collectives.traffic.total
    result = {
        "median_ms": 1000 * statistics.median(times),
        "p95_ms": 1000 * sorted(times)[int(0.95 * (len(times) - 1))],
        "bytes_per_step": traffic / (args.warmup + args.steps),
        "decomposition_s": engine.counters.decomposition_seconds if engine else 0.0,
        "decompositions": engine.counters.decompositions if engine else 0,
    }
    gathered = [result]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
    if rank == 0:
        queue.put(gathered)
        queue.close()
        queue.join_thread()
    if world > 1:
        dist.barrier()
        # Skip interpreter teardown: destroying a gloo process group still referenced by
        # DDP's reducer can deadlock (its destructor joins a thread that needs the GIL).
        os._exit(0)


def run(args, model_name: str, world: int, kfac: bool, options):
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [
        context.Process(
            target=worker, args=(r, world, port, args, model_name, kfac, options, queue)
        )
        for r in range(world)
    ]
    for p in processes:
        p.start()
    result = queue.get(timeout=600)  # raises queue.Empty instead of hanging
    for p in processes:
        p.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256, help="global batch size")
    parser.add_argument("--factor-update-freq", type=int, default=1)
    parser.add_argument("--inv-update-freq", type=int, default=10)
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--quick", action="store_true", help="a few steps: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.models = 4, 1, "mlp"
    print(
        f"global batch {args.batch}, factor_update_freq {args.factor_update_freq}, "
        f"inv_update_freq {args.inv_update_freq}, {args.steps} timed steps after "
        f"{args.warmup} warm-up, 1 thread per rank, gloo\n"
    )
    for model_name in args.models.split(","):
        print(f"### {model_name.upper()}\n")
        print(
            "| configuration | median ms/step | p95 ms/step | K-FAC payload bytes/step | "
            "decomposition s per rank (count) |"
        )
        print("| --- | ---: | ---: | ---: | --- |")
        for name, (world, kfac, options) in CONFIGS.items():
            ranks = run(args, model_name, world, kfac, options or {})
            first = ranks[0]
            decompositions = (
                ", ".join(f"{r['decomposition_s']:.3f} ({r['decompositions']})" for r in ranks)
                if kfac
                else "-"
            )
            print(
                f"| {name} | {first['median_ms']:.1f} | {first['p95_ms']:.1f} | "
                f"{first['bytes_per_step']:,.0f} | {decompositions} |",
                flush=True,
            )
        print()


if __name__ == "__main__":
    main()
