"""Large factors (reference, section 12): block-diagonal and diagonal sides, chosen by a size
limit or per layer; the dense path unchanged below the limit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACCallback, KFACDDPStrategy
from lightning_kfac.blocks import LinearBlock
from lightning_kfac.capture import FactorCapture
from lightning_kfac.discovery import discover, summary_table
from lightning_kfac.structure import FactorStructure, StructurePolicy
from tests.helpers import Classifier, InterleavedData, classification_data, mlp, trainer

F64 = torch.float64
N, D_IN, D_OUT = 40, 9, 7


def captured(block: LinearBlock, x: torch.Tensor, target: torch.Tensor) -> dict:
    capture = FactorCapture({"m": block}, loss_reduction="mean", dtype=F64)
    capture.attach()
    capture.start_microbatch(examples=N)
    F.cross_entropy(block.module(x), target).backward()
    factors = capture.pop()["m"].factors
    capture.detach()
    return factors


def decomposed(block: LinearBlock, factors: dict) -> dict:
    out = {}
    for key, matrix in factors.items():
        [(decomposition, report)] = block.decomposition_method(key).decompose([matrix], 0.0)
        assert report.outcome == "ok"
        out[key] = block.rebuild(key, decomposition.tensors())  # through the wire format
    return out


def structured(a: FactorStructure, g: FactorStructure):
    torch.manual_seed(0)
    layer = nn.Linear(D_IN, D_OUT).double()
    block = LinearBlock(layer)
    block.set_structure(a, g)
    x = torch.randn(N, D_IN, dtype=F64)
    target = torch.randint(0, D_OUT, (N,))
    return layer, block, x, target


def dense_factors(layer, x, target):
    """A and G by explicit per-example sums (reference, section 2)."""
    a_rows = torch.cat([x, torch.ones(N, 1, dtype=F64)], dim=1)
    out = layer(x).detach().requires_grad_()
    F.cross_entropy(out, target).backward()
    g_hat = N * out.grad
    A = sum(torch.outer(a, a) for a in a_rows) / N
    G = sum(torch.outer(g, g) for g in g_hat) / N
    return A, G


def as_matrix(structure: FactorStructure, factors: dict, side: str, dense: torch.Tensor):
    """The structured factor as a full matrix: the diagonal blocks (or the diagonal)."""
    if structure.kind == "diagonal":
        return torch.diag(factors[side][0])
    return torch.block_diag(*(factors[key][0] for key in structure.keys(side)))


def expected_structure(structure: FactorStructure, dense: torch.Tensor) -> torch.Tensor:
    if structure.kind == "diagonal":
        return torch.diag(torch.diagonal(dense))
    blocks, start = [], 0
    for size in structure.sizes:
        blocks.append(dense[start : start + size, start : start + size])
        start += size
    return torch.block_diag(*blocks)


CASES = {
    "A blocks, G dense": (
        FactorStructure.block_diagonal(D_IN + 1, 4),
        FactorStructure.dense(D_OUT),
    ),
    "A dense, G blocks": (
        FactorStructure.dense(D_IN + 1),
        FactorStructure.block_diagonal(D_OUT, 3),
    ),
    "A diagonal, G blocks": (
        FactorStructure.diagonal(D_IN + 1),
        FactorStructure.block_diagonal(D_OUT, 2),
    ),
    "A blocks, G diagonal": (
        FactorStructure.block_diagonal(D_IN + 1, 6),
        FactorStructure.diagonal(D_OUT),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", ["exact", "factored"])
def test_structured_factors_and_step_match_an_explicit_dense_reference(case, method):
    a, g = CASES[case]
    layer, block, x, target = structured(a, g)
    factors = captured(block, x, target)
    A_dense, G_dense = dense_factors(layer, x, target)
    A_s, G_s = as_matrix(a, factors, "A", A_dense), as_matrix(g, factors, "G", G_dense)
    torch.testing.assert_close(A_s, expected_structure(a, A_dense), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(G_s, expected_structure(g, G_dense), rtol=1e-12, atol=1e-13)

    damping = 0.03
    V = torch.randn(1, D_OUT, D_IN + 1, dtype=F64)
    got = block.precondition(V, decomposed(block, factors), damping, method)[0]
    eye_a, eye_g = torch.eye(D_IN + 1, dtype=F64), torch.eye(D_OUT, dtype=F64)
    if method == "exact":  # (G_s (x) A_s + lambda I)^-1 vec(V), row-major vec
        curvature = torch.kron(G_s, A_s) + damping * torch.eye((D_IN + 1) * D_OUT, dtype=F64)
        want = torch.linalg.solve(curvature, V[0].reshape(-1)).reshape(D_OUT, D_IN + 1)
    else:  # (G_s + sqrt(lambda)/pi I)^-1 V (A_s + pi sqrt(lambda) I)^-1
        pi = ((torch.trace(A_s) / (D_IN + 1)) / (torch.trace(G_s) / D_OUT)).sqrt()
        left = torch.linalg.inv(G_s + damping**0.5 / pi * eye_g)
        want = left @ V[0] @ torch.linalg.inv(A_s + pi * damping**0.5 * eye_a)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_one_block_equals_dense():
    one = FactorStructure.block_diagonal(D_IN + 1, 100)
    assert one.sizes == (D_IN + 1,)
    _, block_one, x, target = structured(one, FactorStructure.block_diagonal(D_OUT, 100))
    _, block_dense, _, _ = structured(FactorStructure.dense(D_IN + 1), FactorStructure.dense(D_OUT))
    f_one, f_dense = captured(block_one, x, target), captured(block_dense, x, target)
    torch.testing.assert_close(f_one["A0"], f_dense["A"], rtol=0, atol=0)
    torch.testing.assert_close(f_one["G0"], f_dense["G"], rtol=0, atol=0)
    V = torch.randn(1, D_OUT, D_IN + 1, dtype=F64)
    for method in ("exact", "factored"):
        got = block_one.precondition(V, decomposed(block_one, f_one), 0.01, method)
        want = block_dense.precondition(V, decomposed(block_dense, f_dense), 0.01, method)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def test_block_diagonal_blocks_are_nearly_equal():
    assert FactorStructure.block_diagonal(1001, 256).sizes == (251, 250, 250, 250)
    assert FactorStructure.block_diagonal(10, 5).sizes == (5, 5)


def test_size_limit_overrides_summary_and_unmatched_patterns():
    model = nn.Sequential(nn.Linear(300, 20), nn.ReLU(), nn.Linear(20, 10), nn.Linear(10, 600))
    policy = StructurePolicy(
        max_size=256,
        block_size=128,
        overrides={"2": "diagonal", "3": {"G": "dense"}, "x*": "dense"},
    )
    found = discover(model, structures=policy)
    blocks = found.blocks
    assert (
        blocks["0"].a_structure.sizes == (101, 100, 100) and blocks["0"].g_structure.kind == "dense"
    )
    assert blocks["2"].a_structure.kind == "diagonal" and blocks["2"].g_structure.kind == "diagonal"
    assert blocks["3"].g_structure.kind == "dense"  # 600 > 256, but overridden
    table = summary_table(found)
    assert "LinearBlock (A 3 blocks of 100-101)" in table and "A0-A2 100x100..101x101" in table
    assert ("factor_structure", "x*") in found.unmatched_patterns
    assert discover(model).blocks["0"].dense  # below the default limit: dense


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_factor_size=0), "max_factor_size"),
        (dict(factor_block_size=1.5), "factor_block_size"),
        (dict(large_factors="sparse"), "large_factors"),
        (dict(factor_structure={"head": "low-rank"}), "factor_structure"),
        (dict(factor_structure={"head": {"B": "dense"}}), "factor_structure"),
    ],
)
def test_bad_structure_options_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KFACCallback(**kwargs)


def _fit(devices: int, local_batch: int, **kfac):
    torch.manual_seed(0)
    module = Classifier(mlp(), lr=0.05)
    callback = KFACCallback(inv_update_freq=2, verbose=False, **kfac)
    extra = dict(strategy=KFACDDPStrategy(start_method="spawn")) if devices > 1 else {}
    trainer(
        devices=devices, callbacks=[callback], max_steps=6, use_distributed_sampler=False, **extra
    ).fit(module, datamodule=InterleavedData(classification_data(144), local_batch))
    return module, callback


def test_structured_blocks_train_and_two_ranks_equal_one_process():
    structures = dict(
        max_factor_size=8, factor_block_size=5, factor_structure={"net.2": "diagonal"}
    )
    single, callback = _fit(1, 24, **structures)
    kinds = {name: block.kind for name, block in callback.engine.blocks.items()}
    assert any("blocks" in kind for kind in kinds.values()), kinds
    assert any("diagonal" in kind for kind in kinds.values()), kinds
    dense, _ = _fit(1, 24)
    assert any(not torch.allclose(p, q) for p, q in zip(single.parameters(), dense.parameters()))
    double, _ = _fit(2, 12, **structures)
    for (name, p), q in zip(double.named_parameters(), single.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
