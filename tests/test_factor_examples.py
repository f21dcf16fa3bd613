"""Statistics from part of the batch (reference, section 13; distributed K-FAC): the factors
of Linear and Conv layers from the first n' examples, G scaled by the loss's N."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACCallback
from lightning_kfac.blocks import LinearBlock
from lightning_kfac.capture import FactorCapture
from tests.helpers import Classifier, classification_data, loader, mlp, trainer

F64 = torch.float64
N, T, D_IN, D_OUT, SUBSET = 10, 3, 4, 5, 4


def factors(x, layer, loss_fn, subset=None, reduce=False, loss_terms="examples"):
    block = LinearBlock(layer)
    block.factor_examples, block.reduce = subset, reduce
    capture = FactorCapture({"m": block}, loss_reduction="mean", dtype=F64, loss_terms=loss_terms)
    capture.attach()
    capture.start_microbatch(examples=N)
    loss_fn(layer(x)).backward()
    out = capture.pop()["m"].factors
    capture.detach()
    return out["A"][0], out["G"][0]


def test_subset_factors_match_the_reference_estimators():
    """A from the first n' examples' rows; G = (1/n') sum over them of g-hat g-hat^T with
    g-hat = N g (the loss averages over all N)."""
    torch.manual_seed(0)
    layer = nn.Linear(D_IN, D_OUT).double()
    x = torch.randn(N, D_IN, dtype=F64)
    target = torch.randint(0, D_OUT, (N,))

    def loss(out):
        return F.cross_entropy(out, target)

    A, G = factors(x, layer, loss, subset=SUBSET)
    rows = torch.cat([x[:SUBSET], torch.ones(SUBSET, 1, dtype=F64)], dim=1)
    out = layer(x).detach().requires_grad_()
    loss(out).backward()
    g_hat = N * out.grad[:SUBSET]
    torch.testing.assert_close(A, rows.T @ rows / SUBSET, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(G, g_hat.T @ g_hat / SUBSET, rtol=1e-12, atol=1e-14)
    # every example: today's factors exactly
    full = factors(x, layer, loss)
    for got, want in zip(factors(x, layer, loss, subset=N), full):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("reduce", [False, True])
def test_subset_of_a_sequence_first_layer_equals_the_batch_first_one(reduce):
    torch.manual_seed(1)
    layer = nn.Linear(D_IN, D_OUT).double()
    x = torch.randn(N, T, D_IN, dtype=F64)
    labels = torch.randint(0, D_OUT, (N,))

    def pooled(out):  # batch-first output
        return F.cross_entropy(out.mean(1), labels)

    batch_first = factors(x, layer, pooled, subset=SUBSET, reduce=reduce)
    seq_first = factors(
        x.transpose(0, 1), layer, lambda out: pooled(out.transpose(0, 1)), SUBSET, reduce
    )
    for got, want in zip(seq_first, batch_first):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # and against the reference: rows of the first n' examples (reduce: per-example sums)
    out = layer(x).detach().requires_grad_()
    pooled(out).backward()
    a = torch.cat([x, torch.ones(N, T, 1, dtype=F64)], dim=-1)[:SUBSET]
    g = out.grad[:SUBSET]
    if reduce:
        a, g = a.mean(1), g.sum(1)
        A = a.T @ a / SUBSET
    else:
        A = a.reshape(-1, D_IN + 1).T @ a.reshape(-1, D_IN + 1) / (SUBSET * T)
    g = g.reshape(-1, D_OUT)
    G = N * N * g.T @ g / SUBSET
    torch.testing.assert_close(batch_first[0], A, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(batch_first[1], G, rtol=1e-12, atol=1e-14)


def test_option_in_a_fit_is_shown_and_trains(caplog):
    logging.getLogger("lightning.pytorch").setLevel(logging.INFO)
    torch.manual_seed(0)
    module = Classifier(mlp(), lr=0.05)
    with caplog.at_level(logging.INFO):
        trainer(max_steps=5, callbacks=[KFACCallback(factor_examples=8)]).fit(
            module, loader(classification_data(96), 24)
        )
    assert "first 8 examples" in caplog.text
    assert all(torch.isfinite(p).all() for p in module.parameters())
    with pytest.raises(ValueError, match="factor_examples"):
        KFACCallback(factor_examples=0)
