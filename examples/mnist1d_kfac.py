"""MNIST-1D classification: K-FAC against SGD and Adam, side by side, on one CPU.

MNIST-1D (Greydanus, 2020) is generated locally by the ``mnist1d`` package: 4000 training
and 1000 test sequences of length 40, ten classes. The model is the dataset's baseline CNN
(three Conv1d layers and a Linear head), which reaches about 94% test accuracy.

    python examples/mnist1d_kfac.py            # SGD, Adam and K-FAC; prints a table
    python examples/mnist1d_kfac.py --quick    # a few hundred steps, as a smoke test

Test accuracy is measured every ``--eval-every`` optimizer steps. Each run prints a progress
line every sixth of its steps and when it first reaches 90% and ``--target``; the K-FAC run
prints its table of registered layers at fit start. The closing table gives, per optimizer,
the steps and training seconds (evaluation excluded) to reach each target, the final and
best test accuracy and the milliseconds per training step; one sentence then reads it.
Time to accuracy is the comparison that matters: a K-FAC step costs more than an SGD step,
and it has to pay for itself by needing fewer of them.
"""

from __future__ import annotations

import argparse
import functools
import logging
import time
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_kfac import KFACCallback

# MNIST-1D lives in memory: DataLoader workers would only add start-up time, so Lightning's
# advice to add some (on machines with more than 2 cores) does not apply here.
warnings.filterwarnings("ignore", ".*does not have many workers.*")


@functools.cache
def load_mnist1d(num_samples: int = 5000) -> tuple[TensorDataset, TensorDataset]:
    """MNIST-1D train and test sets, ``(N, 1, 40)`` float inputs and integer labels,
    generated offline with the package's default arguments (seed 42) and cached."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    data = make_dataset(args)

    def tensors(x, y) -> TensorDataset:
        inputs = torch.as_tensor(x, dtype=torch.float32).unsqueeze(1)
        return TensorDataset(inputs, torch.as_tensor(y).long())

    return tensors(data["x"], data["y"]), tensors(data["x_test"], data["y_test"])


class MNIST1DDataModule(L.LightningDataModule):
    """MNIST-1D, generated offline with the package's default arguments (seed 42).

    Args:
        batch_size: training batch size.
        num_samples: total number of sequences (80% train, 20% test).
    """

    def __init__(self, batch_size: int = 100, num_samples: int = 5000) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_samples = num_samples

    def setup(self, stage: str | None = None) -> None:
        self.train_set, self.test_set = load_mnist1d(self.num_samples)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=1000)


class MNIST1DClassifier(L.LightningModule):
    """The MNIST-1D baseline CNN.

    Args:
        optimizer: ``"sgd"`` (with momentum) or ``"adam"``.
        lr: learning rate.
        momentum: SGD momentum.
        channels: channels of each convolution.
    """

    def __init__(
        self, optimizer: str = "sgd", lr: float = 0.05, momentum: float = 0.9, channels: int = 25
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(channels * 5, 10),
        )
        self.accuracy = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        self.accuracy(self(x), y)
        self.log("test_acc", self.accuracy, prog_bar=True)

    def configure_optimizers(self):
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(
                self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum
            )
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.hparams.optimizer!r}")


class AccuracyHistory(Callback):
    """Records (optimizer step, training seconds, test accuracy) after every evaluation.

    Training seconds exclude the time spent evaluating.

    Args:
        stop_at: stop at the first evaluation with at least this accuracy.
        name: if given, print a progress line for this run (see ``report_every``).
        report_every: print a line at the evaluations of every this many steps, and the
            first time each of ``milestones`` is reached.
        milestones: accuracies whose first crossing gets a line of its own.
    """

    def __init__(
        self,
        stop_at: float | None = None,
        name: str | None = None,
        report_every: int = 0,
        milestones: tuple[float, ...] = (),
    ) -> None:
        self.stop_at = stop_at
        self.name = name
        self.report_every = report_every
        self.milestones = sorted(milestones)
        self.history: list[tuple[int, float, float]] = []
        self.train_seconds = 0.0
        self.steps = 0
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train_seconds += time.perf_counter() - self._start
        self.steps = trainer.global_step

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        accuracy = float(trainer.callback_metrics["test_acc"])
        step = trainer.global_step
        crossed = [m for m in self.milestones if accuracy >= m and self.first_reaching(m) is None]
        self.history.append((step, self.train_seconds, accuracy))
        if self.name is not None and (
            crossed or (self.report_every and step % self.report_every == 0)
        ):
            note = f"  reached {crossed[-1]:.0%}" if crossed else ""
            print(
                f"  {self.name:<12} step {step:>5}/{trainer.max_steps}  test accuracy "
                f"{accuracy:6.1%}  training time {self.train_seconds:5.1f} s{note}",
                flush=True,
            )
        if self.stop_at is not None and accuracy >= self.stop_at:
            trainer.should_stop = True

    def first_reaching(self, target: float) -> tuple[int, float] | None:
        """(steps, seconds) at the first evaluation with accuracy >= target."""
        for step, seconds, accuracy in self.history:
            if accuracy >= target:
                return step, seconds
        return None


#: Learning rates from the time-to-accuracy benchmark's grid (docs/benchmarks.md; see
#: docs/tuning.md): SGD and Adam at their best rate, K-FAC at the rate whose runs reached 94%
#: in the fewest steps, with the default damping and KL clip.
CONFIGS = {
    "SGD": dict(optimizer="sgd", lr=0.1),
    "Adam": dict(optimizer="adam", lr=1e-2),
    "K-FAC (SGD)": dict(optimizer="sgd", lr=0.02, kfac=dict(damping=1e-2, kl_clip=1e-3)),
}


def train(
    steps: int,
    eval_every: int,
    seed: int = 0,
    batch_size: int = 100,
    stop_at: float | None = None,
    name: str | None = None,
    report_every: int = 0,
    milestones: tuple[float, ...] = (),
    classifier: type[MNIST1DClassifier] = MNIST1DClassifier,
    **config,
) -> AccuracyHistory:
    """Train one configuration for ``steps`` optimizer steps; returns its accuracy history.

    Args:
        steps: optimizer steps.
        eval_every: steps between test-set evaluations.
        seed: seed of the initial weights and the data order.
        batch_size: training batch size.
        stop_at: stop at the first evaluation with at least this accuracy.
        name, report_every, milestones: progress lines (see ``AccuracyHistory``); with a
            name, K-FAC also prints its table of registered layers.
        classifier: the LightningModule (a subclass may offer other optimizers).
        **config: ``classifier`` arguments, plus ``kfac`` (``KFACCallback`` arguments) to
            train with K-FAC.
    """
    L.seed_everything(seed, verbose=False)
    kfac_options = config.pop("kfac", None)
    history = AccuracyHistory(stop_at, name, report_every, milestones)
    callbacks = [history]
    if kfac_options is not None:
        callbacks.append(KFACCallback(**{"verbose": name is not None, **kfac_options}))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        val_check_interval=eval_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(classifier(**config), MNIST1DDataModule(batch_size=batch_size))
    return history


class _OnlyOnce(logging.Filter):
    """Lets each message through once: Lightning repeats its banners for every run."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def conclusion(rows: list[tuple[str, AccuracyHistory]], targets: tuple[float, ...]) -> str:
    """One sentence that reads the table: K-FAC against the fastest first-order optimizer,
    at the highest target K-FAC reached."""
    kfac = next(history for name, history in rows if name.startswith("K-FAC"))
    others = [(name, history) for name, history in rows if not name.startswith("K-FAC")]
    reached = [t for t in targets if kfac.first_reaching(t) is not None]
    if not reached:
        return (
            f"K-FAC reached none of the targets ({', '.join(f'{t:.0%}' for t in targets)}) "
            "in this run; run more steps (without --quick) to compare."
        )
    target = max(reached)
    steps, seconds = kfac.first_reaching(target)
    hits = [(h.first_reaching(target), name) for name, h in others if h.first_reaching(target)]
    if not hits:
        names = " and ".join(name for name, _ in others)
        return (
            f"K-FAC reached {target:.0%} test accuracy in {steps} steps ({seconds:.1f} s of "
            f"training); {names} did not reach it in this run."
        )
    (best_steps, best_seconds), best = min(hits, key=lambda hit: hit[0][1])
    faster = best_seconds / seconds
    speed = (
        f"{faster:.1f}x less time"
        if faster >= 1.05
        else f"{1 / faster:.1f}x more time"
        if faster <= 1 / 1.05
        else "about the same time"
    )
    return (
        f"To {target:.0%} test accuracy K-FAC needed {steps} steps and {seconds:.1f} s of "
        f"training against {best_steps} steps and {best_seconds:.1f} s for {best}, the "
        f"fastest first-order optimizer here: {best_steps / steps:.1f}x fewer steps and "
        f"{speed}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps per run")
    parser.add_argument(
        "--eval-every", type=int, help="steps between evaluations (default 40; 30 with --quick)"
    )
    parser.add_argument("--target", type=float, default=0.94, help="second accuracy target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="300 steps: a smoke test")
    args = parser.parse_args()
    steps = 300 if args.quick else args.steps
    eval_every = min(args.eval_every or (30 if args.quick else 40), steps)
    targets = tuple(sorted({0.90, args.target}))
    report_every = eval_every * max(1, steps // 6 // eval_every)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    logging.getLogger("lightning.pytorch").addFilter(_OnlyOnce())
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_OnlyOnce())

    print(
        f"MNIST-1D, baseline CNN, batch 100: {steps} steps per optimizer, test accuracy every "
        f"{eval_every} steps, seed {args.seed}"
    )
    rows = []
    for name, config in CONFIGS.items():
        options = {"lr": config["lr"], **config.get("kfac", {})}
        print(f"{name}: {', '.join(f'{k} {v:g}' for k, v in options.items())}", flush=True)
        history = train(
            steps,
            eval_every,
            seed=args.seed,
            name=name,
            report_every=report_every,
            milestones=targets,
            **dict(config),
        )
        rows.append((name, history))

    columns = ["optimizer", "lr", "final test acc", "best test acc", "ms per step"]
    for target in targets:
        columns += [f"steps to {target:.0%}", f"seconds to {target:.0%}"]
    table = []
    for name, history in rows:
        final = history.history[-1][2]
        best = max(accuracy for _, _, accuracy in history.history)
        ms = 1000 * history.train_seconds / history.steps
        row = [name, f"{CONFIGS[name]['lr']:g}", f"{final:.1%}", f"{best:.1%}", f"{ms:.2f}"]
        for target in targets:
            hit = history.first_reaching(target)
            row += ["-", "-"] if hit is None else [str(hit[0]), f"{hit[1]:.1f}"]
        table.append(row)
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(columns)]

    def line(cells: list[str]) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        return " | ".join([first, *(f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:]))])

    print()
    print(line(columns))
    print("-+-".join("-" * w for w in widths))
    for row in table:
        print(line(row))
    print(
        "(seconds: training time on this machine, evaluation excluded; ms per step: training "
        "time / steps; '-': not reached)"
    )
    print()
    print(conclusion(rows, targets))


if __name__ == "__main__":
    main()
