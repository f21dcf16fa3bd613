"""Per-step overhead of K-FAC against SGD and Adam, measured side by side in one run.

    python -m benchmarks.overhead            # prints a table
    python -m benchmarks.overhead --quick    # a smoke test

Models: the MNIST-1D baseline CNN (batch 100), a deep narrow MLP (17 Linear layers of
width 32, batch 64), an MLP 256-512-512-10 (batch 256) and the MNIST-1D CNN with 200
channels, whose flatten -> Linear head is 1000 wide (batch 100), each trained with a plain
loop around the same engine ``KFACCallback`` uses. Configurations: SGD with momentum, Adam,
K-FAC at the default frequencies (factors every step, decompositions every 10), and K-FAC
with factors and decompositions every step; for the wide head also its input factor
block-diagonal, doubly-factored, Cholesky inverses instead of eigendecompositions, and
factored damping with eigendecompositions (at the defaults and with rare updates). The
configurations are interleaved in rounds (each round times ``--steps`` steps of every
configuration), and the median over rounds is reported, so that the machine's drift hits
all of them alike; ratios are to SGD.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from benchmarks.loop import CLOCKS, add_clock_argument, train_step
from examples.mnist1d_kfac import MNIST1DClassifier
from lightning_kfac.discovery import discover
from lightning_kfac.engine import KFACEngine
from lightning_kfac.options import KFACOptions


def mnist1d_cnn() -> nn.Module:
    return MNIST1DClassifier().net


def wide_head_cnn() -> nn.Module:
    """The MNIST-1D CNN with 200 channels: its flatten -> Linear head is 1000 wide."""
    return MNIST1DClassifier(channels=200).net


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def deep_narrow_mlp() -> nn.Module:
    """17 Linear layers of width 32: per-layer host overhead dominates.

    The weights are initialised for tanh (Xavier, gain 5/3): with torch's default
    initialisation the gradients shrink to about 1e-9 in the first layers, and float32
    arithmetic on subnormal numbers, not host work, then decides every optimizer's timings.
    """
    layers: list[nn.Module] = [nn.Linear(32, 32)]
    for _ in range(15):
        layers += [nn.Tanh(), nn.Linear(32, 32)]
    model = nn.Sequential(*layers, nn.Tanh(), nn.Linear(32, 10))
    for module in model:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight, gain=nn.init.calculate_gain("tanh"))
            nn.init.zeros_(module.bias)
    return model


MODELS = {
    "MNIST-1D CNN, batch 100": (mnist1d_cnn, (1, 40), 100),
    "deep narrow MLP 17x32, batch 64": (deep_narrow_mlp, (32,), 64),
    "MLP 256-512-512-10, batch 256": (mlp, (256,), 256),
    "MNIST-1D CNN, 1000-wide head, batch 100": (wide_head_cnn, (1, 40), 100),
}
#: Configurations only for the wide-head CNN: what to do about one wide layer.
WIDE = "MNIST-1D CNN, 1000-wide head, batch 100"
CONFIGS = {
    "SGD": ("sgd", None),
    "Adam": ("adam", None),
    "K-FAC (defaults: factors 1, decompositions 10)": ("sgd", dict()),
    "K-FAC (factors and decompositions every step)": ("sgd", dict(inv_update_freq=1)),
    "K-FAC (rare: factors 10, decompositions 100)": (
        "sgd",
        dict(factor_update_freq=10, inv_update_freq=100),
    ),
}
WIDE_CONFIGS = {
    "K-FAC, head block-diagonal (blocks of 256)": (
        "sgd",
        dict(),
        dict(structures=dict(overrides={"7": {"A": "block-diagonal"}}, block_size=256)),
    ),
    "K-FAC, head doubly-factored (200 x 5)": (
        "sgd",
        dict(),
        dict(structures=dict(overrides={"7": "doubly-factored"})),
    ),
    "K-FAC, Cholesky inverses (factored damping)": (
        "sgd",
        dict(damping_method="factored"),
        dict(inverse="cholesky"),
    ),
    "K-FAC, factored damping (eigen)": ("sgd", dict(damping_method="factored"), None),
    "K-FAC, rare, factored damping (eigen)": (
        "sgd",
        dict(damping_method="factored", factor_update_freq=10, inv_update_freq=100),
        None,
    ),
}


#: Random batches each model cycles through (random labels: nothing to memorise quickly).
POOL = 64


class Runner:
    """One model and optimizer (and K-FAC engine), stepping through ``POOL`` random batches
    in turn (on one repeated batch the loss reaches zero and the gradients vanish: float32
    arithmetic on subnormal numbers then slows the steps)."""

    def __init__(self, build, shape, batch, optimizer, kfac, discovery=None) -> None:
        torch.manual_seed(0)
        self.model = build()
        self.x = torch.randn(POOL, batch, *shape)
        self.y = torch.randint(0, 10, (POOL, batch))
        self.step = 0
        if optimizer == "adam":
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        else:
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.engine = None
        if kfac is not None:
            discovery = dict(discovery or {})
            if "structures" in discovery:  # imported here: the script also runs on 0.1.0
                from lightning_kfac.structure import StructurePolicy

                discovery["structures"] = StructurePolicy(**discovery["structures"])
            blocks = discover(self.model, **discovery).blocks
            self.engine = KFACEngine(blocks, KFACOptions(**kfac), warn=lambda message: None)
            self.engine.attach()

    #: The clock ``steps`` reads (one of ``CLOCKS``).
    clock = staticmethod(CLOCKS["wall"])

    def steps(self, count: int) -> float:
        """Seconds per step over ``count`` steps."""
        start = self.clock()
        for _ in range(count):
            index = self.step % POOL
            train_step(self.model, self.optimizer, self.engine, self.x[index], self.y[index])
            self.step += 1
        return (self.clock() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="steps per configuration and round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="a few steps: a smoke test")
    add_clock_argument(parser)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--models", default=None, help="semicolon-separated substrings of the model names to run"
    )
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds = 3, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    Runner.clock = staticmethod(CLOCKS[args.clock])
    print(
        f"{torch.get_num_threads()} threads, {args.clock} clock; median of {args.rounds} rounds "
        f"x {args.steps} steps\n"
    )
    print("| model | configuration | ms/step | ratio to SGD |")
    print("| --- | --- | ---: | ---: |")
    wanted = args.models.split(";") if args.models else None
    for model_name, (build, shape, batch) in MODELS.items():
        if wanted and not any(part in model_name for part in wanted):
            continue
        configs = {name: (*config, None) for name, config in CONFIGS.items()}
        if model_name == WIDE:
            configs |= WIDE_CONFIGS
        runners = {
            name: Runner(build, shape, batch, optimizer, kfac, discovery)
            for name, (optimizer, kfac, discovery) in configs.items()
        }
        for runner in runners.values():
            runner.steps(max(2, args.steps // 5))  # warm-up
        timings = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, runner in runners.items():
                timings[name].append(runner.steps(args.steps))
        baseline = statistics.median(timings["SGD"])
        for name, values in timings.items():
            median = statistics.median(values)
            print(f"| {model_name} | {name} | {1000 * median:.2f} | {median / baseline:.2f} |")


if __name__ == "__main__":
    main()
