"""Real Lightning Trainer fits with KFACCallback on one CPU process."""

from __future__ import annotations

import typing
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_kfac import KFACCallback, StepDecay
from tests.helpers import Classifier, classification_data, cnn, loader, mlp, sequence_data, trainer


class GradientProbe(Callback):
    """Records every parameter's gradient when its on_before_optimizer_step runs."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append(
            {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        )


def fit(module, data, batch_size=32, callbacks=(), **trainer_kwargs):
    t = trainer(callbacks=list(callbacks), **trainer_kwargs)
    t.fit(module, loader(data, batch_size, shuffle=True))
    return t


def epoch_means(losses, steps_per_epoch):
    return [
        sum(losses[i : i + steps_per_epoch]) / steps_per_epoch
        for i in range(0, len(losses), steps_per_epoch)
    ]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_fit_reduces_loss(kind):
    torch.manual_seed(0)
    net, data = (mlp(), classification_data()) if kind == "mlp" else (cnn(), sequence_data())
    module = Classifier(net, lr=0.05)
    callback = KFACCallback(damping=1e-2, inv_update_freq=5)
    fit(module, data, callbacks=[callback], max_epochs=6)
    means = epoch_means(module.losses, 8)
    assert means[-1] < 0.6 * means[0], means
    supported = {
        f"net.{n}" for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d))
    }
    assert set(callback.factors()) == supported
    assert callback.engine.steps == 48


def test_factors_are_registered_by_name_and_shape():
    torch.manual_seed(0)
    module = Classifier(cnn(), lr=0.05)
    callback = KFACCallback()
    fit(module, sequence_data(64), callbacks=[callback], max_steps=2)
    shapes = {name: (tuple(A.shape), tuple(G.shape)) for name, (A, G) in callback.factors().items()}
    assert shapes == {  # (d, d) where groups is 1; grouped convolutions keep their groups
        "net.0": ((7, 7), (8, 8)),
        "net.2": ((2, 13, 13), (2, 4, 4)),
        "net.5": ((65, 65), (2, 2)),
    }


def test_unsupported_layer_keeps_raw_gradient_and_registered_layers_change():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(12, 16), nn.PReLU(16), nn.ReLU(inplace=True), nn.Linear(16, 3))
    before, after = GradientProbe(), GradientProbe()
    fit(
        Classifier(net),
        classification_data(64),
        callbacks=[before, KFACCallback(), after],
        max_steps=3,
    )
    for raw, new in zip(before.grads, after.grads):
        torch.testing.assert_close(new["net.1.weight"], raw["net.1.weight"], rtol=0, atol=0)
        assert not torch.allclose(new["net.0.weight"], raw["net.0.weight"])
        assert not torch.allclose(new["net.3.weight"], raw["net.3.weight"])


def test_in_place_relu_gives_same_factors_as_out_of_place():
    factors = []
    for inplace in (True, False):
        torch.manual_seed(2)
        callback = KFACCallback()
        fit(
            Classifier(mlp(inplace=inplace)),
            classification_data(64),
            callbacks=[callback],
            max_steps=3,
        )
        factors.append(callback.factors())
    for name in factors[0]:
        for got, want in zip(factors[0][name], factors[1][name]):
            torch.testing.assert_close(got, want)


def test_adam_param_groups_and_gradient_clipping_see_preconditioned_gradient():
    class ClipProbe(Classifier):
        clipped_norms: typing.ClassVar[list[float]] = []

        def configure_gradient_clipping(
            self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
        ):
            self.clipped_norms.append(self.net[0].weight.grad.norm().item())
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    torch.manual_seed(3)
    module = ClipProbe(mlp(), optimizer="adamw_groups", lr=0.01)
    after = GradientProbe()
    fit(
        module,
        classification_data(128),
        callbacks=[KFACCallback(momentum=StepDecay(0.9, 0.5, [4])), after],
        max_epochs=3,
        gradient_clip_val=1.0,
    )
    assert module.clipped_norms == pytest.approx(
        [g["net.0.weight"].norm().item() for g in after.grads], rel=1e-6
    )
    optimizer = module.trainer.optimizers[0]
    assert [group["betas"][0] for group in optimizer.param_groups] == [0.45, 0.45]
    assert epoch_means(module.losses, 4)[-1] < epoch_means(module.losses, 4)[0]


def test_no_supported_layer_warns_and_trains_first_order():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(12, 3) * 0.1)

        def forward(self, x):
            return x @ self.w

    with pytest.warns(UserWarning, match="no supported layer"):
        module = Classifier(Scale())
        fit(module, classification_data(64), callbacks=[KFACCallback()], max_steps=4)
    assert len(module.losses) == 4


def test_frozen_excluded_and_unused_layers():
    torch.manual_seed(4)
    net = mlp()
    for p in net[2].parameters():
        p.requires_grad_(False)
    module = Classifier(net)
    module.spare = nn.Linear(3, 3)  # registered, never called by forward
    callback = KFACCallback(exclude=["net.4"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(module, classification_data(64), callbacks=[callback], max_steps=3)
    messages = [str(w.message) for w in caught if "K-FAC" in str(w.message)]
    assert len([m for m in messages if "'spare'" in m]) == 1
    assert set(callback.factors()) == {"net.0"}
    assert set(callback.engine.blocks) == {"net.0", "spare"}


def test_schedules_are_functions_of_the_step():
    seen = []

    def damping(step):
        seen.append(step)
        return 1e-2 / (1 + step)

    torch.manual_seed(5)
    callback = KFACCallback(damping=damping, kl_clip=lambda step: 1e-3, inv_update_freq=2)
    fit(Classifier(mlp()), classification_data(64), callbacks=[callback], max_steps=4)
    assert seen == [0, 1, 2, 3]
    assert callback.last_stats.damping == pytest.approx(1e-2 / 4)
