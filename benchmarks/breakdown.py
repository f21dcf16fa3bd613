"""Where a K-FAC training step's time goes, phase by phase, against an SGD step.

    python -m benchmarks.breakdown --threads 1     # one table per model
    python -m benchmarks.breakdown --quick         # a smoke test

The models are those of ``benchmarks/overhead.py``; SGD with momentum and SGD with K-FAC
(the defaults, or ``--options`` and ``--discovery``) train side by side, their rounds
interleaved so that the machine's drift hits both alike. Each step is split into:

- **forward**, **backward**: the model's own passes; for K-FAC less the time spent inside
  its hooks, so that what remains beyond SGD's is the cost of having hooks at all (the
  module call's slow path, the autograd engine calling back into Python);
- **hooks (forward)**, **hooks (backward)**: inside K-FAC's forward and tensor hooks, where
  the statistics of layers too large to batch are computed;
- **factor update**: the factor step after the backward pass (the batched statistics, the
  finiteness check, the running averages);
- **decompositions**: the decomposition steps, averaged over all steps;
- **preconditioning**: the rest of the K-FAC step (reading the gradients, the products in
  the eigenbases, the KL clip, writing the gradients back);
- **optimizer**: ``zero_grad`` and ``step``.

Each phase is the median over ``--rounds`` rounds of its mean over ``--steps`` steps, read
from the wall clock (the clock the hooks' own timer reads; use ``--threads 1`` and nothing
else running). The last column divides K-FAC's extra time by the number of its layers.
"""

from __future__ import annotations

import argparse
import ast
import statistics
import time
from collections import Counter

import torch
import torch.nn.functional as F

from benchmarks.overhead import MODELS, POOL, Runner
from lightning_kfac.options import KFACOptions

PHASES = (
    "forward",
    "hooks (forward)",
    "backward",
    "hooks (backward)",
    "factor update",
    "decompositions",
    "preconditioning",
    "optimizer",
)


class PhaseRunner:
    """``benchmarks.overhead.Runner`` (SGD with momentum, and a K-FAC engine with ``options``),
    timing the phases of each step."""

    def __init__(
        self, build, shape, batch, options: dict | None, discovery: dict | None = None
    ) -> None:
        self.runner = Runner(build, shape, batch, "sgd", options, discovery)
        self.layers = len(self.runner.engine.blocks) if self.runner.engine else 0

    def steps(self, count: int) -> Counter:
        """Seconds per step of each phase, averaged over ``count`` steps."""
        totals: Counter = Counter()
        clock, run = time.perf_counter, self.runner
        engine, optimizer = run.engine, run.optimizer
        for _ in range(count):
            index = run.step % POOL
            run.step += 1
            start = clock()
            if engine is not None:
                engine.start_microbatch()
            optimizer.zero_grad()
            # the hooks' own timer, reset by factor steps: read before and after each pass
            hooks_start = engine.capture.seconds if engine is not None else 0.0
            forward_start = clock()
            loss = F.cross_entropy(run.model(run.x[index]), run.y[index])
            forward_end = clock()
            hooks_forward_end = engine.capture.seconds if engine is not None else 0.0
            forward_hooks = hooks_forward_end - hooks_start
            loss.backward()
            backward_end = step_end = clock()
            backward_hooks = 0.0
            if engine is not None:
                hooks = engine.capture.seconds  # what the factor step counts as hook time
                backward_hooks = hooks - hooks_forward_end
                stats = engine.step(optimizer.param_groups)
                step_end = clock()
                update = stats.factor_seconds - hooks if stats.factor_seconds else 0.0
                totals["hooks (forward)"] += forward_hooks
                totals["hooks (backward)"] += backward_hooks
                totals["factor update"] += update
                totals["decompositions"] += stats.decomposition_seconds
                totals["preconditioning"] += (
                    step_end - backward_end - update - stats.decomposition_seconds
                )
            optimizer.step()
            end = clock()
            totals["forward"] += forward_end - forward_start - forward_hooks
            totals["backward"] += backward_end - forward_end - backward_hooks
            totals["optimizer"] += forward_start - start + end - step_end
        return Counter({phase: seconds / count for phase, seconds in totals.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="steps per configuration and round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--models", default=None, help="semicolon-separated substrings of the model names to run"
    )
    parser.add_argument(
        "--options", default="{}", help="KFACOptions keywords, e.g. '{\"inv_update_freq\": 100}'"
    )
    parser.add_argument(
        "--discovery",
        default="{}",
        help='discover() keywords, e.g. \'{"inverse": "cholesky", "factor_examples": 25}\'',
    )
    parser.add_argument("--quick", action="store_true", help="a few steps: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds = 3, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    options = dict(ast.literal_eval(args.options))
    discovery = dict(ast.literal_eval(args.discovery))
    KFACOptions(**options)  # a wrong keyword or value fails here, before any timing
    print(
        f"{torch.get_num_threads()} threads, wall clock; median of {args.rounds} rounds x "
        f"{args.steps} steps; K-FAC options {options}, discovery {discovery}"
    )
    wanted = args.models.split(";") if args.models else None
    for model_name, (build, shape, batch) in MODELS.items():
        if wanted and not any(part in model_name for part in wanted):
            continue
        sgd = PhaseRunner(build, shape, batch, None)
        kfac = PhaseRunner(build, shape, batch, options, discovery)
        rounds: dict[str, list[Counter]] = {"SGD": [], "K-FAC": []}
        for runner in (sgd, kfac):
            runner.steps(max(2, args.steps // 5))  # warm-up
        for _ in range(args.rounds):
            rounds["SGD"].append(sgd.steps(args.steps))
            rounds["K-FAC"].append(kfac.steps(args.steps))
        print(f"\n{model_name}, {kfac.layers} K-FAC layers\n")
        print("| phase | SGD ms | K-FAC ms | K-FAC extra, µs per layer |")
        print("| --- | ---: | ---: | ---: |")
        for phase in (*PHASES, "total"):
            medians = [
                statistics.median(
                    sum(r.values()) if phase == "total" else r[phase] for r in rounds[name]
                )
                for name in ("SGD", "K-FAC")
            ]
            extra = 1e6 * (medians[1] - medians[0]) / max(kfac.layers, 1)
            print(f"| {phase} | {1000 * medians[0]:.2f} | {1000 * medians[1]:.2f} | {extra:.0f} |")


if __name__ == "__main__":
    main()
