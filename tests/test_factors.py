"""Kronecker factors A and G against float64 references built per example (reference, section 2)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac.blocks import ConvBlock, LinearBlock
from lightning_kfac.capture import FactorCapture

pytestmark = pytest.mark.usefixtures("float64_default")


def head_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A per-example loss that is not linear in the layer output: sum of a smooth nonlinearity."""
    return (torch.tanh(out) * target).flatten(1).sum(1) + (out**2).flatten(1).sum(1) * 0.1


def captured_factors(layer: nn.Module, block, x, target, reduction: str, calls: int = 1):
    """A and G as the library computes them, from one batched backward pass."""
    capture = FactorCapture({"layer": block}, loss_reduction=reduction, dtype=torch.float64)
    capture.attach()
    capture.start_microbatch()
    per_example = sum(head_loss(layer(x), target) for _ in range(calls))
    loss = per_example.mean() if reduction == "mean" else per_example.sum()
    loss.backward()
    batch = capture.pop()["layer"]
    capture.detach()
    return batch.factors["A"], batch.factors["G"]


def reference_factors(layer, rows_of, x, target, calls: int = 1, reduction: str = "mean"):
    """Per-example loop: a-rows from explicit patches, g-hat from each example's own loss.

    G is the mean over examples of their outer products for a mean loss (K = N); for a summed
    loss (K = 1) it is their sum, the curvature of the summed loss (reference, section 1).
    """
    n = x.shape[0]
    a_terms, g_terms, row_count = [], [], 0
    for i in range(n):
        xi = x[i : i + 1]
        for _ in range(calls):
            out = layer(xi)
            out.retain_grad()
            head_loss(out, target[i : i + 1]).sum().backward()
            a_rows, g_rows = rows_of(xi, out.grad)  # (groups, S, d_a), (groups, S, d_g)
            a_terms.append(a_rows.mT @ a_rows)
            g_terms.append(g_rows.mT @ g_rows)
            row_count += a_rows.shape[1]
    return sum(a_terms) / row_count, sum(g_terms) / (n if reduction == "mean" else 1)


def with_ones(rows: torch.Tensor, bias: bool) -> torch.Tensor:
    if not bias:
        return rows
    return torch.cat([rows, torch.ones(*rows.shape[:-1], 1)], dim=-1)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("input_shape", [(6, 5), (4, 3, 5)])
def test_linear_factors(bias, reduction, input_shape):
    torch.manual_seed(0)
    layer = nn.Linear(5, 4, bias=bias)
    x = torch.randn(*input_shape)
    target = torch.randn(*input_shape[:-1], 4)

    def rows_of(xi, grad):
        return with_ones(xi.reshape(1, -1, 5), bias), grad.reshape(1, -1, 4)

    A, G = captured_factors(layer, LinearBlock(layer), x, target, reduction)
    A_ref, G_ref = reference_factors(layer, rows_of, x, target, reduction=reduction)
    assert A.shape == (1, 5 + bias, 5 + bias) and G.shape == (1, 4, 4)
    torch.testing.assert_close(A, A_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(G, G_ref, rtol=1e-10, atol=1e-12)


def explicit_patches(conv: nn.Module, xi: torch.Tensor) -> torch.Tensor:
    """Patches of one example by explicit index loops: (groups, locations, C/groups * prod(k)).

    Padding is applied with F.pad in the layer's mode; the patches are then checked to
    reproduce the layer's own output, so a wrong padding or ordering cannot pass unnoticed.
    """
    spatial = xi.dim() - 2
    k, s, d = conv.kernel_size, conv.stride, conv.dilation
    if conv.padding == "same":
        pads = []
        for i in range(spatial):
            total = d[i] * (k[i] - 1)
            pads.append((total // 2, total - total // 2))
    else:
        pads = [(conv.padding[i], conv.padding[i]) for i in range(spatial)]
    flat_pad = [p for pair in reversed(pads) for p in pair]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(xi, flat_pad, mode=mode)[0]  # (C, *padded)
    out_sizes = [(xp.shape[1 + i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(spatial)]
    cpg = conv.in_channels // conv.groups
    rows = []
    for location in itertools.product(*[range(o) for o in out_sizes]):
        per_group = []
        for g in range(conv.groups):
            values = []
            for c in range(g * cpg, (g + 1) * cpg):
                for offset in itertools.product(*[range(kk) for kk in k]):
                    index = tuple(location[i] * s[i] + offset[i] * d[i] for i in range(spatial))
                    values.append(xp[(c, *index)])
            per_group.append(torch.stack(values))
        rows.append(torch.stack(per_group))
    patches = torch.stack(rows).transpose(0, 1)  # (groups, locations, cpg * prod(k))
    # the patches must reproduce the layer's output
    opg = conv.out_channels // conv.groups
    weight = conv.weight.reshape(conv.groups, opg, -1)
    out = patches @ weight.mT  # (groups, locations, opg)
    if conv.bias is not None:
        out = out + conv.bias.reshape(conv.groups, 1, opg)
    expected = conv(xi)[0].reshape(conv.groups, opg, -1).transpose(1, 2)
    torch.testing.assert_close(out, expected)
    return patches


CONV_CASES = [
    # (dims, kwargs)
    (1, dict(kernel_size=3)),
    (1, dict(kernel_size=3, stride=2, padding=1, bias=False)),
    (1, dict(kernel_size=4, padding="same", dilation=2)),
    (1, dict(kernel_size=3, padding=2, padding_mode="reflect", groups=2)),
    (2, dict(kernel_size=3, stride=2, padding=1)),
    (2, dict(kernel_size=(2, 3), padding="same", bias=False)),
    (2, dict(kernel_size=3, dilation=2, padding=1, padding_mode="circular")),
    (2, dict(kernel_size=2, groups=2, stride=(1, 2))),
    (3, dict(kernel_size=2, padding=1, groups=2)),
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dims,kwargs", CONV_CASES)
def test_conv_factors(dims, kwargs, reduction):
    torch.manual_seed(1)
    conv = [nn.Conv1d, nn.Conv2d, nn.Conv3d][dims - 1](4, 6, **kwargs)
    size = [9, 6, 4][dims - 1]
    x = torch.randn(3, 4, *([size] * dims))
    target = torch.randn_like(conv(x))
    bias = conv.bias is not None

    def rows_of(xi, grad):
        a_rows = with_ones(explicit_patches(conv, xi), bias)
        g = grad[0].reshape(conv.groups, conv.out_channels // conv.groups, -1).transpose(1, 2)
        return a_rows, g

    A, G = captured_factors(conv, ConvBlock(conv), x, target, reduction)
    A_ref, G_ref = reference_factors(conv, rows_of, x, target, reduction=reduction)
    torch.testing.assert_close(A, A_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(G, G_ref, rtol=1e-10, atol=1e-12)


def test_module_called_twice_contributes_both_calls():
    torch.manual_seed(2)
    layer = nn.Linear(3, 2)
    x, target = torch.randn(5, 3), torch.randn(5, 2)

    def rows_of(xi, grad):
        return with_ones(xi.reshape(1, -1, 3), True), grad.reshape(1, -1, 2)

    A, G = captured_factors(layer, LinearBlock(layer), x, target, "mean", calls=2)
    A_ref, G_ref = reference_factors(layer, rows_of, x, target, calls=2)
    torch.testing.assert_close(A, A_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(G, G_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("inplace_op", ["relu", "add"])
def test_in_place_op_after_layer_sees_pre_activation_gradient(inplace_op):
    torch.manual_seed(3)
    layer, head = nn.Linear(4, 5), nn.Linear(5, 2)
    x, y = torch.randn(8, 4), torch.randn(8, 2)

    def factors(inplace: bool):
        capture = FactorCapture(
            {"l": LinearBlock(layer)}, loss_reduction="mean", dtype=torch.float64
        )
        capture.attach()
        capture.start_microbatch()
        h = layer(x)
        if inplace_op == "relu":
            h = F.relu(h, inplace=inplace)
        else:
            h = h.add_(1.0) if inplace else h + 1.0
        F.mse_loss(head(h), y).backward()
        out = capture.pop()["l"]
        capture.detach()
        return out.factors["A"], out.factors["G"]

    A_in, G_in = factors(True)
    A_out, G_out = factors(False)
    torch.testing.assert_close(A_in, A_out)
    torch.testing.assert_close(G_in, G_out)
    assert G_in.abs().sum() > 0


def test_loss_scale_is_undone_and_microbatches_average():
    """Two half batches with loss/2 each (accumulation) equal one full batch."""
    torch.manual_seed(4)
    layer = nn.Linear(3, 2)
    x, target = torch.randn(8, 3), torch.randn(8, 2)
    block = LinearBlock(layer)
    full = FactorCapture({"l": block}, loss_reduction="mean", dtype=torch.float64)
    full.attach()
    full.start_microbatch()
    head_loss(layer(x), target).mean().backward()
    expected = full.pop()["l"]
    full.detach()

    split = FactorCapture({"l": block}, loss_reduction="mean", dtype=torch.float64)
    split.attach()
    for half in (slice(0, 4), slice(4, 8)):
        split.start_microbatch(loss_scale=0.5 * 1024.0)
        (head_loss(layer(x[half]), target[half]).mean() * 0.5 * 1024.0).backward()
    got = split.pop()["l"]
    torch.testing.assert_close(got.factors["A"], expected.factors["A"])
    torch.testing.assert_close(got.factors["G"], expected.factors["G"])
    assert got.examples == 8


def test_hooks_idle_when_not_armed():
    layer = nn.Linear(3, 2)
    capture = FactorCapture({"l": LinearBlock(layer)}, loss_reduction="mean", dtype=torch.float64)
    capture.attach()
    layer(torch.randn(4, 3)).sum().backward()
    assert capture.pop() == {}
    capture.detach()
