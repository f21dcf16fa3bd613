"""Decompositions of curvature factors, with fallbacks that never crash.

A decomposition is a small dataclass of tensors that share a leading *groups* dimension
(``tensors()`` lists them; its block rebuilds it from them), so the distribution can send
any kind over the wire and the engine can stack factors of one shape into one batched call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

#: How many times the added diagonal grows by 100x before a decomposition is given up.
JITTER_ATTEMPTS = 3


@dataclass
class Eigen:
    """``F = vectors diag(values) vectors^T`` per group.

    Attributes:
        vectors: ``(groups, d, d)``, orthonormal columns.
        values: ``(groups, d)``, clipped to be non-negative.
    """

    vectors: Tensor
    values: Tensor

    @property
    def mean_eigenvalue(self) -> Tensor:
        """``tr(F) / d`` per group, ``(groups,)``."""
        return self.values.mean(dim=-1)

    def tensors(self) -> tuple[Tensor, Tensor]:
        """The tensors that make up the decomposition, in wire order."""
        return self.values, self.vectors


class Decomposition(Protocol):
    """Any decomposition: tensors with a common leading groups dimension."""

    def tensors(self) -> tuple[Tensor, ...]: ...


@dataclass
class DecompositionReport:
    """How a decomposition was obtained: ``"ok"``, ``"float64"``, ``"jitter"`` or ``"failed"``."""

    outcome: str
    jitter: float = 0.0


def _eigh(matrix: Tensor) -> Eigen | None:
    try:
        values, vectors = torch.linalg.eigh(matrix)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        return None
    # One host read: a NaN or inf anywhere makes the sum non-finite (eigenvectors are bounded).
    if not torch.isfinite(values.sum() + vectors.sum()):
        return None
    return Eigen(vectors=vectors, values=values.clamp_min(0.0))


def symmetric_eigen(matrix: Tensor, damping: float) -> tuple[Eigen | None, DecompositionReport]:
    """Eigendecomposition of the symmetric ``matrix`` (``(groups, d, d)``).

    Tries the matrix's own dtype, then float64, then float64 with ``delta * I`` added, where
    ``delta = max(damping, 1e-8) * max(mean diagonal, 1)`` grows 100x per attempt. The result
    is in the input dtype; eigenvalues below zero (round-off) are clipped to zero.

    Returns:
        The decomposition (None if every attempt failed) and a report of the path taken.
    """
    dtype = matrix.dtype
    result = _eigh(matrix)
    if result is not None:
        return result, DecompositionReport("ok")
    wide = matrix.double()
    result = _eigh(wide)
    if result is not None:
        return _cast(result, dtype), DecompositionReport("float64")
    scale = max(damping, 1e-8) * max(float(wide.diagonal(dim1=-2, dim2=-1).abs().mean()), 1.0)
    if not torch.isfinite(wide).all():
        return None, DecompositionReport("failed")
    eye = torch.eye(wide.shape[-1], dtype=wide.dtype, device=wide.device)
    for attempt in range(JITTER_ATTEMPTS):
        delta = scale * 100.0**attempt
        result = _eigh(wide + delta * eye)
        if result is not None:
            return _cast(result, dtype), DecompositionReport("jitter", delta)
    return None, DecompositionReport("failed")


def _cast(eigen: Eigen, dtype: torch.dtype) -> Eigen:
    return Eigen(vectors=eigen.vectors.to(dtype), values=eigen.values.to(dtype))


#: One decomposition and how it was obtained.
Outcome = tuple[Decomposition | None, DecompositionReport]


class DecompositionMethod(ABC):
    """How one kind of factor is decomposed.

    Factors with equal ``batch_key`` are decomposed in one call of ``decompose``, stacked
    along their leading groups dimension.
    """

    def batch_key(self, matrix: Tensor) -> Hashable:
        """Factors with the same key may be stacked: by default, same shape past the groups
        dimension, dtype and device."""
        return (type(self), tuple(matrix.shape[1:]), matrix.dtype, matrix.device)

    @abstractmethod
    def decompose(self, matrices: Sequence[Tensor], damping: float) -> list[Outcome]:
        """Decompose each of ``matrices`` (``(groups_i, ...)`` each, one batch key)."""


class SymmetricEigenMethod(DecompositionMethod):
    """``torch.linalg.eigh`` of symmetric factors, batched; on failure each factor falls back
    alone through ``symmetric_eigen`` (float64, then a growing diagonal)."""

    def decompose(self, matrices: Sequence[Tensor], damping: float) -> list[Outcome]:
        if len(matrices) == 1:
            return [symmetric_eigen(matrices[0], damping)]
        eigen = _eigh(torch.cat(list(matrices)))
        if eigen is None:
            return [symmetric_eigen(matrix, damping) for matrix in matrices]
        counts = [matrix.shape[0] for matrix in matrices]
        return [
            (Eigen(vectors=vectors, values=values), DecompositionReport("ok"))
            for values, vectors in zip(eigen.values.split(counts), eigen.vectors.split(counts))
        ]


SYMMETRIC_EIGEN = SymmetricEigenMethod()


def _finite(matrices: Sequence[Tensor]) -> list[bool]:
    """Whether each of ``matrices`` is finite, with one host read."""
    return torch.isfinite(torch.stack([matrix.sum() for matrix in matrices])).tolist()


@dataclass
class Diagonal:
    """``F = diag(values)`` per group: a diagonal factor kept as its diagonal.

    Attributes:
        values: ``(groups, d)``, clipped to be non-negative (the eigenvalues).
    """

    values: Tensor

    @property
    def mean_eigenvalue(self) -> Tensor:
        """``tr(F) / d`` per group, ``(groups,)``."""
        return self.values.mean(dim=-1)

    def tensors(self) -> tuple[Tensor]:
        """The tensors that make up the decomposition, in wire order."""
        return (self.values,)


class DiagonalMethod(DecompositionMethod):
    """Diagonal factors stored as vectors ``(groups, d)``: their entries are the eigenvalues,
    so there is nothing to decompose (a copy, clipped at zero). A non-finite factor fails."""

    def decompose(self, matrices: Sequence[Tensor], damping: float) -> list[Outcome]:
        return [
            (Diagonal(matrix.clamp_min(0.0)), DecompositionReport("ok"))
            if finite
            else (None, DecompositionReport("failed"))
            for matrix, finite in zip(matrices, _finite(matrices))
        ]


DIAGONAL = DiagonalMethod()


@dataclass
class SmallMatrix:
    """A small factor kept as it is, for blocks that invert it in closed form.

    Attributes:
        matrix: ``(groups, d, d)`` (the scale-and-shift blocks' ``2 x 2`` or ``1 x 1``).
    """

    matrix: Tensor

    def tensors(self) -> tuple[Tensor]:
        """The tensors that make up the decomposition, in wire order."""
        return (self.matrix,)


class AsIsMethod(DecompositionMethod):
    """Small factors that the block inverts in closed form: kept as they are (a copy). A
    non-finite factor fails."""

    def decompose(self, matrices: Sequence[Tensor], damping: float) -> list[Outcome]:
        return [
            (SmallMatrix(matrix.clone()), DecompositionReport("ok"))
            if finite
            else (None, DecompositionReport("failed"))
            for matrix, finite in zip(matrices, _finite(matrices))
        ]


AS_IS = AsIsMethod()
