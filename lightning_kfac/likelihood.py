"""Likelihoods for the true (Monte Carlo) Fisher (reference, section 6), in plain PyTorch.

The true Fisher takes the output gradients of the loss evaluated on targets *sampled from the
model's own predictive distribution*, one sample per loss term, through an extra backward
pass over the same forward graph. A likelihood says how to sample the targets from the model
output ``f`` and what the negative log-likelihood of one term is (it must be the training
loss's term, so that the expectation of G is the generalised Gauss-Newton factor):

- ``categorical``: softmax cross-entropy, ``y ~ Categorical(softmax(f))`` over the class
  dimension (the last one; dimension 1 for a convolution's ``(N, C, ...)`` output);
- ``gaussian``: ``MSELoss`` (no 1/2), the negative log-likelihood of ``N(f, 1/2)`` up to a
  constant: ``y = f + eps / sqrt(2)``, ``eps ~ N(0, I)`` (a unit variance would double G);
- ``bernoulli``: ``BCEWithLogitsLoss``, ``y ~ Bernoulli(sigmoid(f))`` per element.

``TrueFisher`` owns the sampling generator (seeded from a seed and the rank, saved and
restored with the checkpoint) and builds the sampled loss ``(1/K) sum of the sampled terms``,
with K the number of terms the training loss averages over, so that the capture's rule
``G = K sum_r g_r g_r^T`` applies unchanged.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

FISHER_TYPES = ("empirical", "true")


class Likelihood(ABC):
    """How targets are sampled from a model output, and their summed negative log-likelihood.

    Attributes:
        name: the option value naming it.
    """

    name: str

    def check(self, output: Tensor, class_dim: int) -> None:
        """Raise ``ValueError`` if ``output`` does not fit this likelihood (default: any)."""
        return None

    @abstractmethod
    def sample(self, output: Tensor, class_dim: int, generator: torch.Generator) -> Tensor:
        """Targets drawn from the predictive distribution at ``output`` (no gradient)."""

    @abstractmethod
    def summed_loss(self, output: Tensor, target: Tensor, class_dim: int) -> Tensor:
        """The sum over terms of the negative log-likelihood (the training loss's terms)."""


class Categorical(Likelihood):
    """Softmax cross-entropy: one term per position, the classes along ``class_dim``."""

    name = "categorical"

    def check(self, output: Tensor, class_dim: int) -> None:
        if output.dim() < 2 or output.shape[class_dim] < 2:
            raise ValueError(
                "K-FAC: fisher='true' with likelihood='categorical' needs a model output with "
                f"a class dimension of at least 2 classes, (N, C) or (N, ..., C); got shape "
                f"{tuple(output.shape)}. Use likelihood='bernoulli' for one logit per example, "
                "'gaussian' for regression, or name the logits' module with fisher_output="
            )

    def sample(self, output: Tensor, class_dim: int, generator: torch.Generator) -> Tensor:
        logits = output.detach().movedim(class_dim, -1)
        probabilities = torch.softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)
        draws = torch.multinomial(probabilities, 1, generator=generator)
        return draws.reshape(logits.shape[:-1])

    def summed_loss(self, output: Tensor, target: Tensor, class_dim: int) -> Tensor:
        logits = output.movedim(class_dim, -1)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        )


class Gaussian(Likelihood):
    """``MSELoss`` (squared error, no 1/2): ``y = f + eps / sqrt(2)``, one term per element."""

    name = "gaussian"

    def sample(self, output: Tensor, class_dim: int, generator: torch.Generator) -> Tensor:
        f = output.detach()
        noise = torch.randn(f.shape, generator=generator, device=f.device, dtype=torch.float32)
        return f + (noise / math.sqrt(2.0)).to(f.dtype)

    def summed_loss(self, output: Tensor, target: Tensor, class_dim: int) -> Tensor:
        return F.mse_loss(output, target, reduction="sum")


class Bernoulli(Likelihood):
    """``BCEWithLogitsLoss``: ``y ~ Bernoulli(sigmoid(f))``, one term per element."""

    name = "bernoulli"

    def sample(self, output: Tensor, class_dim: int, generator: torch.Generator) -> Tensor:
        probabilities = torch.sigmoid(output.detach().float())
        return torch.bernoulli(probabilities, generator=generator).to(output.dtype)

    def summed_loss(self, output: Tensor, target: Tensor, class_dim: int) -> Tensor:
        return F.binary_cross_entropy_with_logits(output, target, reduction="sum")


#: The likelihoods by option value.
LIKELIHOODS: dict[str, type[Likelihood]] = {
    cls.name: cls for cls in (Categorical, Gaussian, Bernoulli)
}


def check_fisher(value: Any) -> str:
    """``value`` as one of ``FISHER_TYPES``; a bool is read as ``"true"``/``"empirical"``
    (YAML reads an unquoted ``fisher: true`` as a bool).

    Raises:
        ValueError: naming the allowed values.
    """
    if isinstance(value, bool):
        return "true" if value else "empirical"
    if not isinstance(value, str) or value not in FISHER_TYPES:
        raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {value!r}")
    return str(value)


def check_likelihood(value: Any) -> str | Likelihood:
    """``value`` as a likelihood name (one of ``LIKELIHOODS``) or a ``Likelihood`` instance.

    Raises:
        ValueError: naming the allowed values.
    """
    if isinstance(value, Likelihood):
        return value
    if isinstance(value, str) and value in LIKELIHOODS:
        return value
    raise ValueError(
        f"likelihood must be one of {tuple(LIKELIHOODS)} or a Likelihood instance, got {value!r}"
    )


def make_likelihood(value: str | Likelihood) -> Likelihood:
    """The likelihood named by ``value`` (an instance passes through)."""
    return value if isinstance(value, Likelihood) else LIKELIHOODS[value]()


def generator_seed(seed: int, rank: int) -> int:
    """The sampling generator's seed on ``rank``: distinct per rank, fixed by ``seed``."""
    return (int(seed) * 1_000_003 + 7919 * int(rank) + 12_345) % (2**63 - 1)


class TrueFisher:
    """Samples targets and builds the sampled loss for the true Fisher.

    Args:
        likelihood: the likelihood (a name from ``LIKELIHOODS`` or an instance).
        seed: the run's seed (Lightning's ``seed_everything`` seed, 0 if none).
        rank: this process's rank (each rank draws its own samples).
    """

    def __init__(self, likelihood: str | Likelihood, seed: int = 0, rank: int = 0) -> None:
        self.likelihood = make_likelihood(likelihood)
        self.seed = generator_seed(seed, rank)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._saved: dict[str, Tensor] | None = None
        #: Factor batches whose sample was non-finite (they are skipped).
        self.non_finite = 0

    def generator(self, device: torch.device) -> torch.Generator:
        """The generator for ``device`` (created, or restored from a checkpoint, on first use)."""
        key = torch.device(device)
        generator = self._generators.get(key)
        if generator is None:
            generator = torch.Generator(device=key)
            generator.manual_seed(self.seed)
            saved = (self._saved or {}).get(str(key))
            if saved is not None:
                generator.set_state(saved)
            self._generators[key] = generator
        return generator

    def sampled_loss(self, output: Tensor, terms: float, class_dim: int = -1) -> Tensor:
        """``(1/K) sum`` of the sampled terms' negative log-likelihoods at ``output``.

        A non-finite ``output`` gives a NaN loss without sampling: its gradients poison the
        factor batch, which the engine then skips on every rank.

        Raises:
            ValueError: if ``output``'s shape does not fit the likelihood.
        """
        self.likelihood.check(output, class_dim)
        if not bool(torch.isfinite(output.detach()).all()):
            self.non_finite += 1
            return output.sum() * math.nan
        target = self.likelihood.sample(output, class_dim, self.generator(output.device))
        loss = self.likelihood.summed_loss(output, target, class_dim)
        return loss / terms if terms != 1.0 else loss

    def state_dict(self) -> dict[str, Any]:
        """The generators' states by device (tensors and strings only)."""
        states = dict(self._saved or {})
        states.update({str(d): g.get_state() for d, g in self._generators.items()})
        return {"seed": self.seed, "generators": states, "non_finite": self.non_finite}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self._saved = {k: v.cpu() for k, v in state["generators"].items()}
        self._generators = {}
        self.non_finite = int(state.get("non_finite", 0))
