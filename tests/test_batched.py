"""Work batched across layers of one shape equals the same work one layer at a time.

Statistics of same-shaped calls are computed by one product per factor after the backward
pass, gradients are gathered and written back for a whole shape group at once, and later
steps work on the stacked tensors again (``lightning_kfac.tiles``). Each is checked against
the per-layer path (``batched_elements = 0``) to float64 round-off, and the batched factors
against an explicit per-example reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac.capture import FactorCapture
from lightning_kfac.curvature import KroneckerBlock
from lightning_kfac.discovery import discover
from lightning_kfac.engine import KFACEngine
from lightning_kfac.options import KFACOptions
from lightning_kfac.tiles import stacked, tile_runs, tiles, untile

pytestmark = pytest.mark.usefixtures("float64_default")


def deep_mlp() -> nn.Sequential:
    """Four 6-wide layers (one shape group), then a 6 -> 3 head (a group of its own)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(6, 6), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(6, 3))


def conv_net() -> nn.Sequential:
    """Three same-shaped convolutions (a shape group, one grouped) and a Linear head."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv1d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv1d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv1d(4, 4, 3, padding=1),
        nn.Flatten(),
        nn.Linear(4 * 7, 3),
    )


def spy_group_sizes(monkeypatch) -> list[int]:
    """The number of calls of each ``batched_statistics`` from now on."""
    sizes: list[int] = []
    original = KroneckerBlock.batched_statistics.__func__

    def spy(cls, blocks, inputs, grads, examples):
        sizes.append(len(blocks))
        return original(cls, blocks, inputs, grads, examples)

    monkeypatch.setattr(KroneckerBlock, "batched_statistics", classmethod(spy))
    return sizes


def unbatched(blocks):
    for block in blocks.values():
        block.batched_elements = 0
    return blocks


def attached_capture(blocks, batched: bool, dtype=torch.float64) -> FactorCapture:
    """A capture of ``blocks``, with batching on or off, its hooks installed."""
    blocks = blocks if batched else unbatched(blocks)
    capture = FactorCapture(blocks, loss_reduction="mean", dtype=dtype)
    capture.attach()
    return capture


def factors_of(model, x, y, batched: bool, loss_scale: float = 1.0, passes: int = 1, **discovery):
    capture = attached_capture(discover(model, **discovery).blocks, batched)
    for part in torch.arange(x.shape[0]).chunk(passes):
        capture.start_microbatch(loss_scale=loss_scale / passes)
        loss = F.cross_entropy(model(x[part]), y[part]) * loss_scale / passes
        loss.backward()
        capture.end_backward()
    out = capture.pop()
    capture.detach()
    model.zero_grad()
    return {name: batch.factors for name, batch in out.items()}


@pytest.mark.parametrize("build, shape", [(deep_mlp, (6,)), (conv_net, (4, 7))])
@pytest.mark.parametrize("passes, loss_scale", [(1, 1.0), (2, 512.0)])
def test_batched_statistics_equal_per_layer_ones(build, shape, passes, loss_scale, monkeypatch):
    model = build()
    x, y = torch.randn(8, *shape), torch.randint(0, 3, (8,))
    sizes = spy_group_sizes(monkeypatch)
    got = factors_of(model, x, y, True, loss_scale, passes)
    assert max(sizes) >= 3  # the shape group went through one batched product
    expected = factors_of(model, x, y, False, loss_scale, passes)
    assert got.keys() == expected.keys() and len(got) == len(discover(model).blocks)
    for name in expected:
        for key in expected[name]:
            torch.testing.assert_close(got[name][key], expected[name][key], rtol=1e-12, atol=0)


@pytest.mark.parametrize("build, shape", [(deep_mlp, (6,)), (conv_net, (4, 7))])
def test_batched_statistics_of_part_of_the_batch_equal_per_layer_ones(build, shape, monkeypatch):
    """``factor_examples``: the batched path slices each stacked call's first n' examples
    and scales G by N / n', as the hooks do (whose estimators test_factor_examples checks
    against explicit references); here also against one for the first layer."""
    model = build()
    x, y = torch.randn(8, *shape), torch.randint(0, 3, (8,))
    sizes = spy_group_sizes(monkeypatch)
    got = factors_of(model, x, y, True, factor_examples=3)
    assert max(sizes) >= 3  # the shape group went through one batched product
    expected = factors_of(model, x, y, False, factor_examples=3)
    assert got.keys() == expected.keys() and len(got) == len(discover(model).blocks)
    for name in expected:
        for key in expected[name]:
            torch.testing.assert_close(got[name][key], expected[name][key], rtol=1e-12, atol=0)
    if build is deep_mlp:  # the first layer against the reference estimators of 3 examples
        out = model[0](x).detach().requires_grad_()
        g_hat = 8 * torch.autograd.grad(F.cross_entropy(model[1:](out), y), out)[0][:3]
        rows = torch.cat([x[:3], torch.ones(3, 1)], dim=1)
        torch.testing.assert_close(got["0"]["A"][0], rows.T @ rows / 3, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(got["0"]["G"][0], g_hat.T @ g_hat / 3, rtol=1e-12, atol=1e-15)


def test_batched_factors_match_a_per_example_reference():
    """Every layer of the shape group against explicit per-example outer products."""
    model = deep_mlp()
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    got = factors_of(model, x, y, True)
    linears = [(str(i), m) for i, m in model.named_children() if isinstance(m, nn.Linear)]
    a_sum = {name: 0.0 for name, _ in linears}
    g_sum = {name: 0.0 for name, _ in linears}
    for i in range(5):
        inputs, outputs = {}, {}
        h = x[i : i + 1]
        for name, module in model.named_children():
            if isinstance(module, nn.Linear):
                inputs[name] = h
                h = module(h)
                h.retain_grad()
                outputs[name] = h
            else:
                h = module(h)
        F.cross_entropy(h, y[i : i + 1]).backward()  # example i's own loss
        for name, _ in linears:
            a = torch.cat([inputs[name][0], torch.ones(1)])
            g = outputs[name].grad[0]
            a_sum[name] = a_sum[name] + torch.outer(a, a)
            g_sum[name] = g_sum[name] + torch.outer(g, g)
        model.zero_grad()
    for name, _ in linears:
        # A averages over the N rows; G = K sum g_hat g_hat^T / N with g_hat = g / N: the
        # mean of the per-example outer products (K = N, reference section 1)
        torch.testing.assert_close(got[name]["A"][0], a_sum[name] / 5, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got[name]["G"][0], g_sum[name] / 5, rtol=1e-12, atol=1e-14)


def test_a_second_gradient_of_one_call_counts_both(monkeypatch):
    """Two backward passes over one retained graph before the commit: both gradients' outer
    products are summed, as the hooks sum them, not the outer product of their sum."""
    sizes = spy_group_sizes(monkeypatch)
    model = deep_mlp()
    x, y = torch.randn(6, 6), torch.randint(0, 3, (6,))
    results = []
    for batched in (True, False):
        sizes.clear()
        capture = attached_capture(discover(model).blocks, batched)
        capture.start_microbatch()
        out = model(x)
        F.cross_entropy(out, y).backward(retain_graph=True)
        (out**2).mean().backward()
        assert bool(sizes) == batched  # the first gradients' statistics, taken at once
        results.append({n: b.factors for n, b in capture.pop().items()})
        capture.detach()
        model.zero_grad()
    for name in results[1]:
        torch.testing.assert_close(results[0][name]["G"], results[1][name]["G"], rtol=1e-12, atol=0)


def test_a_call_reached_by_a_later_backward_is_kept_until_then(monkeypatch):
    """A generator's forward feeding two losses: the first backward reaches only the head,
    the second the whole network; batched and per-layer capture agree."""
    sizes = spy_group_sizes(monkeypatch)
    torch.manual_seed(3)
    body, head = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5)), nn.Linear(5, 2)
    model = nn.Sequential(body, head)
    x = torch.randn(7, 5)
    results = []
    for batched in (True, False):
        sizes.clear()
        capture = attached_capture(discover(model).blocks, batched)
        capture.start_microbatch()
        features = body(x)
        head(features.detach()).pow(2).mean().backward()
        capture.end_backward()
        assert set(capture._committed["1"].inputs) == {"A"}  # the head, committed
        assert not capture._committed["0.0"].inputs  # the body, still pending
        body(x).sum().backward()  # another forward of the body, reached at once
        capture.end_backward()
        features.pow(2).mean().backward()  # the first body forward, reached now
        assert (max(sizes, default=0) == 2) == batched
        results.append({n: b.factors for n, b in capture.pop().items()})
        capture.detach()
        model.zero_grad()
    assert results[0].keys() == results[1].keys() == {"0.0", "0.2", "1"}
    for name in results[1]:
        for key in ("A", "G"):
            torch.testing.assert_close(results[0][name][key], results[1][name][key])


def trained(model, blocks, batched: bool, options, shape, steps: int) -> list[torch.Tensor]:
    """The parameters after ``steps`` K-FAC steps (SGD, momentum 0.9) on random batches of
    ``shape`` with 3 classes, with batching on or off."""
    engine = KFACEngine(
        blocks if batched else unbatched(blocks), options, warn=lambda message: None
    )
    engine.attach()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x = torch.randn(*shape, generator=generator)
        y = torch.randint(0, 3, shape[:1], generator=generator)
        engine.start_microbatch()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        engine.step(optimizer.param_groups)
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("method", ["exact", "factored"])
@pytest.mark.parametrize("build, shape", [(deep_mlp, (6,)), (conv_net, (4, 7))])
def test_engine_steps_equal_per_layer_ones(build, shape, method, monkeypatch):
    """Batched statistics, gathered and written-back gradients, the tiled KL clip: five
    steps give the parameters the per-layer path gives."""
    sizes = spy_group_sizes(monkeypatch)
    params = []
    for batched in (True, False):
        sizes.clear()
        model = build()
        options = KFACOptions(inv_update_freq=2, kl_clip=1e-3, damping_method=method)
        params.append(trained(model, discover(model).blocks, batched, options, (8, *shape), 5))
        assert (max(sizes, default=0) >= 3) == batched
    for got, expected in zip(*params):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_batched_gradients_round_trip_grouped_convolutions():
    torch.manual_seed(4)
    convs = [nn.Conv1d(4, 6, 3, groups=2) for _ in range(3)]
    model = nn.Sequential(*convs)
    blocks = list(discover(model).blocks.values())
    for conv in convs:
        conv.weight.grad = torch.randn_like(conv.weight)
        conv.bias.grad = torch.randn_like(conv.bias)
    one_by_one = [block.gradient() for block in blocks]
    together = type(blocks[0]).gradients(blocks)
    for got, expected in zip(together, one_by_one):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    new = [torch.randn_like(g) for g in one_by_one]
    type(blocks[0]).set_gradients(blocks, new)
    written = [(c.weight.grad.clone(), c.bias.grad.clone()) for c in convs]
    for block, gradient in zip(blocks, new):
        block.set_gradient(gradient)
    for conv, (weight, bias) in zip(convs, written):
        assert torch.equal(conv.weight.grad, weight) and torch.equal(conv.bias.grad, bias)


def test_tile_runs_collapse_whole_runs_only():
    base = torch.randn(4, 3, 2)
    views = list(base.unbind(0))
    assert [(t is base, n) for t, n in tile_runs(views)] == [(True, 4)]
    assert [n for _, n in tile_runs(views[:3])] == [1, 1, 1]  # not the whole tensor
    assert [n for _, n in tile_runs(views[1:])] == [1, 1, 1]  # not from its start
    assert [n for _, n in tile_runs(views[::-1])] == [1, 1, 1, 1]  # not in order
    other = torch.randn(2, 3, 2)
    plain = torch.randn(5)
    runs = tile_runs([*views, *other.split(1), plain])
    assert [(t.shape, n) for t, n in runs] == [((4, 3, 2), 4), ((2, 3, 2), 2), ((5,), 1)]
    pieces = [*views, *other.split(1), plain]
    runs = tile_runs(pieces)
    copies = untile(pieces, runs, [t.clone() for t, _ in runs])
    assert [c.shape for c in copies] == [p.shape for p in pieces]
    assert all(torch.equal(c, p) and c.data_ptr() != p.data_ptr() for c, p in zip(copies, pieces))
    mixed = [views[0], plain, *views[1:]]
    flat = torch.cat([t.reshape(-1) for t in tiles(mixed)])
    assert torch.equal(flat, torch.cat([t.reshape(-1) for t in mixed]))
    transposed = list(base.transpose(1, 2).unbind(0))  # not contiguous: kept apart
    assert len(tiles(transposed)) == 4
    buffer = torch.randn(36 + 36)  # slices of other shapes (a communication buffer)
    shaped = [buffer[:36].view(1, 6, 6), buffer[36:].view(1, 4, 9)]
    assert [n for _, n in tile_runs(shaped)] == [1, 1]


def test_stacked_is_a_view_for_the_slices_of_one_tensor():
    base = torch.randn(6, 3, 2)
    pieces = list(base.split(2))
    assert stacked(pieces).data_ptr() == base.data_ptr()
    assert torch.equal(stacked(pieces), base)
    other = [torch.randn(1, 3, 2), *pieces]
    assert torch.equal(stacked(other), torch.cat(other))


def test_one_batch_key_of_different_layers_steps_as_per_layer():
    """A 1x1 convolution and a Linear layer of the same widths share a batch key (one
    operator), but not a weight shape: their gradients are read and written per block."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = nn.Sequential(nn.Conv1d(8, 8, 1), nn.Tanh(), nn.Conv1d(8, 8, 1))
            self.linear = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = self.convs(x).mean(-1)
            return self.head(torch.tanh(self.linear(h)))

    params = []
    for batched in (True, False):
        torch.manual_seed(6)
        model = Mixed()
        blocks = discover(model).blocks
        keys = {blocks[n].batch_key() for n in ("convs.0", "convs.2", "linear")}
        assert len(keys) == 1
        params.append(trained(model, blocks, batched, KFACOptions(), (6, 8, 5), 3))
    for got, expected in zip(*params):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_a_batch_key_of_biased_and_unbiased_layers_reads_gradients_per_block():
    """A biased Linear(9, 4) and unbiased Linear(10, 4) layers share a batch key (a = 10):
    their gradients are read and written per block, in either order."""
    torch.manual_seed(9)
    layers = nn.ModuleList(
        [nn.Linear(9, 4), nn.Linear(10, 4, bias=False), nn.Linear(10, 4, bias=False)]
    )
    for order in ([0, 1, 2], [1, 0, 2], [1, 2, 0]):
        for layer in layers:
            layer(torch.randn(3, layer.in_features)).pow(2).sum().backward()
        blocks = list(discover(layers).blocks.values())
        chosen = [blocks[i] for i in order]
        assert len({block.batch_key() for block in chosen}) == 1
        got = type(chosen[0]).gradients(chosen)
        for block, gradient in zip(chosen, got):
            torch.testing.assert_close(gradient, block.gradient(), rtol=0, atol=0)
        new = [torch.randn_like(g) for g in got]
        type(chosen[0]).set_gradients(chosen, new)
        for block, gradient in zip(chosen, new):
            torch.testing.assert_close(block.gradient(), gradient, rtol=0, atol=0)
        layers.zero_grad()


def test_an_input_changed_in_place_under_autocast_is_read_as_it_was():
    """Under autocast a layer's float32 input is saved as a cast copy, so the input itself
    may change in place after the layer ran (an in-place residual): such calls are taken in
    the hooks, from the input as the layer saw it."""
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(8)
    layers = nn.ModuleList(nn.Linear(6, 6) for _ in range(3))
    x = torch.randn(5, 6)
    factors = []
    for batched in (True, False):
        blocks = {str(i): b for i, b in enumerate(discover(layers).blocks.values())}
        capture = attached_capture(blocks, batched, torch.float32)
        capture.start_microbatch()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = x.clone()
            for layer in layers:
                h += layer(h)  # the residual stream, float32, updated in place
            loss = h.float().pow(2).mean()
        loss.backward()
        factors.append({n: b.factors["A"] for n, b in capture.pop().items()})
        capture.detach()
        layers.zero_grad()
    for name in factors[1]:
        torch.testing.assert_close(factors[0][name], factors[1][name], rtol=0, atol=0)


def test_an_input_changed_before_the_commit_is_refused():
    model = deep_mlp()
    x = torch.randn(4, 6)
    capture = FactorCapture(discover(model).blocks, loss_reduction="mean", dtype=torch.float64)
    capture.attach()
    capture.start_microbatch()
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
    x.add_(1.0)  # the first layer's input, after its backward and before the commit
    with pytest.raises(RuntimeError, match="layer '0' was modified in place"):
        capture.end_backward()
