"""Real Lightning Trainer runs with 2 CPU processes (gloo): "kfac_ddp" equals one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from lightning_kfac import KFACCallback, KFACDDPStrategy
from tests.helpers import (
    Classifier,
    InterleavedData,
    classification_data,
    cnn,
    loads,
    mlp,
    replicas_identical,
    sequence_data,
    trainer,
)

STEPS = 12
FACTOR_FREQ, INV_FREQ = 2, 4


class ReplicaCheck(Callback):
    """After every step, assert parameters are bitwise identical on every rank; at the end,
    write each rank's decomposition count and the assignment's loads to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        assert replicas_identical(pl_module), "replicas drifted"

    def on_train_end(self, trainer, pl_module) -> None:
        kfac = next(c for c in trainer.callbacks if isinstance(c, KFACCallback))
        counts = [None] * dist.get_world_size()
        dist.all_gather_object(counts, kfac.engine.counters.decompositions)
        distribution = kfac.engine.distribution
        assignment = distribution.assignment
        per_rank = loads(assignment.costs, assignment.owners, dist.get_world_size())
        if trainer.global_rank == 0:
            Path(self.path).write_text(
                json.dumps(
                    {
                        "counts": counts,
                        "units": len(assignment.owners),
                        "mode": distribution.options.precondition_mode,
                        "loads": per_rank,
                        "max_cost": max(assignment.costs.values()),
                    }
                )
            )


def kfac_callback() -> KFACCallback:
    return KFACCallback(
        damping=1e-2, factor_update_freq=FACTOR_FREQ, inv_update_freq=INV_FREQ, verbose=False
    )


def make(kind: str):
    torch.manual_seed(0)
    if kind == "mlp":
        return Classifier(mlp(), lr=0.05), classification_data(24 * STEPS)
    return Classifier(cnn(), lr=0.05), sequence_data(24 * STEPS)


def single_process(kind: str):
    module, data = make(kind)
    trainer(callbacks=[kfac_callback()], max_steps=STEPS, use_distributed_sampler=False).fit(
        module, datamodule=InterleavedData(data, 24)
    )
    return module


def two_ranks(kind: str, tmp_path, **strategy_options):
    module, data = make(kind)
    strategy = KFACDDPStrategy(start_method="spawn", **strategy_options)
    report = tmp_path / "report.json"
    trainer(
        devices=2,
        strategy=strategy,
        callbacks=[kfac_callback(), ReplicaCheck(str(report))],
        max_steps=STEPS,
        use_distributed_sampler=False,
    ).fit(module, datamodule=InterleavedData(data, 12))  # local batch 12 on each of 2 ranks
    return module, json.loads(report.read_text())


@pytest.fixture(scope="module")
def reference():
    return {kind: single_process(kind) for kind in ("mlp", "cnn")}


@pytest.mark.parametrize(
    "kind,options",
    [
        ("mlp", {}),
        ("cnn", {}),
        ("mlp", {"kfac_precondition_mode": "owner", "kfac_bucket_cap_mb": 0.002}),
        ("cnn", {"kfac_reduce_every_update": True, "kfac_pack_triangular": False}),
    ],
    ids=[
        "mlp-shared-lazy",
        "cnn-shared-lazy",
        "mlp-owner-small-buckets",
        "cnn-every-update-unpacked",
    ],
)
def test_two_ranks_equal_one_process_with_double_batch(reference, kind, options, tmp_path):
    module, report = two_ranks(kind, tmp_path, **options)
    for (name, got), want in zip(module.named_parameters(), reference[kind].parameters()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(next(module.parameters()), next(make(kind)[0].parameters())), (
        "training must have moved the parameters"
    )

    # every decomposition ran on exactly one rank, and the load is balanced
    inversions = len(range(0, STEPS, INV_FREQ))
    factors = report["units"] * (2 if report["mode"] == "owner" else 1)
    assert sum(report["counts"]) == factors * inversions
    assert min(report["counts"]) > 0
    assert max(report["loads"]) - min(report["loads"]) <= report["max_cost"]


def test_strategy_name_and_plain_ddp_from_a_script(tmp_path):
    """`strategy="kfac_ddp"` from the registry (popen launcher), and plain "ddp", both train
    identical replicas; the script exits non-zero otherwise."""
    script = Path(__file__).parent / "scripts" / "fit_two_ranks.py"
    for strategy in ("kfac_ddp", "ddp"):
        result = subprocess.run(
            [sys.executable, str(script), strategy, str(tmp_path / f"{strategy}.json")],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=Path(__file__).parent.parent,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        summary = json.loads((tmp_path / f"{strategy}.json").read_text())
        assert summary["strategy"] == (
            "KFACDDPStrategy" if strategy == "kfac_ddp" else "DDPStrategy"
        )
        assert summary["world_size"] == 2 and summary["replicas_identical"]
        assert summary["distribution"] == "DataParallelDistribution"


def test_invalid_strategy_options_raise():
    with pytest.raises(ValueError, match="kfac_precondition_mode"):
        KFACDDPStrategy(kfac_precondition_mode="fast")
    with pytest.raises(ValueError, match="kfac_bucket_cap_mb"):
        KFACDDPStrategy(kfac_bucket_cap_mb=0)
    with pytest.raises(ValueError, match=r"unknown options \['kfac_precondition'\]"):
        KFACDDPStrategy(kfac_precondition="owner")
    KFACDDPStrategy(find_unused_parameters=True, start_method="spawn")  # passed through
