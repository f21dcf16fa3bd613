"""A deep autoencoder, the classic K-FAC test problem, on scikit-learn's digits.

    python -m benchmarks.autoencoder            # tables + docs/img/autoencoder.png
    python -m benchmarks.autoencoder --quick    # a smoke test

The 1797 8x8 digits (scaled to [0, 1]) are encoded through 64-256-128-64-32-16 and decoded
back (tanh layers, sigmoid cross-entropy reconstruction loss, as in Martens & Grosse's
autoencoder experiments, here much smaller). SGD with momentum, Adam, AdamW, Muon (torch's,
on the weight matrices, with AdamW at lr 1e-2 on the biases), SOAP (``pytorch_optimizer``'s,
from the ``benchmarks`` extra; left out with a message where it is not installed) and K-FAC
each train with a real Lightning Trainer for the same number of steps at batch 256, the
training loss (over the whole set) measured every ``--every`` steps.

Best-tuned: every learning rate of an optimizer's grid runs on the tuning seed; the one
with the fewest steps to the lowest target loss (then to the next, then the least time,
then the lowest final loss) runs on ``--seeds`` other seeds: an optimizer's step costs the
same at every rate, so steps rank its rates as time would, free of timing noise. The first
table gives the tuning seed's loss at fixed steps and fixed training seconds for the chosen
rates, the second the medians over the other seeds of the steps and seconds to each target
loss ("-": half the seeds never reach it).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import statistics
import time
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.baselines import (
    add_tuning_arguments,
    best_tuned,
    fmt,
    make_optimizer,
    median_or_inf,
    selected,
)
from benchmarks.plotting import pyplot, save
from lightning_kfac import KFACCallback

WIDTHS = [64, 256, 128, 64, 32, 16]


def autoencoder() -> nn.Sequential:
    sizes = WIDTHS + WIDTHS[-2::-1]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class Autoencoder(L.LightningModule):
    def __init__(self, optimizer: str, lr: float) -> None:
        super().__init__()
        self.net = autoencoder()
        self.optimizer_name, self.lr = optimizer, lr

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return F.binary_cross_entropy_with_logits(self.net(x), x)

    def configure_optimizers(self):
        return make_optimizer(self.optimizer_name, self.parameters(), self.lr)


class LossCurve(Callback):
    """Whole-set training loss every ``every`` steps, against steps and training seconds
    (read from ``clock``: wall time by default, ``time.process_time`` for CPU time)."""

    def __init__(
        self, data: torch.Tensor, every: int, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.data, self.every, self.clock = data, every, clock
        self.points: list[tuple[int, float, float]] = []
        self.seconds, self._start = 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = self.clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds += self.clock() - self._start
        if trainer.global_step % self.every == 0:
            with torch.no_grad():
                loss = F.binary_cross_entropy_with_logits(pl_module.net(self.data), self.data)
            self.points.append((trainer.global_step, self.seconds, loss.item()))

    def first_below(self, target: float) -> tuple[float, float]:
        """(steps, seconds) at the first measurement with a loss <= ``target``, or infinite."""
        return first_below(self.points, target)


def first_below(points: list[tuple[int, float, float]], target: float) -> tuple[float, float]:
    """(steps, seconds) of the first ``(step, seconds, loss)`` point with a loss <= ``target``,
    or infinite."""
    return next(((s, t) for s, t, loss in points if loss <= target), (math.inf,) * 2)


def fit(
    seed: int,
    steps: int,
    every: int,
    digits: torch.Tensor,
    optimizer: str,
    lr: float,
    kfac: dict | None,
    clock: Callable[[], float] = time.perf_counter,
) -> LossCurve:
    """One seeded training run of ``steps`` steps at batch 256 in a Lightning Trainer, with
    K-FAC when ``kfac`` (``KFACCallback`` arguments) is given; its loss curve."""
    L.seed_everything(seed, verbose=False)
    curve = LossCurve(digits, every, clock)
    callbacks = [curve] + ([KFACCallback(**kfac, verbose=False)] if kfac else [])
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(TensorDataset(digits), batch_size=256, shuffle=True, drop_last=True)
    trainer.fit(Autoencoder(optimizer, lr), loader)
    return curve


#: The best of benchmarks.curvature and benchmarks.schedules on this model: the true Fisher
#: (its loss averages over every output: K = N*D) and rare updates.
TRUE_FISHER_RARE = dict(
    damping=1e-2,
    fisher="true",
    likelihood="bernoulli",
    loss_terms="elements",
    factor_update_freq=10,
    inv_update_freq=100,
)

#: optimizer -> (optimizer, learning-rate grid, K-FAC options or None).
GRID = {
    "SGD": ("sgd", [0.1, 0.3, 1.0], None),
    "Adam": ("adam", [1e-3, 3e-3, 1e-2], None),
    "AdamW": ("adamw", [1e-3, 3e-3, 1e-2], None),
    "Muon (+AdamW)": ("muon", [0.01, 0.02, 0.05], None),
    "SOAP": ("soap", [1e-3, 3e-3, 1e-2], None),
    "K-FAC": ("sgd", [0.03, 0.1, 0.3], dict(damping=1e-2)),
    "K-FAC (true Fisher, rare updates)": ("sgd", [0.03, 0.1, 0.3], TRUE_FISHER_RARE),
    "K-FAC (true Fisher, rare updates, factored damping)": (
        "sgd",
        [0.03, 0.1, 0.3],
        dict(TRUE_FISHER_RARE, damping_method="factored"),
    ),
}
#: Target training losses, highest first (Adam's best loss at 1500 steps was 0.233).
TARGETS = (0.27, 0.24)


def tuning_key(curve: LossCurve) -> tuple[float, ...]:
    """Steps to the lowest target, then to the higher ones, then seconds to the lowest, then
    the final loss (steps rank one optimizer's rates as seconds would, without the noise)."""
    hits = [curve.first_below(t) for t in reversed(TARGETS)]
    return (*(steps for steps, _ in hits), hits[0][1], curve.points[-1][2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=25)
    add_tuning_arguments(parser, GRID)
    parser.add_argument("--plot", default="docs/img/autoencoder.png", help="'none': no plot")
    parser.add_argument("--quick", action="store_true", help="a few steps: a smoke test")
    args = parser.parse_args()
    grid = selected(parser, args, GRID)
    if args.quick:
        args.steps, args.every, args.seeds, args.plot = 20, 10, 1, "none"
        grid = {name: (opt, lrs[:1], kfac) for name, (opt, lrs, kfac) in grid.items()}
    digits = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0

    def run(name: str, optimizer: str, kfac: dict | None, lr: float, seed: int) -> LossCurve:
        curve = fit(seed, args.steps, args.every, digits, optimizer, lr, kfac)
        print(f"  {name} lr={lr:g} seed={seed}: final loss {curve.points[-1][2]:.4f}", flush=True)
        return curve

    curves, chosen, evaluated = {}, {}, {}
    for name, (optimizer, lrs, kfac) in grid.items():
        trials, lr, others = best_tuned(
            lrs,
            functools.partial(run, name, optimizer, kfac),
            tuning_key,
            args.tuning_seed,
            args.seeds,
        )
        curves[name], chosen[name], evaluated[name] = trials[lr].points, lr, others

    checkpoints = [s for s in (args.steps // 10, args.steps // 3, args.steps) if s > 0]
    shortest = min(points[-1][1] for points in curves.values())
    moments = [shortest / 4, shortest / 2, shortest]

    def loss_at(points, index, value):
        return min((p[2] for p in points if p[index] <= value), default=float("nan"))

    title = f"Deep autoencoder {'-'.join(map(str, WIDTHS))}-... on digits, batch 256 (CPU)"
    print(f"\n{title}: best-tuned learning rates, tuning seed {args.tuning_seed}\n")
    header = [f"loss @ {s} steps" for s in checkpoints] + [f"loss @ {m:.1f} s" for m in moments]
    print("| optimizer | lr | " + " | ".join(header) + " | ms/step |")
    print("| --- | ---: | " + " | ".join("---:" for _ in header) + " | ---: |")
    for name, points in curves.items():
        cells = [f"{loss_at(points, 0, s):.4f}" for s in checkpoints]
        cells += [f"{loss_at(points, 1, m):.4f}" for m in moments]
        ms = 1000 * points[-1][1] / points[-1][0]
        print(f"| {name} | {chosen[name]:g} | " + " | ".join(cells) + f" | {ms:.2f} |")

    seeds = f"{args.tuning_seed + 1}..{args.tuning_seed + args.seeds}"
    print(f"\n{title}: to each target loss, medians over seeds {seeds}\n")
    header = [f"steps to {t:g} | s to {t:g}" for t in TARGETS]
    print("| optimizer | lr | final loss | ms/step | " + " | ".join(header) + " |")
    print("| --- | ---: | ---: | ---: | " + " | ".join("---: | ---:" for _ in TARGETS) + " |")
    for name, others in evaluated.items():
        cells = []
        for target in TARGETS:
            hits = [curve.first_below(target) for curve in others]
            steps, seconds = (median_or_inf([hit[i] for hit in hits]) for i in (0, 1))
            cells.append(f"{fmt(steps, 0)} | {fmt(seconds)}")
        final = statistics.median(curve.points[-1][2] for curve in others)
        ms = statistics.median(1000 * c.points[-1][1] / c.points[-1][0] for c in others)
        print(f"| {name} | {chosen[name]:g} | {final:.4f} | {ms:.2f} | " + " | ".join(cells) + " |")

    if args.plot != "none":
        plt = pyplot()
        figure, axes = plt.subplots(1, 2, figsize=(10, 4.8))
        for name, points in curves.items():
            steps, seconds, losses = zip(*points)
            axes[0].plot(steps, losses, label=f"{name} (lr {chosen[name]:g})")
            axes[1].plot(seconds, losses)
        # one slow optimizer must not squeeze every other curve into the left edge
        durations = [points[-1][1] for points in curves.values()]
        cut = 3 * statistics.median(durations)
        seconds_label = "training seconds"
        if max(durations) > cut:
            axes[1].set_xlim(0, cut)
            seconds_label += f" (cut at {cut:.0f} s, 3x the median run)"
        for axis, xlabel in zip(axes, ("optimizer steps", seconds_label)):
            axis.set_xlabel(xlabel)
            axis.set_ylabel("training loss (whole set)")
            axis.set_yscale("log")
        figure.suptitle("Deep autoencoder on scikit-learn digits (CPU)")
        save(figure, args.plot, legend_below=True)


if __name__ == "__main__":
    main()
