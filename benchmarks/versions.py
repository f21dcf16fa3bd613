"""Per-step cost of this tree's K-FAC against another tree's, side by side in one process.

    python -m benchmarks.versions --against ../old-checkout          # prints a table
    python -m benchmarks.versions --quick        # a smoke test, against this tree itself

The other tree's ``lightning_kfac`` package is copied into a temporary directory under
another name (``lightning_kfac_against``, its imports rewritten) and imported next to this
one, so both engines train the same models in the same process, their rounds interleaved
with SGD's: on a shared machine whose speed drifts by tens of percent within minutes,
timings taken in separate runs cannot tell a 5% change. Models are those of
``benchmarks/overhead.py``; the K-FAC configuration is the defaults, or ``--options``
(``KFACOptions``) and ``--discovery`` (plain ``discover`` keywords, e.g. ``factor_examples``).
Medians over ``--rounds`` rounds of ``--steps`` steps; ratios are to SGD.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.loop import CLOCKS, add_clock_argument, train_step
from benchmarks.overhead import MODELS, POOL

PACKAGE = "lightning_kfac"
RENAMED = "lightning_kfac_against"


def import_other(tree: Path, into: Path):
    """The ``lightning_kfac`` package of the source tree ``tree``, importable as ``RENAMED``."""
    source = tree / PACKAGE
    if not (source / "engine.py").is_file():
        raise SystemExit(f"--against: {tree} has no {PACKAGE}/engine.py")
    target = into / RENAMED
    shutil.copytree(source, target)
    for path in target.rglob("*.py"):
        path.write_text(re.sub(rf"\b{PACKAGE}\b", RENAMED, path.read_text()))
    sys.path.insert(0, str(into))
    return importlib.import_module(RENAMED)


class Runner:
    """One model and SGD optimizer, preconditioned by one package's engine (or none)."""

    def __init__(self, build, shape, batch, package, options: dict, discovery: dict) -> None:
        torch.manual_seed(0)
        self.model = build()
        self.x = torch.randn(POOL, batch, *shape)
        self.y = torch.randint(0, 10, (POOL, batch))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.engine = None
        self.step = 0
        if package is not None:
            discover = importlib.import_module(f"{package}.discovery").discover
            engine = importlib.import_module(f"{package}.engine").KFACEngine
            kfac_options = importlib.import_module(f"{package}.options").KFACOptions
            blocks = discover(self.model, **discovery).blocks
            self.engine = engine(blocks, kfac_options(**options), warn=lambda message: None)
            self.engine.attach()

    def steps(self, count: int, clock) -> float:
        start = clock()
        for _ in range(count):
            index = self.step % POOL
            train_step(self.model, self.optimizer, self.engine, self.x[index], self.y[index])
            self.step += 1
        return (clock() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--against", type=Path, default=None, help="another source tree (--quick: this one)"
    )
    parser.add_argument("--steps", type=int, default=20, help="steps per configuration and round")
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--models", default=None, help="semicolon-separated name substrings")
    parser.add_argument(
        "--options", default="{}", help="KFACOptions keywords, e.g. '{\"inv_update_freq\": 100}'"
    )
    parser.add_argument(
        "--discovery", default="{}", help="discover keywords, e.g. '{\"factor_examples\": 32}'"
    )
    parser.add_argument("--quick", action="store_true", help="a few steps: a smoke test")
    add_clock_argument(parser)
    parser.set_defaults(clock="process")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds = 2, 2
        args.against = args.against or Path(__file__).resolve().parents[1]
    if args.against is None:
        parser.error("--against: the source tree to compare with is required")
    torch.set_num_threads(args.threads)
    options = dict(ast.literal_eval(args.options))
    discovery = dict(ast.literal_eval(args.discovery))
    clock = CLOCKS[args.clock]
    with tempfile.TemporaryDirectory() as scratch:
        import_other(args.against.resolve(), Path(scratch))
        print(
            f"{torch.get_num_threads()} threads, {args.clock} clock; median of {args.rounds} "
            f"rounds x {args.steps} steps; K-FAC options {options}, discovery {discovery}\n"
        )
        print("| model | SGD ms/step | other ms/step (/ SGD) | this ms/step (/ SGD) | this/other |")
        print("| --- | ---: | ---: | ---: | ---: |")
        wanted = args.models.split(";") if args.models else None
        for name, (build, shape, batch) in MODELS.items():
            if wanted and not any(part in name for part in wanted):
                continue
            runners = {
                label: Runner(build, shape, batch, package, options, discovery)
                for label, package in (("SGD", None), ("other", RENAMED), ("this", PACKAGE))
            }
            for runner in runners.values():
                runner.steps(max(2, args.steps // 2), clock)  # warm-up
            times: dict[str, list[float]] = {label: [] for label in runners}
            for _ in range(args.rounds):
                for label, runner in runners.items():
                    times[label].append(runner.steps(args.steps, clock))
            sgd, other, this = (statistics.median(times[k]) for k in ("SGD", "other", "this"))
            print(
                f"| {name} | {1e3 * sgd:.2f} | {1e3 * other:.2f} ({other / sgd:.2f}) | "
                f"{1e3 * this:.2f} ({this / sgd:.2f}) | {this / other:.2f} |"
            )


if __name__ == "__main__":
    main()
