"""Models and training loops K-FAC must get right, against float64 references built here.

N is a property of the step (sequence-first inputs, chunked and per-example forwards), K is
what the loss averages over (examples, positions, elements; a sum), several optimizers with
manual optimization (a GAN), one callback over a sweep of models, precision, lazy and
zero-width layers, ``kfac_ddp`` without the callback and patterns that match nothing.

The references follow the rule of the reference, section 1: with R rows over the whole batch
and autograd's output gradient g_r, ``A = (1/R) sum_r a_r a_r^T`` and
``G = K sum_r g_r g_r^T``. They run the model on one example at a time, take the gradient of
each loss term on its own and sum explicitly; nothing is taken from the library.
"""

from __future__ import annotations

import copy
import logging
import os
import types
import warnings
from collections.abc import Callable, Mapping

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning_utilities.core import rank_zero as rank_zero_module
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_kfac import KFACCallback, KFACDDPStrategy
from lightning_kfac.blocks import ConvBlock, LinearBlock
from lightning_kfac.capture import FactorCapture
from tests.helpers import Classifier, classification_data, mlp, trainer

F64 = torch.float64
TIGHT = dict(rtol=1e-12, atol=1e-12)
N, T, D_IN, D_OUT, VOCAB = 8, 3, 5, 4, 6
#: The ways a forward pass can run a (N, T, d) batch through one Linear layer.
MODES = ("batch_first", "sequence_first", "chunks", "loop")


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def info(caplog):
    """Lightning's rank-zero info lines (its logger does not propagate to the root logger)."""
    logger = rank_zero_module.log
    logger.addHandler(caplog.handler)
    with caplog.at_level(logging.INFO, logger=logger.name):
        yield caplog
    logger.removeHandler(caplog.handler)


def kfac_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "K-FAC" in str(w.message)]


def fit(module, data, batch_size: int, callbacks=(), steps: int = 1, **kwargs) -> L.Trainer:
    t = trainer(callbacks=list(callbacks), max_steps=steps, **kwargs)
    t.fit(module, DataLoader(data, batch_size=batch_size))
    return t


class GradientProbe(Callback):
    """Records every parameter's gradient when its on_before_optimizer_step runs."""

    def __init__(self) -> None:
        self.grads: list[dict[str, Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append(
            {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        )


def with_ones(rows: Tensor) -> Tensor:
    return torch.cat([rows, torch.ones(*rows.shape[:-1], 1, dtype=rows.dtype)], dim=-1)


class Recorder:
    """Records every call of the given Linear layers: its input and its output (whose
    gradient is retained)."""

    def __init__(self, layers: Mapping[str, nn.Linear]) -> None:
        self.calls: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in layers}
        self.handles = [
            layer.register_forward_hook(self._hook(name)) for name, layer in layers.items()
        ]

    def _hook(self, name: str):
        def hook(module, args, output) -> None:
            output.retain_grad()
            self.calls[name].append((args[0].detach(), output))

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def rule_reference(
    layers: Mapping[str, nn.Linear],
    example_terms: Callable[[int], list[Tensor]],
    examples: int,
    K: float,
) -> dict[str, tuple[Tensor, Tensor]]:
    """``{name: (A, G)}`` by the rule of the reference, section 1, built example by example.

    ``example_terms(n)`` runs the model on example n alone and returns that example's loss
    terms l_k (the loss is ``(1/K) sum_k l_k``). Every call of every layer is a row block;
    the mean loss's gradient at a row is summed term by term, ``g_r = (1/K) sum_k dl_k/dy_r``
    (one backward pass per term), then ``A = mean_r a_r a_r^T`` and ``G = K sum_r g_r g_r^T``.
    For K = N and one term per example this is ``G = (1/N) sum_n sum_r g-hat g-hat^T`` with
    g-hat the gradient of example n's own loss (section 2).
    """
    a_sums = {name: 0.0 for name in layers}
    g_sums = {name: 0.0 for name in layers}
    rows = dict.fromkeys(layers, 0)
    for n in range(examples):
        recorder = Recorder(layers)
        count = len(example_terms(n))
        recorder.remove()
        inputs = {name: [x for x, _ in calls] for name, calls in recorder.calls.items()}
        grads = {name: [0.0] * len(calls) for name, calls in recorder.calls.items()}
        for k in range(count):
            recorder = Recorder(layers)
            term = example_terms(n)[k]
            recorder.remove()
            term.backward()
            for name, calls in recorder.calls.items():
                for i, (_, output) in enumerate(calls):
                    if output.grad is not None:
                        grads[name][i] = grads[name][i] + output.grad / K
        for name, layer in layers.items():
            for x, g in zip(inputs[name], grads[name]):
                a = x.reshape(-1, layer.in_features)
                a = with_ones(a) if layer.bias is not None else a
                a_sums[name] = a_sums[name] + a.T @ a
                rows[name] += a.shape[0]
                if not isinstance(g, float):
                    g = g.reshape(-1, layer.out_features)
                    g_sums[name] = g_sums[name] + g.T @ g
    return {name: (a_sums[name] / rows[name], K * g_sums[name]) for name in layers}


def captured(
    layers: Mapping[str, nn.Linear],
    loss: Callable[[], Tensor],
    examples: int,
    reduction: str = "mean",
    loss_terms="examples",
    block_type=LinearBlock,
) -> dict[str, tuple[Tensor, Tensor]]:
    """``{name: (A, G)}`` as ``FactorCapture`` computes them from one backward of ``loss()``."""
    blocks = {name: block_type(layer) for name, layer in layers.items()}
    capture = FactorCapture(blocks, loss_reduction=reduction, dtype=F64, loss_terms=loss_terms)
    capture.attach()
    capture.start_microbatch(examples=examples)
    capture.begin_backward()
    loss().backward()
    capture.end_backward()
    batch = capture.pop()
    capture.detach()
    return {name: (b.factors["A"][0], b.factors["G"][0]) for name, b in batch.items()}


def assert_factors_equal(got, want, **tolerance) -> None:
    tolerance = tolerance or TIGHT
    assert set(got) == set(want), (sorted(got), sorted(want))
    for name in want:
        for key, x, y in zip("AG", got[name], want[name]):
            torch.testing.assert_close(x, y, msg=f"{key} of {name!r}", **tolerance)


# -- 1. N is a property of the step ----------------------------------------------------------


def example_loss(out: Tensor, target: Tensor) -> Tensor:
    """Each example's own loss term, summed over its positions, nonlinear in the output."""
    return (torch.tanh(out) * target).flatten(1).sum(1) + 0.1 * (out**2).flatten(1).sum(1)


def run_layer(layer: nn.Module, x: Tensor, mode: str) -> Tensor:
    """The layer on a batch-first (N, T, d) batch, however the forward pass organises it."""
    if mode == "batch_first":
        return layer(x)
    if mode == "sequence_first":  # (T, N, d), as batch_first=False transformers and RNNs
        return layer(x.transpose(0, 1).contiguous()).transpose(0, 1)
    if mode == "chunks":
        return torch.cat([layer(chunk) for chunk in x.chunk(4)])
    if mode == "loop":
        return torch.cat([layer(x[n : n + 1]) for n in range(len(x))])
    raise ValueError(mode)


def linear_data(seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(N, T, D_IN, generator=generator, dtype=F64)
    return TensorDataset(x, torch.randn(N, T, D_OUT, generator=generator, dtype=F64))


def linear_reference(layer: nn.Linear, data: TensorDataset, reduction: str = "mean"):
    x, target = data.tensors
    layer = copy.deepcopy(layer)

    def terms(n):
        return [example_loss(layer(x[n : n + 1]), target[n : n + 1]).sum()]

    return rule_reference({"layer": layer}, terms, N, K=N if reduction == "mean" else 1)


class LinearModule(L.LightningModule):
    def __init__(self, mode: str = "batch_first", reduction: str = "mean") -> None:
        super().__init__()
        self.layer = nn.Linear(D_IN, D_OUT, dtype=F64)
        self.mode = mode
        self.reduction = reduction

    def training_step(self, batch, batch_idx):
        x, target = batch
        per_example = example_loss(run_layer(self.layer, x, self.mode), target)
        return per_example.mean() if self.reduction == "mean" else per_example.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("mode", MODES)
def test_examples_are_a_property_of_the_step_capture(mode):
    torch.manual_seed(0)
    layer = nn.Linear(D_IN, D_OUT, dtype=F64)
    data = linear_data()
    x, target = data.tensors

    def factors(mode):
        return captured(
            {"layer": layer}, lambda: example_loss(run_layer(layer, x, mode), target).mean(), N
        )

    got = factors(mode)
    assert_factors_equal(got, factors("batch_first"))
    assert_factors_equal(got, linear_reference(layer, data))


def test_examples_are_a_property_of_the_step_in_a_fit():
    data = linear_data()
    results = {}
    for mode in MODES:
        torch.manual_seed(0)
        module = LinearModule(mode)
        initial = copy.deepcopy(module.layer)
        callback = KFACCallback(factor_dtype="float64", verbose=False)
        fit(module, data, N, [callback])
        results[mode] = callback.factors()
    reference = linear_reference(initial, data)
    for mode in MODES:
        assert_factors_equal(results[mode], results["batch_first"])
        assert_factors_equal(results[mode], reference)


# -- 2. what the loss averages over: K -------------------------------------------------------


def token_net() -> nn.Sequential:
    """Acts on every position on its own, so each token's term reaches only its rows."""
    return nn.Sequential(nn.Linear(D_IN, 7), nn.Tanh(), nn.Linear(7, VOCAB)).to(F64)


def token_data(seed: int = 1) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(N, T, D_IN, generator=generator, dtype=F64)
    return TensorDataset(x, torch.randint(0, VOCAB, (N, T), generator=generator))


def token_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy averaged over all N*T tokens."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def linears(net: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in net.named_modules() if isinstance(m, nn.Linear)}


def token_reference(net: nn.Module, data: TensorDataset) -> dict[str, tuple[Tensor, Tensor]]:
    """Per token: one loss term per position, K = N*T."""
    x, labels = data.tensors
    net = copy.deepcopy(net)

    def terms(n):
        logits = net(x[n])  # (T, vocab): example n alone
        return [F.cross_entropy(logits[t : t + 1], labels[n, t : t + 1]) for t in range(T)]

    return rule_reference(linears(net), terms, N, K=N * T)


def test_token_mean_loss_positions_and_examples():
    torch.manual_seed(2)
    net = token_net()
    data = token_data()
    x, labels = data.tensors
    layers = linears(net)

    def factors(loss_terms):
        return captured(layers, lambda: token_ce(net(x), labels), N, loss_terms=loss_terms)

    positions = factors("positions")
    assert_factors_equal(positions, token_reference(net, data))
    examples = factors("examples")
    for name in layers:  # the default is off by exactly T, and only in G
        torch.testing.assert_close(examples[name][0], positions[name][0], rtol=0, atol=0)
        torch.testing.assert_close(positions[name][1], T * examples[name][1], **TIGHT)


def test_positions_count_every_call_of_the_head():
    """The head run on the batch in 4 chunks still has N*T positions in the step."""
    torch.manual_seed(2)
    net = token_net()
    x, labels = token_data().tensors
    layers = linears(net)

    def loss(chunked):
        logits = torch.cat([net(c) for c in x.chunk(4)]) if chunked else net(x)
        return token_ce(logits, labels)

    batch_first = captured(layers, lambda: loss(False), N, loss_terms="positions")
    assert_factors_equal(
        captured(layers, lambda: loss(True), N, loss_terms="positions"), batch_first
    )


def test_positions_of_a_conv_head_are_its_output_locations():
    """A per-pixel loss over a conv's (N, C, H, W) output averages over K = N*H*W terms."""
    torch.manual_seed(14)
    conv = nn.Conv2d(2, 3, 3, padding=1, dtype=F64)
    x = torch.randn(4, 2, 5, 6, dtype=F64)
    labels = torch.randint(0, 3, (4, 5, 6))

    def factors(loss_terms):
        return captured(
            {"conv": conv},
            lambda: F.cross_entropy(conv(x), labels),
            len(x),
            loss_terms=loss_terms,
            block_type=ConvBlock,
        )

    positions, examples = factors("positions")["conv"], factors("examples")["conv"]
    torch.testing.assert_close(positions[0], examples[0], rtol=0, atol=0)
    torch.testing.assert_close(positions[1], 5 * 6 * examples[1], **TIGHT)


class TokenModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = token_net()

    def training_step(self, batch, batch_idx):
        x, labels = batch
        return token_ce(self.net(x), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_callable_loss_terms_equals_positions_in_a_fit():
    data = token_data()
    results = {}
    for loss_terms in ("positions", lambda batch: batch[1].numel()):
        torch.manual_seed(3)
        module = TokenModule()
        initial = copy.deepcopy(module.net)
        callback = KFACCallback(factor_dtype="float64", loss_terms=loss_terms, verbose=False)
        fit(module, data, N, [callback])
        results["callable" if callable(loss_terms) else loss_terms] = callback.factors()
    reference = {f"net.{name}": pair for name, pair in token_reference(initial, data).items()}
    assert_factors_equal(results["positions"], reference)
    assert_factors_equal(results["callable"], reference)


def test_elements_for_mse_over_outputs():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(D_IN, 7), nn.Tanh(), nn.Linear(7, D_OUT)).to(F64)
    x, target = linear_data(5).tensors
    layers = linears(net)

    def factors(loss_terms):
        return captured(layers, lambda: F.mse_loss(net(x), target), N, loss_terms=loss_terms)

    def terms(n):
        out = net(x[n])  # (T, D_OUT)
        return [(out[t, j] - target[n, t, j]) ** 2 for t in range(T) for j in range(D_OUT)]

    elements = factors("elements")
    assert_factors_equal(elements, rule_reference(layers, terms, N, K=N * T * D_OUT))
    examples = factors("examples")
    for name in layers:
        torch.testing.assert_close(elements[name][1], T * D_OUT * examples[name][1], **TIGHT)


# -- 3. a summed loss, and loss modules that disagree with loss_reduction --------------------


def test_sum_reduced_loss_in_a_fit():
    data = linear_data(6)
    torch.manual_seed(5)
    module = LinearModule(reduction="sum")
    initial = copy.deepcopy(module.layer)
    callback = KFACCallback(factor_dtype="float64", loss_reduction="sum", verbose=False)
    fit(module, data, N, [callback])
    assert_factors_equal(callback.factors(), linear_reference(initial, data, reduction="sum"))


class CriterionModule(Classifier):
    def __init__(self, criterion: nn.Module | None) -> None:
        super().__init__(mlp())
        self.criterion = criterion

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.criterion is None:
            return F.cross_entropy(self(x), y)
        return self.criterion(self(x), y)


@pytest.mark.parametrize(
    ("criterion_reduction", "loss_reduction", "mismatch"),
    [
        ("sum", "mean", True),
        ("mean", "sum", True),
        ("mean", "mean", False),
        ("sum", "sum", False),
        (None, "mean", False),  # no loss module
    ],
)
def test_loss_module_reduction_mismatch_warns_once(
    criterion_reduction, loss_reduction, mismatch, info
):
    torch.manual_seed(6)
    criterion = None
    if criterion_reduction is not None:
        criterion = nn.CrossEntropyLoss(reduction=criterion_reduction)
    callback = KFACCallback(loss_reduction=loss_reduction, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(CriterionModule(criterion), classification_data(32), 16, [callback], steps=2)
    messages = [m for m in kfac_warnings(caught) if "reduction" in m]
    if mismatch:
        assert len(messages) == 1, messages
        assert "'criterion'" in messages[0]
        assert f"reduction={criterion_reduction!r}" in messages[0]
        assert f"loss_reduction={loss_reduction!r}" in messages[0]
    else:
        assert messages == []
    # the fit-start line says which convention K-FAC works under
    expected = "taken as a sum" if loss_reduction == "sum" else "mean over the examples"
    assert any(expected in m and m.startswith("KFACCallback") for m in info.messages)


# -- 4. several optimizers, manual optimization: a GAN ---------------------------------------

Z, X = 3, 4


def generator_net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(Z, 6), nn.Tanh(), nn.Linear(6, X)).to(F64)


def discriminator_net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(X, 5), nn.Tanh(), nn.Linear(5, 1)).to(F64)


def bce(logits: Tensor, value: float, reduction: str = "mean") -> Tensor:
    return F.binary_cross_entropy_with_logits(
        logits, torch.full_like(logits, value), reduction=reduction
    )


class GAN(L.LightningModule):
    """Manual optimization with a generator and a discriminator optimizer.

    ``order``: the passes of a training step ("dg": discriminator first). ``toggle``: use
    ``toggle_optimizer``/``untoggle_optimizer`` around each pass. ``reuse_fake``: one
    generator forward feeds both losses (detached for the discriminator), as in Lightning's
    manual-optimization GAN example. Every pass records the states it starts from.
    """

    def __init__(self, order: str, toggle: bool, reuse_fake: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = generator_net()
        self.discriminator = discriminator_net()
        self.order = order
        self.toggle = toggle
        self.reuse_fake = reuse_fake
        self.passes: list[tuple[str, dict, dict, Tensor, Tensor]] = []

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.generator.parameters(), lr=0.1),
            torch.optim.SGD(self.discriminator.parameters(), lr=0.1),
        )

    def training_step(self, batch, batch_idx):
        real, z = batch
        opt_g, opt_d = self.optimizers()
        fake = self.generator(z) if self.reuse_fake else None
        for which in self.order:
            self.passes.append(
                (
                    which,
                    {k: v.clone() for k, v in self.generator.state_dict().items()},
                    {k: v.clone() for k, v in self.discriminator.state_dict().items()},
                    real,
                    z,
                )
            )
            optimizer = opt_d if which == "d" else opt_g
            if self.toggle:
                self.toggle_optimizer(optimizer)
            generated = fake if fake is not None else self.generator(z)
            if which == "d":
                loss = bce(self.discriminator(real), 1.0)
                loss = loss + bce(self.discriminator(generated.detach()), 0.0)
            else:
                loss = bce(self.discriminator(generated), 1.0)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            if self.toggle:
                self.untoggle_optimizer(optimizer)


def gan_reference(passes) -> dict[str, tuple[Tensor, Tensor]]:
    """Each network's factors from the last pass that produced its gradients, per example:
    the discriminator's from loss_d over real and fake, the generator's from loss_g."""
    reference = {}
    for which, g_state, d_state, real, z in passes[-2:]:
        generator, discriminator = generator_net(), discriminator_net()
        generator.load_state_dict(g_state)
        discriminator.load_state_dict(d_state)
        if which == "d":

            def terms(n, g=generator, d=discriminator, real=real, z=z):
                fake = g(z[n : n + 1])
                return [bce(d(real[n : n + 1]), 1.0, "sum") + bce(d(fake), 0.0, "sum")]

            net, prefix = discriminator, "discriminator"
        else:

            def terms(n, g=generator, d=discriminator, z=z):
                return [bce(d(g(z[n : n + 1])), 1.0, "sum")]

            net, prefix = generator, "generator"
        layers = linears(net)
        for name, pair in rule_reference(layers, terms, len(z), K=len(z)).items():
            reference[f"{prefix}.{name}"] = pair
    return reference


def gan_data() -> TensorDataset:
    generator = torch.Generator().manual_seed(7)
    real = torch.randn(2 * N, X, generator=generator, dtype=F64) + 1.0
    return TensorDataset(real, torch.randn(2 * N, Z, generator=generator, dtype=F64))


def fit_gan(module: GAN) -> KFACCallback:
    callback = KFACCallback(
        factor_dtype="float64", inv_update_freq=1, factor_decay=0.0, verbose=False
    )
    t = trainer(callbacks=[callback], max_epochs=1, limit_train_batches=2)
    t.fit(module, DataLoader(gan_data(), batch_size=N))
    return callback


@pytest.mark.parametrize("toggle", [True, False], ids=["toggle", "zero_grad"])
@pytest.mark.parametrize("order", ["dg", "gd"])
def test_gan_factors_follow_each_optimizer_backward(order, toggle):
    torch.manual_seed(8)
    module = GAN(order, toggle)
    callback = fit_gan(module)
    assert callback.engine.optimizer_steps == {0: 2, 1: 2}
    assert_factors_equal(callback.factors(), gan_reference(module.passes))


def test_gan_one_generator_forward_feeds_both_losses():
    """Lightning's manual-optimization GAN example: fake = G(z) once, D's loss on
    fake.detach() and backward, then G's loss on D(fake) and backward. The generator's
    forward statistics must survive the discriminator's backward, which does not reach it."""
    torch.manual_seed(8)
    module = GAN("dg", toggle=False, reuse_fake=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback = fit_gan(module)
    assert not [m for m in kfac_warnings(caught) if "no forward/backward pass" in m]
    assert_factors_equal(callback.factors(), gan_reference(module.passes))


# -- 5. one callback over a sweep of models --------------------------------------------------


def test_callback_reused_for_a_new_model_and_for_the_same_model(info):
    data = classification_data(48)
    callback = KFACCallback(verbose=False)

    def classifier(seed):
        torch.manual_seed(seed)
        return Classifier(mlp(), lr=0.05)

    fit(classifier(0), data, 16, [callback], steps=3)
    first_engine = callback.engine
    info.clear()

    second = classifier(1)
    fit(second, data, 16, [callback], steps=3)
    assert any("new model" in m and "dropped" in m for m in info.messages), info.messages
    engine = callback.engine
    assert engine is not first_engine and engine.steps == 3
    modules = dict(second.named_modules())
    assert set(engine.blocks) == {"net.0", "net.2", "net.4"}
    assert all(block.module is modules[name] for name, block in engine.blocks.items())

    plain = classifier(1)
    fit(plain, data, 16, steps=3)
    for (name, p), q in zip(second.named_parameters(), plain.parameters()):
        assert not torch.allclose(p, q), f"{name} was not preconditioned"

    info.clear()
    before = {name: tuple(t.clone() for t in pair) for name, pair in callback.factors().items()}
    fit(second, data, 16, [callback], steps=3)
    assert callback.engine is engine and engine.steps == 6
    assert not any("new model" in m for m in info.messages)
    assert all(not torch.equal(callback.factors()[n][1], before[n][1]) for n in before)


# -- 6. precision ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("precision", "factor_dtype", "expected"),
    [
        ("64-true", "auto", F64),
        ("32-true", "auto", torch.float32),
        ("64-true", "float32", torch.float32),
    ],
)
def test_factor_dtype_follows_precision(precision, factor_dtype, expected, info):
    torch.manual_seed(9)
    callback = KFACCallback(factor_dtype=factor_dtype, inv_update_freq=1, verbose=False)
    module = Classifier(mlp())
    fit(module, classification_data(32), 16, [callback], steps=2, precision=precision)
    assert callback.engine.dtype == expected
    assert all(t.dtype == expected for pair in callback.factors().values() for t in pair)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert any(f"factors in {expected}" in m for m in info.messages), info.messages


# -- 7. lazy and 8. zero-width layers --------------------------------------------------------


def test_lazy_linear_registered_after_first_batch():
    torch.manual_seed(10)
    net = nn.Sequential(nn.LazyLinear(16), nn.Tanh(), nn.Linear(16, 3))
    before, after = GradientProbe(), GradientProbe()
    callback = KFACCallback(inv_update_freq=1, verbose=False, include=["net.*", "nothing.*"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(Classifier(net), classification_data(48), 16, [before, callback, after], steps=3)
    messages = [str(w.message) for w in caught]
    assert len([m for m in messages if "lazy modules" in m]) == 1
    assert len([m for m in messages if "'nothing.*'" in m]) == 1, messages  # not repeated
    assert callback.engine is not None
    assert set(callback.engine.blocks) == {"net.0", "net.2"}
    assert callback.engine.blocks["net.0"].module is net[0]
    assert callback.engine.steps == 2
    raw, new = before.grads, after.grads
    torch.testing.assert_close(new[0]["net.0.weight"], raw[0]["net.0.weight"], rtol=0, atol=0)
    for step in (1, 2):
        assert not torch.allclose(new[step]["net.0.weight"], raw[step]["net.0.weight"])


class WithEmptyBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(12, 8)
        self.empty = nn.Linear(8, 0)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.head(torch.cat([h, self.empty(h)], dim=-1))


def test_zero_width_layer_is_skipped_with_a_reason(info):
    torch.manual_seed(11)
    callback = KFACCallback(inv_update_freq=1)
    module = Classifier(WithEmptyBranch())
    fit(module, classification_data(32), 16, [callback], steps=2)
    assert set(callback.engine.blocks) == {"net.body", "net.head"}
    assert set(callback.factors()) == {"net.body", "net.head"}
    table = next(m for m in info.messages if m.startswith("K-FAC registered layers"))
    assert "net.empty (Linear): zero-width layer" in table
    assert len(module.losses) == 2


# -- 9. kfac_ddp without the callback --------------------------------------------------------

INACTIVE = "without a KFACCallback: K-FAC is inactive"


def test_kfac_ddp_without_callback_check():
    strategy = KFACDDPStrategy()
    with pytest.warns(UserWarning, match=INACTIVE) as caught:
        strategy._warn_without_kfac_callback(types.SimpleNamespace(callbacks=[]))
    assert len([w for w in caught if INACTIVE in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strategy._warn_without_kfac_callback(types.SimpleNamespace(callbacks=[KFACCallback()]))


def test_kfac_ddp_without_callback_warns_in_a_fit():
    """One process (no child is launched): the check runs in the strategy's set-up."""
    environment = dict(os.environ)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(12)
            fit(Classifier(mlp()), classification_data(32), 16, strategy="kfac_ddp", steps=1)
        assert len([w for w in caught if INACTIVE in str(w.message)]) == 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)


# -- 10. patterns that match nothing ---------------------------------------------------------


def test_unmatched_patterns_warn_once_each_in_a_fit():
    torch.manual_seed(13)
    callback = KFACCallback(include=["net.*", "encoder.*"], exclude=["net.4", "decoder"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(Classifier(mlp()), classification_data(32), 16, [callback], steps=2)
    messages = kfac_warnings(caught)
    assert len([m for m in messages if "include pattern 'encoder.*'" in m]) == 1, messages
    assert len([m for m in messages if "exclude pattern 'decoder'" in m]) == 1, messages
    assert not [m for m in messages if "pattern 'net.*'" in m or "pattern 'net.4'" in m]
    assert set(callback.engine.blocks) == {"net.0", "net.2"}
