"""What a user would pick instead of K-FAC, best tuned: SGD, Adam, AdamW, Muon and SOAP by
name, and the choice of each one's learning rate on a tuning seed."""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

import torch
from torch import nn

#: AdamW's learning rate for the parameters that Muon does not take.
MUON_ADAMW_LR = 1e-2

#: Grid entries whose optimizer comes from an optional package: name -> importable module.
#: ``pip install -e ".[benchmarks]"`` installs them.
OPTIONAL_PACKAGES = {"SOAP": "pytorch_optimizer"}

Run = TypeVar("Run")
Entry = TypeVar("Entry")


class MuonWithAdamW(torch.optim.Optimizer):
    """torch's Muon for the 2-D weight matrices and AdamW for every other parameter (biases,
    convolution kernels), as Muon's documentation asks, stepped as one optimizer (a
    LightningModule with automatic optimization has one). torch's defaults otherwise.

    Args:
        params: the parameters.
        lr: Muon's learning rate.
        adamw_lr: AdamW's.
    """

    def __init__(
        self, params: Iterable[nn.Parameter], lr: float, adamw_lr: float = MUON_ADAMW_LR
    ) -> None:
        params = list(params)
        others = [p for p in params if p.ndim != 2]
        self.parts = [torch.optim.Muon([p for p in params if p.ndim == 2], lr=lr)]
        self.parts += [torch.optim.AdamW(others, lr=adamw_lr)] if others else []
        super().__init__(params, {"lr": lr})
        self.param_groups = [group for part in self.parts for group in part.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss


def make_optimizer(
    name: str, params: Iterable[nn.Parameter], lr: float, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """``"sgd"`` (with ``momentum``), ``"adam"``, ``"adamw"``, ``"muon"`` (``MuonWithAdamW``)
    or ``"soap"`` (``pytorch_optimizer.SOAP`` with its defaults: betas (0.95, 0.95), weight
    decay 1e-2, a new eigenbasis every 10 steps, Adam on the 1-D parameters)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name == "muon":
        return MuonWithAdamW(params, lr=lr)
    if name == "soap":
        from pytorch_optimizer import SOAP

        return SOAP(params, lr=lr)
    raise ValueError(f"optimizer must be 'sgd', 'adam', 'adamw', 'muon' or 'soap', got {name!r}")


def add_tuning_arguments(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    """``--seeds``, ``--tuning-seed`` and ``--optimizers`` (a comma-separated subset of
    ``names``)."""
    parser.add_argument("--seeds", type=int, default=3, help="seeds after the tuning seed")
    parser.add_argument("--tuning-seed", type=int, default=0)
    parser.add_argument(
        "--optimizers", default=None, help=f"comma-separated names from {', '.join(names)}"
    )


def selected(
    parser: argparse.ArgumentParser, args: argparse.Namespace, grid: Mapping[str, Entry]
) -> dict[str, Entry]:
    """The entries of ``grid`` that ``--optimizers`` names (all by default), after checking
    the arguments of ``add_tuning_arguments``. An entry of ``OPTIONAL_PACKAGES`` whose package
    is missing is an error where named and left out with a message otherwise."""
    if args.seeds < 1:
        parser.error("--seeds must be at least 1 (the seeds reported after the tuning seed)")
    wanted = [name.strip() for name in args.optimizers.split(",")] if args.optimizers else []
    unknown = [name for name in wanted if name not in grid]
    if unknown:
        parser.error(f"unknown optimizers {unknown}; choose from {list(grid)}")
    chosen = {name: grid[name] for name in wanted or grid}
    for name in list(chosen):
        module = OPTIONAL_PACKAGES.get(name)
        if module is None or importlib.util.find_spec(module) is not None:
            continue
        hint = f"{name} needs the {module} package: pip install -e '.[benchmarks]'"
        if wanted:
            parser.error(hint)
        print(f"{hint}; left out of this run", flush=True)
        del chosen[name]
    return chosen


def best_tuned(
    lrs: Sequence[float],
    run: Callable[[float, int], Run],
    key: Callable[[Run], tuple[float, ...]],
    tuning_seed: int,
    seeds: int,
) -> tuple[dict[float, Run], float, list[Run]]:
    """Every learning rate of ``lrs`` run on the tuning seed, then the one with the smallest
    ``key`` (e.g. the time to a target) on ``seeds`` other seeds.

    Returns:
        The tuning runs by learning rate, the chosen rate and its runs on the other seeds.
    """
    trials = {lr: run(lr, tuning_seed) for lr in lrs}
    chosen = min(trials, key=lambda lr: key(trials[lr]))
    others = [run(chosen, seed) for seed in range(tuning_seed + 1, tuning_seed + 1 + seeds)]
    return trials, chosen, others


def median_or_inf(values: Sequence[float]) -> float:
    """The median, infinite where half the values are (a target never reached)."""
    return statistics.median(values) if values else math.inf


def fmt(value: float, digits: int = 1) -> str:
    """``value`` to ``digits`` places, ``"-"`` if infinite."""
    return "-" if math.isinf(value) else f"{value:.{digits}f}"
