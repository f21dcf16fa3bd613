"""The true (Monte Carlo) Fisher (reference, section 6): G from the gradients of a loss on
targets sampled from the model's predictive distribution, by an extra backward pass."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_kfac import KFACCallback, KFACDDPStrategy
from lightning_kfac.blocks import LinearBlock
from lightning_kfac.engine import KFACEngine
from lightning_kfac.likelihood import Categorical, Gaussian, Likelihood, TrueFisher
from lightning_kfac.options import KFACOptions
from tests.helpers import (
    Classifier,
    InterleavedData,
    StepIndexedClassifier,
    classification_data,
    dummy_loader,
    loader,
    mlp,
    replicas_identical,
    trainer,
)
from tests.test_cli_errors import CALLBACK, assert_usage_error, parse_in_process

F64 = torch.float64
N, D_IN, HIDDEN = 4, 3, 5


def net(outputs: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, outputs)).double()


def engine_for(model: nn.Module, **options) -> KFACEngine:
    blocks = {name: LinearBlock(m) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    settings = dict(fisher="true", factor_dtype="float64", kl_clip=None, inv_update_freq=1)
    settings.update(options)
    engine = KFACEngine(blocks, KFACOptions(**settings), seed=3)
    engine.attach()
    return engine


def sampled_factors(engine: KFACEngine, model: nn.Module, x: torch.Tensor, examples: int):
    """One factor batch from the sampled pass alone (no training backward needed)."""
    engine.start_microbatch(1.0, examples=examples)
    model(x)
    engine.begin_backward()
    engine.end_backward()
    return {name: captured.factors for name, captured in engine.capture.pop().items()}


def exact_ggn(model: nn.Module, x: torch.Tensor, hessian, k: float) -> dict[str, torch.Tensor]:
    """``(1/K) sum_n J_n^T H_n J_n``, J_n the Jacobian of the model output with respect to
    each layer's output, H_n the per-example Hessian of the summed loss terms at f_n."""
    first, last = model[0], model[2]
    z = first(x)
    f = last(torch.tanh(z))
    out: dict[str, torch.Tensor] = {"0": 0.0, "2": 0.0}
    for n in range(x.shape[0]):
        h = hessian(f[n].detach())
        j_hidden = last.weight * (1 - torch.tanh(z[n].detach()) ** 2)  # df/dz
        out["2"] = out["2"] + h
        out["0"] = out["0"] + j_hidden.mT @ h @ j_hidden
    return {name: value / k for name, value in out.items()}


def softmax_hessian(f):
    p = torch.softmax(f, -1)
    return torch.diag(p) - torch.outer(p, p)


def mse_hessian(f):
    return 2 * torch.eye(f.shape[0], dtype=f.dtype)


def bce_hessian(f):
    s = torch.sigmoid(f)
    return torch.diag(s * (1 - s))


@pytest.mark.parametrize(
    "likelihood,outputs,terms,hessian",
    [
        ("categorical", 3, "examples", softmax_hessian),
        ("gaussian", 3, "elements", mse_hessian),
        ("bernoulli", 3, "elements", bce_hessian),
    ],
)
def test_expected_g_is_the_exact_ggn_factor(likelihood, outputs, terms, hessian):
    """Every example repeated M times in one batch: the batch's G is the mean of M*N
    independent samples, whose expectation is (1/K) sum_n J^T H J with K = N (softmax) or
    N*D (squared error and sigmoid cross-entropy averaged over every output)."""
    model = net(outputs)
    torch.manual_seed(1)
    x = torch.randn(N, D_IN, dtype=F64) * 2
    repeats = 4000
    engine = engine_for(model, likelihood=likelihood, loss_terms=terms)
    got = sampled_factors(engine, model, x.repeat(repeats, 1), N * repeats)
    k = N if terms == "examples" else N * outputs
    want = exact_ggn(model, x, hessian, k)
    for name in ("0", "2"):
        g = got[name]["G"][0]
        error = (g - want[name]).norm() / want[name].norm()
        # Monte Carlo error <= 0.017 seen; a wrong x2 scale gives 1.0
        assert error < 0.05, (name, float(error))
        assert (2 * g - want[name]).norm() / want[name].norm() > 0.5
    if likelihood == "gaussian":  # the reference's closed form on the last layer: (2/D) I
        eye = torch.eye(outputs, dtype=F64)
        torch.testing.assert_close(want["2"], 2 / outputs * eye)


def test_training_loss_gradients_and_global_rng_are_unchanged():
    """The sampled pass touches no .grad and draws from its own generator: the training
    loss's gradients are bitwise those of a run without K-FAC."""
    plain, sampled = net(3), net(3)
    x, y = torch.randn(8, D_IN, dtype=F64), torch.randint(0, 3, (8,))
    F.cross_entropy(plain(x), y).backward()
    engine = engine_for(sampled)
    engine.start_microbatch(1.0, examples=8)
    loss = F.cross_entropy(sampled(x), y)
    rng = torch.get_rng_state()
    engine.begin_backward()
    assert all(p.grad is None for p in sampled.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    loss.backward()
    engine.end_backward()
    for a, b in zip(plain.parameters(), sampled.parameters()):
        assert torch.equal(a.grad, b.grad)
    factors = engine.capture.pop()
    assert set(factors) == {"0", "2"}  # and G came from the sampled pass, not the labels
    assert not torch.allclose(factors["2"].factors["G"], _empirical_g(x, y))


def _empirical_g(x, y):
    model = net(3)
    engine = engine_for(model, fisher="empirical")
    engine.start_microbatch(1.0, examples=x.shape[0])
    loss = F.cross_entropy(model(x), y)
    engine.begin_backward()
    loss.backward()
    engine.end_backward()
    return engine.capture.pop()["2"].factors["G"]


class NaNTargets(Gaussian):
    def sample(self, output, class_dim, generator):
        return torch.full_like(output, float("nan"))


def test_bad_input():
    with pytest.raises(ValueError, match=r"likelihood must be one of \('categorical', 'gaussian'"):
        KFACCallback(fisher="true", likelihood="poisson")
    with pytest.raises(ValueError, match=r"fisher must be one of \('empirical', 'true'\)"):
        KFACCallback(fisher="monte-carlo")
    # a categorical likelihood on one output per example: a clear error at the first factor step
    model = net(1)
    engine = engine_for(model)
    engine.start_microbatch(1.0, examples=N)
    model(torch.randn(N, D_IN, dtype=F64))
    with pytest.raises(ValueError, match="at least 2 classes"):
        engine.begin_backward()


@pytest.mark.parametrize("case", ["non-finite sample", "non-finite output"])
def test_non_finite_sample_skips_the_factor_batch(case):
    """A NaN target, or logits that cannot be sampled from (NaN: torch.multinomial would
    raise), make the sampled gradients non-finite: the factor batch is skipped, the factors
    stay as they were."""
    model = net(3)
    likelihood = NaNTargets() if case == "non-finite sample" else "categorical"
    engine = engine_for(model, likelihood=likelihood)
    x = torch.randn(N, D_IN, dtype=F64)
    params = [{"params": list(model.parameters()), "lr": 0.1}]

    def step(inputs):
        model.zero_grad(set_to_none=True)
        engine.start_microbatch(1.0, examples=N)
        loss = model(inputs).square().mean()
        engine.begin_backward()
        if torch.isfinite(loss):
            loss.backward()
        engine.end_backward()
        engine.step(params)

    if case == "non-finite sample":
        step(x)
        assert engine.counters.skipped_batches == 1 and not engine.state["2"].running
        return
    step(x)
    before = {k: t.clone() for k, t in engine.state["2"].running.items()}
    bad = x.clone()
    bad[0, 0] = float("nan")
    step(bad)
    assert engine.counters.skipped_batches == 1 and engine.true_fisher.non_finite == 1
    for key, value in engine.state["2"].running.items():
        assert torch.equal(value, before[key])


# -- Lightning -----------------------------------------------------------------------------


class ArgmaxCategorical(Categorical):
    """A "sample" that is a fixed function of each example's logits: the same per-example
    targets whatever the batch split, so several ranks can equal one process."""

    def sample(self, output, class_dim, generator):
        logits = output.detach().movedim(class_dim, -1)
        return (logits + torch.sin(1e3 * logits)).argmax(-1)


def fisher_callback(**overrides) -> KFACCallback:
    options = dict(damping=1e-2, inv_update_freq=3, fisher="true", verbose=False)
    options.update(overrides)
    return KFACCallback(**options)


def params_of(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def fit(callback, steps=6, seed=7, batch=16, sampler_seed=None, **trainer_options):
    L.seed_everything(seed, verbose=False)
    module = Classifier(mlp(), lr=0.05)
    if sampler_seed is not None:  # the same model and data, another seed for the sampler
        os.environ["PL_GLOBAL_SEED"] = str(sampler_seed)
    trainer(callbacks=[callback], max_steps=steps, **trainer_options).fit(
        module, loader(classification_data(16 * steps), batch)
    )
    return module


def test_fixed_seed_gives_identical_runs_and_another_seed_other_samples():
    a, b = fit(fisher_callback()), fit(fisher_callback())
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    c = fit(fisher_callback(), sampler_seed=8)
    assert c.losses[0] == a.losses[0]
    assert not torch.equal(next(a.parameters()), next(c.parameters()))
    empirical = fit(fisher_callback(fisher="empirical"))
    assert empirical.losses[0] == a.losses[0]  # the training loss itself is untouched
    assert not torch.equal(next(empirical.parameters()), next(a.parameters()))


def test_accumulation_equals_larger_batch_with_the_same_samples():
    big = fit(fisher_callback(likelihood=ArgmaxCategorical()), batch=32, steps=4)
    small = fit(
        fisher_callback(likelihood=ArgmaxCategorical()),
        batch=8,
        steps=4,
        accumulate_grad_batches=4,
    )
    for x, y in zip(small.parameters(), big.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_named_output_module_and_bf16_autocast():
    default = fit(fisher_callback())
    named = fit(fisher_callback(fisher_output="net.4"))  # the last layer: the same output
    assert all(torch.equal(x, y) for x, y in zip(default.parameters(), named.parameters()))
    with pytest.raises(ValueError, match=r"fisher_output='net\.9' names no module"):
        fit(fisher_callback(fisher_output="net.9"))
    callback = fisher_callback()
    fit(callback, precision="bf16-mixed")
    assert callback.engine.counters.skipped_batches == 0
    assert all(
        t.dtype == torch.float32 and torch.isfinite(t).all()
        for pair in callback.factors().values()
        for t in pair
    )


def test_resume_equals_uninterrupted_run(tmp_path):
    data = classification_data(4 * 16)

    def module(seed):
        torch.manual_seed(seed)
        return StepIndexedClassifier(mlp(), data, 16, lr=0.05)

    L.seed_everything(11, verbose=False)
    straight = module(0)
    trainer(callbacks=[fisher_callback()], max_steps=8).fit(straight, dummy_loader())
    L.seed_everything(11, verbose=False)
    t = trainer(callbacks=[fisher_callback()], max_steps=4)
    t.fit(module(0), dummy_loader())
    path = tmp_path / "half.ckpt"
    t.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["callbacks"]["KFACCallback"]
    assert len(state["true_fisher"]["ranks"]) == 1
    L.seed_everything(99, verbose=False)  # the generator's state comes from the checkpoint
    resumed = module(123)
    trainer(callbacks=[fisher_callback()], max_steps=8).fit(resumed, dummy_loader(), ckpt_path=path)
    for (name, a), b in zip(resumed.named_parameters(), straight.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


class Report(Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        assert replicas_identical(pl_module), "replicas drifted"

    def on_train_end(self, trainer, pl_module) -> None:
        kfac = next(c for c in trainer.callbacks if isinstance(c, KFACCallback))
        seeds = [None] * trainer.world_size
        torch.distributed.all_gather_object(seeds, kfac.engine.true_fisher.seed)
        if trainer.global_rank == 0:
            Path(self.path).write_text(json.dumps({"seeds": seeds}))


def two_ranks(likelihood, tmp_path, steps):
    L.seed_everything(7, verbose=False)
    module = Classifier(mlp(), lr=0.05)
    report = tmp_path / "report.json"
    trainer(
        devices=2,
        strategy=KFACDDPStrategy(start_method="spawn"),
        callbacks=[fisher_callback(likelihood=likelihood), Report(str(report))],
        max_steps=steps,
        use_distributed_sampler=False,
    ).fit(module, datamodule=InterleavedData(classification_data(24 * steps), 12))
    return module, json.loads(report.read_text())


def test_two_ranks(tmp_path):
    """With the same per-example samples (a likelihood whose sample is a function of the
    example's logits), 2 ranks with local batch 12 equal 1 process with batch 24. With the
    built-in sampler each rank draws its own samples (another seed per rank), so the runs
    differ from 1 process by the samples alone; the replicas stay bitwise identical."""
    steps = 6
    L.seed_everything(7, verbose=False)
    single = Classifier(mlp(), lr=0.05)
    trainer(
        callbacks=[fisher_callback(likelihood=ArgmaxCategorical())],
        max_steps=steps,
        use_distributed_sampler=False,
    ).fit(single, datamodule=InterleavedData(classification_data(24 * steps), 24))
    double, _ = two_ranks(ArgmaxCategorical(), tmp_path, steps)
    for (name, got), want in zip(double.named_parameters(), single.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
    _, report = two_ranks("categorical", tmp_path, steps)
    assert len(set(report["seeds"])) == 2
    assert TrueFisher("categorical", 7, 0).seed == report["seeds"][0]


def test_cli_rejects_an_unknown_likelihood_at_parse_time(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["cli.py"])
    config = tmp_path / "bad.yaml"
    config.write_text(CALLBACK + "        fisher: true\n        likelihood: poisson\n")
    message = "likelihood must be one of ('categorical', 'gaussian', 'bernoulli'), got 'poisson'"
    assert_usage_error(*parse_in_process(config, capsys), message)
    config.write_text(CALLBACK + "        fisher: sampled\n")
    message = "fisher must be one of ('empirical', 'true'), got 'sampled'"
    assert_usage_error(*parse_in_process(config, capsys), message)


def test_likelihood_is_an_extension_point():
    assert isinstance(ArgmaxCategorical(), Likelihood)
    sampler = TrueFisher(ArgmaxCategorical())
    logits = torch.tensor([[0.0, 5.0, 0.0]], requires_grad=True)
    assert sampler.sampled_loss(logits, terms=1.0).requires_grad
