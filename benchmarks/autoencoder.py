"""A deep autoencoder, the classic K-FAC test problem, on scikit-learn's digits.

    python -m benchmarks.autoencoder            # table + docs/img/autoencoder.png
    python -m benchmarks.autoencoder --quick    # a smoke test

The 1797 8x8 digits (scaled to [0, 1]) are encoded through 64-256-128-64-32-16 and decoded
back (tanh layers, sigmoid cross-entropy reconstruction loss, as in Martens & Grosse's
autoencoder experiments, here much smaller). SGD with momentum, Adam and K-FAC each train
with a real Lightning Trainer for the same number of steps at batch 256; the table reports
the training loss (over the whole set) at fixed steps and fixed training seconds.
"""

from __future__ import annotations

import argparse
import itertools
import time

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

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
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class LossCurve(Callback):
    """Whole-set training loss every ``every`` steps, against steps and training seconds."""

    def __init__(self, data: torch.Tensor, every: int) -> None:
        self.data, self.every = data, every
        self.points: list[tuple[int, float, float]] = []
        self.seconds, self._start = 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds += time.perf_counter() - self._start
        if trainer.global_step % self.every == 0:
            with torch.no_grad():
                loss = F.binary_cross_entropy_with_logits(pl_module.net(self.data), self.data)
            self.points.append((trainer.global_step, self.seconds, loss.item()))


#: optimizer -> (optimizer, learning-rate grid, K-FAC options or None). The best learning
#: rate of each grid (lowest final loss) is reported.
GRID = {
    "SGD": ("sgd", [0.1, 0.3, 1.0], None),
    "Adam": ("adam", [1e-3, 3e-3, 1e-2], None),
    "K-FAC": ("sgd", [0.03, 0.1, 0.3], dict(damping=1e-2)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--plot", default="docs/img/autoencoder.png")
    parser.add_argument("--quick", action="store_true", help="a few steps: a smoke test")
    args = parser.parse_args()
    grid = GRID
    if args.quick:
        args.steps, args.every, args.plot = 20, 10, None
        grid = {name: (opt, lrs[:1], kfac) for name, (opt, lrs, kfac) in GRID.items()}
    digits = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0

    curves, chosen = {}, {}
    for name, (optimizer, lrs, kfac) in grid.items():
        for lr in lrs:
            L.seed_everything(0, verbose=False)
            curve = LossCurve(digits, args.every)
            callbacks = [curve] + ([KFACCallback(**kfac, verbose=False)] if kfac else [])
            trainer = L.Trainer(
                accelerator="cpu",
                max_steps=args.steps,
                callbacks=callbacks,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            )
            loader = DataLoader(TensorDataset(digits), batch_size=256, shuffle=True, drop_last=True)
            trainer.fit(Autoencoder(optimizer, lr), loader)
            final = curve.points[-1][2]
            print(f"  {name} lr={lr}: final loss {final:.4f}", flush=True)
            if name not in curves or final < curves[name][-1][2]:
                curves[name], chosen[name] = curve.points, lr

    checkpoints = [s for s in (args.steps // 10, args.steps // 3, args.steps) if s > 0]
    shortest = min(points[-1][1] for points in curves.values())
    moments = [shortest / 4, shortest / 2, shortest]

    def loss_at(points, index, value):
        return min((p[2] for p in points if p[index] <= value), default=float("nan"))

    print(f"\nDeep autoencoder {'-'.join(map(str, WIDTHS))}-... on digits, batch 256 (CPU)\n")
    header = [f"loss @ {s} steps" for s in checkpoints] + [f"loss @ {m:.1f} s" for m in moments]
    print("| optimizer | lr | " + " | ".join(header) + " | ms/step |")
    print("| --- | ---: | " + " | ".join("---:" for _ in header) + " | ---: |")
    for name, points in curves.items():
        cells = [f"{loss_at(points, 0, s):.4f}" for s in checkpoints]
        cells += [f"{loss_at(points, 1, m):.4f}" for m in moments]
        ms = 1000 * points[-1][1] / points[-1][0]
        print(f"| {name} | {chosen[name]:g} | " + " | ".join(cells) + f" | {ms:.2f} |")

    if args.plot:
        plt = pyplot()
        figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for name, points in curves.items():
            steps, seconds, losses = zip(*points)
            axes[0].plot(steps, losses, label=f"{name} (lr {chosen[name]:g})")
            axes[1].plot(seconds, losses, label=f"{name} (lr {chosen[name]:g})")
        for axis, xlabel in zip(axes, ("optimizer steps", "training seconds")):
            axis.set_xlabel(xlabel)
            axis.set_ylabel("training loss (whole set)")
            axis.set_yscale("log")
            axis.legend()
        figure.suptitle("Deep autoencoder on scikit-learn digits (CPU)")
        save(figure, args.plot)


if __name__ == "__main__":
    main()
