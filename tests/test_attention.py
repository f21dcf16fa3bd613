"""nn.MultiheadAttention: its projections observed without changing the model, their factors
against a float64 reference built here by hand, the preconditioned gradient against the dense
solve, a Trainer fit of a small transformer and 2 ranks."""

from __future__ import annotations

import itertools
import logging
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning_utilities.core import rank_zero as rank_zero_module
from torch import nn
from torch.utils.data import TensorDataset

from lightning_kfac import KFACCallback, KFACDDPStrategy
from lightning_kfac.attention import PROJECTIONS, MultiheadAttentionBlock
from lightning_kfac.decomposition import symmetric_eigen
from lightning_kfac.discovery import discover, summary_table
from lightning_kfac.engine import KFACEngine
from lightning_kfac.options import KFACOptions
from tests.helpers import AssertReplicasIdentical, InterleavedData, loader, trainer

D = torch.float64
E, HEADS, N, T, S = 8, 2, 3, 4, 5


def engine_for(model: nn.Module, **options) -> KFACEngine:
    options = dict(damping=0.1, kl_clip=None, factor_dtype="float64") | options
    engine = KFACEngine(discover(model).blocks, KFACOptions(**options), warn=lambda m: None)
    engine.attach()
    return engine


def inputs(pattern: str, batch_first: bool, kdim: int = E, vdim: int = E, dtype=D):
    """(query, key, value) for a call pattern: "self" (one tensor), "kv" (key is value),
    "different" (three tensors)."""

    def make(length, width):
        shape = (N, length, width) if batch_first else (length, N, width)
        return torch.randn(shape, dtype=dtype, requires_grad=True)

    query = make(T, E)
    if pattern == "self":
        return query, query, query
    key = make(S, kdim)
    value = key if pattern == "kv" else make(S, vdim)
    return query, key, value


def masks(pattern: str, kind: str):
    """``attn_mask`` and ``key_padding_mask`` keyword arguments (boolean: True is masked)."""
    source = T if pattern == "self" else S
    out = {}
    if kind in ("attn", "both"):
        out["attn_mask"] = torch.ones(T, source, dtype=torch.bool).triu(1)
    if kind in ("padding", "both"):
        padding = torch.zeros(N, source, dtype=torch.bool)
        padding[0, -2:] = True
        padding[2, -1] = True
        out["key_padding_mask"] = padding
    return out


def run(module, query, key, value, **kwargs):
    """Forward and backward of a fixed function of the outputs; what it returns and every
    gradient."""
    out, weights = module(query, key, value, **kwargs)
    loss = (out.tanh() * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum()
    if weights is not None:
        loss = loss + weights.pow(2).sum()
    loss.backward()
    leaves = [t for t in {id(t): t for t in (query, key, value)}.values()]
    grads = [p.grad.clone() for p in module.parameters()] + [t.grad.clone() for t in leaves]
    return out.detach(), None if weights is None else weights.detach(), grads


CASES = [
    # (pattern, mask kind, kdim/vdim separate)
    ("self", "none", False),
    ("self", "both", False),
    ("kv", "padding", False),
    ("kv", "attn", False),
    ("different", "both", False),
    ("different", "padding", True),
]


@pytest.mark.parametrize(
    "batch_first,need_weights", list(itertools.product([True, False], [True, False]))
)
@pytest.mark.parametrize("pattern,mask_kind,separate", CASES)
def test_outputs_and_gradients_are_bit_for_bit_those_without_kfac(
    batch_first, need_weights, pattern, mask_kind, separate
):
    torch.manual_seed(0)
    dims = dict(kdim=6, vdim=7) if separate else {}
    mha = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, **dims)
    x = inputs(pattern, batch_first, dtype=torch.float32, **dims)
    kwargs = masks(pattern, mask_kind) | dict(need_weights=need_weights)
    want = run(mha, *x, **kwargs)
    mha.zero_grad()
    for t in x:
        t.grad = None
    engine = engine_for(mha, factor_dtype="auto")
    assert isinstance(engine.blocks[""], MultiheadAttentionBlock)
    engine.start_microbatch(examples=N)
    original = F.linear
    got = run(mha, *x, **kwargs)
    assert F.linear is original  # restored after the forward
    assert torch.equal(got[0], want[0])
    assert (got[1] is None) == (want[1] is None) and (
        got[1] is None or torch.equal(got[1], want[1])
    )
    assert len(got[2]) == len(want[2]) and all(torch.equal(a, b) for a, b in zip(got[2], want[2]))
    batch = engine.capture.pop()
    assert set(batch[""].factors) == set(engine.blocks[""].factor_shapes())


def test_linear_is_restored_when_the_forward_raises_and_not_replaced_when_unarmed():
    mha = nn.MultiheadAttention(E, HEADS)
    engine = engine_for(mha, factor_dtype="auto")
    engine.start_microbatch(examples=N)
    original = F.linear
    query = torch.randn(T, N, E)
    with pytest.raises(RuntimeError):
        mha(query, query, query, attn_mask=torch.zeros(T + 1, T, dtype=torch.bool))
    assert F.linear is original
    seen = []
    engine.capture.stop()

    def pre(module, args):
        seen.append(F.linear)

    mha.register_forward_pre_hook(pre)
    mha(query, query, query)
    assert seen == [original]


# -- the factors against a reference built by hand -------------------------------------------


def reference_attention(mha: nn.MultiheadAttention, query, key, value, attn_mask, padding):
    """MultiheadAttention written out in float64, batch first: the projections' inputs and
    outputs (outputs retain their gradient) and the attention output ``(N, T, E)``."""
    e, h = mha.embed_dim, mha.num_heads
    if mha._qkv_same_embed_dim:
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    projected = {
        "q": query @ w_q.T + b_q,
        "k": key @ w_k.T + b_k,
        "v": value @ w_v.T + b_v,
    }
    q, k, v = (
        projected[p].reshape(N, -1, h, e // h).transpose(1, 2) for p in "qkv"
    )  # (N, h, length, head_dim)
    scores = q @ k.transpose(-1, -2) / math.sqrt(e // h)
    if attn_mask is not None:
        scores = scores.masked_fill(attn_mask, float("-inf"))
    if padding is not None:
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    mixed = (scores.softmax(-1) @ v).transpose(1, 2).reshape(N, -1, e)
    projected["o"] = mixed @ mha.out_proj.weight.T + mha.out_proj.bias
    for p in PROJECTIONS:
        projected[p].retain_grad()
    rows_in = {"q": query, "k": key, "v": value, "o": mixed}
    return rows_in, projected, projected["o"]


class Tagger(nn.Module):
    """Attention then a per-token head: ``(..., E) -> (..., classes)``."""

    def __init__(self, batch_first: bool, classes: int = 3, **dims) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, **dims)
        self.head = nn.Linear(E, classes)
        self.batch_first = batch_first

    def forward(self, query, key, value, **kwargs):
        out = self.attn(query, key, value, **kwargs)[0]
        return self.head(torch.tanh(out))


@pytest.mark.parametrize("loss_terms", ["examples", "positions"])
@pytest.mark.parametrize(
    "pattern,batch_first,separate",
    [("self", False, False), ("kv", True, False), ("different", False, True)],
)
def test_factors_of_every_projection_match_a_float64_reference(
    loss_terms, pattern, batch_first, separate
):
    torch.manual_seed(1)
    dims = dict(kdim=6, vdim=7) if separate else {}
    model = Tagger(batch_first, **dims).to(D)
    query, key, value = inputs(pattern, batch_first, **dims)
    kw = masks(pattern, "both")
    y = torch.randint(0, 3, (N, T))

    def per_token(logits):  # (N, T, classes) losses, batch first
        logits = logits if batch_first else logits.transpose(0, 1)
        return F.cross_entropy(logits.reshape(-1, 3), y.reshape(-1), reduction="none").view(N, T)

    def loss_of(terms):
        return terms.mean(1).mean() if loss_terms == "examples" else terms.mean()

    engine = engine_for(model, loss_terms=loss_terms)
    engine.start_microbatch(examples=N)
    logits = model(query, key, value, **kw)
    loss_of(per_token(logits)).backward()
    engine.step([{"params": list(model.parameters()), "lr": 0.1}])
    running = engine.state["attn"].running

    def first(t):  # batch first, detached
        t = t.detach()
        return t if batch_first else t.transpose(0, 1)

    rows_in, projected, out = reference_attention(
        model.attn, first(query), first(key), first(value), kw["attn_mask"], kw["key_padding_mask"]
    )
    want_logits = model.head(torch.tanh(out))
    torch.testing.assert_close(want_logits, first(logits), rtol=1e-12, atol=1e-12)
    terms = F.cross_entropy(want_logits.reshape(-1, 3), y.reshape(-1), reduction="none")
    terms = terms.view(N, T)
    for p in PROJECTIONS:
        a = F.pad(rows_in[p].detach().reshape(-1, rows_in[p].shape[-1]), (0, 1), value=1.0)
        want_a = a.T @ a / a.shape[0]
        torch.testing.assert_close(running[f"A_{p}"][0], want_a, rtol=1e-10, atol=1e-13)
    g_hat = {p: torch.zeros(E, E, dtype=D) for p in PROJECTIONS}
    if loss_terms == "examples":  # g-hat of each example from its own loss, explicit sums
        for n in range(N):
            grads = torch.autograd.grad(
                terms[n].mean(), [projected[p] for p in PROJECTIONS], retain_graph=True
            )
            for p, grad in zip(PROJECTIONS, grads):
                rows = grad[n]
                assert torch.count_nonzero(grad) == torch.count_nonzero(rows)  # only example n
                g_hat[p] += rows.T @ rows
        want_g = {p: g / N for p, g in g_hat.items()}
    else:  # every token a term: K = N T, G = K sum_r g_r g_r^T with g of the mean loss
        grads = torch.autograd.grad(terms.mean(), [projected[p] for p in PROJECTIONS])
        want_g = {}
        for p, grad in zip(PROJECTIONS, grads):
            rows = grad.reshape(-1, E)
            want_g[p] = (N * T) * sum(torch.outer(r, r) for r in rows)
    for p in PROJECTIONS:
        torch.testing.assert_close(running[f"G_{p}"][0], want_g[p], rtol=1e-10, atol=1e-14)


def test_self_attention_counts_one_input_factor_for_three_projections():
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(E, HEADS).to(D)
    engine = engine_for(mha)
    engine.start_microbatch(examples=N)
    query = torch.randn(T, N, E, dtype=D)
    mha(query, query, query)[0].pow(2).mean().backward()
    (batch,) = engine.capture.pop().values()
    assert torch.equal(batch.factors["A_q"], batch.factors["A_k"])
    assert torch.equal(batch.factors["A_q"], batch.factors["A_v"])
    assert not torch.equal(batch.factors["G_q"], batch.factors["G_k"])


# -- the preconditioned gradient ----------------------------------------------------------------


def dense_solve(A, G, V, damping):
    dense = torch.kron(G, A) + damping * torch.eye(G.shape[0] * A.shape[0], dtype=D)
    return torch.linalg.solve(dense, V.reshape(-1)).reshape(V.shape)


@pytest.mark.parametrize("separate", [False, True])
def test_preconditioned_gradient_is_the_dense_solve_per_projection(separate):
    torch.manual_seed(3)
    dims = dict(kdim=6, vdim=7) if separate else {}
    model = Tagger(False, **dims).to(D)
    query, key, value = inputs("different" if separate else "self", False, **dims)
    y = torch.randint(0, 3, (T * N,))
    engine = engine_for(model, damping=0.05)
    engine.start_microbatch(examples=N)
    F.cross_entropy(model(query, key, value).reshape(-1, 3), y).backward()
    block = engine.blocks["attn"]
    raw = [v.clone() for v in block.split(block.gradient())]
    raw_in = (model.attn.in_proj_weight if not separate else model.attn.q_proj_weight).grad.clone()
    engine.step([{"params": list(model.parameters()), "lr": 0.1}])
    running = engine.state["attn"].running
    got = block.split(block.gradient())
    for p, v, new in zip(PROJECTIONS, raw, got):
        want = dense_solve(running[f"A_{p}"][0], running[f"G_{p}"][0], v[0], 0.05)
        torch.testing.assert_close(new[0], want, rtol=1e-9, atol=1e-12)
    # the parameters' .grad hold it: W_q's rows are the first E rows (of in_proj_weight)
    weight = model.attn.in_proj_weight if not separate else model.attn.q_proj_weight
    torch.testing.assert_close(weight.grad[:E], got[0][0, :, :-1], rtol=0, atol=0)
    torch.testing.assert_close(model.attn.in_proj_bias.grad[:E], got[0][0, :, -1], rtol=0, atol=0)
    torch.testing.assert_close(model.attn.out_proj.bias.grad, got[3][0, :, -1], rtol=0, atol=0)
    assert not torch.allclose(weight.grad, raw_in)


@pytest.mark.parametrize("method", ["exact", "factored"])
def test_batched_operator_equals_one_block_at_a_time(method):
    torch.manual_seed(4)
    blocks = [MultiheadAttentionBlock(nn.MultiheadAttention(E, HEADS, kdim=5)) for _ in range(3)]
    assert len({b.batch_key() for b in blocks}) == 1

    def psd(d):
        x = torch.randn(1, d, 2 * d, dtype=D)
        return symmetric_eigen(x @ x.mT / (2 * d), 0.0)[0]

    decompositions = [
        {key: psd(shape[-1]) for key, shape in b.factor_shapes().items()} for b in blocks
    ]
    grads = [torch.randn(sum(E * b.a_dim(p) for p in PROJECTIONS), dtype=D) for b in blocks]
    batched = MultiheadAttentionBlock.operator(blocks, decompositions, 0.03, method)(grads)
    for block, grad, decomposition, got in zip(blocks, grads, decompositions, batched):
        from lightning_kfac.preconditioning import precondition

        for p, v, new in zip(PROJECTIONS, block.split(grad), block.split(got)):
            want = precondition(v, decomposition[f"G_{p}"], decomposition[f"A_{p}"], 0.03, method)
            torch.testing.assert_close(new, want, rtol=1e-12, atol=1e-14)


def test_discovery_covers_out_proj_and_lists_plain_bias_kv_and_frozen_projections():
    model = nn.ModuleDict(
        {
            "plain": nn.MultiheadAttention(E, HEADS, bias=False),
            "bias_kv": nn.MultiheadAttention(E, HEADS, add_bias_kv=True, add_zero_attn=True),
            "frozen_out": nn.MultiheadAttention(E, HEADS),
        }
    )
    model["frozen_out"].out_proj.requires_grad_(False)
    found = discover(model)
    assert set(found.blocks) == {"plain", "bias_kv"}
    reasons = {s.name: s.reason for s in found.skipped}
    assert set(reasons) == {"bias_kv", "frozen_out", "frozen_out.out_proj"}
    assert "bias_k, bias_v" in reasons["bias_kv"] and "plain gradient" in reasons["bias_kv"]
    assert "out_proj.weight" in reasons["frozen_out"]
    assert found.blocks["plain"].factor_shapes()["A_q"] == (1, E, E)  # no bias: no 1
    assert "A_q 8x8" in summary_table(found)
    # add_bias_kv and add_zero_attn change nothing for the projections: they train
    engine = engine_for(model["bias_kv"].to(D))
    engine.start_microbatch(examples=N)
    query = torch.randn(T, N, E, dtype=D)
    model["bias_kv"](query, query, query)[0].pow(2).mean().backward()
    engine.step([{"params": list(model["bias_kv"].parameters()), "lr": 0.1}])
    assert set(engine.state[""].decompositions) == set(engine.blocks[""].factor_shapes())


# -- Trainer fits -------------------------------------------------------------------------------


VOCAB, LENGTH = 11, 6


def lm_data(n: int, seed: int = 0) -> TensorDataset:
    """Sequences that count up modulo VOCAB from a random start: next-token targets."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=generator)
    tokens = (start + torch.arange(LENGTH + 1)) % VOCAB
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


class TinyLM(L.LightningModule):
    """Embedding, torch's TransformerEncoder (sequence first, causal) and a Linear head;
    cross-entropy averaged over every token."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, E)
        layer = nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(E, VOCAB)
        self.lr = lr
        self.losses: list[float] = []

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        h = self.encoder(self.embedding(x).transpose(0, 1), mask=mask, is_causal=True)
        return self.head(h.transpose(0, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x).reshape(-1, VOCAB), y.reshape(-1))
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class GradientProbe(L.Callback):
    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters()})


@pytest.fixture
def info(caplog):
    logger = rank_zero_module.log
    logger.addHandler(caplog.handler)
    with caplog.at_level(logging.INFO, logger=logger.name):
        yield caplog
    logger.removeHandler(caplog.handler)


def test_trainer_fit_registers_the_attention_projections_and_trains(info):
    torch.manual_seed(5)
    module = TinyLM()
    before, after = GradientProbe(), GradientProbe()
    callback = KFACCallback(damping=1e-2, inv_update_freq=2, loss_terms="positions")
    trainer(callbacks=[before, callback, after], max_steps=12).fit(module, loader(lm_data(96), 16))
    table = next(m for m in info.messages if m.startswith("K-FAC registered layers"))
    for i in range(2):
        assert (
            f"encoder.layers.{i}.self_attn | MultiheadAttention | MultiheadAttentionBlock" in table
        )
    assert "out_proj" not in table
    blocks = callback.engine.blocks
    assert isinstance(blocks["encoder.layers.0.self_attn"], MultiheadAttentionBlock)
    for raw, new in zip(before.grads[2:], after.grads[2:]):
        for name in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"):
            key = f"encoder.layers.1.self_attn.{name}"
            assert not torch.allclose(new[key], raw[key]), key
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert math.isfinite(module.losses[-1]) and module.losses[-1] < module.losses[0]


def _lm_fit(devices: int, local_batch: int) -> TinyLM:
    torch.manual_seed(0)
    module = TinyLM()
    callback = KFACCallback(damping=1e-2, inv_update_freq=2, loss_terms="positions", verbose=False)
    callbacks = [callback]
    extra = {}
    if devices > 1:
        extra = dict(strategy=KFACDDPStrategy(start_method="spawn"))
        callbacks.append(AssertReplicasIdentical())
    trainer(
        devices=devices, callbacks=callbacks, max_steps=4, use_distributed_sampler=False, **extra
    ).fit(module, datamodule=InterleavedData(lm_data(96), local_batch))
    return module


def test_two_ranks_equal_one_process_with_double_batch():
    single = _lm_fit(1, 16)
    double = _lm_fit(2, 8)
    for (name, got), want in zip(double.named_parameters(), single.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
    torch.manual_seed(0)
    start = TinyLM()
    key = "encoder.layers.0.self_attn.in_proj_weight"
    assert not torch.allclose(
        dict(single.named_parameters())[key], dict(start.named_parameters())[key]
    )
