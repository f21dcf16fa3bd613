"""Large-batch scaling on MNIST-1D: steps to a target accuracy against batch size.

    python -m benchmarks.batch_scaling            # table + docs/img/batch_scaling.png
    python -m benchmarks.batch_scaling --quick    # a smoke test

For every batch size (64 to 2048) and optimizer, a small learning-rate sweep trains the
MNIST-1D baseline CNN until its test accuracy reaches ``--target`` (checked every
``--eval-every`` steps) or ``--steps`` run out; the table and the plot report the fewest
steps over the sweep. The training set has 4000 examples: at batch 2048 one step sees half
of it.
"""

from __future__ import annotations

import argparse
import math

from benchmarks.plotting import pyplot, save
from examples.mnist1d_kfac import train

GRID = {
    "SGD": (dict(optimizer="sgd"), [0.05, 0.2]),
    "Adam": (dict(optimizer="adam"), [3e-3, 1e-2]),
    "K-FAC": (dict(optimizer="sgd", kfac=dict(damping=1e-2)), [0.05, 0.2]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="64,128,256,512,1024,2048")
    parser.add_argument("--target", type=float, default=0.85)
    parser.add_argument("--steps", type=int, default=1000, help="budget per run")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="docs/img/batch_scaling.png")
    parser.add_argument("--quick", action="store_true", help="a few steps: a smoke test")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    grid = GRID
    if args.quick:
        batches, args.steps, args.eval_every, args.plot = [64, 256], 20, 10, None
        grid = {name: (base, lrs[:1]) for name, (base, lrs) in GRID.items()}

    results: dict[str, dict[int, tuple[float, float, float]]] = {name: {} for name in grid}
    for batch in batches:
        for name, (base, lrs) in grid.items():
            best = (math.inf, math.inf, None)
            for lr in lrs:
                config = {**base, "lr": lr}
                if "kfac" in config:
                    config["kfac"] = dict(config["kfac"])
                history = train(
                    args.steps,
                    args.eval_every,
                    seed=args.seed,
                    batch_size=batch,
                    stop_at=args.target,
                    **config,
                )
                hit = history.first_reaching(args.target)
                steps, seconds = hit if hit else (math.inf, math.inf)
                if (steps, seconds) < best[:2]:
                    best = (steps, seconds, lr)
                print(f"  batch {batch} {name} lr={lr}: steps to target {steps}", flush=True)
            results[name][batch] = best

    print(
        f"\nMNIST-1D baseline CNN: steps (and training seconds) to {args.target:.0%} test "
        f"accuracy, best of the learning-rate sweep, seed {args.seed}, budget {args.steps} steps\n"
    )
    print("| batch | " + " | ".join(grid) + " |")
    print("| ---: | " + " | ".join("---:" for _ in grid) + " |")
    for batch in batches:
        cells = []
        for name in grid:
            steps, seconds, lr = results[name][batch]
            cells.append("-" if math.isinf(steps) else f"{steps} ({seconds:.1f}s, lr {lr:g})")
        print(f"| {batch} | " + " | ".join(cells) + " |")

    if args.plot:
        plt = pyplot()
        figure, axis = plt.subplots(figsize=(6, 4))
        for name in grid:
            points = [
                (b, results[name][b][0]) for b in batches if not math.isinf(results[name][b][0])
            ]
            if points:
                axis.plot(*zip(*points), marker="o", label=name)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("batch size")
        axis.set_ylabel(f"steps to {args.target:.0%} test accuracy")
        axis.set_title("MNIST-1D: steps to target against batch size (CPU)")
        axis.legend()
        save(figure, args.plot)


if __name__ == "__main__":
    main()
