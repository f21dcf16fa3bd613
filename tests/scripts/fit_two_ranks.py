"""Fit a small MLP on 2 CPU ranks with the strategy named on the command line.

Usage: python tests/scripts/fit_two_ranks.py STRATEGY SUMMARY.json

Lightning's popen launcher re-runs this script for rank 1. Rank 0 writes a JSON summary:
the strategy class, the world size, the K-FAC distribution class, and whether parameters
were bitwise identical on both ranks after every step.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from lightning.pytorch.callbacks import Callback

from lightning_kfac import KFACCallback
from tests.helpers import (
    Classifier,
    classification_data,
    loader,
    mlp,
    replicas_identical,
    trainer,
)


class Summary(Callback):
    def __init__(self, path: str) -> None:
        self.path = path
        self.identical = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.identical &= replicas_identical(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        kfac = next(c for c in trainer.callbacks if isinstance(c, KFACCallback))
        if trainer.global_rank == 0:
            summary = {
                "strategy": type(trainer.strategy).__name__,
                "world_size": trainer.world_size,
                "distribution": type(kfac.engine.distribution).__name__,
                "replicas_identical": self.identical,
            }
            Path(self.path).write_text(json.dumps(summary))


def main() -> None:
    strategy, path = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    module = Classifier(mlp(), lr=0.05)
    t = trainer(
        devices=2,
        strategy=strategy,
        max_steps=6,
        callbacks=[KFACCallback(inv_update_freq=2, verbose=False), Summary(path)],
    )
    t.fit(module, loader(classification_data(96), 8))


if __name__ == "__main__":
    main()
    # Leave without interpreter teardown: destroying torch's gloo process group at exit
    # rarely aborts ("terminate called without an active exception"), which would turn a
    # finished run into a failure. Everything this script reports is written by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
