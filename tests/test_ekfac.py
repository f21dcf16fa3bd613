"""Eigenvalue-corrected K-FAC (reference, section 14): second moments of the per-example
gradients in the Kronecker eigenbasis, reset at every install, against explicit loops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_kfac import KFACCallback, KFACDDPStrategy
from lightning_kfac.blocks import ConvBlock, LinearBlock
from lightning_kfac.curvature import KroneckerBlock
from lightning_kfac.distribution import DataParallelDistribution
from lightning_kfac.ekfac import EigenvalueCorrectedBlock, eigenvalue_corrected
from lightning_kfac.engine import KFACEngine
from lightning_kfac.options import DataParallelOptions, KFACOptions
from tests.helpers import (
    Classifier,
    InterleavedData,
    StepIndexedClassifier,
    classification_data,
    dummy_loader,
    replicas_identical,
    trainer,
)

F64 = torch.float64
N, DECAY, DAMPING = 6, 0.8, 1e-3


class Pooled(nn.Module):
    """Linear on every position of ``(N, T, d)`` (or ``(T, N, d)``), mean over positions,
    then a Linear head: an example's rows must be summed before squaring."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)
        self.batch_first = batch_first

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.head(h.mean(1 if self.batch_first else 0))


class Shared(nn.Module):
    """One Linear called twice per forward pass (an unrolled recurrence), on ``(N, d)`` or
    ``(N, T, d)``: an example's rows must be summed over both calls before squaring."""

    def __init__(self, sequence: bool = False) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.sequence = sequence

    def forward(self, x):
        h = torch.tanh(self.body(torch.tanh(self.body(x))))
        return self.head(h.mean(1) if self.sequence else h)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.head = nn.Linear(4 * 6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def model_and_data(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "mlp":
        net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        x = torch.randn(N, 4, dtype=F64)
    elif kind in ("sequence", "sequence-reduce"):
        net, x = Pooled(), torch.randn(N, 7, 4, dtype=F64)
    elif kind == "sequence-first":
        net, x = Pooled(batch_first=False), torch.randn(7, N, 4, dtype=F64)
    elif kind in ("shared", "shared-subset"):
        net, x = Shared(), torch.randn(N, 4, dtype=F64)
    elif kind == "shared-sequence":
        net, x = Shared(sequence=True), torch.randn(N, 7, 4, dtype=F64)
    else:
        net, x = ConvNet(), torch.randn(N, 2, 6, dtype=F64)
    y = torch.randint(0, 3, (N,))
    return net.double(), x, y


def example(kind: str, x: torch.Tensor, n: int) -> torch.Tensor:
    return x[:, n : n + 1] if kind == "sequence-first" else x[n : n + 1]


def blocks_of(net: nn.Module, ekfac: bool) -> dict:
    found = {
        name: LinearBlock(m) if isinstance(m, nn.Linear) else ConvBlock(m)
        for name, m in net.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv1d))
    }
    return eigenvalue_corrected(found) if ekfac else found


def engine_for(net, ekfac=True, reduce=(), factor_examples=None, **options) -> KFACEngine:
    settings = dict(
        damping=DAMPING,
        factor_decay=DECAY,
        inv_update_freq=100,
        kl_clip=None,
        factor_dtype="float64",
        eigenvalue_correction=ekfac,
    )
    settings.update(options)
    blocks = blocks_of(net, ekfac)
    for name in reduce:  # K-FAC-reduce for A and G; S still from every example's gradient
        (blocks[name].inner if ekfac else blocks[name]).reduce = True
    for block in blocks.values():
        (block.inner if ekfac else block).factor_examples = factor_examples
    engine = KFACEngine(blocks, KFACOptions(**settings))
    engine.attach()
    return engine


def kfac_step(engine, net, x, y) -> dict[str, torch.Tensor]:
    """One forward/backward/K-FAC step (parameters are not updated); returns the raw
    combined gradients ``V`` of every block, taken before preconditioning."""
    net.zero_grad(set_to_none=True)
    engine.start_microbatch(1.0, examples=N)
    loss = F.cross_entropy(net(x), y)
    engine.begin_backward()
    loss.backward()
    engine.end_backward()
    raw = {name: block.gradient().clone() for name, block in engine.blocks.items()}
    engine.step([{"params": list(net.parameters()), "lr": 0.1}])
    return raw


def combined(layer: nn.Module) -> torch.Tensor:
    """``[W | b]`` of ``layer``'s gradient as ``(d_out, d_in + 1)``."""
    return torch.cat(
        [layer.weight.grad.reshape(layer.weight.shape[0], -1), layer.bias.grad[:, None]], 1
    )


def reference_second_moments(kind, net, x, y, bases, examples=N) -> dict[str, torch.Tensor]:
    """``K sum_n W_n * W_n`` by an explicit loop over examples: each example's gradient of its
    own loss term (times 1/N, as autograd hands it for the mean loss; every call of a module
    called twice included), rotated, squared. From the first ``examples`` examples only,
    scaled by ``N / examples``, for ``factor_examples``."""
    layers = {name: m for name, m in net.named_modules() if name in bases}
    total = {name: 0.0 for name in bases}
    for n in range(examples):
        net.zero_grad(set_to_none=True)
        (F.cross_entropy(net(example(kind, x, n)), y[n : n + 1]) / N).backward()
        for name, (q_a, q_g) in bases.items():
            rotated = q_g.mT @ combined(layers[name]) @ q_a
            total[name] = total[name] + rotated**2
    return {name: N * (N / examples) * value for name, value in total.items()}


KINDS = ["mlp", "sequence", "sequence-reduce", "sequence-first", "conv"]
KINDS += ["shared", "shared-sequence", "shared-subset"]


@pytest.mark.parametrize("kind", KINDS)
def test_second_moments_and_step_match_the_per_example_reference(kind):
    net, x, y = model_and_data(kind)
    examples = 4 if kind == "shared-subset" else N
    engine = engine_for(
        net,
        reduce=["body"] if kind == "sequence-reduce" else (),
        factor_examples=examples if examples < N else None,
    )
    kfac_step(engine, net, x, y)  # step 0: the first decomposition, S reset to e_G e_A^T
    names = list(engine.blocks)
    bases, start = {}, {}
    for name in names:
        decompositions = engine.state[name].decompositions
        a, g = decompositions["A"], decompositions["G"]
        bases[name] = (a.vectors[0], g.vectors[0])
        start[name] = (g.values[0][:, None] * a.values[0][None, :]).clone()
        torch.testing.assert_close(engine.state[name].running["S"][0], start[name])

    x1 = x + 0.5 * torch.randn_like(x)  # another batch, same basis (no decomposition at 1)
    raw = kfac_step(engine, net, x1, y)
    stepped = {name: block.gradient().clone() for name, block in engine.blocks.items()}
    engine.capture.stop()  # the loop's forward passes are not factor batches
    want = reference_second_moments(kind, net, x1, y, bases, examples)
    for name in names:
        s = engine.state[name].running["S"][0]
        expected = DECAY * start[name] + (1 - DECAY) * want[name]
        torch.testing.assert_close(s, expected, rtol=1e-10, atol=1e-14, msg=name)
        # V' = Q_G [(Q_G^T V Q_A) / (S + lambda)] Q_A^T
        q_a, q_g = bases[name]
        v = raw[name][0]
        want_step = q_g @ ((q_g.mT @ v @ q_a) / (expected + DAMPING)) @ q_a.mT
        torch.testing.assert_close(stepped[name][0], want_step, rtol=1e-9, atol=1e-12)


def test_squared_batch_gradient_is_not_what_is_averaged():
    """The mean of squares, not the square of the mean: S differs from (rotated V)**2 * K."""
    net, x, y = model_and_data("mlp")
    engine = engine_for(net)
    kfac_step(engine, net, x, y)
    raw = kfac_step(engine, net, x, y)
    name = "2"
    a, g = engine.state[name].decompositions["A"], engine.state[name].decompositions["G"]
    start = g.values[0][:, None] * a.values[0][None, :]
    squared_mean = N * (g.vectors[0].mT @ raw[name][0] @ a.vectors[0]) ** 2
    s = engine.state[name].running["S"][0]
    assert not torch.allclose(s, DECAY * start + (1 - DECAY) * squared_mean, rtol=1e-3)


def test_first_step_in_a_new_basis_is_kfac_and_reset_holds_under_staleness():
    """S is reset to e_G e_A^T at the step a decomposition is installed (t + s under
    staleness), so that step equals K-FAC's; in between, it is running-averaged."""
    net_e, x, y = model_and_data("mlp")
    net_k, _, _ = model_and_data("mlp")
    options = dict(inv_update_freq=3, staleness=2)
    ekfac, kfac = engine_for(net_e, **options), engine_for(net_k, ekfac=False, **options)
    generator = torch.Generator().manual_seed(5)
    installs, differs = [], []
    for step in range(8):
        batch = x + 0.3 * torch.randn(x.shape, generator=generator, dtype=F64)
        before = ekfac.decomposed_at
        kfac_step(ekfac, net_e, batch, y)
        kfac_step(kfac, net_k, batch, y)
        installed = step == 0 or ekfac.decomposed_at != before
        same = all(
            torch.allclose(ekfac.blocks[n].gradient(), kfac.blocks[n].gradient(), rtol=1e-10)
            for n in ekfac.blocks
        )
        for name in ekfac.blocks:
            decompositions = ekfac.state[name].decompositions
            products = (
                decompositions["G"].values[..., :, None] * decompositions["A"].values[..., None, :]
            )
            reset = torch.equal(ekfac.state[name].running["S"], products)
            assert reset == installed, (step, name)
        (installs if installed else differs).append(same)
    # installs at 0 (synchronous), 3 + 2 = 5; decompositions started at 3 and 6
    assert ekfac.decomposed_at == 3 and len(installs) == 2
    assert all(installs), "the step of an install must equal K-FAC's"
    assert not any(differs), "between installs EKFAC must rescale within the basis"


def test_correction_off_is_todays_kfac():
    """eigenvalue_correction=False (the default) keeps plain Kronecker blocks, whose step is
    the reference's exact-damping K-FAC: Q_G [(Q_G^T V Q_A) / (e_G e_A^T + lambda)] Q_A^T."""
    assert KFACOptions().eigenvalue_correction is False
    net, x, y = model_and_data("mlp")
    engine = engine_for(net, ekfac=False)
    assert all(type(b) is LinearBlock for b in engine.blocks.values()) and not engine._live
    kfac_step(engine, net, x, y)
    raw = kfac_step(engine, net, x, y)
    for name, block in engine.blocks.items():
        a_factor, g_factor = (engine.state[name].running[k][0] for k in "AG")
        e_a, q_a = torch.linalg.eigh(engine.state[name].decomposed["A"][0])
        e_g, q_g = torch.linalg.eigh(engine.state[name].decomposed["G"][0])
        assert a_factor.shape[0] == q_a.shape[0] and g_factor.shape[0] == q_g.shape[0]
        products = e_g.clamp_min(0)[:, None] * e_a.clamp_min(0)[None, :]
        want = q_g @ ((q_g.mT @ raw[name][0] @ q_a) / (products + DAMPING)) @ q_a.mT
        torch.testing.assert_close(block.gradient()[0], want, rtol=1e-8, atol=1e-12)


def test_blocks_and_bad_options():
    layer = nn.Linear(3, 2)
    wrapped = eigenvalue_corrected({"a": LinearBlock(layer), "b": object()})
    assert isinstance(wrapped["a"], EigenvalueCorrectedBlock) and not isinstance(
        wrapped["b"], KroneckerBlock
    )
    assert wrapped["a"].kind == "EKFAC LinearBlock" and wrapped["a"].live_keys() == ("S",)
    assert wrapped["a"].factor_shapes()["S"] == (1, 2, 4)
    with pytest.raises(ValueError, match="damping_method='exact'"):
        KFACCallback(eigenvalue_correction=True, damping_method="factored")
    with pytest.raises(ValueError, match="eigenvalue_correction must be True or False"):
        KFACCallback(eigenvalue_correction="yes")

    class TwoRanks:
        world_size, rank = 2, 0

        def all_gather_object(self, obj):
            return [obj, obj]

    distribution = DataParallelDistribution(
        TwoRanks(), DataParallelOptions(precondition_mode="owner")
    )
    with pytest.raises(ValueError, match="kfac_precondition_mode='shared'"):
        distribution.setup({"a": wrapped["a"]}, torch.float32)


# -- Lightning: checkpoints and two ranks -------------------------------------------------


def square_net() -> nn.Module:
    """The first layer's S is square (13 x 13), which must travel whole, not packed."""
    return nn.Sequential(nn.Linear(12, 13), nn.Tanh(), nn.Linear(13, 3))


def ekfac_callback(**overrides) -> KFACCallback:
    options = dict(
        damping=1e-2, inv_update_freq=3, staleness=1, eigenvalue_correction=True, verbose=False
    )
    options.update(overrides)
    return KFACCallback(**options)


def test_resume_equals_uninterrupted_run(tmp_path):
    data = classification_data(4 * 16)

    def module(seed):
        torch.manual_seed(seed)
        return StepIndexedClassifier(square_net(), data, 16, lr=0.05)

    straight = module(0)
    trainer(callbacks=[ekfac_callback(staleness=2)], max_steps=8).fit(straight, dummy_loader())
    # decompositions at 0, 3 (installed at 5), 6: resumed at 4, one is pending and step 4
    # captures S in the basis of step 0, restored before its forward pass
    t = trainer(callbacks=[ekfac_callback(staleness=2)], max_steps=4)
    t.fit(module(0), dummy_loader())
    path = tmp_path / "half.ckpt"
    t.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["callbacks"]["KFACCallback"]
    assert set(state["running"]["net.0"]) == {"A", "G", "S"} and state["pending"]
    resumed = module(123)
    callback = ekfac_callback(staleness=2)
    trainer(callbacks=[callback], max_steps=8).fit(resumed, dummy_loader(), ckpt_path=path)
    for (name, a), b in zip(resumed.named_parameters(), straight.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


class Report(Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        assert replicas_identical(pl_module), "replicas drifted"

    def on_train_end(self, trainer, pl_module) -> None:
        kfac = next(c for c in trainer.callbacks if isinstance(c, KFACCallback))
        if trainer.global_rank == 0:
            s = kfac.engine.state["net.0"].running["S"]
            Path(self.path).write_text(json.dumps({"S": s.reshape(-1).tolist()}))


def test_two_ranks_equal_one_process_with_double_batch(tmp_path):
    """S is reduced with the factors on every factor update, so 2 ranks with local batch 12
    are the mathematics of 1 process with batch 24 (float64, to round-off); replicas stay
    bitwise identical. Every factor is full rank at batch 24 (the widest is 14): inside a
    repeated eigenvalue the basis, and so S, is whatever round-off makes it."""
    steps = 8
    x, y = classification_data(24 * steps).tensors
    data = torch.utils.data.TensorDataset(x.double(), y)
    torch.manual_seed(0)
    single = Classifier(square_net().double(), lr=0.05)
    one = ekfac_callback()
    trainer(
        callbacks=[one], max_steps=steps, use_distributed_sampler=False, precision="64-true"
    ).fit(single, datamodule=InterleavedData(data, 24))
    torch.manual_seed(0)
    double = Classifier(square_net().double(), lr=0.05)
    report = tmp_path / "report.json"
    trainer(
        devices=2,
        strategy=KFACDDPStrategy(start_method="spawn"),
        callbacks=[ekfac_callback(), Report(str(report))],
        max_steps=steps,
        use_distributed_sampler=False,
        precision="64-true",
    ).fit(double, datamodule=InterleavedData(data, 12))
    torch.manual_seed(0)
    start = square_net().double().parameters()
    assert all(not torch.equal(p, q) for p, q in zip(single.parameters(), start)), "no step"
    for (name, got), want in zip(double.named_parameters(), single.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13, msg=name)
    s_two = torch.tensor(json.loads(report.read_text())["S"], dtype=F64)
    s_one = one.engine.state["net.0"].running["S"].reshape(-1)
    assert s_one.dtype == F64
    torch.testing.assert_close(s_two, s_one, rtol=1e-10, atol=1e-14)


def test_shares_of_calls_sum_to_the_square_of_their_sum():
    """Three calls' shares sum to the square of the sum of their per-example gradients; a
    call that never reports (its backward never came) adds nothing, and the sum is freed
    once every call has reported."""
    from lightning_kfac.ekfac import _Calls

    generator = torch.Generator().manual_seed(0)
    w = [torch.randn(1, N, 3, 5, generator=generator, dtype=F64) for _ in range(3)]
    calls = _Calls(made=3)
    shares = sum(calls.squares(part) for part in w)
    torch.testing.assert_close(shares, (sum(w) ** 2).sum(dim=1), rtol=1e-12, atol=1e-14)
    assert calls.total is None
    partial = _Calls(made=3)
    shares = partial.squares(w[0]) + partial.squares(w[2])
    torch.testing.assert_close(shares, ((w[0] + w[2]) ** 2).sum(dim=1), rtol=1e-12, atol=0)
    assert partial.total is not None  # held until the next forward pass opens a new group
