"""Cholesky inverses with factored damping (reference, section 13): the same step as the
eigen method's factored damping, formed once per decomposition."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_kfac import KFACCallback, KFACDDPStrategy
from lightning_kfac.blocks import LinearBlock
from lightning_kfac.decomposition import SmallMatrix
from lightning_kfac.discovery import discover, summary_table
from lightning_kfac.inverse import damped_inverse_pair
from tests.helpers import Classifier, InterleavedData, classification_data, mlp, trainer

F64 = torch.float64


def random_psd(groups: int, d: int, rank: int | None = None) -> torch.Tensor:
    x = torch.randn(groups, d, rank or 2 * d, dtype=F64)
    return x @ x.mT / x.shape[-1]


def test_damped_inverses_match_an_explicit_reference_with_the_pi_correction():
    torch.manual_seed(0)
    a, g, damping = random_psd(2, 6), random_psd(2, 4), 0.05
    a_inv, g_inv = damped_inverse_pair(a, g, damping)
    for i in range(2):
        pi = ((torch.trace(a[i]) / 6) / (torch.trace(g[i]) / 4)).sqrt()
        want_a = torch.linalg.inv(a[i] + pi * damping**0.5 * torch.eye(6, dtype=F64))
        want_g = torch.linalg.inv(g[i] + damping**0.5 / pi * torch.eye(4, dtype=F64))
        torch.testing.assert_close(a_inv[i], want_a, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_inv[i], want_g, rtol=1e-10, atol=1e-12)


def test_a_failed_cholesky_falls_back_to_the_eigen_inverse():
    """A float32 matrix with a negative round-off eigenvalue larger than the shift."""
    vectors = torch.linalg.qr(torch.randn(5, 5, dtype=F64))[0]
    values = torch.tensor([1.0, 0.5, 0.1, 0.0, -1e-3], dtype=F64)
    a = (vectors * values) @ vectors.T
    g = torch.eye(3, dtype=F64)
    a_inv, _ = damped_inverse_pair(a[None], g[None], 1e-8)
    assert torch.isfinite(a_inv).all()
    shift = 1e-4 * (torch.trace(a) / 5).sqrt()  # pi sqrt(lambda), tr(G)/3 = 1
    clipped = (vectors * (values.clamp_min(0) + shift)) @ vectors.T
    torch.testing.assert_close(a_inv[0] @ clipped, torch.eye(5, dtype=F64), rtol=0, atol=1e-6)


def test_cholesky_step_equals_the_eigen_step_with_factored_damping():
    torch.manual_seed(1)
    layer = nn.Linear(5, 3).double()
    eigen, cholesky = LinearBlock(layer), LinearBlock(layer)
    cholesky.inverse = "cholesky"
    factors = {"A": random_psd(1, 6), "G": random_psd(1, 3)}
    V = torch.randn(1, 3, 6, dtype=F64)
    decomposed = {}
    for block in (eigen, cholesky):
        decomposed[block] = {}
        for key, matrix in factors.items():
            [(decomposition, _)] = block.decomposition_method(key).decompose([matrix], 0.0)
            decomposed[block][key] = block.rebuild(key, decomposition.tensors())
    assert isinstance(decomposed[cholesky]["A"], SmallMatrix)
    want = eigen.precondition(V, decomposed[eigen], 0.02, "factored")
    got = cholesky.precondition(V, decomposed[cholesky], 0.02, "factored")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # batched: two blocks of one shape through one operator equal one at a time
    operator = LinearBlock.operator(
        [cholesky, cholesky], [decomposed[cholesky]] * 2, 0.02, "factored"
    )
    for out in operator([V, 2 * V]):
        assert out.shape == V.shape
    torch.testing.assert_close(operator([V, 2 * V])[1], 2 * got, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="factored"):
        cholesky.precondition(V, decomposed[cholesky], 0.02, "exact")


def test_the_eigen_operator_with_factored_damping_equals_the_four_product_step():
    """With factored damping the eigen operator forms both damped inverses once and takes
    two products per step; three blocks of one shape, each with its own factors, give what
    the rotate-scale-rotate path (``precondition``) gives for each, and the explicit
    float64 inverses with the pi correction."""
    torch.manual_seed(3)
    blocks = [LinearBlock(nn.Linear(5, 3).double()) for _ in range(3)]
    decompositions, grads = [], []
    for block in blocks:
        factors = {"A": random_psd(1, 6, rank=4), "G": random_psd(1, 3)}
        decomposed = {}
        for key, matrix in factors.items():
            [(decomposition, _)] = block.decomposition_method(key).decompose([matrix], 0.0)
            decomposed[key] = block.rebuild(key, decomposition.tensors())
        decompositions.append(decomposed)
        grads.append(torch.randn(1, 3, 6, dtype=F64))
        a_inv, g_inv = damped_inverse_pair(factors["A"], factors["G"], 0.03)
        want = g_inv @ grads[-1] @ a_inv
        got = block.precondition(grads[-1], decomposed, 0.03, "factored")
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    outs = LinearBlock.operator(blocks, decompositions, 0.03, "factored")(grads)
    for block, decomposed, grad, out in zip(blocks, decompositions, grads, outs):
        want = block.precondition(grad, decomposed, 0.03, "factored")
        torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-12)


def test_option_validation_and_summary():
    with pytest.raises(ValueError, match="damping_method"):
        KFACCallback(inverse_method="cholesky")
    with pytest.raises(ValueError, match="inverse_method"):
        KFACCallback(inverse_method="lu", damping_method="factored")
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 300))
    found = discover(
        model,
        inverse="cholesky",
        structures=__import__("lightning_kfac.structure").structure.StructurePolicy(
            max_size=100, block_size=100
        ),
    )
    assert found.blocks["0"].inverse == "cholesky"
    assert found.blocks["2"].inverse == "eigen"  # block-diagonal G keeps the eigen method
    assert "LinearBlock (cholesky)" in summary_table(found)


def _fit(devices: int, local_batch: int, **kfac):
    torch.manual_seed(0)
    module = Classifier(mlp(), lr=0.05)
    callback = KFACCallback(inv_update_freq=2, verbose=False, damping_method="factored", **kfac)
    extra = dict(strategy=KFACDDPStrategy(start_method="spawn")) if devices > 1 else {}
    trainer(
        devices=devices, callbacks=[callback], max_steps=6, use_distributed_sampler=False, **extra
    ).fit(module, datamodule=InterleavedData(classification_data(144), local_batch))
    return module


def test_cholesky_training_equals_eigen_and_two_ranks_equal_one_process():
    cholesky = _fit(1, 24, inverse_method="cholesky")
    eigen = _fit(1, 24)
    for (name, p), q in zip(cholesky.named_parameters(), eigen.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    double = _fit(2, 12, inverse_method="cholesky")
    for (name, p), q in zip(double.named_parameters(), cholesky.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
