"""Argument validation: every invalid argument fails at construction with a ValueError
naming it; numbers of any numeric type are accepted and stored as Python numbers."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from lightning_kfac import ExponentialDecay, KFACCallback, KFACDDPStrategy, StepDecay
from lightning_kfac.options import (
    DataParallelOptions,
    KFACOptions,
    check_int_at_least,
    check_real,
)

INF, NAN = float("inf"), float("nan")

# -- KFACCallback ------------------------------------------------------------------------

INVALID_CALLBACK_ARGUMENTS = [
    # float options: non-finite, bool, non-numbers, non-scalar tensors
    *(("damping", bad) for bad in (INF, -INF, NAN, 0.0, -1, True, "0.1", None)),
    ("damping", torch.tensor([0.1, 0.2])),
    ("damping", np.float32("inf")),
    ("damping", torch.tensor(True)),
    *(("factor_decay", bad) for bad in (INF, NAN, 1.0, -0.1, True, "0.9")),
    *(("kl_clip", bad) for bad in (INF, NAN, 0.0, False, "1e-3")),
    *(("momentum", bad) for bad in (INF, NAN, 1.0, True, torch.tensor(float("nan")))),
    # integer options: below the minimum, non-integral, bool
    *(("factor_update_freq", bad) for bad in (0, 2.0, True, np.float64(2.0), "2")),
    ("factor_update_freq", torch.tensor(2.0)),
    *(("inv_update_freq", bad) for bad in (0, 2.5, True, None, INF)),
    *(("staleness", bad) for bad in (-1, 1.5, True, np.int64(11))),
    *(("log_every_n_steps", bad) for bad in (-1, 1.5, True, "5", torch.tensor(2.0))),
    # lists of strings
    *(("include", bad) for bad in ([1], ["net.*", None], "net.*", 5, [["net.*"]])),
    *(("exclude", bad) for bad in ([1], "net.*", 5, [b"net"])),
    *(("progress_bar", bad) for bad in (["dampin"], "damping", [["damping"]], 5, [1])),
    # choices and flags
    *(("damping_method", bad) for bad in ("cholesky", ["exact"], None)),
    *(("loss_reduction", bad) for bad in ("avg", ["mean"], 1)),
    *(("factor_dtype", bad) for bad in ("float16", ["float32"], torch.float16, None)),
    *(("verbose", bad) for bad in ("no", 1, None)),
]


@pytest.mark.parametrize(
    "name,value",
    INVALID_CALLBACK_ARGUMENTS,
    ids=[f"{name}={value!r}" for name, value in INVALID_CALLBACK_ARGUMENTS],
)
def test_invalid_callback_argument_raises_at_construction(name, value):
    with pytest.raises(ValueError, match=name):
        KFACCallback(**{name: value})


def test_none_lists_are_empty():
    callback = KFACCallback(exclude=None, progress_bar=None)
    assert callback.exclude == [] and callback.progress_bar == []
    assert KFACCallback(include=None).include is None


def test_lists_are_normalised():
    callback = KFACCallback(
        include=("net.*",), exclude=(p for p in ["net.0"]), progress_bar=("damping",)
    )
    assert callback.include == ["net.*"]
    assert callback.exclude == ["net.0"]
    assert callback.progress_bar == ["damping"]


NUMERIC_TYPES = [
    pytest.param(lambda x: x, id="python"),
    pytest.param(np.float32, id="np.float32"),
    pytest.param(np.float64, id="np.float64"),
    pytest.param(torch.tensor, id="tensor"),
    pytest.param(lambda x: torch.tensor(x, dtype=torch.float64), id="tensor64"),
    pytest.param(np.array, id="np.array-0d"),
]

INTEGER_TYPES = [
    pytest.param(lambda x: x, id="python"),
    pytest.param(np.int64, id="np.int64"),
    pytest.param(np.int32, id="np.int32"),
    pytest.param(torch.tensor, id="tensor"),
    pytest.param(np.array, id="np.array-0d"),
]


@pytest.mark.parametrize("real", NUMERIC_TYPES)
def test_float_options_accept_any_real_type(real):
    callback = KFACCallback(
        damping=real(0.5), factor_decay=real(0.75), kl_clip=real(0.25), momentum=real(0.5)
    )
    options = callback.options
    for name, expected in [("damping", 0.5), ("factor_decay", 0.75), ("kl_clip", 0.25)]:
        value = getattr(options, name)
        assert type(value) is float and value == expected, name
    assert type(options.momentum) is float and options.momentum == 0.5
    assert type(options.damping_at(3)) is float


def test_float_options_accept_integers_and_fractions():
    options = KFACCallback(damping=np.int64(1), kl_clip=Fraction(1, 4)).options
    assert type(options.damping) is float and options.damping == 1.0
    assert type(options.kl_clip) is float and options.kl_clip == 0.25
    assert math.isclose(KFACCallback(damping=np.float32(1e-2)).options.damping, 1e-2, rel_tol=1e-6)


@pytest.mark.parametrize("integer", INTEGER_TYPES)
def test_integer_options_accept_any_integral_type(integer):
    callback = KFACCallback(
        factor_update_freq=integer(2),
        inv_update_freq=integer(4),
        staleness=integer(1),
        log_every_n_steps=integer(5),
    )
    options = callback.options
    values = {
        "factor_update_freq": (options.factor_update_freq, 2),
        "inv_update_freq": (options.inv_update_freq, 4),
        "staleness": (options.staleness, 1),
        "log_every_n_steps": (callback.log_every_n_steps, 5),
    }
    for name, (value, expected) in values.items():
        assert type(value) is int and value == expected, name


def test_flags_and_choices_are_normalised():
    callback = KFACCallback(
        verbose=np.bool_(False), damping_method=np.str_("factored"), factor_dtype=torch.float64
    )
    assert callback.verbose is False
    assert type(callback.options.damping_method) is str
    assert callback.options.factor_dtype == "float64"


# -- scheduled reads ---------------------------------------------------------------------

SCHEDULED = [
    ("damping", "damping_at", INF),
    ("damping", "damping_at", NAN),
    ("damping", "damping_at", True),
    ("damping", "damping_at", "0.1"),
    ("factor_decay", "factor_decay_at", NAN),
    ("factor_decay", "factor_decay_at", INF),
    ("kl_clip", "kl_clip_at", INF),
    ("kl_clip", "kl_clip_at", torch.tensor(float("nan"))),
    ("momentum", "momentum_at", INF),
    ("momentum", "momentum_at", np.float32("nan")),
]


@pytest.mark.parametrize(
    "name,reader,bad", SCHEDULED, ids=[f"{name}={bad!r}" for name, _, bad in SCHEDULED]
)
def test_invalid_scheduled_value_raises_naming_option_and_step(name, reader, bad):
    options = KFACOptions(**{name: lambda step: 0.5 if step < 3 else bad})
    assert getattr(options, reader)(2) == 0.5
    with pytest.raises(ValueError, match=f"{name} at step 3 must be") as error:
        getattr(options, reader)(3)
    assert f"got {bad!r}" in str(error.value)


def test_scheduled_values_of_any_real_type_are_floats():
    options = KFACOptions(
        damping=lambda step: np.float32(0.5),
        factor_decay=lambda step: torch.tensor(0.5),
        kl_clip=lambda step: np.int64(1),
        momentum=lambda step: Fraction(1, 2),
    )
    for reader in ("damping_at", "factor_decay_at", "kl_clip_at", "momentum_at"):
        value = getattr(options, reader)(7)
        assert type(value) is float, reader


# -- schedules ---------------------------------------------------------------------------

INVALID_SCHEDULES = [
    (StepDecay, dict(value=INF, factor=0.5, milestones=[1]), "value"),
    (StepDecay, dict(value="1", factor=0.5, milestones=[1]), "value"),
    (StepDecay, dict(value=1.0, factor=0.0, milestones=[1]), "factor"),
    (StepDecay, dict(value=1.0, factor=-0.5, milestones=[1]), "factor"),
    (StepDecay, dict(value=1.0, factor=NAN, milestones=[1]), "factor"),
    (StepDecay, dict(value=1.0, factor=True, milestones=[1]), "factor"),
    (StepDecay, dict(value=1.0, factor=0.5, milestones=5), "milestones"),
    (StepDecay, dict(value=1.0, factor=0.5, milestones=torch.tensor(5)), "milestones"),
    (StepDecay, dict(value=1.0, factor=0.5, milestones="10"), "milestones"),
    (StepDecay, dict(value=1.0, factor=0.5, milestones=[-1]), "milestones"),
    (StepDecay, dict(value=1.0, factor=0.5, milestones=[1.5]), "milestones"),
    (StepDecay, dict(value=1.0, factor=0.5, milestones=[True]), "milestones"),
    (StepDecay, dict(value=1.0, factor=0.5, milestones=None), "milestones"),
    (ExponentialDecay, dict(value=NAN, rate=0.5), "value"),
    (ExponentialDecay, dict(value=1.0, rate=0.0), "rate"),
    (ExponentialDecay, dict(value=1.0, rate=INF), "rate"),
    (ExponentialDecay, dict(value=1.0, rate=0.5, every=0), "every"),
    (ExponentialDecay, dict(value=1.0, rate=0.5, every=1.5), "every"),
    (ExponentialDecay, dict(value=1.0, rate=0.5, every=True), "every"),
    (ExponentialDecay, dict(value=1.0, rate=0.5, minimum=-1e-3), "minimum"),
    (ExponentialDecay, dict(value=1.0, rate=0.5, minimum=INF), "minimum"),
]


@pytest.mark.parametrize(
    "cls,kwargs,name",
    INVALID_SCHEDULES,
    ids=[f"{cls.__name__}-{name}={kwargs[name]!r}" for cls, kwargs, name in INVALID_SCHEDULES],
)
def test_invalid_schedule_argument_raises_at_construction(cls, kwargs, name):
    with pytest.raises(ValueError, match=f"{cls.__name__} {name}"):
        cls(**kwargs)


def test_schedules_accept_any_numeric_type():
    step = StepDecay(np.float32(1.0), torch.tensor(0.5), np.array([10, 5]))
    assert (type(step.value), type(step.factor)) == (float, float)
    assert step.milestones == [5, 10] and all(type(m) is int for m in step.milestones)
    assert (step(4), step(5), step(10)) == (1.0, 0.5, 0.25)
    decay = ExponentialDecay(np.float64(1.0), np.float32(0.5), every=np.int64(10))
    assert type(decay.every) is int and type(decay.rate) is float
    assert decay(10) == 0.5
    assert KFACOptions(damping=decay).damping_at(20) == 0.25


# -- data-parallel options and KFACDDPStrategy -------------------------------------------

INVALID_DATA_PARALLEL = [
    *(("bucket_cap_mb", bad) for bad in ("25", 0, -1.0, INF, NAN, True, None)),
    *(("pack_triangular", bad) for bad in ("no", 0, None)),
    *(("reduce_every_update", bad) for bad in ("yes", 1, None)),
    *(("precondition_mode", bad) for bad in ("fast", None, ["shared"])),
]
DATA_PARALLEL_IDS = [f"{name}={value!r}" for name, value in INVALID_DATA_PARALLEL]


@pytest.mark.parametrize("name,value", INVALID_DATA_PARALLEL, ids=DATA_PARALLEL_IDS)
def test_invalid_data_parallel_option_raises(name, value):
    with pytest.raises(ValueError, match=f"^{name}"):
        DataParallelOptions(**{name: value})


@pytest.mark.parametrize("name,value", INVALID_DATA_PARALLEL, ids=DATA_PARALLEL_IDS)
def test_invalid_strategy_option_raises_naming_the_strategy_argument(name, value):
    with pytest.raises(ValueError, match=f"^kfac_{name}"):
        KFACDDPStrategy(**{f"kfac_{name}": value})


def test_strategy_options_are_normalised():
    strategy = KFACDDPStrategy(
        kfac_bucket_cap_mb=np.float32(0.5),
        kfac_pack_triangular=np.bool_(False),
        kfac_reduce_every_update=torch.tensor(True),
        kfac_precondition_mode="owner",
    )
    assert strategy.kfac_options == DataParallelOptions(
        reduce_every_update=True,
        pack_triangular=False,
        precondition_mode="owner",
        bucket_cap_mb=0.5,
    )
    options = strategy.kfac_options
    assert type(options.bucket_cap_mb) is float
    assert options.pack_triangular is False and options.reduce_every_update is True
    assert KFACDDPStrategy().kfac_options == DataParallelOptions()


# -- the shared helpers ------------------------------------------------------------------


def test_check_real_and_check_int_at_least():
    assert check_real("x", torch.tensor(2)) == 2.0
    assert check_real("x", 0.0, at_least=0.0) == 0.0
    with pytest.raises(ValueError, match="x must be a positive finite number"):
        check_real("x", 0.0, above=0.0)
    with pytest.raises(ValueError, match="x must be a finite real number"):
        check_real("x", 10**400)
    assert check_int_at_least("n", np.uint8(3), 1) == 3
    assert check_int_at_least("n", None, 0, none_ok=True) is None
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        check_int_at_least("n", None, 1)
    with pytest.raises(ValueError, match="n must be None or an integer >= 0"):
        check_int_at_least("n", -1, 0, none_ok=True)
