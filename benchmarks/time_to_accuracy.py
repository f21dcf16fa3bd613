"""Time to accuracy on MNIST-1D: SGD with momentum, Adam and K-FAC, each with a small sweep.

    python -m benchmarks.time_to_accuracy           # table + docs/img/time_to_accuracy.png
    python -m benchmarks.time_to_accuracy --quick   # a smoke test

Every configuration trains the MNIST-1D baseline CNN (``examples/mnist1d_kfac.py``) with a
real Lightning Trainer for ``--steps`` steps at batch 100, for each seed, measuring test
accuracy every ``--eval-every`` steps. Seconds are training seconds (evaluation excluded).
For each optimizer the table reports the learning rate of the grid with the smallest median
time to the highest target any of its runs reached, and the medians over seeds of the steps
and seconds to 90% and 94% test accuracy (a seed that never reaches a target counts as
never: the median is then "-" if half the seeds miss it).
"""

from __future__ import annotations

import argparse
import math
import statistics

from benchmarks.plotting import pyplot, save
from examples.mnist1d_kfac import train

#: optimizer -> (base config, learning-rate grid). K-FAC uses SGD with momentum 0.9 and
#: damping 1e-2 (the example's setting); only the learning rate is swept for every optimizer.
GRID = {
    "SGD": (dict(optimizer="sgd"), [0.05, 0.1, 0.2]),
    "Adam": (dict(optimizer="adam"), [3e-3, 1e-2, 3e-2]),
    "K-FAC": (dict(optimizer="sgd", kfac=dict(damping=1e-2)), [0.02, 0.05, 0.1]),
}
TARGETS = (0.90, 0.94)


def median_or_inf(values: list[float]) -> float:
    return statistics.median(values) if values else math.inf


def reach(history, target):
    hit = history.first_reaching(target)
    return (math.inf, math.inf) if hit is None else hit


def fmt(value: float, digits: int = 1) -> str:
    return "-" if math.isinf(value) else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--plot", default="docs/img/time_to_accuracy.png")
    parser.add_argument("--quick", action="store_true", help="one short run each: a smoke test")
    args = parser.parse_args()
    grid = GRID
    if args.quick:
        args.steps, args.eval_every, args.seeds, args.plot = 60, 20, 1, None
        grid = {name: (base, lrs[:1]) for name, (base, lrs) in GRID.items()}

    runs: dict[tuple[str, float], list] = {}
    for name, (base, lrs) in grid.items():
        for lr in lrs:
            for seed in range(args.seeds):
                config = {**base, "lr": lr}
                history = train(args.steps, args.eval_every, seed=seed, **config)
                runs.setdefault((name, lr), []).append(history)
                final = history.history[-1][2]
                print(f"  {name} lr={lr} seed={seed}: final accuracy {final:.3f}", flush=True)

    def medians(histories):
        out = {}
        for target in TARGETS:
            hits = [reach(h, target) for h in histories]
            out[target] = (median_or_inf([s for s, _ in hits]), median_or_inf([t for _, t in hits]))
        out["final"] = statistics.median(h.history[-1][2] for h in histories)
        out["ms"] = statistics.median(1000 * h.train_seconds / h.history[-1][0] for h in histories)
        return out

    print(f"\nMNIST-1D baseline CNN, batch 100, {args.steps} steps, {args.seeds} seeds; medians")
    print(
        "\n| optimizer | lr | final acc | ms/step | steps to 90% | s to 90% | steps to 94% "
        "| s to 94% |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    best = {}
    for (name, lr), histories in runs.items():
        m = medians(histories)
        print(
            f"| {name} | {lr:g} | {m['final']:.3f} | {m['ms']:.2f} | {fmt(m[0.90][0], 0)} | "
            f"{fmt(m[0.90][1])} | {fmt(m[0.94][0], 0)} | {fmt(m[0.94][1])} |"
        )
        key = (m[0.94][1], m[0.90][1], -m["final"])
        if name not in best or key < best[name][0]:
            best[name] = (key, lr, m)
    print("\nBest-tuned learning rate of each optimizer (smallest median time to 94%, then 90%):\n")
    print("| optimizer | lr | steps to 90% | s to 90% | steps to 94% | s to 94% | final acc |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, (_, lr, m) in best.items():
        print(
            f"| {name} | {lr:g} | {fmt(m[0.90][0], 0)} | {fmt(m[0.90][1])} | "
            f"{fmt(m[0.94][0], 0)} | {fmt(m[0.94][1])} | {m['final']:.3f} |"
        )

    if args.plot:
        plt = pyplot()
        figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for name, (_, lr, _) in best.items():
            history = runs[(name, lr)][0].history  # seed 0
            steps, seconds, accuracy = zip(*history)
            axes[0].plot(seconds, accuracy, label=f"{name} (lr {lr:g})")
            axes[1].plot(steps, accuracy, label=f"{name} (lr {lr:g})")
        for axis, xlabel in zip(axes, ("training seconds", "optimizer steps")):
            axis.axhline(0.90, color="grey", linewidth=0.5)
            axis.axhline(0.94, color="grey", linewidth=0.5, linestyle="--")
            axis.set_xlabel(xlabel)
            axis.set_ylabel("test accuracy")
            axis.set_ylim(0.5, 1.0)
            axis.legend()
        figure.suptitle("MNIST-1D: test accuracy, best-tuned learning rates, seed 0 (CPU)")
        save(figure, args.plot)


if __name__ == "__main__":
    main()
