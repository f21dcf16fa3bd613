"""The curvature-block interface: batching by shape, a kind defined outside the package,
and checkpoints of the previous format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACCallback, KFACDDPStrategy, register_block_type
from lightning_kfac import registry as registry_module
from lightning_kfac.blocks import LinearBlock
from lightning_kfac.decomposition import SYMMETRIC_EIGEN, symmetric_eigen
from lightning_kfac.discovery import discover
from lightning_kfac.engine import KFACEngine
from lightning_kfac.options import KFACOptions
from lightning_kfac.registry import block_type_for
from tests.helpers import (
    Classifier,
    DiagonalLinearBlock,
    InterleavedData,
    classification_data,
    mlp,
    trainer,
)

D = torch.float64
DATA = Path(__file__).parent / "data"


def random_psd(groups: int, d: int) -> torch.Tensor:
    x = torch.randn(groups, d, 2 * d, dtype=D)
    return x @ x.mT / (2 * d)


def test_batched_decomposition_equals_one_at_a_time_and_isolates_failures():
    torch.manual_seed(0)
    matrices = [random_psd(1, 6), random_psd(2, 6), random_psd(1, 6)]
    batched = SYMMETRIC_EIGEN.decompose(matrices, 1e-3)
    for matrix, (eigen, report) in zip(matrices, batched):
        single, _ = symmetric_eigen(matrix, 1e-3)
        assert report.outcome == "ok"
        rebuilt = eigen.vectors @ torch.diag_embed(eigen.values) @ eigen.vectors.mT
        torch.testing.assert_close(rebuilt, matrix, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(eigen.values, single.values, rtol=1e-12, atol=1e-14)
    broken = [matrices[0], torch.full((1, 6, 6), float("nan"), dtype=D), matrices[2]]
    outcomes = SYMMETRIC_EIGEN.decompose(broken, 1e-3)
    assert outcomes[1][0] is None and outcomes[1][1].outcome == "failed"
    assert outcomes[0][0] is not None and outcomes[2][0] is not None


def test_batched_preconditioning_equals_one_block_at_a_time():
    torch.manual_seed(1)
    layers = [nn.Linear(5, 4).to(D) for _ in range(4)]
    blocks = [LinearBlock(layer) for layer in layers]
    assert len({block.batch_key() for block in blocks}) == 1
    decompositions = [
        {key: symmetric_eigen(random_psd(1, d), 0.0)[0] for key, d in (("A", 6), ("G", 4))}
        for _ in blocks
    ]
    grads = [torch.randn(1, 4, 6, dtype=D) for _ in blocks]
    for method in ("exact", "factored"):
        operator = LinearBlock.operator(blocks, decompositions, 0.03, method)
        batched = operator(grads)
        for block, grad, decomposition, got in zip(blocks, grads, decompositions, batched):
            want = block.precondition(grad, decomposition, 0.03, method)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_engine_step_batches_layers_of_one_shape_and_matches_dense_solve():
    """A deep narrow MLP: the batched step equals the explicit (G kron A + lambda I) solve."""
    torch.manual_seed(2)
    model = nn.Sequential(*[nn.Linear(6, 6) for _ in range(5)], nn.Linear(6, 3)).to(D)
    blocks = discover(model).blocks
    engine = KFACEngine(blocks, KFACOptions(damping=0.1, kl_clip=None), warn=lambda m: None)
    engine.attach()
    engine.start_microbatch()
    x, y = torch.randn(16, 6, dtype=D), torch.randint(0, 3, (16,))
    F.cross_entropy(model(x), y).backward()
    raw = {name: block.gradient().clone() for name, block in blocks.items()}
    engine.step([{"params": list(model.parameters()), "lr": 0.1}])
    assert engine.dtype == D  # factors follow float64 parameters
    for name, block in blocks.items():
        A, G = engine.factors()[name]
        dense = torch.kron(G, A) + 0.1 * torch.eye(G.shape[0] * A.shape[0], dtype=D)
        want = torch.linalg.solve(dense, raw[name][0].reshape(-1)).reshape(raw[name][0].shape)
        torch.testing.assert_close(block.gradient()[0], want, rtol=1e-9, atol=1e-12)


# -- a block kind defined outside the package ----------------------------------------------


def diagonal_reference(model: nn.Sequential, x, y, damping: float) -> dict[str, torch.Tensor]:
    """The diagonal block's preconditioned weight gradients, from per-example loops."""
    n = x.shape[0]
    out = {}
    inputs = {}
    h = x
    for index, layer in enumerate(model):
        if isinstance(layer, nn.Linear):
            inputs[str(index)] = h
        h = layer(h)
    for name, a in inputs.items():
        layer = model[int(name)]
        g_sq = torch.zeros(layer.out_features, dtype=D)
        outputs: list[torch.Tensor] = []

        def keep(module, args, output, store=outputs):
            output.retain_grad()
            store.append(output)

        handle = layer.register_forward_hook(keep)
        for i in range(n):  # g-hat of example i from its own loss
            F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
            g_sq += outputs[-1].grad[0] ** 2
            model.zero_grad()
        handle.remove()
        curvature = torch.outer(g_sq / n, (a**2).mean(0))
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        out[name] = layer.weight.grad / (curvature + damping)
        model.zero_grad()
    return out


@pytest.fixture
def clean_registry():
    saved = dict(registry_module._BLOCK_TYPES)
    yield
    registry_module._BLOCK_TYPES.clear()
    registry_module._BLOCK_TYPES.update(saved)


def test_a_kind_registered_through_the_public_function_trains(clean_registry):
    torch.manual_seed(3)
    register_block_type(nn.Linear, DiagonalLinearBlock)
    assert block_type_for(nn.Linear(2, 2)) is DiagonalLinearBlock
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(D)
    x, y = torch.randn(8, 4, dtype=D), torch.randint(0, 3, (8,))
    want = diagonal_reference(model, x, y, damping=0.05)
    engine = KFACEngine(
        discover(model).blocks, KFACOptions(damping=0.05, kl_clip=None), warn=lambda m: None
    )
    assert {type(b) for b in engine.blocks.values()} == {DiagonalLinearBlock}
    engine.attach()
    engine.start_microbatch()
    F.cross_entropy(model(x), y).backward()
    engine.step([{"params": list(model.parameters()), "lr": 0.1}])
    for name, grad in want.items():
        torch.testing.assert_close(model[int(name)].weight.grad, grad, rtol=1e-9, atol=1e-12)
    module = Classifier(mlp(), lr=0.05)
    callback = KFACCallback(verbose=False)
    trainer(callbacks=[callback], max_steps=4).fit(
        module, datamodule=InterleavedData(classification_data(96), 24)
    )
    assert {type(b) for b in callback.engine.blocks.values()} == {DiagonalLinearBlock}
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_register_block_type_rejects_bad_arguments():
    with pytest.raises(ValueError, match="module_type"):
        register_block_type("Linear", DiagonalLinearBlock)
    with pytest.raises(ValueError, match="block_type"):
        register_block_type(nn.Linear, 3)


def _diagonal_fit(devices: int, local_batch: int):
    torch.manual_seed(0)
    module = Classifier(mlp(), lr=0.05)
    callback = KFACCallback(
        block_types={nn.Linear: DiagonalLinearBlock}, inv_update_freq=2, verbose=False
    )
    extra = dict(strategy=KFACDDPStrategy(start_method="spawn")) if devices > 1 else {}
    trainer(
        devices=devices, callbacks=[callback], max_steps=6, use_distributed_sampler=False, **extra
    ).fit(module, datamodule=InterleavedData(classification_data(144), local_batch))
    return module, callback


def test_a_kind_outside_the_package_under_kfac_ddp_equals_one_process():
    single, callback = _diagonal_fit(1, 24)
    assert {type(b) for b in callback.engine.blocks.values()} == {DiagonalLinearBlock}
    double, _ = _diagonal_fit(2, 12)
    torch.manual_seed(0)
    plain = Classifier(mlp(), lr=0.05)
    trainer(max_steps=6, use_distributed_sampler=False).fit(
        plain, datamodule=InterleavedData(classification_data(144), 24)
    )
    for (name, p), q in zip(double.named_parameters(), single.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    assert any(not torch.allclose(q, r) for q, r in zip(single.parameters(), plain.parameters()))


# -- checkpoints of the previous format ---------------------------------------------------


def _format1_engine():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    options = KFACOptions(inv_update_freq=2, staleness=1, factor_dtype="float64")
    return model, KFACEngine(discover(model).blocks, options, warn=lambda m: None)


def test_a_format_1_checkpoint_loads_and_continues_as_the_version_that_wrote_it():
    """``tests/data/format1_state.pt``: written by lightning-kfac 0.1.0 after 5 steps of this
    model (a background decomposition pending), with its weights and the weights 3 steps
    later as that version computed them."""
    saved = torch.load(DATA / "format1_state.pt", weights_only=True)
    assert saved["kfac"]["format"] == 1 and saved["kfac"]["pending"] is not None
    model, engine = _format1_engine()
    model.load_state_dict(saved["model"])
    torch.manual_seed(0)
    torch.nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))  # same RNG as the writer
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    engine.load_state_dict(saved["kfac"])
    assert engine.steps == 5 and engine.pending.install_step == 5
    engine.attach()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        engine.start_microbatch()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        engine.step(optimizer.param_groups)
        optimizer.step()
    engine.close()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, saved["after_3_steps"][name], rtol=1e-6, atol=1e-7)
    assert engine.state_dict()["format"] == 2


def test_a_checkpoint_of_an_unknown_format_is_refused_naming_both_versions():
    _, engine = _format1_engine()
    with pytest.raises(ValueError, match=r"format 7.*formats 1 and 2"):
        engine.load_state_dict({"format": 7})
