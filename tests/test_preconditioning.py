"""Preconditioned gradients and the KL-clip scale against explicit dense float64 solves."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_kfac.blocks import ConvBlock, LinearBlock
from lightning_kfac.decomposition import symmetric_eigen
from lightning_kfac.engine import KFACEngine
from lightning_kfac.options import KFACOptions
from lightning_kfac.preconditioning import factored_damping, kl_clip_scale, precondition

D = torch.float64


def random_psd(d: int, rank: int | None = None) -> torch.Tensor:
    x = torch.randn(d, rank or 2 * d, dtype=D)
    return x @ x.T / x.shape[1]


def dense_exact(G, A, V, damping):
    """Solve (G kron A + damping I) vec(V') = vec(V), row-major vec."""
    F = torch.kron(G, A) + damping * torch.eye(G.shape[0] * A.shape[0], dtype=D)
    return torch.linalg.solve(F, V.reshape(-1)).reshape(V.shape)


def dense_factored(G, A, V, damping):
    pi = math.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0]))
    root = math.sqrt(damping)
    G_inv = torch.linalg.inv(G + root / pi * torch.eye(G.shape[0], dtype=D))
    A_inv = torch.linalg.inv(A + pi * root * torch.eye(A.shape[0], dtype=D))
    return G_inv @ V @ A_inv


@pytest.mark.parametrize("damping", [1e-4, 1e-2, 3.0])
@pytest.mark.parametrize("rank_deficient", [False, True])
def test_exact_damping_equals_dense_solve(damping, rank_deficient):
    torch.manual_seed(0)
    G, A = (
        random_psd(4, 2 if rank_deficient else None),
        random_psd(6, 3 if rank_deficient else None),
    )
    V = torch.randn(4, 6, dtype=D)
    eigen_g, _ = symmetric_eigen(G[None], damping)
    eigen_a, _ = symmetric_eigen(A[None], damping)
    got = precondition(V[None], eigen_g, eigen_a, damping, "exact")[0]
    torch.testing.assert_close(got, dense_exact(G, A, V, damping), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_factored_damping_equals_pi_corrected_inverse(damping):
    torch.manual_seed(1)
    G, A = random_psd(3) * 50.0, random_psd(5) * 0.01  # very different scales: pi matters
    V = torch.randn(3, 5, dtype=D)
    eigen_g, _ = symmetric_eigen(G[None], damping)
    eigen_a, _ = symmetric_eigen(A[None], damping)
    got = precondition(V[None], eigen_g, eigen_a, damping, "factored")[0]
    torch.testing.assert_close(got, dense_factored(G, A, V, damping), rtol=1e-8, atol=1e-10)


def test_factored_damping_three_factors_and_zero_trace():
    traces = [
        torch.tensor([2.0], dtype=D),
        torch.tensor([0.5], dtype=D),
        torch.tensor([8.0], dtype=D),
    ]
    damping = 0.001
    c = (2.0 * 0.5 * 8.0) ** (1 / 3)
    expected = [t / c * damping ** (1 / 3) for t in (2.0, 0.5, 8.0)]
    got = factored_damping(traces, damping)
    for value, want in zip(got, expected):
        assert value.item() == pytest.approx(want, rel=1e-12)
    zero = factored_damping([torch.tensor([0.0]), torch.tensor([4.0])], 0.01)
    assert [z.item() for z in zero] == pytest.approx([0.1, 0.1])


def test_kl_clip_scale_formula():
    assert kl_clip_scale(torch.tensor(4.0), 1.0).item() == pytest.approx(0.5)
    assert kl_clip_scale(torch.tensor(0.25), 1.0).item() == 1.0
    assert kl_clip_scale(torch.tensor(0.0), 1.0).item() == 1.0
    assert kl_clip_scale(torch.tensor(2e-3), 1e-3).item() == pytest.approx(math.sqrt(0.5))


@pytest.mark.parametrize("method", ["exact", "factored"])
def test_engine_step_matches_dense_reference(method):
    """Whole step: factors from hooks, [W | b] combination, two layers with different learning
    rates, the KL clip, and a layer outside K-FAC that keeps its raw gradient."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(18, 4), nn.LayerNorm(4)
    ).to(D)
    blocks = {"0": ConvBlock(model[0]), "2": LinearBlock(model[2])}
    damping, kl_clip, lrs = 0.05, 1e-4, {"0": 0.3, "2": 0.1}
    engine = KFACEngine(
        blocks,
        KFACOptions(
            damping=damping, kl_clip=kl_clip, damping_method=method, factor_dtype="float64"
        ),
    )
    engine.attach()
    engine.start_microbatch()
    x, y = torch.randn(10, 2, 6, dtype=D), torch.randn(10, 4, dtype=D)
    torch.nn.functional.mse_loss(model(x), y).backward()
    raw = {name: block.gradient().clone() for name, block in blocks.items()}
    norm_grad = model[3].weight.grad.clone()
    groups = [
        {"params": list(model[0].parameters()), "lr": lrs["0"]},
        {"params": list(model[2].parameters()) + list(model[3].parameters()), "lr": lrs["2"]},
    ]
    engine.step(groups)

    solve = dense_exact if method == "exact" else dense_factored
    expected, inner = {}, 0.0
    for name in blocks:
        A, G = engine.factors()[name]  # (d, d): groups is 1
        expected[name] = solve(G, A, raw[name][0], damping)
        inner += lrs[name] ** 2 * (expected[name] * raw[name][0]).sum().item()
    nu = min(1.0, math.sqrt(kl_clip / inner))
    assert nu < 1.0, "the test must exercise the clip"
    for name, block in blocks.items():
        torch.testing.assert_close(block.gradient()[0], nu * expected[name], rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(model[3].weight.grad, norm_grad, rtol=0, atol=0)
