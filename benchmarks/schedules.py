"""K-FAC's defaults, chosen by time to target: sweeps over one group of options at a time.

    python -m benchmarks.schedules                        # update frequencies (the first table)
    python -m benchmarks.schedules --sweep inverse        # damping method and inverse method
    python -m benchmarks.schedules --sweep structure      # the large-factor policy
    python -m benchmarks.schedules --sweep factor-examples
    python -m benchmarks.schedules --quick                # a smoke test (every sweep)

Every configuration of the sweep trains, with K-FAC's other defaults (damping 1e-2, KL
clip 1e-3, empirical Fisher) and SGD with momentum 0.9:
- the MNIST-1D CNN of ``examples/mnist1d_kfac.py`` (batch 100, lr 0.05) and its variant
  with a 1000-wide flatten -> Linear head (``channels=200``), to 90% and 94% test accuracy;
- the deep autoencoder of ``benchmarks/autoencoder.py`` (batch 256, lr 0.1,
  ``loss_terms="elements"``), to whole-set losses 0.26 and 0.25.
The sweeps (``SWEEPS``; each one's first row is the library's default):
- ``frequencies``: ``(factor_update_freq, inv_update_freq)`` pairs;
- ``inverse``: exact damping with eigendecompositions, factored damping with
  eigendecompositions, factored damping with Cholesky inverses;
- ``structure``: ``max_factor_size`` 2048 (every side of these models dense) against 512,
  above which a side is block-diagonal or diagonal (only the wide head has such sides);
- ``factor-examples``: the factors from the whole batch, half of it or a quarter.
Reported per model and configuration: medians over ``--seeds`` seeds of the steps and
training seconds to each target ("-": half the seeds or more never reach it) and of ms per
step. Steps do not depend on the machine's load; seconds do, so run it alone.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable

import torch
from sklearn.datasets import load_digits

from benchmarks.autoencoder import first_below, fit
from benchmarks.baselines import fmt
from examples.mnist1d_kfac import train

#: (factor_update_freq, inv_update_freq) pairs swept; the first is the library's default.
SCHEDULES = [(1, 10), (2, 20), (5, 50), (10, 100), (20, 100)]
#: A configuration's ``KFACCallback`` arguments for a batch size (``factor_examples``
#: is a number of examples, so the sweep gives it as a fraction of the batch).
Options = Callable[[int], dict]
#: sweep -> {row label: options}; the first row of each is the library's default.
SWEEPS: dict[str, dict[str, Options]] = {
    "frequencies": {
        f"{factor}, {inverse}" + (" (default)" if i == 0 else ""): (
            lambda batch, f=factor, v=inverse: dict(factor_update_freq=f, inv_update_freq=v)
        )
        for i, (factor, inverse) in enumerate(SCHEDULES)
    },
    "inverse": {
        "exact damping, eigen (default)": lambda batch: {},
        "factored damping, eigen": lambda batch: dict(damping_method="factored"),
        "factored damping, Cholesky": lambda batch: dict(
            damping_method="factored", inverse_method="cholesky"
        ),
    },
    "structure": {
        "max_factor_size 2048 (default)": lambda batch: {},
        "512, block-diagonal (blocks of 512)": lambda batch: dict(max_factor_size=512),
        "512, block-diagonal (blocks of 256)": lambda batch: dict(
            max_factor_size=512, factor_block_size=256
        ),
        "512, diagonal": lambda batch: dict(max_factor_size=512, large_factors="diagonal"),
    },
    "factor-examples": {
        "the whole batch (default)": lambda batch: {},
        "half the batch": lambda batch: dict(factor_examples=batch // 2),
        "a quarter of the batch": lambda batch: dict(factor_examples=batch // 4),
    },
}
#: What each sweep's rows are called in the tables.
ROW_TITLES = {
    "frequencies": "factor_update_freq, inv_update_freq",
    "inverse": "damping and inverse method",
    "structure": "sides wider than max_factor_size",
    "factor-examples": "examples feeding the factors",
}
#: The models a sweep changes (a structure limit of 512 leaves every side of the CNN and
#: the autoencoder dense: their runs would repeat the default's).
SWEEP_MODELS = {"structure": ("wide-head",)}
MNIST_BATCH, AUTOENCODER_BATCH = 100, 256
MNIST_TARGETS = (0.90, 0.94)
AUTOENCODER_TARGETS = (0.26, 0.25)
#: One run: ``(steps, seconds)`` to each target (infinite if never), and its ms per step.
Run = tuple[list[tuple[float, float]], float]


def mnist_runs(options: dict, seeds: int, steps: int, channels: int) -> list[Run]:
    """One run per seed (it stops at the last target)."""
    kfac = dict(damping=1e-2) | options
    out = []
    for seed in range(seeds):
        history = train(
            steps,
            25,
            seed=seed,
            batch_size=MNIST_BATCH,
            stop_at=MNIST_TARGETS[-1],
            optimizer="sgd",
            lr=0.05,
            channels=channels,
            kfac=kfac,
        )
        hits = [history.first_reaching(t) or (math.inf, math.inf) for t in MNIST_TARGETS]
        out.append((hits, 1000 * history.train_seconds / max(history.steps, 1)))
    return out


def autoencoder_runs(options: dict, seeds: int, steps: int) -> list[Run]:
    digits = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
    kfac = dict(damping=1e-2, loss_terms="elements") | options
    out = []
    for seed in range(seeds):
        points = fit(seed, steps, 25, digits, "sgd", 0.1, kfac).points
        hits = [first_below(points, t) for t in AUTOENCODER_TARGETS]
        out.append((hits, 1000 * points[-1][1] / points[-1][0]))
    return out


def table(title: str, row_title: str, targets: list[str], rows: dict[str, list[Run]]) -> None:
    print(f"\n{title}; medians\n")
    header = " | ".join(f"steps to {t} | s to {t}" for t in targets)
    print(f"| {row_title} | ms/step | {header} |")
    print("| --- | ---: | " + " | ".join("---: | ---:" for _ in targets) + " |")
    for label, runs in rows.items():
        cells = []
        for index in range(len(targets)):
            cells.append(fmt(statistics.median([hits[index][0] for hits, _ in runs]), 0))
            cells.append(fmt(statistics.median([hits[index][1] for hits, _ in runs]), 1))
        ms = statistics.median([ms for _, ms in runs])
        print(f"| {label} | {ms:.2f} | " + " | ".join(cells) + " |", flush=True)


def sweep(name: str, configs: dict[str, Options], models: list[str], args) -> None:
    """Every configuration of one sweep on every model it changes; one table per model."""
    models = [m for m in models if m in SWEEP_MODELS.get(name, models)]
    mnist_targets = [f"{t:.0%}" for t in MNIST_TARGETS]
    print(f"\n## sweep: {name}")
    for model, channels in (("cnn", 25), ("wide-head", 200)):
        if model in models:
            rows = {
                label: mnist_runs(options(MNIST_BATCH), args.seeds, args.mnist_steps, channels)
                for label, options in configs.items()
            }
            title = "MNIST-1D CNN" + (", 1000-wide head" if channels == 200 else "")
            title += f", batch {MNIST_BATCH}, lr 0.05, {args.seeds} seeds"
            table(title, ROW_TITLES[name], mnist_targets, rows)
    if "autoencoder" in models:
        rows = {
            label: autoencoder_runs(options(AUTOENCODER_BATCH), args.seeds, args.autoencoder_steps)
            for label, options in configs.items()
        }
        targets = [f"{t:g}" for t in AUTOENCODER_TARGETS]
        title = f"Deep autoencoder, batch {AUTOENCODER_BATCH}, lr 0.1, {args.seeds} seeds"
        table(title, ROW_TITLES[name], targets, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", nargs="+", default=["frequencies"], choices=list(SWEEPS))
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
    sweeps = {name: SWEEPS[name] for name in args.sweep}
    if args.quick:  # every sweep's first two rows, each on one model it changes
        args.seeds, args.mnist_steps, args.autoencoder_steps = 1, 30, 30
        sweeps = {name: dict(list(configs.items())[:2]) for name, configs in SWEEPS.items()}
    for name, configs in sweeps.items():
        models = [SWEEP_MODELS.get(name, ("cnn",))[0]] if args.quick else args.models
        sweep(name, configs, models, args)


if __name__ == "__main__":
    main()
