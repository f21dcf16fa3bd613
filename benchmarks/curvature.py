"""Empirical Fisher vs true Fisher vs EKFAC, on the MNIST-1D CNN and the deep autoencoder.

    python -m benchmarks.curvature            # the two tables of docs/benchmarks.md
    python -m benchmarks.curvature --quick    # a smoke test

MNIST-1D: the baseline CNN of ``examples/mnist1d_kfac.py`` at batch 100, K-FAC with SGD
(momentum 0.9, lr 0.05, damping 1e-2), steps and training seconds to 90% and 94% test
accuracy. Deep autoencoder (``benchmarks/autoencoder.py``): the target is the whole-set loss
Adam (lr 1e-2, the best of that benchmark's grid) reaches at ``--steps`` steps in the same
run and seed; K-FAC (SGD, momentum 0.9, damping 1e-2, each learning rate of a small grid)
reports the steps and seconds to reach it and its own loss at the last step; its loss
averages over every output, so K-FAC runs with ``loss_terms="elements"`` (K = N*D: the true
Fisher's sampled loss is built with K, a wrong K would scale its G the other way from the
empirical Fisher's). Each K-FAC variant runs with each ``--schedules`` entry: the defaults
(factors every step, decompositions every 10) and rare updates (factors every 10,
decompositions every 100: a basis up to 100 steps old, which EKFAC rescales on every factor
step). Seconds are the training steps' time by ``--clock``: ``wall`` or ``process`` (CPU
time of this process, which a shared machine inflates less; one thread). Medians over
``--seeds`` seeds; one run at a time.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from sklearn.datasets import load_digits

from benchmarks.autoencoder import first_below, fit
from benchmarks.baselines import fmt, median_or_inf
from benchmarks.loop import CLOCKS, add_clock_argument
from examples.mnist1d_kfac import train

#: name -> K-FAC options beyond the defaults (the likelihood is set per model).
VARIANTS = {
    "empirical Fisher": dict(),
    "true Fisher": dict(fisher="true"),
    "EKFAC (empirical)": dict(eigenvalue_correction=True),
    "EKFAC + true Fisher": dict(fisher="true", eigenvalue_correction=True),
}


#: name -> K-FAC update frequencies.
SCHEDULES = {
    "default": dict(),
    "rare": dict(factor_update_freq=10, inv_update_freq=100),
}


def mnist1d(seeds: int, steps: int, eval_every: int, targets: tuple[float, ...]) -> None:
    print(
        f"\nMNIST-1D CNN, batch 100, lr 0.05, damping 1e-2, {steps} steps, {seeds} seeds; medians\n"
    )
    header = " | ".join(f"steps to {t:.0%} | s to {t:.0%}" for t in targets)
    print(f"| curvature | final acc | ms/step | {header} |")
    print("| --- | ---: | ---: | " + " | ".join("---: | ---:" for _ in targets) + " |")
    for name, options in VARIANTS.items():
        histories = [
            train(
                steps,
                eval_every,
                seed=seed,
                optimizer="sgd",
                lr=0.05,
                kfac=dict(damping=1e-2, likelihood="categorical", **options),
            )
            for seed in range(seeds)
        ]
        cells = []
        for target in targets:
            hits = [h.first_reaching(target) or (math.inf, math.inf) for h in histories]
            steps = median_or_inf([s for s, _ in hits])
            cells += [fmt(steps, 0), fmt(median_or_inf([t for _, t in hits]))]
        final = statistics.median(h.history[-1][2] for h in histories)
        ms = statistics.median(1000 * h.train_seconds / h.history[-1][0] for h in histories)
        print(f"| {name} | {final:.3f} | {ms:.2f} | " + " | ".join(cells) + " |", flush=True)


def autoencoder(
    seeds: int,
    steps: int,
    every: int,
    lrs: list[float],
    target: float | None = None,
    schedules: tuple[str, ...] = tuple(SCHEDULES),
    clock: str = "wall",
) -> None:
    digits = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
    tick = CLOCKS[clock]

    def run(seed, optimizer, lr, kfac):
        return fit(seed, steps, every, digits, optimizer, lr, kfac, tick).points

    if target is None:
        adam = [run(s, "adam", 1e-2, None) for s in range(seeds)]
    else:  # a target measured before (every seed's): Adam is not run again
        adam = [[(steps, math.nan, target)] for _ in range(seeds)]
    targets = [points[-1][2] for points in adam]
    adam_ms = statistics.median(1000 * p[-1][1] / p[-1][0] for p in adam)
    print(
        f"\nDeep autoencoder on digits, batch 256: target = Adam's (lr 1e-2) loss at {steps} "
        f"steps, per seed (median {statistics.median(targets):.4f}, {adam_ms:.2f} ms/step); "
        f"K-FAC damping 1e-2, {seeds} seeds, {clock} clock; medians\n"
    )
    print(
        "| curvature | schedule | lr | loss @ last step | ms/step | steps to target | s to target |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    adam_hits = [first_below(p, t) for p, t in zip(adam, targets)]
    print(
        f"| Adam (the target) | - | 0.01 | {statistics.median(targets):.4f} | {adam_ms:.2f} | "
        f"{fmt(median_or_inf([s for s, _ in adam_hits]), 0)} | "
        f"{fmt(median_or_inf([t for _, t in adam_hits]))} |"
    )
    for name, options in VARIANTS.items():
        for schedule in schedules:
            for lr in lrs:
                kfac = dict(damping=1e-2, likelihood="bernoulli", loss_terms="elements")
                kfac |= options | SCHEDULES[schedule]
                runs = [run(s, "sgd", lr, kfac) for s in range(seeds)]
                hits = [first_below(p, t) for p, t in zip(runs, targets)]
                final = statistics.median(p[-1][2] for p in runs)
                ms = statistics.median(1000 * p[-1][1] / p[-1][0] for p in runs)
                print(
                    f"| {name} | {schedule} | {lr:g} | {final:.4f} | {ms:.2f} | "
                    f"{fmt(median_or_inf([s for s, _ in hits]), 0)} | "
                    f"{fmt(median_or_inf([t for _, t in hits]))} |",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--mnist-steps", type=int, default=1000)
    parser.add_argument("--autoencoder-steps", type=int, default=1500)
    parser.add_argument("--autoencoder-seeds", type=int, default=None, help="default: --seeds")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.03, 0.1])
    parser.add_argument("--parts", nargs="+", default=["mnist1d", "autoencoder"])
    parser.add_argument("--adam-target", type=float, default=None, help="skip the Adam runs")
    parser.add_argument("--schedules", nargs="+", choices=list(SCHEDULES), default=list(SCHEDULES))
    add_clock_argument(parser)  # the autoencoder's seconds
    parser.add_argument("--quick", action="store_true", help="a few steps: a smoke test")
    args = parser.parse_args()
    if args.quick:
        mnist1d(1, 40, 20, (0.5,))
        autoencoder(1, 20, 10, [0.03], schedules=("rare",), clock="process")
        return
    if "mnist1d" in args.parts:
        mnist1d(args.seeds, args.mnist_steps, 25, (0.90, 0.94))
    if "autoencoder" in args.parts:
        seeds = args.autoencoder_seeds or args.seeds
        autoencoder(
            seeds,
            args.autoencoder_steps,
            25,
            args.lrs,
            args.adam_target,
            tuple(args.schedules),
            args.clock,
        )


if __name__ == "__main__":
    main()
