"""Checkpoints and resume, mixed precision, gradient accumulation, logging, LightningCLI."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from lightning_kfac import KFACCallback, KFACDDPStrategy
from tests.helpers import (
    Classifier,
    StepIndexedClassifier,
    classification_data,
    cnn,
    dummy_loader,
    loader,
    mlp,
    sequence_data,
    trainer,
)

ROOT = Path(__file__).resolve().parent.parent


def kfac(**overrides) -> KFACCallback:
    options = dict(
        damping=1e-2,
        factor_update_freq=1,
        inv_update_freq=3,
        verbose=False,
    )
    options.update(overrides)
    return KFACCallback(**options)


def assert_same_parameters(a: nn.Module, b: nn.Module, **tolerance) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(x, y, msg=name, **tolerance)


# -- checkpoints -------------------------------------------------------------------------


def test_resume_equals_uninterrupted_run_single_device(tmp_path):
    data = classification_data(4 * 16)

    def module(seed):
        torch.manual_seed(seed)
        return StepIndexedClassifier(mlp(), data, 16, lr=0.05)

    straight = module(0)
    trainer(callbacks=[kfac()], max_steps=8).fit(straight, dummy_loader())

    t = trainer(callbacks=[kfac()], max_steps=4)
    t.fit(module(0), dummy_loader())
    path = tmp_path / "half.ckpt"
    t.save_checkpoint(path)

    state = torch.load(path, weights_only=True)["callbacks"]["KFACCallback"]
    assert state["steps"] == 4 and set(state["running"]) == {"net.0", "net.2", "net.4"}

    resumed = module(123)  # other initial weights: everything must come from the checkpoint
    callback = kfac(damping=1e-2)  # a new instance: the state key does not depend on options
    trainer(callbacks=[callback], max_steps=8).fit(resumed, dummy_loader(), ckpt_path=path)
    assert callback.engine.steps == 8
    assert_same_parameters(resumed, straight, rtol=1e-5, atol=1e-6)


def test_state_key_is_independent_of_hyperparameters():
    assert kfac(damping=1e-3).state_key == kfac(damping=0.5, kl_clip=None).state_key


def test_resume_with_different_layers_fails_naming_them(tmp_path):
    data = classification_data(32)
    t = trainer(callbacks=[kfac()], max_steps=2)
    t.fit(Classifier(mlp()), loader(data, 16))
    t.save_checkpoint(tmp_path / "a.ckpt")
    net = mlp()
    net[2].bias.requires_grad_(False)  # same weights, but net.2's A factor loses its bias row
    with pytest.raises(ValueError, match=r"factor shapes changed: \['net.2'\]"):
        trainer(callbacks=[kfac()], max_steps=4).fit(
            Classifier(net), loader(data, 16), ckpt_path=tmp_path / "a.ckpt"
        )
    with pytest.raises(ValueError, match=r"in the checkpoint only: \['net.4'\]"):
        trainer(callbacks=[kfac(exclude=["net.4"])], max_steps=4).fit(
            Classifier(mlp()), loader(data, 16), ckpt_path=tmp_path / "a.ckpt"
        )


def _two_rank_fit(module, steps, tmp_path=None, ckpt_path=None):
    callbacks = [kfac()]
    if tmp_path is not None:
        callbacks.append(
            ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=steps, save_top_k=-1)
        )
    trainer(
        devices=2,
        strategy=KFACDDPStrategy(start_method="spawn"),
        callbacks=callbacks,
        max_steps=steps,
        enable_checkpointing=tmp_path is not None,
    ).fit(module, dummy_loader(), ckpt_path=ckpt_path)


def test_resume_equals_uninterrupted_run_under_kfac_ddp(tmp_path):
    data = classification_data(4 * 16)  # global batch 16: local batch 8 on each of 2 ranks

    def module(seed):
        torch.manual_seed(seed)
        return StepIndexedClassifier(mlp(), data, 16, lr=0.05)

    straight = module(0)
    _two_rank_fit(straight, 8)
    _two_rank_fit(module(0), 4, tmp_path=tmp_path)
    (checkpoint,) = tmp_path.glob("*.ckpt")
    resumed = module(7)
    _two_rank_fit(resumed, 8, ckpt_path=checkpoint)
    assert_same_parameters(resumed, straight, rtol=1e-5, atol=1e-6)


# -- mixed precision ---------------------------------------------------------------------


def _factors_after_one_step(**trainer_kwargs):
    torch.manual_seed(0)
    callback = kfac()
    trainer(callbacks=[callback], max_steps=1, **trainer_kwargs).fit(
        Classifier(cnn()), loader(sequence_data(32), 32)
    )
    return callback.factors()


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_factors_are_float32_and_unscaled(precision):
    reference = _factors_after_one_step()
    if precision == "16-mixed":
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
        got = _factors_after_one_step(plugins=[plugin])
    else:
        got = _factors_after_one_step(precision="bf16-mixed")
    for name, (A, G) in got.items():
        assert A.dtype == G.dtype == torch.float32
        # bf16 activations round to ~3 digits; a missing loss-scale correction would be 2**24 off
        torch.testing.assert_close(A, reference[name][0], rtol=0.05, atol=2e-2)
        torch.testing.assert_close(
            G, reference[name][1], rtol=0.1, atol=0.05 * G.abs().max().item()
        )


class OverflowAt(Classifier):
    """A classifier whose loss overflows on one step, as fp16 can."""

    def __init__(self, *args, overflow_step: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.overflow_step = overflow_step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_step == self.overflow_step:
            loss = loss * float("inf")
        return loss


def test_step_skipped_by_grad_scaler_updates_no_factor_or_counter():
    torch.manual_seed(0)
    callback = kfac(inv_update_freq=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    module = OverflowAt(mlp(), overflow_step=2)
    seen = []

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(
                (callback.engine.steps, {k: v[1].clone() for k, v in callback.factors().items()})
            )

    trainer(
        callbacks=[callback, Watch()],
        max_steps=5,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    ).fit(module, loader(classification_data(160), 32))
    steps = [s for s, _ in seen]
    assert steps[:4] == [1, 2, 2, 3], steps  # the overflowing step did not count
    for name, G in seen[2][1].items():  # factors unchanged by the skipped step
        torch.testing.assert_close(G, seen[1][1][name], rtol=0, atol=0)
    assert all(torch.isfinite(G).all() for _, factors in seen for G in factors.values())
    assert callback.engine.counters.skipped_batches == 0


# -- gradient accumulation ---------------------------------------------------------------


def test_accumulation_equals_larger_batch():
    data = classification_data(6 * 32)
    torch.manual_seed(0)
    big = Classifier(mlp(), lr=0.05)
    trainer(callbacks=[kfac()], max_steps=6).fit(big, loader(data, 32))
    torch.manual_seed(0)
    accumulated = Classifier(mlp(), lr=0.05)
    callback = kfac()
    trainer(callbacks=[callback], max_steps=6, accumulate_grad_batches=4).fit(
        accumulated, loader(data, 8)
    )
    assert callback.engine.steps == 6
    assert_same_parameters(accumulated, big, rtol=1e-4, atol=1e-5)


# -- logging -----------------------------------------------------------------------------


def test_metrics_reach_csv_and_tensorboard_loggers_and_progress_bar(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    csv_logger = CSVLogger(tmp_path, name="csv")
    tb_logger = TensorBoardLogger(tmp_path, name="tb")
    callback = kfac(log_every_n_steps=2, progress_bar=["damping", "kl_scale"])
    t = trainer(callbacks=[callback], max_steps=6, logger=[csv_logger, tb_logger])
    t.fit(Classifier(mlp()), loader(classification_data(96), 16))

    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("kfac/damping")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    for row in rows:
        assert float(row["kfac/damping"]) == pytest.approx(1e-2)
        assert 0 < float(row["kfac/kl_scale"]) <= 1
        assert float(row["kfac/layers"]) == 3
        assert float(row["kfac/factor_update_ms"]) > 0
    assert float(rows[0]["kfac/decomposition_ms"]) > 0  # step 0 decomposes

    events = EventAccumulator(tb_logger.log_dir)
    events.Reload()
    assert {"kfac/damping", "kfac/kl_scale", "kfac/decomposition_ms"} <= set(
        events.Tags()["scalars"]
    )
    assert {"kfac/damping", "kfac/kl_scale"} <= set(t.progress_bar_metrics)
    assert "kfac/layers" not in t.progress_bar_metrics


def test_invalid_logging_options_raise():
    with pytest.raises(ValueError, match="progress_bar"):
        KFACCallback(progress_bar=["dampin"])
    with pytest.raises(ValueError, match="log_every_n_steps"):
        KFACCallback(log_every_n_steps=-1)


# -- LightningCLI ------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "examples/cli.py", "fit", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    "config", sorted(p.name for p in (ROOT / "examples/configs").glob("*.yaml"))
)
def test_shipped_configs_train(config, tmp_path):
    result = run_cli(
        "--config",
        f"examples/configs/{config}",
        "--trainer.max_steps=3",
        "--trainer.val_check_interval=3",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=3` reached" in result.stderr + result.stdout


@pytest.mark.parametrize(
    "yaml,expected",
    [
        (
            "trainer:\n  callbacks:\n    - class_path: lightning_kfac.KFACCallback\n"
            "      init_args:\n        dampng: 0.01\n",
            "Option 'dampng' is not accepted",
        ),
        (
            "trainer:\n  callbacks:\n    - class_path: lightning_kfac.KFACCallback\n"
            "      init_args:\n        inv_update_freq: often\n",
            "inv_update_freq",
        ),
        (
            "trainer:\n  strategy:\n    class_path: lightning_kfac.KFACDDPStrategy\n"
            "    init_args:\n      kfac_precondition: owner\n",
            "Option 'kfac_precondition' is not accepted",
        ),
    ],
    ids=["misspelled-callback-option", "mistyped-callback-option", "unknown-strategy-option"],
)
def test_bad_configs_fail_before_training(yaml, expected, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml)
    result = run_cli("--config", str(config), "--trainer.max_steps=2")
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Trainer.fit" not in result.stderr + result.stdout
