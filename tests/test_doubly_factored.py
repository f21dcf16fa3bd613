"""The doubly-factored approximation (reference, section 5) for a Linear layer after
``nn.Flatten()``: factors against a per-example SVD reference, the step against an explicit
Kronecker solve, detection of the pattern, and a Trainer fit on 1 and 2 ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACCallback, KFACDDPStrategy
from lightning_kfac.capture import FactorCapture
from lightning_kfac.discovery import discover, summary_table
from lightning_kfac.doubly_factored import DoublyFactoredLinearBlock
from lightning_kfac.structure import StructurePolicy
from tests.helpers import Classifier, InterleavedData, trainer

F64 = torch.float64
N, J, T, D_OUT = 12, 3, 5, 4


def reference_factors(x: torch.Tensor, layer: nn.Linear, target: torch.Tensor):
    """Phi, Omega from each example's best rank-one map (explicit SVD per example), G by
    the per-example rule."""
    phi = torch.zeros(J, J, dtype=F64)
    omega = torch.zeros(T, T, dtype=F64)
    for n in range(N):
        u, s, vh = torch.linalg.svd(x[n].reshape(J, T))
        p, q = u[:, 0] * s[0].sqrt(), vh[0] * s[0].sqrt()
        phi += torch.outer(p, p) / N
        omega += torch.outer(q, q) / N
    out = layer(x).detach().requires_grad_()
    F.cross_entropy(out, target).backward()
    g_hat = N * out.grad
    G = sum(torch.outer(g, g) for g in g_hat) / N
    return phi, omega, G


def setup(bias: bool = True):
    torch.manual_seed(0)
    layer = nn.Linear(J * T, D_OUT, bias=bias).double()
    x = torch.randn(N, J * T, dtype=F64)
    target = torch.randint(0, D_OUT, (N,))
    block = DoublyFactoredLinearBlock(layer, J, T)
    capture = FactorCapture({"m": block}, loss_reduction="mean", dtype=F64)
    capture.attach()
    capture.start_microbatch(examples=N)
    F.cross_entropy(layer(x), target).backward()
    factors = capture.pop()["m"].factors
    capture.detach()
    return layer, block, x, target, factors


def test_factors_match_a_per_example_svd_reference():
    layer, _, x, target, factors = setup()
    phi, omega, G = reference_factors(x, layer, target)
    torch.testing.assert_close(factors["Phi"][0], phi, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(factors["Omega"][0], omega, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(factors["G"][0], G, rtol=1e-10, atol=1e-12)


def test_one_rank_one_example_is_exact_and_the_kronecker_order_is_channel_major():
    """For one example whose map is rank one, Phi (x) Omega is exactly A = x x^T; the
    other order (Omega (x) Phi) is not."""
    torch.manual_seed(1)
    p, q = torch.randn(J, dtype=F64), torch.randn(T, dtype=F64)
    x = torch.outer(p, q).reshape(1, J * T)
    block = DoublyFactoredLinearBlock(nn.Linear(J * T, D_OUT).double(), J, T)
    stats, rows, _ = block.capture_input(x, 1)
    phi, omega = stats["Phi"][0] / rows, stats["Omega"][0] / rows
    torch.testing.assert_close(torch.kron(phi, omega), x.T @ x, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(torch.kron(omega, phi), x.T @ x)


@pytest.mark.parametrize("method", ["exact", "factored"])
@pytest.mark.parametrize("bias", [True, False])
def test_step_matches_an_explicit_kronecker_solve(method, bias):
    _, block, _, _, factors = setup(bias)
    decompositions = {}
    for key, matrix in factors.items():
        [(decomposition, _)] = block.decomposition_method(key).decompose([matrix], 0.0)
        decompositions[key] = block.rebuild(key, decomposition.tensors())
    damping = 0.05
    V = torch.randn(1, D_OUT, J * T + int(bias), dtype=F64)
    got = block.precondition(V, decompositions, damping, method)[0]
    phi, omega, G = factors["Phi"][0], factors["Omega"][0], factors["G"][0]
    weight = V[0, :, : J * T]
    if method == "exact":
        curvature = torch.kron(G, torch.kron(phi, omega))
        curvature += damping * torch.eye(curvature.shape[0], dtype=F64)
        want = torch.linalg.solve(curvature, weight.reshape(-1)).reshape(D_OUT, J * T)
    else:
        traces = torch.stack([torch.trace(m) / m.shape[0] for m in (G, phi, omega)])
        c = traces.prod() ** (1 / 3)
        d_g, d_phi, d_omega = traces / c * damping ** (1 / 3)
        inv = [
            torch.linalg.inv(m + d * torch.eye(m.shape[0], dtype=F64))
            for m, d in ((G, d_g), (phi, d_phi), (omega, d_omega))
        ]
        want = inv[0] @ weight @ torch.kron(inv[1], inv[2])
    torch.testing.assert_close(got[:, : J * T], want, rtol=1e-9, atol=1e-11)
    if bias:  # the bias block is G
        want_b = torch.linalg.solve(G + damping * torch.eye(D_OUT, dtype=F64), V[0, :, -1])
        torch.testing.assert_close(got[:, -1], want_b, rtol=1e-9, atol=1e-11)


def wide_head_cnn(channels: int = 6, length: int = 16) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(2, channels, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * length, 2),
    )


def test_the_flatten_linear_pattern_is_detected_above_the_limit_and_declarable():
    model = wide_head_cnn()
    assert type(discover(model).blocks["3"]).__name__ == "LinearBlock"  # below the limit
    found = discover(model, structures=StructurePolicy(max_size=64))
    head = found.blocks["3"]
    assert isinstance(head, DoublyFactoredLinearBlock) and (head.channels, head.locations) == (
        6,
        16,
    )
    assert "DoublyFactoredLinearBlock (6 x 16 map)" in summary_table(found)
    declared = discover(model, structures=StructurePolicy(overrides={"3": "doubly-factored:3"}))
    assert (declared.blocks["3"].channels, declared.blocks["3"].locations) == (3, 32)
    plain = nn.Sequential(nn.Linear(4, 96), nn.Linear(96, 2))
    assert type(discover(plain, structures=StructurePolicy(max_size=64)).blocks["1"]).__name__ == (
        "LinearBlock"  # no Flatten before it: block-diagonal instead
    )
    with pytest.raises(ValueError, match="doubly-factored:<channels>"):
        discover(plain, structures=StructurePolicy(overrides={"1": "doubly-factored"}))
    with pytest.raises(ValueError, match="factor_structure"):
        KFACCallback(factor_structure={"1": {"G": "doubly-factored"}})


def sequence_data(n: int = 144):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, 16, generator=generator)
    y = (x[:, 0].mean(1) > x[:, 1].mean(1)).long()
    return torch.utils.data.TensorDataset(x, y)


def _fit(devices: int, local_batch: int):
    torch.manual_seed(0)
    module = Classifier(wide_head_cnn(), lr=0.05)
    callback = KFACCallback(inv_update_freq=2, verbose=False, max_factor_size=64)
    extra = dict(strategy=KFACDDPStrategy(start_method="spawn")) if devices > 1 else {}
    trainer(
        devices=devices, callbacks=[callback], max_steps=6, use_distributed_sampler=False, **extra
    ).fit(module, datamodule=InterleavedData(sequence_data(), local_batch))
    return module, callback


def test_doubly_factored_trains_and_two_ranks_equal_one_process():
    single, callback = _fit(1, 24)
    assert isinstance(callback.engine.blocks["net.3"], DoublyFactoredLinearBlock)
    double, _ = _fit(2, 12)
    for (name, p), q in zip(double.named_parameters(), single.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
