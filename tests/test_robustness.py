"""Bad input: invalid arguments, non-finite factor batches, failing decompositions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_kfac import KFACCallback
from lightning_kfac.blocks import LinearBlock
from lightning_kfac.decomposition import symmetric_eigen
from lightning_kfac.engine import KFACEngine
from lightning_kfac.options import KFACOptions


@pytest.mark.parametrize(
    "kwargs,names",
    [
        (dict(damping=-1.0), ["damping", "positive"]),
        (dict(damping=0.0), ["damping"]),
        (dict(damping="big"), ["damping", "callable"]),
        (dict(factor_decay=1.0), ["factor_decay", "[0.0, 1.0)"]),
        (dict(factor_decay=-0.1), ["factor_decay"]),
        (dict(factor_update_freq=0), ["factor_update_freq", ">= 1"]),
        (dict(inv_update_freq=2.5), ["inv_update_freq", "integer"]),
        (dict(factor_update_freq=3, inv_update_freq=10), ["multiple of factor_update_freq"]),
        (dict(kl_clip=0.0), ["kl_clip", "None"]),
        (dict(damping_method="cholesky"), ["damping_method", "'exact', 'factored'"]),
        (dict(loss_reduction="avg"), ["loss_reduction", "'mean', 'sum'"]),
        (dict(momentum=1.5), ["momentum"]),
        (dict(factor_dtype="float16"), ["factor_dtype", "float32"]),
        (dict(include="net.*"), ["include", "list"]),
    ],
)
def test_invalid_arguments_raise_at_construction(kwargs, names):
    with pytest.raises(ValueError) as error:
        KFACCallback(**kwargs)
    for name in names:
        assert name in str(error.value)


def test_invalid_scheduled_value_raises_when_read():
    options = KFACOptions(damping=lambda step: 1e-3 if step < 2 else -1.0)
    assert options.damping_at(1) == 1e-3
    with pytest.raises(ValueError, match="damping"):
        options.damping_at(2)


def _engine(layer, **options):
    engine = KFACEngine({"l": LinearBlock(layer)}, KFACOptions(**options), warn=lambda m: None)
    engine.attach()
    return engine


def _backward(engine, layer, x):
    engine.start_microbatch()
    layer(x).pow(2).mean().backward()


def test_non_finite_factor_batch_is_skipped_and_counted():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    engine = _engine(layer, inv_update_freq=1)
    _backward(engine, layer, torch.randn(4, 3))
    engine.step([{"params": list(layer.parameters()), "lr": 0.1}])
    A, G = (t.clone() for t in engine.factors()["l"])
    layer.zero_grad()
    bad = torch.randn(4, 3)
    bad[0, 0] = float("inf")
    engine.start_microbatch()
    out = layer(bad)
    out.pow(2).mean().backward()
    layer.weight.grad.nan_to_num_(0.0, 0.0, 0.0)  # the gradient path is the optimizer's concern
    layer.bias.grad.nan_to_num_(0.0, 0.0, 0.0)
    engine.step([{"params": list(layer.parameters()), "lr": 0.1}])
    assert engine.counters.skipped_batches == 1
    torch.testing.assert_close(engine.factors()["l"][0], A, rtol=0, atol=0)
    torch.testing.assert_close(engine.factors()["l"][1], G, rtol=0, atol=0)
    assert all(torch.isfinite(e.values).all() for e in engine.state["l"].decompositions.values())


def test_decomposition_falls_back_to_float64_then_jitter(monkeypatch):
    real_eigh = torch.linalg.eigh
    matrix = torch.randn(1, 4, 4)
    matrix = matrix @ matrix.mT

    def fails_in_float32(m):
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated")
        return real_eigh(m)

    monkeypatch.setattr(torch.linalg, "eigh", fails_in_float32)
    eigen, report = symmetric_eigen(matrix, 1e-3)
    assert report.outcome == "float64" and eigen.values.dtype == torch.float32
    recon = eigen.vectors @ torch.diag_embed(eigen.values) @ eigen.vectors.mT
    torch.testing.assert_close(recon, matrix, rtol=1e-4, atol=1e-5)

    calls = []

    def fails_without_jitter(m):
        calls.append(m)
        if len(calls) < 3:
            raise torch.linalg.LinAlgError("simulated")
        return real_eigh(m)

    monkeypatch.setattr(torch.linalg, "eigh", fails_without_jitter)
    eigen, report = symmetric_eigen(matrix, 1e-3)
    assert report.outcome == "jitter" and report.jitter > 0
    shift = calls[-1].diagonal(dim1=-2, dim2=-1) - matrix.double().diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(shift, torch.full_like(shift, report.jitter))

    monkeypatch.setattr(torch.linalg, "eigh", lambda m: (_ for _ in ()).throw(RuntimeError("x")))
    eigen, report = symmetric_eigen(matrix, 1e-3)
    assert eigen is None and report.outcome == "failed"


def test_failed_decomposition_keeps_raw_gradient_without_crash(monkeypatch):
    torch.manual_seed(1)
    layer = nn.Linear(3, 2)
    engine = _engine(layer, inv_update_freq=1, kl_clip=None)
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: (_ for _ in ()).throw(RuntimeError("x")))
    _backward(engine, layer, torch.randn(4, 3))
    raw = layer.weight.grad.clone()
    engine.step([{"params": list(layer.parameters()), "lr": 0.1}])
    torch.testing.assert_close(layer.weight.grad, raw, rtol=0, atol=0)
    assert engine.counters.decomposition_fallbacks["failed"] == 2


def test_layer_whose_hooks_never_fire_keeps_its_plain_gradient():
    """Like MultiheadAttention's out_proj: parameters used through F.linear, so the module's
    hooks never fire. It must keep its raw gradient, unscaled by the KL clip."""
    torch.manual_seed(2)
    first, bypassed = nn.Linear(3, 4), nn.Linear(4, 2)
    messages = []
    blocks = {"first": LinearBlock(first), "bypassed": LinearBlock(bypassed)}
    engine = KFACEngine(blocks, KFACOptions(kl_clip=1e-8), warn=messages.append)
    engine.attach()
    engine.start_microbatch()
    out = torch.nn.functional.linear(first(torch.randn(8, 3)), bypassed.weight, bypassed.bias)
    out.pow(2).mean().backward()
    raw_first, raw_bypassed = first.weight.grad.clone(), bypassed.weight.grad.clone()
    stats = engine.step([{"params": [*first.parameters(), *bypassed.parameters()], "lr": 0.1}])
    assert stats.kl_scale.item() < 1.0
    torch.testing.assert_close(bypassed.weight.grad, raw_bypassed, rtol=0, atol=0)
    assert not torch.allclose(first.weight.grad, raw_first)
    assert len(messages) == 1 and "'bypassed'" in messages[0]
