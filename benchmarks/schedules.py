"""K-FAC's update frequencies, chosen by time to target: a sweep over schedules.

    python -m benchmarks.schedules            # the table of docs/benchmarks.md
    python -m benchmarks.schedules --quick    # a smoke test

Every ``(factor_update_freq, inv_update_freq)`` of ``SCHEDULES`` trains, with K-FAC's other
defaults (damping 1e-2, KL clip 1e-3, empirical Fisher) and SGD with momentum 0.9:
- the MNIST-1D CNN of ``examples/mnist1d_kfac.py`` (batch 100, lr 0.05) and its variant
  with a 1000-wide flatten -> Linear head (``channels=200``), to 90% and 94% test accuracy;
- the deep autoencoder of ``benchmarks/autoencoder.py`` (batch 256, lr 0.1,
  ``loss_terms="elements"``), to whole-set losses 0.26 and 0.25.
Reported per model and schedule: medians over ``--seeds`` seeds of the steps and training
seconds to each target ("-": half the seeds or more never reach it) and of ms per step.
Steps do not depend on the machine's load; seconds do, so run it alone.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from sklearn.datasets import load_digits

from benchmarks.autoencoder import first_below, fit
from benchmarks.baselines import fmt
from examples.mnist1d_kfac import train

#: (factor_update_freq, inv_update_freq) pairs swept; the first is the library's default.
SCHEDULES = [(1, 10), (2, 20), (5, 50), (10, 100), (20, 100)]
MNIST_TARGETS = (0.90, 0.94)
AUTOENCODER_TARGETS = (0.26, 0.25)
#: One run: ``(steps, seconds)`` to each target (infinite if never), and its ms per step.
Run = tuple[list[tuple[float, float]], float]


def mnist_runs(schedule, seeds: int, steps: int, channels: int) -> list[Run]:
    """One run per seed (it stops at the last target)."""
    factor, inverse = schedule
    kfac = dict(damping=1e-2, factor_update_freq=factor, inv_update_freq=inverse)
    out = []
    for seed in range(seeds):
        history = train(
            steps,
            25,
            seed=seed,
            stop_at=MNIST_TARGETS[-1],
            optimizer="sgd",
            lr=0.05,
            channels=channels,
            kfac=kfac,
        )
        hits = [history.first_reaching(t) or (math.inf, math.inf) for t in MNIST_TARGETS]
        out.append((hits, 1000 * history.train_seconds / max(history.steps, 1)))
    return out


def autoencoder_runs(schedule, seeds: int, steps: int) -> list[Run]:
    factor, inverse = schedule
    digits = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
    kfac = dict(
        damping=1e-2,
        loss_terms="elements",
        factor_update_freq=factor,
        inv_update_freq=inverse,
    )
    out = []
    for seed in range(seeds):
        points = fit(seed, steps, 25, digits, "sgd", 0.1, kfac).points
        hits = [first_below(points, t) for t in AUTOENCODER_TARGETS]
        out.append((hits, 1000 * points[-1][1] / points[-1][0]))
    return out


def table(title: str, targets: list[str], rows: dict[tuple[int, int], list[Run]]) -> None:
    print(f"\n{title}; medians\n")
    header = " | ".join(f"steps to {t} | s to {t}" for t in targets)
    print(f"| factor_update_freq, inv_update_freq | ms/step | {header} |")
    print("| --- | ---: | " + " | ".join("---: | ---:" for _ in targets) + " |")
    for (factor, inverse), runs in rows.items():
        cells = []
        for index in range(len(targets)):
            cells.append(fmt(statistics.median([hits[index][0] for hits, _ in runs]), 0))
            cells.append(fmt(statistics.median([hits[index][1] for hits, _ in runs]), 1))
        ms = statistics.median([ms for _, ms in runs])
        print(f"| {factor}, {inverse} | {ms:.2f} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--mnist-steps", type=int, default=1000)
    parser.add_argument("--autoencoder-steps", type=int, default=1500)
    parser.add_argument(
        "--models",
        nargs="+",
        default=["cnn", "wide-head", "autoencoder"],
        choices=["cnn", "wide-head", "autoencoder"],
    )
    parser.add_argument("--quick", action="store_true", help="a few steps: a smoke test")
    args = parser.parse_args()
    schedules = SCHEDULES
    if args.quick:
        args.seeds, args.mnist_steps, args.autoencoder_steps = 1, 30, 30
        schedules = SCHEDULES[:2]
    mnist_targets = [f"{t:.0%}" for t in MNIST_TARGETS]
    for model, channels in (("cnn", 25), ("wide-head", 200)):
        if model in args.models:
            rows = {s: mnist_runs(s, args.seeds, args.mnist_steps, channels) for s in schedules}
            name = "MNIST-1D CNN" + (", 1000-wide head" if channels == 200 else "")
            table(f"{name}, batch 100, lr 0.05, {args.seeds} seeds", mnist_targets, rows)
    if "autoencoder" in args.models:
        rows = {s: autoencoder_runs(s, args.seeds, args.autoencoder_steps) for s in schedules}
        targets = [f"{t:g}" for t in AUTOENCODER_TARGETS]
        table(f"Deep autoencoder, batch 256, lr 0.1, {args.seeds} seeds", targets, rows)


if __name__ == "__main__":
    main()
