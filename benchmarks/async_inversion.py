"""Synchronous vs asynchronous (stale) decompositions: the per-step time distribution.

    python -m benchmarks.async_inversion            # table + docs/img/async_step_times.png
    python -m benchmarks.async_inversion --quick    # a smoke test

The model is a stack of wide-narrow Linear layers (input factors of side ``--width`` + 1
and 2 * ``--width`` + 1), so that eigendecompositions dominate the inversion steps while
ordinary steps stay cheap. Both runs train the same model on the same data with the same
engine; only ``staleness`` differs. Times are wall-clock per optimizer step, measured in one
process, one after the other.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from benchmarks.loop import train_step
from benchmarks.plotting import pyplot, save
from lightning_kfac.discovery import discover
from lightning_kfac.engine import KFACEngine
from lightning_kfac.options import KFACOptions


def build(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(width, 64),
        nn.Tanh(),
        nn.Linear(64, 2 * width),
        nn.Tanh(),
        nn.Linear(2 * width, 64),
        nn.Tanh(),
        nn.Linear(64, 10),
    )


def run(args, staleness: int) -> list[float]:
    torch.manual_seed(0)
    model = build(args.width)
    options = KFACOptions(damping=1e-2, inv_update_freq=args.inv_update_freq, staleness=staleness)
    engine = KFACEngine(discover(model).blocks, options, warn=lambda message: None)
    engine.attach()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, args.width)
    y = torch.randint(0, 10, (args.batch,))
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        train_step(model, optimizer, engine, x, y)
        times.append(time.perf_counter() - start)
    engine.close()
    return times


def summary(times: list[float]) -> dict[str, float]:
    """Statistics of steps 1.. (step 0 decomposes synchronously in both runs, by design)."""
    times = times[1:]
    ordered = sorted(times)

    def pick(q: float) -> float:
        return 1000 * ordered[int(q * (len(ordered) - 1))]

    return {
        "median": 1000 * statistics.median(times),
        "p95": pick(0.95),
        "p99": pick(0.99),
        "max": 1000 * max(times),
        "total": sum(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--inv-update-freq", type=int, default=50)
    parser.add_argument("--staleness", type=int, default=25)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--plot", default="docs/img/async_step_times.png")
    parser.add_argument("--quick", action="store_true", help="a few steps: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.width, args.steps, args.inv_update_freq, args.staleness = 128, 12, 4, 2
        args.plot = None

    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for label, staleness in (
        ("synchronous", 0),
        (f"async, staleness {args.staleness}", args.staleness),
    ):
        results[label] = run(args, staleness)
    print(
        f"MLP {args.width}-64-{2 * args.width}-64-10 (input factors {args.width + 1}^2 and "
        f"{2 * args.width + 1}^2), batch {args.batch}, {args.steps} steps, "
        f"inv_update_freq {args.inv_update_freq}, {torch.get_num_threads()} intra-op threads "
        f"on {os.cpu_count()} cores; statistics of steps 1..{args.steps - 1}\n"
    )
    print(
        "| decompositions | median ms | p95 ms | p99 ms | max ms | p95/median | max/median "
        "| total s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, times in results.items():
        s = summary(times)
        print(
            f"| {label} | {s['median']:.1f} | {s['p95']:.1f} | {s['p99']:.1f} | {s['max']:.1f} | "
            f"{s['p95'] / s['median']:.2f} | {s['max'] / s['median']:.2f} | {s['total']:.1f} |"
        )
    if args.plot:
        plt = pyplot()
        figure, axis = plt.subplots(figsize=(8, 3.5))
        for label, times in results.items():
            axis.plot([1000 * t for t in times], label=label, linewidth=1)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("ms per step")
        axis.set_yscale("log")
        axis.set_title("Per-step time: synchronous vs asynchronous decompositions (CPU)")
        axis.legend()
        save(figure, args.plot)


if __name__ == "__main__":
    main()
