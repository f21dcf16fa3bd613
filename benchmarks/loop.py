"""The training step every timing benchmark runs: a plain loop around the engine that
``KFACCallback`` drives (the same calls, in the same order), and the clocks they read."""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kfac.engine import KFACEngine

#: What a benchmark's seconds are read from: wall time, or this process's CPU time (robust
#: to other processes on a shared machine when torch runs one thread).
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def add_clock_argument(parser: argparse.ArgumentParser) -> None:
    """``--clock``: a key of ``CLOCKS``."""
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="process: CPU time of this process (use with --threads 1 on a busy machine)",
    )


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    engine: KFACEngine | None,
    x: Tensor,
    y: Tensor,
) -> None:
    """One step of cross-entropy training, preconditioned by ``engine`` if given."""
    if engine is not None:
        engine.start_microbatch()
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    if engine is not None:
        engine.step(optimizer.param_groups)
    optimizer.step()
