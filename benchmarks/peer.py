"""Per-step cost of this project's K-FAC and kfac-pytorch's, side by side in one Lightning loop.

    python -m benchmarks.peer                    # prints a table
    python -m benchmarks.peer --clock process    # CPU time of this process
    python -m benchmarks.peer --quick            # a smoke test

kfac-pytorch (not on PyPI: ``pip install --no-deps -e`` a checkout of
https://github.com/gpauloski/kfac-pytorch) is no dependency of this project;
without it the script says so and exits. Models: the MLP 256-512-512-10 (batch 256) and the
deep narrow MLP 17x32 (batch 64) of ``benchmarks/overhead.py``, and the MNIST-1D baseline
CNN (batch 100) with its Conv1d layers as Conv2d of height 1 (kfac-pytorch registers Linear
and Conv2d layers only; the factors are the same). Each trains on fresh random batches in
a real Lightning Trainer (CPU, ``--threads`` threads, SGD with momentum 0.9, lr 0.01) with
no K-FAC, with ``KFACCallback``, and with kfac-pytorch's ``KFACPreconditioner``, stepped by
a small callback in ``on_before_optimizer_step`` (after backward, before the optimizer).
Both K-FACs: factors every step, eigendecompositions every ``--inv-update-freq`` steps,
damping 1e-2 in the eigenbasis, factor decay 0.95, KL clip 1e-3.

A step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward,
K-FAC and the optimizer step) after ``--warmup`` steps; the configurations alternate in
``--rounds`` rounds of ``--steps`` steps, each a fresh fit. The table gives the median over
all timed steps, over the decomposition steps alone and over the others, and the ratio of
this project's K-FAC to kfac-pytorch's.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.loop import CLOCKS, add_clock_argument
from benchmarks.overhead import deep_narrow_mlp, mlp, mnist1d_cnn
from lightning_kfac import KFACCallback

MISSING = (
    "kfac-pytorch is not installed (it is not on PyPI): pip install --no-deps -e a checkout "
    "of https://github.com/gpauloski/kfac-pytorch"
)
LR = 0.01
#: The K-FAC hyperparameters both libraries run with (besides the frequencies).
DAMPING, FACTOR_DECAY, KL_CLIP = 1e-2, 0.95, 1e-3


def mnist1d_cnn_2d() -> nn.Module:
    """The MNIST-1D baseline CNN on ``(N, 1, 1, 40)`` inputs: each Conv1d as the Conv2d of
    height 1 that computes the same, and ReLUs not in place (kfac-pytorch's backward hooks
    refuse in-place changes of a layer's output)."""

    def convert(m: nn.Module) -> nn.Module:
        if isinstance(m, nn.ReLU):
            return nn.ReLU()
        if not isinstance(m, nn.Conv1d):
            return m
        return nn.Conv2d(
            m.in_channels,
            m.out_channels,
            (1, m.kernel_size[0]),
            stride=(1, m.stride[0]),
            padding=(0, m.padding[0]),
        )

    return nn.Sequential(*map(convert, mnist1d_cnn()))


MODELS = {
    "MLP 256-512-512-10, batch 256": (mlp, (256,), 256),
    "deep narrow MLP 17x32, batch 64": (deep_narrow_mlp, (32,), 64),
    "MNIST-1D CNN (as Conv2d), batch 100": (mnist1d_cnn_2d, (1, 1, 40), 100),
}


class Classifier(L.LightningModule):
    """Cross-entropy training of ``net`` with SGD (momentum 0.9)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)


class PeerKFAC(Callback):
    """kfac-pytorch's ``KFACPreconditioner`` (the class, passed in) on the LightningModule,
    stepped before the optimizer."""

    def __init__(self, preconditioner_type: type, inv_update_freq: int) -> None:
        self.preconditioner_type = preconditioner_type
        self.inv_update_freq = inv_update_freq
        self.preconditioner = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.preconditioner = self.preconditioner_type(
            pl_module,
            factor_update_steps=1,
            inv_update_steps=self.inv_update_freq,
            damping=DAMPING,
            factor_decay=FACTOR_DECAY,
            kl_clip=KL_CLIP,
            lr=LR,
        )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.preconditioner.step()


class StepTimes(Callback):
    """Seconds of every training step after the first ``warmup`` by ``clock``, each with
    whether it was a decomposition step (both libraries decompose at steps 0, f, 2f, ...)."""

    def __init__(self, clock: Callable[[], float], warmup: int, inv_update_freq: int) -> None:
        self.clock, self.warmup, self.inv_update_freq = clock, warmup, inv_update_freq
        self.times: list[tuple[float, bool]] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = self.clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seconds = self.clock() - self._start
        step = trainer.global_step - 1  # the step just taken, counted from 0
        if step >= self.warmup:
            self.times.append((seconds, step % self.inv_update_freq == 0))


def fit(build, shape, batch: int, kfac: Callback | None, args: argparse.Namespace):
    """One fresh fit of ``warmup + steps`` steps with the K-FAC callback ``kfac`` (None:
    SGD alone); the timed steps as ``(seconds, decomposition step)``."""
    torch.manual_seed(0)
    net = build()
    count = args.warmup + args.steps
    # a fresh random batch every step: on one repeated batch the loss reaches zero, the
    # gradients vanish and float32 arithmetic on subnormal numbers slows every library
    data = TensorDataset(torch.randn(count * batch, *shape), torch.randint(0, 10, (count * batch,)))
    timer = StepTimes(CLOCKS[args.clock], args.warmup, args.inv_update_freq)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=count,
        callbacks=[timer] + ([kfac] if kfac else []),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Classifier(net), DataLoader(data, batch_size=batch))
    return timer.times


def medians(times: list[tuple[float, bool]]) -> tuple[float, float, float]:
    """Median ms per step over all steps, the decomposition steps and the others (NaN where
    there are none)."""

    def ms(values: list[float]) -> float:
        return 1000 * statistics.median(values) if values else float("nan")

    return (
        ms([t for t, _ in times]),
        ms([t for t, d in times if d]),
        ms([t for t, d in times if not d]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="timed steps per fit")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--inv-update-freq", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    add_clock_argument(parser)
    parser.add_argument(
        "--models", default=None, help="semicolon-separated substrings of the model names to run"
    )
    parser.add_argument("--quick", action="store_true", help="a few steps: a smoke test")
    args = parser.parse_args()
    try:
        from kfac.preconditioner import KFACPreconditioner
    except ImportError:
        print(MISSING)
        return
    if args.quick:
        args.steps, args.warmup, args.rounds, args.inv_update_freq = 6, 2, 1, 3
    torch.set_num_threads(args.threads)
    print(
        f"{torch.get_num_threads()} threads, {args.clock} clock; {args.rounds} rounds x "
        f"{args.steps} steps after {args.warmup}; decompositions every {args.inv_update_freq}\n"
    )
    print("| model | configuration | ms/step | at decomposition steps | at other steps |")
    print("| --- | --- | ---: | ---: | ---: |")
    configurations: dict[str, Callable[[], Callback | None]] = {
        "SGD": lambda: None,
        "lightning-kfac": lambda: KFACCallback(
            damping=DAMPING,
            factor_decay=FACTOR_DECAY,
            kl_clip=KL_CLIP,
            factor_update_freq=1,
            inv_update_freq=args.inv_update_freq,
            verbose=False,
        ),
        "kfac-pytorch": lambda: PeerKFAC(KFACPreconditioner, args.inv_update_freq),
    }
    wanted = args.models.split(";") if args.models else None
    for model_name, (build, shape, batch) in MODELS.items():
        if wanted and not any(part in model_name for part in wanted):
            continue
        times: dict[str, list[tuple[float, bool]]] = {name: [] for name in configurations}
        for _ in range(args.rounds):
            for name, kfac in configurations.items():
                times[name] += fit(build, shape, batch, kfac(), args)
        results = {name: medians(values) for name, values in times.items()}
        for name, (overall, decomposing, other) in results.items():
            cells = [f"{overall:.2f}"] + (
                ["-", "-"] if name == "SGD" else [f"{decomposing:.2f}", f"{other:.2f}"]
            )
            print(f"| {model_name} | {name} | " + " | ".join(cells) + " |")
        ratios = [o / p for o, p in zip(results["lightning-kfac"], results["kfac-pytorch"])]
        print(
            f"| {model_name} | ratio lightning-kfac / kfac-pytorch | {ratios[0]:.2f} | "
            f"{ratios[1]:.2f} | {ratios[2]:.2f} |"
        )


if __name__ == "__main__":
    main()
