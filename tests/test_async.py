"""Asynchronous (stale) decompositions (reference, section 7)."""

from __future__ import annotations

import math
import signal
import threading

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_kfac import KFACCallback, KFACDDPStrategy
from lightning_kfac.background import THREAD_NAME
from lightning_kfac.discovery import discover
from lightning_kfac.engine import KFACEngine
from lightning_kfac.options import KFACOptions
from tests.helpers import (
    Classifier,
    LocalBatch,
    StepIndexedClassifier,
    classification_data,
    dummy_loader,
    loader,
    mlp,
    trainer,
)
from tests.test_ddp import ReplicaCheck

D = torch.float64
STEPS, INV, DAMPING, CLIP, LR, MOMENTUM, DECAY = 14, 3, 1e-2, 1e-3, 0.1, 0.9, 0.95


def make_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(D)
    batches = [(torch.randn(16, 5, dtype=D), torch.randn(16, 3, dtype=D)) for _ in range(4)]
    return model, batches


def installed_origin(step: int, staleness: int) -> int:
    """The step whose factors the decompositions used at ``step`` come from: the first one
    (step 0) is installed at once, every later one ``staleness`` steps after it started."""
    origins = [t for t in range(0, step + 1, INV) if t == 0 or t + staleness <= step]
    return max(origins)


def reference_run(staleness: int) -> nn.Module:
    """K-FAC written out from the reference: explicit factors, EMA, eigendecompositions kept
    by step, exact damping, KL clip, SGD with momentum."""
    model, batches = make_problem()
    layers = [model[0], model[2]]
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    running: dict[int, list[torch.Tensor]] = {}
    decompositions: dict[int, list] = {}
    for step in range(STEPS):
        x, y = batches[step % len(batches)]
        z1 = model[0](x)
        z1.retain_grad()
        z2 = model[2](torch.tanh(z1))
        z2.retain_grad()
        optimizer.zero_grad()
        F.mse_loss(z2, y).backward()
        n = x.shape[0]
        inputs = [x, torch.tanh(z1)]
        for i, (inp, out) in enumerate(zip(inputs, [z1, z2])):
            a = torch.cat([inp, torch.ones(n, 1, dtype=D)], 1).detach()
            g = out.grad * n
            batch = [a.T @ a / n, g.T @ g / n]
            running[i] = (
                batch
                if i not in running
                else [DECAY * r + (1 - DECAY) * b for r, b in zip(running[i], batch)]
            )
        if step % INV == 0:
            decompositions[step] = [
                [torch.linalg.eigh(f) for f in running[i]] for i in range(len(layers))
            ]
        use = decompositions[installed_origin(step, staleness)]
        new, inner = [], 0.0
        for i, layer in enumerate(layers):
            V = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
            (e_a, q_a), (e_g, q_g) = use[i]
            e_a, e_g = e_a.clamp_min(0), e_g.clamp_min(0)
            Vp = q_g @ ((q_g.T @ V @ q_a) / (e_g[:, None] * e_a[None, :] + DAMPING)) @ q_a.T
            new.append(Vp)
            inner += LR**2 * (Vp * V).sum().item()
        nu = min(1.0, math.sqrt(CLIP / inner))
        for layer, Vp in zip(layers, new):
            layer.weight.grad.copy_(nu * Vp[:, :-1])
            layer.bias.grad.copy_(nu * Vp[:, -1])
        optimizer.step()
    return model


def engine_run(staleness: int) -> nn.Module:
    model, batches = make_problem()
    options = KFACOptions(
        damping=DAMPING,
        kl_clip=CLIP,
        factor_decay=DECAY,
        inv_update_freq=INV,
        factor_dtype="float64",
        staleness=staleness,
    )
    engine = KFACEngine(discover(model).blocks, options)
    engine.attach()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    for step in range(STEPS):
        x, y = batches[step % len(batches)]
        engine.start_microbatch()
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        engine.step(optimizer.param_groups)
        optimizer.step()
    engine.close()
    return model


@pytest.mark.parametrize("staleness", [0, 1, 2, 3])
def test_async_equals_reference_with_stale_decompositions(staleness):
    got, want = engine_run(staleness), reference_run(staleness)
    for (name, p), q in zip(got.named_parameters(), want.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11, msg=name)


def test_staleness_changes_the_result():
    synchronous, stale = reference_run(0), reference_run(2)
    assert not torch.allclose(next(synchronous.parameters()), next(stale.parameters()))


def kfac_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_NAME)]


def async_fit(seed=0, **kwargs):
    torch.manual_seed(seed)
    module = Classifier(mlp(), lr=0.05)
    callback = KFACCallback(damping=1e-2, inv_update_freq=3, staleness=2, verbose=False)
    trainer(callbacks=[callback], max_steps=12, **kwargs).fit(
        module, loader(classification_data(192), 16)
    )
    return module, callback


def test_async_runs_are_deterministic_and_leave_no_thread():
    first, callback = async_fit()
    second, _ = async_fit()
    for p, q in zip(first.parameters(), second.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    # decompositions start at 0 (synchronous), 3, 6, 9 and are installed at 0, 5, 8, 11
    assert callback.engine.decomposed_at == 9 and callback.engine.pending is None
    assert kfac_threads() == []


class FailAt(Callback):
    def __init__(self, step: int, error: BaseException) -> None:
        self.step, self.error = step, error

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise self.error


@pytest.mark.parametrize(
    "error,raised",
    [(RuntimeError("boom"), RuntimeError), (KeyboardInterrupt(), SystemExit)],
    ids=["exception", "keyboard-interrupt"],
)
def test_exception_and_interrupt_join_the_worker(error, raised):
    """Lightning turns a KeyboardInterrupt into on_exception, teardown and sys.exit(1)."""
    torch.manual_seed(0)
    callback = KFACCallback(damping=1e-2, inv_update_freq=3, staleness=2, verbose=False)
    t = trainer(callbacks=[callback, FailAt(4, error)], max_steps=12)
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT after an interrupt
    try:
        with pytest.raises(raised):
            t.fit(Classifier(mlp()), loader(classification_data(192), 16))
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert callback.engine.pending is not None  # a decomposition was in flight at step 4
    assert kfac_threads() == []


def test_resume_with_a_pending_decomposition_equals_uninterrupted_run(tmp_path):
    data = classification_data(4 * 16)

    def module(seed):
        torch.manual_seed(seed)
        return StepIndexedClassifier(mlp(), data, 16, lr=0.05)

    def callback():
        return KFACCallback(
            damping=1e-2, inv_update_freq=3, staleness=2, verbose=False, batch_size=LocalBatch(16)
        )

    straight = module(0)
    trainer(callbacks=[callback()], max_steps=10).fit(straight, dummy_loader())
    first = callback()  # step 3 starts a decomposition due at step 5
    t = trainer(callbacks=[first], max_steps=4)
    t.fit(module(0), dummy_loader())
    assert first.engine.pending is not None and first.engine.pending.install_step == 5
    t.save_checkpoint(tmp_path / "pending.ckpt")
    resumed = module(1)
    trainer(callbacks=[callback()], max_steps=10).fit(
        resumed, dummy_loader(), ckpt_path=tmp_path / "pending.ckpt"
    )
    for (name, p), q in zip(resumed.named_parameters(), straight.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_async_under_kfac_ddp_equals_one_process(tmp_path):
    data = classification_data(12 * 24)

    def module():
        torch.manual_seed(0)
        return StepIndexedClassifier(mlp(), data, 24, lr=0.05)

    def callback():
        return KFACCallback(
            damping=1e-2, inv_update_freq=3, staleness=2, verbose=False, batch_size=LocalBatch(24)
        )

    single = module()
    trainer(callbacks=[callback()], max_steps=12).fit(single, dummy_loader())
    double = module()
    trainer(
        devices=2,
        strategy=KFACDDPStrategy(start_method="spawn"),
        callbacks=[callback(), ReplicaCheck(str(tmp_path / "report.json"))],
        max_steps=12,
    ).fit(double, dummy_loader())
    for (name, p), q in zip(double.named_parameters(), single.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_invalid_staleness_raises():
    with pytest.raises(ValueError, match="staleness"):
        KFACCallback(staleness=-1)
    with pytest.raises(ValueError, match="inv_update_freq=10"):
        KFACCallback(staleness=11)
