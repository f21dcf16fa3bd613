"""K-FAC hyperparameters, validated once at construction and at every scheduled read.

Numbers may be of any numeric type (Python, numpy scalars, 0-dim tensors) and are stored as
Python ``float``/``int``; bools are never accepted where a number is expected.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, overload

import torch

from lightning_kfac.likelihood import LIKELIHOODS, Likelihood, check_fisher, check_likelihood
from lightning_kfac.preconditioning import DAMPING_METHODS
from lightning_kfac.schedules import Schedule

LOSS_REDUCTIONS = ("mean", "sum")
#: What a mean-reduced loss averages over (see ``KFACCallback``'s ``loss_terms``).
LOSS_TERMS = ("examples", "positions", "elements")
FACTOR_DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: ``factor_dtype`` choices: ``"auto"`` follows the parameters (float64 parameters give
#: float64 factors; float32 and half-precision parameters give float32).
FACTOR_DTYPE_CHOICES = ("auto", *FACTOR_DTYPES)
PRECONDITION_MODES = ("shared", "owner")


# -- shared argument checks --------------------------------------------------------------


def _item(value: Any) -> Any:
    """A 0-dim tensor or array (anything 0-dim with ``.item()``) as its Python item."""
    if isinstance(value, numbers.Number) or not callable(getattr(value, "item", None)):
        return value
    if getattr(value, "ndim", None) != 0:
        return value
    try:
        return value.item()
    except (TypeError, ValueError, RuntimeError):
        return value


def _is_real(item: Any) -> bool:
    return isinstance(item, numbers.Real) and not isinstance(item, bool)


def check_real(
    name: str,
    value: Any,
    *,
    above: float | None = None,
    at_least: float | None = None,
    alternative: str = "",
) -> float:
    """``value`` as a Python float: a finite real number of any numeric type, not a bool.

    Args:
        name: the argument, named in the error message.
        value: the value to check.
        above: if set, ``value`` must be greater than it.
        at_least: if set, ``value`` must be at least it.
        alternative: appended to what is allowed in the message, for what else the caller
            accepts (e.g. ``" or None (off)"``).

    Raises:
        ValueError: naming ``name`` and what is allowed.
    """
    item = _item(value)
    result = math.nan
    if _is_real(item):
        try:
            result = float(item)
        except OverflowError:
            result = math.inf
    ok = (
        math.isfinite(result)
        and (above is None or result > above)
        and (at_least is None or result >= at_least)
    )
    if not ok:
        if (above, at_least) == (0.0, None):
            allowed = "a positive finite number"
        elif (above, at_least) == (None, 0.0):
            allowed = "a non-negative finite number"
        else:
            allowed = "a finite real number"
            allowed += f" > {above}" if above is not None else ""
            allowed += f" >= {at_least}" if at_least is not None else ""
        raise ValueError(f"{name} must be {allowed}{alternative}, got {value!r}")
    return result


@overload
def check_int_at_least(
    name: str, value: Any, minimum: int, *, none_ok: Literal[False] = False
) -> int: ...
@overload
def check_int_at_least(name: str, value: Any, minimum: int, *, none_ok: bool) -> int | None: ...
def check_int_at_least(name: str, value: Any, minimum: int, *, none_ok: bool = False) -> int | None:
    """``value`` as a Python int ``>= minimum``: any integral type (Python, numpy, a 0-dim
    integer tensor), not a bool or a float; None passes through if ``none_ok``.

    Raises:
        ValueError: naming ``name`` and what is allowed.
    """
    if none_ok and value is None:
        return None
    item = _item(value)
    if isinstance(item, numbers.Integral) and not isinstance(item, bool) and item >= minimum:
        return int(item)
    allowed = f"None or an integer >= {minimum}" if none_ok else f"an integer >= {minimum}"
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a Python bool: ``True``/``False`` (or a numpy/0-dim tensor bool).

    Raises:
        ValueError: naming ``name``, for anything else (``0``, ``"no"``, None, ...).
    """
    item = _item(value)
    if not isinstance(item, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return item


def check_choice(name: str, value: Any, allowed: Collection[str]) -> str:
    """``value`` as a Python str, one of ``allowed``.

    Raises:
        ValueError: naming ``name`` and the allowed values.
    """
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return str(value)


def check_str_list(
    name: str, value: Any, what: str = "strings", allowed: Collection[str] | None = None
) -> list[str]:
    """``value`` as a list of Python strs (None: empty), each in ``allowed`` if given.

    Any iterable of strings is accepted, but not a bare string.

    Raises:
        ValueError: naming ``name`` and what is allowed.
    """
    if value is None:
        return []
    items = list(value) if isinstance(value, Iterable) and not isinstance(value, str) else None
    if items is None or not all(
        isinstance(item, str) and (allowed is None or item in allowed) for item in items
    ):
        raise ValueError(f"{name} must be None or a list of {what}, got {value!r}")
    return [str(item) for item in items]


# -- K-FAC hyperparameters ---------------------------------------------------------------


def _label(name: str, step: int | None) -> str:
    return name if step is None else f"{name} at step {step}"


def _check_unit_interval(name: str, value: Any) -> float:
    """A finite real number in ``[0, 1)``."""
    try:
        result = check_real(name, value, at_least=0.0)
    except ValueError:
        result = math.nan
    if not result < 1.0:
        raise ValueError(f"{name} must be a finite real number in [0.0, 1.0), got {value!r}")
    return result


def check_damping(value: Any, step: int | None = None) -> float:
    """A valid damping as a float; ``step`` (if given) is named in the message."""
    return check_real(_label("damping", step), value, above=0.0)


def check_factor_decay(value: Any, step: int | None = None) -> float:
    """A valid factor decay as a float; ``step`` (if given) is named in the message."""
    return _check_unit_interval(_label("factor_decay", step), value)


def check_kl_clip(value: Any, step: int | None = None) -> float:
    """A valid KL-clip constant as a float; ``step`` (if given) is named in the message."""
    return check_real(_label("kl_clip", step), value, above=0.0, alternative=" or None (off)")


def check_momentum(value: Any, step: int | None = None) -> float:
    """A valid momentum as a float; ``step`` (if given) is named in the message."""
    return _check_unit_interval(_label("momentum", step), value)


def _check_schedule(name: str, schedule: Any, check: Callable[[Any], float]) -> Schedule:
    """A callable unchanged, or a number checked by ``check`` and made a Python float."""
    if callable(schedule):
        return schedule
    if not _is_real(_item(schedule)):
        raise ValueError(
            f"{name} must be a real number or a callable of the step, got {schedule!r}"
        )
    return check(schedule)


def _value_at(schedule: Schedule, step: int) -> Any:
    """The raw value of ``schedule`` at ``step``, checked by the caller."""
    return schedule(step) if callable(schedule) else schedule


@dataclass
class KFACOptions:
    """Every K-FAC hyperparameter; see ``KFACCallback`` for their meaning.

    Raises:
        ValueError: naming the argument and the allowed values, for any invalid setting.
    """

    damping: Schedule = 1e-2
    factor_decay: Schedule = 0.95
    factor_update_freq: int = 1
    inv_update_freq: int = 10
    kl_clip: Schedule | None = 1e-3
    damping_method: str = "exact"
    loss_reduction: str = "mean"
    momentum: Schedule | None = None
    factor_dtype: str = "auto"
    staleness: int = 0
    loss_terms: str | float | Callable[[Any], float] = "examples"
    fisher: str = "empirical"
    likelihood: str | Likelihood = "categorical"
    eigenvalue_correction: bool = False

    def __post_init__(self) -> None:
        self.damping = _check_schedule("damping", self.damping, check_damping)
        self.factor_decay = _check_schedule("factor_decay", self.factor_decay, check_factor_decay)
        if self.kl_clip is not None:
            self.kl_clip = _check_schedule("kl_clip", self.kl_clip, check_kl_clip)
        if self.momentum is not None:
            self.momentum = _check_schedule("momentum", self.momentum, check_momentum)
        self.factor_update_freq = check_int_at_least(
            "factor_update_freq", self.factor_update_freq, 1
        )
        self.inv_update_freq = check_int_at_least("inv_update_freq", self.inv_update_freq, 1)
        if self.inv_update_freq % self.factor_update_freq:
            raise ValueError(
                "inv_update_freq must be a multiple of factor_update_freq (so that every "
                f"decomposition sees freshly updated factors), got inv_update_freq="
                f"{self.inv_update_freq} and factor_update_freq={self.factor_update_freq}"
            )
        self.staleness = check_int_at_least("staleness", self.staleness, 0)
        if self.staleness > self.inv_update_freq:
            raise ValueError(
                "staleness must be 0 (synchronous decompositions) or between 1 and "
                f"inv_update_freq={self.inv_update_freq}, got {self.staleness}"
            )
        self.damping_method = check_choice("damping_method", self.damping_method, DAMPING_METHODS)
        self.loss_reduction = check_choice("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        if isinstance(self.factor_dtype, torch.dtype):
            names = {dtype: name for name, dtype in FACTOR_DTYPES.items()}
            self.factor_dtype = names.get(self.factor_dtype, self.factor_dtype)
        self.factor_dtype = check_choice("factor_dtype", self.factor_dtype, FACTOR_DTYPE_CHOICES)
        if isinstance(self.loss_terms, str):
            self.loss_terms = check_choice("loss_terms", self.loss_terms, LOSS_TERMS)
        elif not callable(self.loss_terms):
            self.loss_terms = check_real(
                "loss_terms",
                self.loss_terms,
                above=0.0,
                alternative=f", one of {LOSS_TERMS} or a callable of the batch",
            )
        self.fisher = check_fisher(self.fisher)
        self.likelihood = check_likelihood(self.likelihood)
        self.eigenvalue_correction = check_bool("eigenvalue_correction", self.eigenvalue_correction)
        if self.eigenvalue_correction and self.damping_method != "exact":
            raise ValueError(
                "eigenvalue_correction=True needs damping_method='exact' (EKFAC damps its "
                f"second moments, S + damping; there is no factored form), got "
                f"damping_method={self.damping_method!r}"
            )

    def dtype_for(self, parameter_dtype: torch.dtype) -> torch.dtype:
        """The factor dtype for parameters of ``parameter_dtype``."""
        if self.factor_dtype != "auto":
            return FACTOR_DTYPES[self.factor_dtype]
        return torch.float64 if parameter_dtype == torch.float64 else torch.float32

    def damping_at(self, step: int) -> float:
        return check_damping(_value_at(self.damping, step), step)

    def factor_decay_at(self, step: int) -> float:
        return check_factor_decay(_value_at(self.factor_decay, step), step)

    def kl_clip_at(self, step: int) -> float | None:
        if self.kl_clip is None:
            return None
        return check_kl_clip(_value_at(self.kl_clip, step), step)

    def momentum_at(self, step: int) -> float | None:
        if self.momentum is None:
            return None
        return check_momentum(_value_at(self.momentum, step), step)

    def is_factor_step(self, step: int) -> bool:
        return step % self.factor_update_freq == 0

    def is_inverse_step(self, step: int) -> bool:
        return step % self.inv_update_freq == 0


# -- data-parallel distribution ----------------------------------------------------------


@dataclass
class DataParallelOptions:
    """The options of K-FAC's data-parallel distribution (``KFACDDPStrategy``'s ``kfac_*``).

    Attributes:
        reduce_every_update: reduce the factors over ranks on every factor update instead
            of only on decomposition steps.
        pack_triangular: send only the upper triangle of each symmetric factor.
        precondition_mode: ``"shared"`` (decompositions broadcast, every rank preconditions)
            or ``"owner"`` (each decomposition's owner preconditions and broadcasts).
        bucket_cap_mb: the largest buffer handed to one collective, in MiB.

    Raises:
        ValueError: naming the field (every message starts with it) and what is allowed.
    """

    reduce_every_update: bool = False
    pack_triangular: bool = True
    precondition_mode: str = "shared"
    bucket_cap_mb: float = 25.0

    def __post_init__(self) -> None:
        self.reduce_every_update = check_bool("reduce_every_update", self.reduce_every_update)
        self.pack_triangular = check_bool("pack_triangular", self.pack_triangular)
        self.precondition_mode = check_choice(
            "precondition_mode", self.precondition_mode, PRECONDITION_MODES
        )
        self.bucket_cap_mb = check_real("bucket_cap_mb", self.bucket_cap_mb, above=0.0)


SHARD_PRECONDITIONINGS = ("gather", "block_diagonal", "owner")


@dataclass
class ShardedOptions(DataParallelOptions):
    """The options of K-FAC's sharded distribution (``KFACModelParallelStrategy``'s ``kfac_*``).

    Factors are reduced over the data-parallel ranks as under data parallelism (the
    inherited fields); gradients are sharded by rows.

    Attributes:
        shard_preconditioning: ``"gather"`` (exact: each layer's gradient rows are gathered,
            one shape group at a time, preconditioned whole on every rank, and the local
            rows kept), ``"block_diagonal"`` (no gradient traffic: each rank preconditions
            its rows with the diagonal block of ``G`` for them, an approximation; Kronecker
            layers only, the others are gathered) or ``"owner"`` (exact: each layer's
            decompositions are kept by one rank, which receives the layer's rows, preconditions
            it whole and sends every rank its rows back).

    Raises:
        ValueError: naming the field, and for ``precondition_mode="owner"`` (under sharding
            that is ``shard_preconditioning="owner"``).
    """

    shard_preconditioning: str = "gather"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.shard_preconditioning = check_choice(
            "shard_preconditioning", self.shard_preconditioning, SHARD_PRECONDITIONINGS
        )
        if self.precondition_mode != "shared":
            raise ValueError(
                "precondition_mode must be 'shared' with sharded parameters (for owner "
                "preconditioning use shard_preconditioning='owner'), got "
                f"{self.precondition_mode!r}"
            )


# -- parse-time types for LightningCLI ---------------------------------------------------
#
# ``KFACCallback`` and ``KFACDDPStrategy`` annotate their options with the names below, so
# that LightningCLI (jsonargparse) rejects a bad value while it parses the config, with the
# one-line message the constructor would raise (``damping must be a positive finite number,
# got -0.01``). To type checkers each name is the plain type (float, int, a Literal). At run
# time, with jsonargparse installed, it is a marker class registered with jsonargparse whose
# (de)serialiser is the option's check; without jsonargparse (an optional extra, never
# required) it is the plain type. Rules between options (``inv_update_freq`` a multiple of
# ``factor_update_freq``) are checked by the constructors only.

try:
    from jsonargparse.typing import register_type as _register_type
except ImportError:  # pragma: no cover - jsonargparse is optional
    _register_type = None


def _cli_type(name: str, plain: Any, check: Callable[[Any], Any], parse: type = str) -> Any:
    """``plain`` without jsonargparse; with it, a class registered to be checked by ``check``.

    ``parse`` converts a string (a value given on the command line) before the check.
    """
    if _register_type is None:
        return plain

    def checked(value: Any) -> Any:
        if isinstance(value, str) and parse is not str:
            with contextlib.suppress(ValueError):  # the check names the option then
                value = parse(value)
        return check(value)

    doc = f"``{plain}`` checked when LightningCLI parses a config (see ``lightning_kfac.options``)."
    marker = type(name, (), {"__module__": __name__, "__doc__": doc})
    _register_type(marker, serializer=checked, deserializer=checked)
    return marker


def _loss_terms(value: Any) -> str | float:
    if isinstance(value, str):
        return check_choice("loss_terms", value, LOSS_TERMS)
    alternative = f", one of {LOSS_TERMS} or a callable of the batch"
    return check_real("loss_terms", value, above=0.0, alternative=alternative)


def _metric(value: Any) -> str:
    from lightning_kfac.callback import METRICS  # the callback imports this module

    return check_choice("progress_bar", value, METRICS)


if TYPE_CHECKING:
    Damping: TypeAlias = float
    FactorDecay: TypeAlias = float
    KLClip: TypeAlias = float
    Momentum: TypeAlias = float
    FactorUpdateFreq: TypeAlias = int
    InvUpdateFreq: TypeAlias = int
    Staleness: TypeAlias = int
    LogEveryNSteps: TypeAlias = int
    DampingMethod: TypeAlias = Literal["exact", "factored"]
    LossReduction: TypeAlias = Literal["mean", "sum"]
    FactorDtype: TypeAlias = Literal["auto", "float32", "float64"]
    LossTerms: TypeAlias = Literal["examples", "positions", "elements"] | float
    ProgressBarMetric: TypeAlias = str
    Fisher: TypeAlias = Literal["empirical", "true"]
    LikelihoodName: TypeAlias = Literal["categorical", "gaussian", "bernoulli"]
    PreconditionMode: TypeAlias = Literal["shared", "owner"]
    BucketCapMB: TypeAlias = float
    ShardPreconditioning: TypeAlias = Literal["gather", "block_diagonal", "owner"]
else:
    Damping = _cli_type("Damping", float, check_damping, float)
    FactorDecay = _cli_type("FactorDecay", float, check_factor_decay, float)
    KLClip = _cli_type("KLClip", float, check_kl_clip, float)
    Momentum = _cli_type("Momentum", float, check_momentum, float)
    FactorUpdateFreq = _cli_type(
        "FactorUpdateFreq", int, lambda v: check_int_at_least("factor_update_freq", v, 1), int
    )
    InvUpdateFreq = _cli_type(
        "InvUpdateFreq", int, lambda v: check_int_at_least("inv_update_freq", v, 1), int
    )
    Staleness = _cli_type("Staleness", int, lambda v: check_int_at_least("staleness", v, 0), int)
    LogEveryNSteps = _cli_type(
        "LogEveryNSteps", int, lambda v: check_int_at_least("log_every_n_steps", v, 0), int
    )
    DampingMethod = _cli_type(
        "DampingMethod",
        Literal["exact", "factored"],
        lambda v: check_choice("damping_method", v, DAMPING_METHODS),
    )
    LossReduction = _cli_type(
        "LossReduction",
        Literal["mean", "sum"],
        lambda v: check_choice("loss_reduction", v, LOSS_REDUCTIONS),
    )
    FactorDtype = _cli_type(
        "FactorDtype",
        Literal["auto", "float32", "float64"],
        lambda v: check_choice("factor_dtype", v, FACTOR_DTYPE_CHOICES),
    )
    LossTerms = _cli_type(
        "LossTerms", Literal["examples", "positions", "elements"] | float, _loss_terms, float
    )
    ProgressBarMetric = _cli_type("ProgressBarMetric", str, _metric)
    Fisher = _cli_type("Fisher", Literal["empirical", "true"], check_fisher)
    LikelihoodName = _cli_type(
        "LikelihoodName",
        Literal["categorical", "gaussian", "bernoulli"],
        lambda v: check_choice("likelihood", v, LIKELIHOODS),
    )
    PreconditionMode = _cli_type(
        "PreconditionMode",
        Literal["shared", "owner"],
        lambda v: check_choice("kfac_precondition_mode", v, PRECONDITION_MODES),
    )
    BucketCapMB = _cli_type(
        "BucketCapMB", float, lambda v: check_real("kfac_bucket_cap_mb", v, above=0.0), float
    )
    ShardPreconditioning = _cli_type(
        "ShardPreconditioning",
        Literal["gather", "block_diagonal", "owner"],
        lambda v: check_choice("kfac_shard_preconditioning", v, SHARD_PRECONDITIONINGS),
    )
