"""nn.Embedding (reference, section 9) and normalisation layers (section 10) against
per-example float64 references built here, in the engine, a Trainer fit and 2 ranks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_kfac import KFACCallback, KFACDDPStrategy
from lightning_kfac.decomposition import DIAGONAL, Diagonal
from lightning_kfac.discovery import discover, summary_table
from lightning_kfac.embedding import SCALE_GRAD_BY_FREQ_REASON, SPARSE_REASON, EmbeddingBlock
from lightning_kfac.engine import KFACEngine
from lightning_kfac.normalization import (
    NO_AFFINE_REASON,
    BatchNormBlock,
    GroupNormBlock,
    LayerNormBlock,
    RMSNormBlock,
    damped_inverse,
)
from lightning_kfac.options import KFACOptions
from tests.helpers import (
    AssertReplicasIdentical,
    Classifier,
    InterleavedData,
    TokenNet,
    loader,
    token_data,
    trainer,
)

D = torch.float64


def engine_step(model, forward, *, damping=0.1, method="exact", kl_clip=None, **microbatch):
    """One K-FAC step on ``model``; ``forward()`` returns the loss. Returns the engine and
    every parameter's raw gradient."""
    options = KFACOptions(
        damping=damping, kl_clip=kl_clip, damping_method=method, factor_dtype="float64"
    )
    engine = KFACEngine(discover(model).blocks, options, warn=lambda m: None)
    engine.attach()
    engine.start_microbatch(**microbatch)
    forward().backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    engine.step([{"params": list(model.parameters()), "lr": 0.1}])
    return engine, raw


def keep_outputs(module: nn.Module) -> list[torch.Tensor]:
    """Every output of ``module`` from now on, with its gradient retained."""
    outputs: list[torch.Tensor] = []

    def hook(_, args, output):
        output.retain_grad()
        outputs.append(output)

    module.register_forward_hook(hook)
    return outputs


# -- nn.Embedding -----------------------------------------------------------------------------


class Pooled(nn.Module):
    """Two lookups per example (the tokens and their reverse), pooled: a per-example loss."""

    def __init__(self, vocab=7, dim=4, classes=3, **embedding) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim, **embedding)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        e = self.embedding(x) + 0.5 * self.embedding(x.flip(1)).tanh()
        return self.head(e.mean(1).tanh())


def tokens(n: int, t: int, vocab: int) -> torch.Tensor:
    x = torch.randint(0, vocab - 1, (n, t))  # the last index is never looked up
    x[0, -2:] = 0  # padding
    return x


def test_embedding_factors_per_example_loss():
    """c: every lookup of every call over R; G = (1/N) sum over rows of every call of the
    per-example g-hat outer products (K = N)."""
    torch.manual_seed(0)
    n, t, vocab = 6, 5, 7
    model = Pooled(vocab, padding_idx=0).to(D)
    x, y = tokens(n, t, vocab), torch.randint(0, 3, (n,))
    engine, _ = engine_step(model, lambda: F.cross_entropy(model(x), y), examples=n)
    assert isinstance(engine.blocks["embedding"], EmbeddingBlock)
    c, G = engine.factors()["embedding"]

    lookups = torch.cat([x.reshape(-1), x.flip(1).reshape(-1)])
    want_c = torch.tensor([float((lookups == v).sum()) for v in range(vocab)], dtype=D)
    want_c /= lookups.numel()
    want_g = torch.zeros(4, 4, dtype=D)
    outputs = keep_outputs(model.embedding)
    for i in range(n):
        outputs.clear()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for output in outputs:  # both calls
            for s in range(t):
                g_hat = output.grad[0, s]
                want_g += torch.outer(g_hat, g_hat)
    want_g /= n
    torch.testing.assert_close(c, want_c, rtol=1e-12, atol=0)
    assert c[0] > 0 and c[-1] == 0  # padding counted, unseen index not
    torch.testing.assert_close(G, want_g, rtol=1e-10, atol=1e-14)


def test_embedding_factors_token_mean_loss():
    """A language model's loss averages over tokens: K = N*T, every token a term."""
    torch.manual_seed(1)
    n, t, vocab, classes = 4, 6, 9, 5
    model = nn.Sequential(nn.Embedding(vocab, 3), nn.Tanh(), nn.Linear(3, classes)).to(D)
    x, y = torch.randint(0, vocab, (n, t)), torch.randint(0, classes, (n, t))

    def loss():
        return F.cross_entropy(model(x).reshape(-1, classes), y.reshape(-1))

    engine, _ = engine_step(model, loss, examples=n, loss_terms="positions")
    _, G = engine.factors()["0"]
    want = torch.zeros(3, 3, dtype=D)
    outputs = keep_outputs(model[0])
    for i in range(n):
        for s in range(t):  # the token's own loss term
            outputs.clear()
            F.cross_entropy(
                model(x[i : i + 1, s : s + 1]).reshape(1, -1), y[i, s : s + 1]
            ).backward()
            g_hat = outputs[0].grad.reshape(-1)
            want += torch.outer(g_hat, g_hat)
    torch.testing.assert_close(G, want / (n * t), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("method", ["exact", "factored"])
@pytest.mark.parametrize("max_norm", [None, 0.8])
def test_embedding_preconditioned_gradient_matches_dense_solve(method, max_norm):
    """grad W is V x d; the Kronecker orientation is grad W^T (d x V) with F = G (x) diag(c)."""
    torch.manual_seed(2)
    n, t, vocab, damping = 5, 4, 7, 0.03
    model = Pooled(vocab, padding_idx=0, max_norm=max_norm).to(D)
    x, y = tokens(n, t, vocab), torch.randint(0, 3, (n,))
    engine, raw = engine_step(
        model, lambda: F.cross_entropy(model(x), y), damping=damping, method=method, examples=n
    )
    assert set(engine.blocks) == {"embedding", "head"}
    c, G = engine.factors()["embedding"]
    grad = raw["embedding.weight"]  # (V, d)
    d = grad.shape[1]
    if method == "exact":
        dense = torch.kron(G, torch.diag(c)) + damping * torch.eye(d * vocab, dtype=D)
        want = torch.linalg.solve(dense, grad.T.reshape(-1)).reshape(d, vocab).T
    else:
        pi = math.sqrt(float(c.mean()) / float(torch.trace(G) / d))
        root = math.sqrt(damping)
        g_inv = torch.linalg.inv(G + root / pi * torch.eye(d, dtype=D))
        a_inv = torch.linalg.inv(torch.diag(c) + pi * root * torch.eye(vocab, dtype=D))
        want = (g_inv @ grad.T @ a_inv).T
    got = model.embedding.weight.grad
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert torch.equal(got[0], torch.zeros(d, dtype=D))  # padding_idx
    assert torch.equal(got[-1], torch.zeros(d, dtype=D))  # never looked up
    assert not torch.allclose(got, grad)


def test_rejected_embedding_options_are_listed_with_the_reason():
    model = nn.Sequential(
        nn.Embedding(5, 3, scale_grad_by_freq=True),
        nn.Embedding(5, 3, sparse=True),
        nn.Embedding(5, 3, max_norm=1.0, padding_idx=2),
        nn.Linear(3, 2),
    )
    found = discover(model)
    assert set(found.blocks) == {"2", "3"}
    assert {s.name: s.reason for s in found.skipped} == {
        "0": SCALE_GRAD_BY_FREQ_REASON,
        "1": SPARSE_REASON,
    }
    lines = summary_table(found).splitlines()
    assert f"  0 (Embedding): {SCALE_GRAD_BY_FREQ_REASON}" in lines
    assert f"  1 (Embedding): {SPARSE_REASON}" in lines
    row = next(line for line in lines if line.strip().startswith("2 "))
    assert [cell.strip() for cell in row.split("|")] == [
        "2",
        "Embedding",
        "EmbeddingBlock",
        "A diag 5, G 3x3",
    ]


def test_diagonal_method_copies_clips_and_fails_on_non_finite():
    vectors = [torch.tensor([[1.0, -1e-9, 3.0]]), torch.tensor([[float("nan"), 1.0, 2.0]])]
    (ok, report), (failed, bad) = DIAGONAL.decompose(vectors, 1e-3)
    assert isinstance(ok, Diagonal) and report.outcome == "ok" and bad.outcome == "failed"
    assert failed is None and ok.values.tolist() == [[1.0, 0.0, 3.0]]
    assert ok.mean_eigenvalue.tolist() == [pytest.approx(4 / 3)]
    assert vectors[0][0, 1] < 0  # the factor itself is untouched


# -- normalisation layers ---------------------------------------------------------------------


def affine(module: nn.Module) -> nn.Module:
    """Random gamma and beta, and running statistics, so that no term is trivially zero."""
    with torch.no_grad():
        module.weight.copy_(1 + 0.5 * torch.randn_like(module.weight))
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(torch.randn_like(module.bias))
        if getattr(module, "running_mean", None) is not None:
            module.running_mean.copy_(torch.randn_like(module.running_mean))
            module.running_var.copy_(0.5 + torch.rand_like(module.running_var))
    return module


class NormNet(nn.Module):
    """``norm`` on the input, then a nonlinear per-example head (``sequence_first``: the
    layer sees ``(T, N, d)``)."""

    def __init__(self, norm: nn.Module, shape: tuple[int, ...], sequence_first: bool) -> None:
        super().__init__()
        self.norm = norm
        self.sequence_first = sequence_first
        self.head = nn.Linear(math.prod(shape), 3)

    def forward(self, x):
        h = self.norm(x)
        if self.sequence_first:
            h = h.transpose(0, 1)
        return self.head(torch.sin(2 * h).flatten(1))


N = 6


def case(make, shape, block, elements, dim, sequence_first=False, evaluate=False):
    """A layer, its per-example input shape, its block class, its elements and block side,
    whether it sees ``(T, N, ...)`` and whether it runs in eval mode."""
    return make, shape, block, elements, dim, sequence_first, evaluate


NORM_CASES = {
    "layernorm": case(lambda: nn.LayerNorm(5), (4, 5), LayerNormBlock, 5, 2),
    "layernorm-no-bias": case(lambda: nn.LayerNorm(5, bias=False), (4, 5), LayerNormBlock, 5, 1),
    "layernorm-multi-dim": case(
        lambda: nn.LayerNorm((3, 4), eps=1e-3), (2, 3, 4), LayerNormBlock, 12, 2
    ),
    "layernorm-sequence-first": case(lambda: nn.LayerNorm(5), (4, 5), LayerNormBlock, 5, 2, True),
    "rmsnorm": case(lambda: nn.RMSNorm(5), (4, 5), RMSNormBlock, 5, 1),
    "rmsnorm-multi-dim-eps": case(lambda: nn.RMSNorm((2, 3), eps=0.5), (2, 3), RMSNormBlock, 6, 1),
    "groupnorm": case(lambda: nn.GroupNorm(2, 4), (4, 5), GroupNormBlock, 4, 2),
    "groupnorm-2d": case(lambda: nn.GroupNorm(3, 6, eps=0.1), (6, 2, 3), GroupNormBlock, 6, 2),
    "batchnorm1d-train": case(lambda: nn.BatchNorm1d(4), (4,), BatchNormBlock, 4, 2),
    "batchnorm1d-sequence-train": case(lambda: nn.BatchNorm1d(4), (4, 3), BatchNormBlock, 4, 2),
    "batchnorm2d-train": case(lambda: nn.BatchNorm2d(3), (3, 2, 2), BatchNormBlock, 3, 2),
    "batchnorm2d-eval": case(
        lambda: nn.BatchNorm2d(3, eps=0.1), (3, 2, 2), BatchNormBlock, 3, 2, evaluate=True
    ),
    "batchnorm3d-eval-frozen-bias": case(
        lambda: nn.BatchNorm3d(2), (2, 2, 1, 2), BatchNormBlock, 2, 1, evaluate=True
    ),
    "batchnorm2d-no-running-stats-eval": case(
        lambda: nn.BatchNorm2d(3, track_running_stats=False),
        (3, 2, 2),
        BatchNormBlock,
        3,
        2,
        evaluate=True,
    ),
}


def norm_setup(case: str, seed: int):
    make, shape, block_type, elements, dim, sequence_first, evaluate = NORM_CASES[case]
    torch.manual_seed(seed)
    norm = affine(make().to(D))
    if "frozen-bias" in case:
        norm.bias.requires_grad_(False)
    model = NormNet(norm, shape, sequence_first).to(D)
    if evaluate:
        model.eval()
    x = 1.5 * torch.randn(N, *shape, dtype=D) + 0.3
    if sequence_first:
        x = x.transpose(0, 1).contiguous()  # (T, N, d), T != N
    return model, x, block_type, elements, dim


def per_example_gradients(model: NormNet, losses) -> torch.Tensor:
    """``(N, elements, dim)``: the gradient of each example's loss term with respect to
    gamma (and beta), by autograd on the whole-batch forward."""
    norm = model.norm
    params = [norm.weight] + (
        [norm.bias] if getattr(norm, "bias", None) is not None and norm.bias.requires_grad else []
    )
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        rows.append(torch.stack([g.reshape(-1) for g in grads], dim=-1))
    return torch.stack(rows)


@pytest.mark.parametrize("case", list(NORM_CASES))
def test_norm_factors_and_preconditioned_gradient_match_per_example_reference(case):
    model, x, block_type, elements, dim = norm_setup(case, seed=3)
    y = torch.randint(0, 3, (N,))
    damping = 0.02
    engine, raw = engine_step(
        model, lambda: F.cross_entropy(model(x), y), damping=damping, examples=N
    )
    assert isinstance(engine.blocks["norm"], block_type)
    (got,) = engine.factors()["norm"]

    out = model(x)
    w_hat = per_example_gradients(
        model, [F.cross_entropy(out[i : i + 1], y[i : i + 1]) for i in range(N)]
    )
    want = torch.einsum("nci,ncj->cij", w_hat, w_hat) / N  # K = N
    assert got.shape == (elements, dim, dim)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)

    columns = [raw["norm.weight"].reshape(-1)]
    if dim == 2:
        columns.append(raw["norm.bias"].reshape(-1))
    v = torch.stack(columns, dim=-1)
    solved = torch.stack(
        [
            torch.linalg.solve(want[c] + damping * torch.eye(dim, dtype=D), v[c])
            for c in range(elements)
        ]
    )
    norm = model.norm
    torch.testing.assert_close(norm.weight.grad.reshape(-1), solved[:, 0], rtol=1e-9, atol=1e-12)
    if dim == 2:
        torch.testing.assert_close(norm.bias.grad.reshape(-1), solved[:, 1], rtol=1e-9, atol=1e-12)
    elif getattr(norm, "bias", None) is not None:
        assert norm.bias.grad is None  # frozen
    assert not torch.allclose(norm.weight.grad, raw["norm.weight"])


def test_sequence_first_layernorm_with_a_token_mean_loss():
    """(T, N, d) input and a loss averaged over the N*T tokens: F = K sum_n w w^T with w the
    per-example sums, i.e. (1/K) sum_n s s^T with s the gradient of example n's terms."""
    torch.manual_seed(4)
    t, n, d, classes = 3, 5, 4, 3
    norm = affine(nn.LayerNorm(d).to(D))
    head = nn.Linear(d, classes).to(D)
    model = nn.Sequential(norm, nn.Tanh(), head)
    x = torch.randn(t, n, d, dtype=D)
    y = torch.randint(0, classes, (t, n))

    def loss():
        return F.cross_entropy(model(x).reshape(-1, classes), y.reshape(-1))

    engine, _ = engine_step(model, loss, examples=n, loss_terms="positions")
    (got,) = engine.factors()["0"]
    out = model(x)
    terms = F.cross_entropy(out.reshape(-1, classes), y.reshape(-1), reduction="none")
    terms = terms.reshape(t, n)
    s = []
    for i in range(n):
        grads = torch.autograd.grad(terms[:, i].sum(), [norm.weight, norm.bias], retain_graph=True)
        s.append(torch.stack(grads, dim=-1))
    s = torch.stack(s)
    want = torch.einsum("nci,ncj->cij", s, s) / (n * t)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def test_layernorm_in_a_transformer_encoder_layer_sequence_first():
    """torch's own encoder layer (batch_first=False) feeds its LayerNorms (T, N, d)."""
    torch.manual_seed(5)
    t, n, d = 3, 4, 8
    layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0).to(D)
    head = nn.Linear(d, 2).to(D)
    for norm in (layer.norm1, layer.norm2):
        affine(norm)
    x, y = torch.randn(t, n, d, dtype=D), torch.randint(0, 2, (n,))

    def forward(inputs):
        return head(layer(inputs).mean(0))

    model = nn.ModuleDict({"layer": layer, "head": head})
    engine, _ = engine_step(model, lambda: F.cross_entropy(forward(x), y), examples=n)
    out = forward(x)
    losses = [F.cross_entropy(out[i : i + 1], y[i : i + 1]) for i in range(n)]
    for name in ("layer.norm1", "layer.norm2"):
        norm = model.get_submodule(name)
        rows = []
        for loss in losses:
            grads = torch.autograd.grad(loss, [norm.weight, norm.bias], retain_graph=True)
            rows.append(torch.stack(grads, dim=-1))
        w_hat = torch.stack(rows)
        want = torch.einsum("nci,ncj->cij", w_hat, w_hat) / n
        torch.testing.assert_close(engine.factors()[name][0], want, rtol=1e-10, atol=1e-14)


def test_damped_inverse_is_the_inverse_also_for_nearly_singular_float32_blocks():
    torch.manual_seed(6)
    w = torch.randn(5, 7, 2, dtype=D)
    matrices = w.mT @ w
    rank_one = torch.randn(3, 2, 1, dtype=D) * 100
    matrices = torch.cat([matrices, rank_one @ rank_one.mT])
    for damping in (1e-3, 0.5):
        want = torch.linalg.inv(matrices + damping * torch.eye(2, dtype=D))
        torch.testing.assert_close(damped_inverse(matrices, damping), want, rtol=1e-8, atol=0)
        # float32: well-conditioned blocks to float32 precision; nearly singular ones
        # (rounding makes them indefinite) still give an inverse in (0, 1/damping]
        got = damped_inverse(matrices.float(), damping)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got[:5].double(), want[:5], rtol=1e-5, atol=0)
        values = torch.linalg.eigvalsh(got[5:].double())
        assert (values > 0).all() and (values <= (1 + 1e-5) / damping).all()
    ones = torch.rand(4, 1, 1, dtype=D)
    torch.testing.assert_close(damped_inverse(ones, 0.1), 1 / (ones + 0.1))


def test_norm_layers_without_affine_parameters_and_frozen_ones():
    model = nn.Sequential(
        nn.LayerNorm(4, elementwise_affine=False),
        nn.GroupNorm(2, 4, affine=False),
        nn.BatchNorm1d(4, affine=False),
        nn.RMSNorm(4, elementwise_affine=False),
        nn.BatchNorm1d(4).requires_grad_(False),
        nn.LayerNorm(4),
        nn.Linear(4, 2),
    )
    found = discover(model)
    assert set(found.blocks) == {"5", "6"}  # nothing to precondition in 0-3: not listed
    assert [s.name for s in found.skipped] == ["4"]
    assert found.skipped[0].reason.startswith("all parameters frozen")
    for index in range(4):
        block_type = LayerNormBlock if index != 2 else BatchNormBlock
        with pytest.raises(TypeError, match="no affine parameters"):
            block_type(model[index])
    assert NO_AFFINE_REASON == "no affine parameters (nothing to precondition)"
    row = summary_table(found).splitlines()[2]
    assert [cell.strip() for cell in row.split("|")] == [
        "5",
        "LayerNorm",
        "LayerNormBlock",
        "F 4 x 2x2",
    ]


def test_kl_clip_sums_over_embedding_and_norm_blocks():
    """nu = min(1, sqrt(c / sum_l lr_l**2 <V'_l, V_l>)) over every block, new kinds included,
    with a learning rate per param group."""
    torch.manual_seed(7)
    base = TokenNet().to(D)
    x, y = token_data(16).tensors
    lrs = {"embedding": 0.3, "norm": 0.2, "hidden": 0.1, "batch_norm": 0.05, "head": 0.1}

    def run(kl_clip):
        model = copy.deepcopy(base)
        options = KFACOptions(damping=0.05, kl_clip=kl_clip, factor_dtype="float64")
        engine = KFACEngine(discover(model).blocks, options, warn=lambda m: None)
        engine.attach()
        engine.start_microbatch(examples=16)
        F.cross_entropy(model(x), y).backward()
        raw = {n: b.gradient().clone() for n, b in engine.blocks.items()}
        groups = [
            {"params": list(getattr(model, n).parameters()), "lr": lr} for n, lr in lrs.items()
        ]
        engine.step(groups)
        return engine, raw

    free, raw = run(None)
    assert set(free.blocks) == set(lrs)
    inner = sum(lrs[n] ** 2 * float((b.gradient() * raw[n]).sum()) for n, b in free.blocks.items())
    new_kinds = sum(
        lrs[n] ** 2 * float((free.blocks[n].gradient() * raw[n]).sum())
        for n in ("embedding", "norm", "batch_norm")
    )
    assert new_kinds > 0.05 * inner  # the new kinds weigh in the sum
    kl_clip = 1e-2 * inner
    clipped, _ = run(kl_clip)
    nu = math.sqrt(kl_clip / inner)
    for name, block in clipped.blocks.items():
        torch.testing.assert_close(
            block.gradient(), nu * free.blocks[name].gradient(), rtol=1e-9, atol=1e-14
        )


# -- Trainer fits -------------------------------------------------------------------------------


class GradientProbe(Callback):
    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append(
            {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        )


NEW_KINDS = ("net.embedding.weight", "net.norm.weight", "net.norm.bias")
NEW_KINDS += ("net.batch_norm.weight", "net.batch_norm.bias")


def test_trainer_fit_preconditions_embedding_and_norm_layers_and_trains():
    torch.manual_seed(8)
    module = Classifier(TokenNet(), lr=0.05)
    before, after = GradientProbe(), GradientProbe()
    callback = KFACCallback(damping=1e-2, inv_update_freq=4, verbose=False)
    trainer(callbacks=[before, callback, after], max_epochs=4).fit(
        module, loader(token_data(192), 32, shuffle=True)
    )
    kinds = {name: type(block).__name__ for name, block in callback.engine.blocks.items()}
    assert kinds == {
        "net.embedding": "EmbeddingBlock",
        "net.norm": "LayerNormBlock",
        "net.hidden": "LinearBlock",
        "net.batch_norm": "BatchNormBlock",
        "net.head": "LinearBlock",
    }
    for raw, new in zip(before.grads, after.grads):
        for name in NEW_KINDS:
            assert not torch.allclose(new[name], raw[name]), name
        assert torch.equal(new["net.embedding.weight"][0], torch.zeros(8))  # padding_idx
    first, last = sum(module.losses[:6]) / 6, sum(module.losses[-6:]) / 6
    assert last < 0.8 * first, (first, last)


def _token_fit(devices: int, local_batch: int) -> Classifier:
    torch.manual_seed(0)
    module = Classifier(TokenNet(ghost_batches=1 if devices > 1 else 2), lr=0.05)
    callback = KFACCallback(damping=1e-2, factor_update_freq=1, inv_update_freq=2, verbose=False)
    extra = {}
    if devices > 1:
        extra = dict(strategy=KFACDDPStrategy(start_method="spawn"))
        extra["callbacks"] = [callback, AssertReplicasIdentical()]
    trainer(
        devices=devices,
        callbacks=extra.pop("callbacks", [callback]),
        max_steps=6,
        use_distributed_sampler=False,
        **extra,
    ).fit(module, datamodule=InterleavedData(token_data(144), local_batch))
    return module


def test_two_ranks_equal_one_process_with_double_batch():
    """Local batch 12 on 2 ranks against 24 in one process, the BatchNorm there run on the
    two ranks' halves (its batch statistics are per rank)."""
    single = _token_fit(1, 24)
    double = _token_fit(2, 12)
    for (name, got), want in zip(double.named_parameters(), single.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
    torch.manual_seed(0)
    start = Classifier(TokenNet())
    for name in NEW_KINDS:
        key = name.removeprefix("net.")
        assert not torch.allclose(
            dict(single.net.named_parameters())[key], dict(start.net.named_parameters())[key]
        )
