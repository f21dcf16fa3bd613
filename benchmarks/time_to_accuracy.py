"""Time to accuracy on MNIST-1D: K-FAC against best-tuned SGD, Adam, AdamW, Muon and SOAP.

    python -m benchmarks.time_to_accuracy               # tables + docs/img/time_to_accuracy.png
    python -m benchmarks.time_to_accuracy --wide-head   # the CNN with a 1000-wide head
    python -m benchmarks.time_to_accuracy --quick       # a smoke test

Every configuration trains the MNIST-1D baseline CNN (``examples/mnist1d_kfac.py``; with
``--wide-head`` its 200-channel variant, whose flatten -> Linear head is 1000 wide) with a
real Lightning Trainer for ``--steps`` steps at batch 100, measuring test accuracy every
``--eval-every`` steps. Seconds are training seconds (evaluation excluded). The optimizers:
SGD with momentum 0.9, Adam, AdamW, Muon (torch's, on the 2-D weights, with AdamW at lr
1e-2 on biases and convolution kernels), SOAP (``pytorch_optimizer.SOAP`` at its defaults,
from the ``benchmarks`` extra; left out with a message where it is not installed) and K-FAC
(SGD with momentum 0.9, damping 1e-2), at the defaults, with factored damping and Cholesky
inverses (``damping_method="factored", inverse_method="cholesky"``: the same preconditioner
as factored damping with eigendecompositions, at less cost) and with rare updates (factors
every 10 steps, decompositions every 100: what the tuning guide advises for wide layers).

Best-tuned: every learning rate of an optimizer's grid runs on the tuning seed; the one
with the fewest steps to the highest target (then to the next, then the least time, then
the best final accuracy) runs on ``--seeds`` other seeds. An optimizer's step costs the
same at every rate, so steps rank its rates as time would, free of timing noise. The first
table shows the tuning runs, the second the medians over the other seeds of the steps and
seconds to each target (a seed that never reaches a target counts as never: the median is
"-" if half the seeds miss it).
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics

from benchmarks.baselines import (
    add_tuning_arguments,
    best_tuned,
    fmt,
    make_optimizer,
    median_or_inf,
    selected,
)
from benchmarks.plotting import pyplot, save
from examples.mnist1d_kfac import AccuracyHistory, MNIST1DClassifier, train

#: optimizer -> (base config, learning-rate grid); only the learning rate is swept.
GRID = {
    "SGD": (dict(optimizer="sgd"), [0.05, 0.1, 0.2]),
    "Adam": (dict(optimizer="adam"), [3e-3, 1e-2, 3e-2]),
    "AdamW": (dict(optimizer="adamw"), [3e-3, 1e-2, 3e-2]),
    "Muon (+AdamW)": (dict(optimizer="muon"), [0.01, 0.02, 0.05]),
    "SOAP": (dict(optimizer="soap"), [3e-3, 1e-2, 3e-2]),
    "K-FAC": (dict(optimizer="sgd", kfac=dict(damping=1e-2)), [0.02, 0.05, 0.1]),
    "K-FAC (factored damping, Cholesky)": (
        dict(
            optimizer="sgd",
            kfac=dict(damping=1e-2, damping_method="factored", inverse_method="cholesky"),
        ),
        [0.02, 0.05, 0.1],
    ),
    "K-FAC (rare updates)": (
        dict(optimizer="sgd", kfac=dict(damping=1e-2, factor_update_freq=10, inv_update_freq=100)),
        [0.02, 0.05, 0.1],
    ),
}
TARGETS = (0.90, 0.94)


class Classifier(MNIST1DClassifier):
    """The MNIST-1D CNN with every optimizer of ``benchmarks.baselines``."""

    def configure_optimizers(self):
        hparams = self.hparams
        return make_optimizer(hparams.optimizer, self.parameters(), hparams.lr, hparams.momentum)


def reach(history: AccuracyHistory, target: float) -> tuple[float, float]:
    """(steps, seconds) to ``target``, infinite if never."""
    hit = history.first_reaching(target)
    return (math.inf, math.inf) if hit is None else hit


def medians(histories: list[AccuracyHistory]) -> dict:
    """Per target the median (steps, seconds), and the final accuracy and ms per step."""
    out: dict = {}
    for target in TARGETS:
        hits = [reach(h, target) for h in histories]
        out[target] = (median_or_inf([s for s, _ in hits]), median_or_inf([t for _, t in hits]))
    out["final"] = statistics.median(h.history[-1][2] for h in histories)
    out["ms"] = statistics.median(1000 * h.train_seconds / h.history[-1][0] for h in histories)
    return out


def tuning_key(history: AccuracyHistory) -> tuple[float, ...]:
    """Steps to the highest target, then to the lower ones, then seconds to the highest
    target, then minus the final accuracy. An optimizer's step costs the same at every
    learning rate, so steps rank its rates as seconds would, without the timing noise."""
    hits = [reach(history, t) for t in sorted(TARGETS, reverse=True)]
    return (*(steps for steps, _ in hits), hits[0][1], -history.history[-1][2])


def table(rows: list[tuple[str, float, dict]]) -> None:
    """A Markdown table of ``(optimizer, lr, medians)`` rows."""
    targets = [f"{t:.0%}" for t in TARGETS]
    print(
        "| optimizer | lr | final acc | ms/step | "
        + " | ".join(f"steps to {t} | s to {t}" for t in targets)
        + " |"
    )
    print("| --- | ---: | ---: | ---: | " + " | ".join("---: | ---:" for _ in targets) + " |")
    for name, lr, m in rows:
        cells = [f"{fmt(m[t][0], 0)} | {fmt(m[t][1])}" for t in TARGETS]
        print(f"| {name} | {lr:g} | {m['final']:.3f} | {m['ms']:.2f} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=25)
    add_tuning_arguments(parser, GRID)
    parser.add_argument(
        "--wide-head", action="store_true", help="200 channels: a 1000-wide flatten -> Linear head"
    )
    parser.add_argument("--plot", default=None, help="PNG path ('none': no plot)")
    parser.add_argument("--quick", action="store_true", help="one short run each: a smoke test")
    args = parser.parse_args()
    grid = selected(parser, args, GRID)
    plot = args.plot or f"docs/img/time_to_accuracy{'_wide_head' if args.wide_head else ''}.png"
    if args.quick:
        args.steps, args.eval_every, args.seeds, plot = 60, 20, 1, "none"
        grid = {name: (base, lrs[:1]) for name, (base, lrs) in grid.items()}
    model = dict(channels=200) if args.wide_head else {}
    title = f"MNIST-1D CNN{', 1000-wide head' if args.wide_head else ''}, batch 100"

    def run(name: str, base: dict, lr: float, seed: int) -> AccuracyHistory:
        config = {**base, **model, "lr": lr}
        history = train(args.steps, args.eval_every, seed=seed, classifier=Classifier, **config)
        final = history.history[-1][2]
        print(f"  {name} lr={lr:g} seed={seed}: final accuracy {final:.3f}", flush=True)
        return history

    tuning, best = [], {}
    for name, (base, lrs) in grid.items():
        trials, lr, others = best_tuned(
            lrs, functools.partial(run, name, base), tuning_key, args.tuning_seed, args.seeds
        )
        tuning += [(name, rate, medians([history])) for rate, history in trials.items()]
        best[name] = (lr, others)

    print(f"\n{title}, {args.steps} steps: every learning rate on tuning seed {args.tuning_seed}\n")
    table(tuning)
    seeds = f"{args.tuning_seed + 1}..{args.tuning_seed + args.seeds}"
    print(
        f"\nBest-tuned learning rates (fewest steps to {TARGETS[-1]:.0%}, then to "
        f"{TARGETS[0]:.0%}, then least time, on the tuning seed); medians over seeds {seeds}:\n"
    )
    table([(name, lr, medians(others)) for name, (lr, others) in best.items()])

    if plot != "none":
        plt = pyplot()
        figure, axes = plt.subplots(1, 2, figsize=(10, 4.8))
        for name, (lr, others) in best.items():
            steps, seconds, accuracy = zip(*others[0].history)
            axes[0].plot(seconds, accuracy, label=f"{name} (lr {lr:g})")
            axes[1].plot(steps, accuracy)
        for axis, xlabel in zip(axes, ("training seconds", "optimizer steps")):
            for target, style in zip(TARGETS, ("-", "--")):
                axis.axhline(target, color="grey", linewidth=0.5, linestyle=style)
            axis.set_xlabel(xlabel)
            axis.set_ylabel("test accuracy")
            axis.set_ylim(0.5, 1.0)
        figure.suptitle(
            f"{title}: test accuracy, best-tuned learning rates, seed {args.tuning_seed + 1} (CPU)"
        )
        save(figure, plot, legend_below=True)


if __name__ == "__main__":
    main()
